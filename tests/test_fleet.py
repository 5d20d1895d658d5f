"""The fleet on real nats-server processes: publishing with acks, reading back, the CLI.

Every test starts its own JetStream server(s) on free loopback ports with data
in a temporary directory (tests/support/nats.py); nothing here mocks NATS.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator

import pytest
import trio
from conftest import PYMAP, require
from support import procs
from support.nats import free_port, nats_problem, nats_server

from consumers.export.checkpoint import Checkpoint
from consumers.export.delivery import Delivery
from consumers.export.grouping import Grouping
from consumers.export.outputs.base import Output
from consumers.export.record import ExportRecord, event_id
from consumers.fleet.jetstream import FleetError, FleetUnavailable
from consumers.fleet.options import FleetConfigError, parse_duration, parse_url
from consumers.fleet.publish import FleetPublisher
from consumers.fleet.subjects import filter_subjects, parse_msg_id, subject, token
from consumers.fleet.subscribe import FleetSubscription


@pytest.fixture
def nats():
    require(nats_problem())
    with nats_server() as server:
        yield server


def records(node: str, epoch: str, n: int, map_name: str = "m1", start: int = 1,
            action: str = "added") -> list[ExportRecord]:
    return [ExportRecord(node, epoch, seq, map_name, action, time.time(),
                         json.dumps({"seq": seq, "time": "2026-01-01T00:00:00Z",
                                     "map": {"id": 1, "name": map_name}, "action": action,
                                     "key": f"{seq:08x}", "value": "00"}).encode())
            for seq in range(start, start + n)]


async def read_all(url: str, **kw) -> list:
    async with FleetSubscription(parse_url(url), follow=False, **kw) as sub:
        return [m async for m in sub]


@contextlib.contextmanager
def fleet_follower(url: str, *args: str) -> Iterator[subprocess.Popen]:
    """``pymap events m1 --fleet URL -f -o json ARGS`` with pipes, stopped at the end if
    it still runs (a test that failed half-way)."""
    proc = subprocess.Popen([PYMAP, "events", "m1", "--fleet", url, "-f", "-o", "json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        procs.stop(proc, 5, proc.stdout, proc.stderr)


# --- options and subjects (no server) ------------------------------------------------


def test_url_options():
    o = parse_url("nats://a:4222,b,c:4333?stream=S&prefix=x.y&max_age=2h&max_bytes=1GiB"
                  "&duplicate_window=5m&creds=/c&create=false")
    assert o.servers == ("nats://a:4222", "nats://b:4222", "nats://c:4333")
    assert (o.stream, o.prefix, o.max_age, o.max_bytes, o.duplicate_window, o.creds,
            o.create_stream, o.replicas) == ("S", "x.y", 7200, 2**30, 300, "/c", False, 3)
    assert parse_url("nats://a").replicas == 1
    assert parse_url("tls://u:p@a,b").servers == ("tls://u:p@a:4222", "tls://u:p@b:4222")
    assert parse_url("tls://a").tls_required
    assert parse_duration("1h30m") == 5400
    for bad in ("http://a", "nats://", "nats://a?bogus=1", "nats://a?max_age=soon",
                "nats://a?replicas=7", "nats://a?prefix=a.*"):
        with pytest.raises(FleetConfigError):
            parse_url(bad)


def test_subjects_are_safe_tokens():
    assert token("a.b c*>") == "a_b_c__"
    assert subject("pymap", "node.1", "cilium_lxc", "added") == "pymap.node_1.cilium_lxc.added"
    assert filter_subjects("pymap", "web-*", "cilium_lxc") == ["pymap.*.cilium_lxc.*",
                                                               "pymap.*._.*"]
    assert filter_subjects("pymap", "n1", "cilium_*") == ["pymap.n1.*.*"]
    assert parse_msg_id("node.1", event_id("node.1", "e9", 42)) == ("e9", 42)
    # records the exporter made: what they cover instead of a seq, read back as seq 0
    assert parse_msg_id("n", event_id("n", "e9", 0, "resync.m1.7")) == ("e9", 0)
    assert parse_msg_id("n", event_id("n", "e9", 0, "dropped.5-9")) == ("e9", 0)


# --- one server ----------------------------------------------------------------------


def test_publish_ack_and_read_back(nats):
    """Events published with acks are read back, headers intact, by a second client."""
    url = nats.url + "?stream=T1"

    async def main():
        async with FleetPublisher(parse_url(url)) as pub:
            a = await pub.publish(records("node-a", "e1", 300))
            b = await pub.publish(records("node.b", "e1", 200, map_name="m2"))
        assert (a.stored, a.duplicates, b.stored) == (300, 0, 200)
        got = await read_all(url)
        assert len(got) == 500
        assert {(m.node, m.map) for m in got} == {("node-a", "m1"), ("node.b", "m2")}
        assert [m.seq for m in got if m.node == "node-a"] == list(range(1, 301))
        assert all(m.epoch == "e1" and m.action == "added" for m in got)
        only_b = await read_all(url, node_glob="node.*")
        assert {m.node for m in only_b} == {"node.b"} and len(only_b) == 200
        only_m1 = await read_all(url, maps=["m1"])
        assert len(only_m1) == 300
        # --since: an hour ago covers everything; replay from "now" gives nothing
        assert len(await read_all(url, since=3600.0)) == 500
        assert await read_all(url, since=0.0) == []

    trio.run(main)


def test_resend_is_deduplicated(nats):
    """The same (node, epoch, seq) published twice is stored once: JetStream's msg-id dedup."""
    url = nats.url + "?stream=T2"

    async def main():
        async with FleetPublisher(parse_url(url)) as pub:
            first = await pub.publish(records("n", "e1", 100))
        async with FleetPublisher(parse_url(url)) as pub:  # a restarted exporter re-sends
            again = await pub.publish(records("n", "e1", 150))
        assert (first.stored, again.stored, again.duplicates) == (100, 50, 100)
        got = await read_all(url)
        assert sorted(m.seq for m in got) == list(range(1, 151))

    trio.run(main)


def test_durable_consumer_resumes_and_acks(nats):
    """A durable consumer sees each message once across reader restarts (acks persist)."""
    url = nats.url + "?stream=T3"

    async def main():
        async with FleetPublisher(parse_url(url)) as pub:
            await pub.publish(records("n", "e1", 50))
            assert len(await read_all(url, durable="siem")) == 50
            await pub.publish(records("n", "e1", 30, start=51))
        later = await read_all(url, durable="siem")
        assert [m.seq for m in later] == list(range(51, 81))

    trio.run(main)


def test_existing_stream_required_when_create_is_off(nats):
    async def main():
        with pytest.raises(FleetError, match="does not exist"):
            async with FleetPublisher(parse_url(nats.url + "?stream=NOPE&create=false")):
                pass

    trio.run(main)


def test_unreachable_broker_is_one_clear_error():
    url = f"nats://127.0.0.1:{free_port()}?connect_timeout=2"

    async def main():
        with pytest.raises(FleetUnavailable, match="cannot reach NATS"):
            async with FleetPublisher(parse_url(url)):
                pass

    trio.run(main)
    r = subprocess.run([PYMAP, "events", "m1", "--fleet", url], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("pymap: error: cannot reach NATS") and "Traceback" not in r.stderr


# --- the CLI ---------------------------------------------------------------------------


def test_cli_events_fleet(nats):
    """``pymap events SEL --fleet URL``: every node's lines, with the node named."""
    url = nats.url + "?stream=T4"

    async def publish():
        async with FleetPublisher(parse_url(url)) as pub:
            for node in ("n1", "n2", "web-3"):
                await pub.publish(records(node, "e1", 5))
            await pub.publish(records("n1", "e1", 5, map_name="other"))

    trio.run(publish)
    r = subprocess.run([PYMAP, "events", "m1", "--fleet", url, "-o", "json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # closing its own connection is no disconnect to report
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 15
    assert {x["node"] for x in lines} == {"n1", "n2", "web-3"}
    assert all(x["map"]["name"] == "m1" and x["action"] == "added" for x in lines)

    r = subprocess.run([PYMAP, "events", "m1", "--fleet", url, "--node", "web-*"],
                       capture_output=True, text=True, timeout=60, env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 5
    assert all(line.startswith("web-3 ") and " m1 " in line and "added" in line
               for line in r.stdout.splitlines())

    # -f starts with new events: publish after the follower is up, it prints them
    with fleet_follower(url, "-c", "3") as follower:
        async def publish_later():
            async with FleetPublisher(parse_url(url)) as pub:
                deadline = time.monotonic() + 30
                seq = 100
                while follower.poll() is None and time.monotonic() < deadline:
                    await pub.publish(records("late", "e2", 1, start=seq))
                    seq += 1
                    await trio.sleep(0.3)

        trio.run(publish_later)
        out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    assert [json.loads(x)["node"] for x in out.splitlines()] == ["late"] * 3


def test_cli_fleet_bad_input():
    for args, msg in ((["--fleet", "http://x"], "nats://"),
                      (["--fleet", "nats://x", "--since", "soon"], "duration"),
                      (["--node", "n*"], "--fleet")):
        r = subprocess.run([PYMAP, "events", "m1", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


# --- a 3-node cluster, stream with 3 replicas ----------------------------------------------


def stream_leader(url: str, stream: str) -> str | None:
    """The server name leading ``stream`` (asked with nats-py directly, as an oracle)."""
    import asyncio

    import nats

    async def ask() -> str | None:
        nc = await nats.connect(list(parse_url(url).servers))
        try:
            info = await nc.jetstream().stream_info(stream)
            return info.cluster.leader if info.cluster else ""
        finally:
            await nc.close()

    return asyncio.run(ask())


@pytest.mark.parametrize("batch", [1, 256])
def test_cluster_member_restart_loses_nothing(batch):
    """R3 stream; the stream's leader is stopped mid-stream and started again.  Batches
    that fail are re-sent as they are (as the delivery layer does); afterwards every
    (node, epoch, seq) is in the stream exactly once (one event or 256 per message)."""
    from support.nats import nats_cluster

    require(nats_problem())
    with nats_cluster(3) as cluster:
        url = cluster.url + f"?stream=R3&ack_timeout=5&batch={batch}"
        opts = parse_url(url)
        assert opts.replicas == 3
        batches = [records("n", "e1", 200, start=1 + 200 * i) for i in range(30)]
        resent = 0

        async def publish_all(stop_at: int, start_at: int, member) -> None:
            nonlocal resent
            async with FleetPublisher(opts) as pub:
                for i, batch in enumerate(batches):
                    if i == stop_at:
                        member.stop()
                    if i == start_at:
                        member.start()
                    while True:
                        try:
                            await pub.publish(batch)
                            break
                        except FleetUnavailable:
                            resent += 1
                            await trio.sleep(0.5)

        async def first_batch() -> None:
            async with FleetPublisher(opts) as pub:
                await pub.publish(batches[0])

        trio.run(first_batch)
        leader = stream_leader(url, "R3")
        member = next(s for s in cluster.servers if s.name == leader)
        trio.run(publish_all, 10, 20, member)
        got = trio.run(read_all, url)
        assert all(m.node == "n" for m in got)
        seqs = [m.seq for m in got]
        print(f"leader {leader} stopped and restarted; batches re-sent: {resent}")
        assert len(seqs) == len(set(seqs)) == 30 * 200, (len(seqs), len(set(seqs)), resent)
        assert sorted(seqs) == list(range(1, 30 * 200 + 1))
        # the restarted member caught up: reading from it alone gives the same
        alone = trio.run(read_all, member.url + "?stream=R3")
        assert sorted(m.seq for m in alone) == sorted(seqs)


# --- security: TLS and nkey as nats-server does them -------------------------------------


def test_tls_and_nkey_login(tmp_path):
    """A server that requires TLS and an nkey user: the URL's tls_ca and nkey get in;
    without the nkey the server refuses, without the CA the certificate is refused."""
    import os

    import nkeys
    import trustme

    require(nats_problem())
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_pem, cert_pem, key_pem = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(ca_pem)
    cert.cert_chain_pems[0].write_to_path(cert_pem)
    cert.private_key_pem.write_to_path(key_pem)
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    seed_file.chmod(0o600)
    conf = tmp_path / "auth.conf"
    conf.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    extra = ["-c", str(conf), "--tls", "--tlscert", str(cert_pem), "--tlskey", str(key_pem)]
    with nats_server(extra) as server:
        base = server.url + "?stream=SEC&connect_timeout=2"

        async def main():
            async with FleetPublisher(parse_url(f"{base}&tls_ca={ca_pem}&nkey={seed_file}")) as p:
                assert (await p.publish(records("n", "e1", 10))).stored == 10
            got = await read_all(f"{base}&tls_ca={ca_pem}&nkey={seed_file}")
            assert len(got) == 10
            with pytest.raises((FleetUnavailable, FleetError)):
                async with FleetPublisher(parse_url(f"{base}&tls_ca={ca_pem}")):
                    pass  # no nkey: authorization violation
            with pytest.raises((FleetUnavailable, FleetError)):
                async with FleetPublisher(parse_url(f"{base}&nkey={seed_file}&tls_ca=/etc/ssl/"
                                                    "certs/ca-certificates.crt")):
                    pass  # a CA that did not sign the server's certificate

        trio.run(main)


def test_follower_holds_on_across_a_broker_restart(nats):
    """``pymap events --fleet -f`` says the connection dropped, and prints what is
    published after the server is back (like tail -F), without exiting."""
    url = nats.url + "?stream=T5"

    async def publish(start: int, n: int) -> None:
        async with FleetPublisher(parse_url(url)) as pub:
            await pub.publish(records("n", "e1", n, start=start))

    trio.run(publish, 1, 1)
    with fleet_follower(url, "--since", "1h", "-c", "6") as follower:
        trio.run(publish, 2, 2)
        assert follower.stdout is not None
        first = [follower.stdout.readline() for _ in range(3)]  # it is following
        nats.stop()
        nats.start()
        deadline = time.monotonic() + 60
        seq = 4
        while follower.poll() is None and time.monotonic() < deadline:
            try:
                trio.run(publish, seq, 1)
                seq += 1
            except FleetUnavailable:
                pass
            time.sleep(1)
        out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    lines = first + out.splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert "disconnected from NATS" in err and "Traceback" not in err


# --- batched messages (batch=N) ------------------------------------------------------


def test_batch_option():
    assert parse_url("nats://a?batch=256&linger=0.2").batch == 256
    assert parse_url("nats://a?batch=256&linger=0.2").linger == 0.2
    assert parse_url("nats://a").batch == 1
    for bad in ("nats://a?batch=0", "nats://a?batch=1001", "nats://a?batch=many",
                "nats://a?linger=10s", "nats://a?linger=50ms"):
        with pytest.raises(FleetConfigError):
            parse_url(bad)


def test_batch_in_an_exports_table(tmp_path):
    """``batch``/``linger`` as ``[[exports]]`` keys reach the nats output, validated."""
    from consumers.export.config import load
    from consumers.export.outputs import OutputConfigError, make_output

    conf = tmp_path / "export.toml"
    conf.write_text("[[exports]]\nname='f'\nmaps=['m']\nto='nats://127.0.0.1:4222'\n"
                    "batch=256\nlinger='0.2s'\n")
    (spec,) = load(str(conf))
    out = make_output(spec.to, spec.options)
    assert out.grouping is not None and (out.grouping.size, out.grouping.linger) == (256, 0.2)
    assert make_output("nats://127.0.0.1:4222", {}).grouping is None  # default: 1 per event
    with pytest.raises(OutputConfigError, match="batch=5000"):
        make_output(spec.to, {"batch": 5000})


def mixed_records(n: int) -> list[ExportRecord]:
    """Daemon events as an exporter sees them: runs of one map and action, other maps
    in between, seqs missing (filtered), a newline payload, an exporter-made record."""
    out = []
    for seq in range(1, n + 1):
        if seq % 997 in (5, 6):
            continue  # not selected: a gap
        map_name = "m2" if seq % 1000 > 980 else "m1"
        action = "updated" if seq % 700 < 10 else "added"
        payload = b"two\nlines" if seq == 77 else b'{"seq":%d}' % seq
        out.append(ExportRecord("n", "e1", seq, map_name, action, 1.0, payload))
        if seq == 500:
            out.append(ExportRecord("n", "e1", 0, "", "resync", 1.0, b'{"action":"resync"}',
                                    "resync"))
    return out


class Recorder(Output):
    """An Output that keeps the messages its grouping cuts (to test the delivery layer)."""

    def __init__(self, size: int, linger: float):
        super().__init__("rec://")
        self.grouping = Grouping(size, linger)
        self.messages: list[tuple[int, int]] = []

    async def open(self) -> None:
        pass

    async def send(self, batch) -> None:
        assert self.grouping is not None
        self.messages += [(m[0].seq, m[-1].seq) for m in self.grouping.split(batch)]

    async def aclose(self) -> None:
        pass


class CutLog(Checkpoint):
    """A checkpoint that also remembers every cut it was told of (pruned or not)."""

    def __init__(self, path):
        super().__init__(path)
        self.log: list[tuple[str, int]] = []

    def cut(self, epoch: str, seq: int) -> None:
        self.log.append((epoch, seq))
        super().cut(epoch, seq)


async def deliver(records, chunks, pauses, linger, state=None, after=0):
    """Records through the real delivery layer into a Recorder: the messages cut."""
    out = Recorder(256, linger)
    cp = CutLog(state)
    if state:
        cp.load()
    d = Delivery(out, lambda gap: None, cp, batch_bytes=4096)  # type: ignore[arg-type,return-value]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d.run)
        for k, pause in zip(chunks, pauses, strict=True):
            chunk, records = records[:k], records[k:]
            d.put_many([r for r in chunk if r.seq == 0 or r.seq > after])
            await trio.sleep(pause)
        await d.close()
    return out.messages, cp.log


def test_message_boundaries_do_not_depend_on_delivery(tmp_path):
    """The same records put all at once, or in random chunks: the same messages.  With
    pauses longer than the linger, messages are cut where the stream paused; an exporter
    restarted from an older checkpoint (holding the cuts written since, as a SIGKILLed
    one's state file does) cuts its re-sends exactly as the first run cut them."""
    import random

    records = mixed_records(2000)
    whole, _ = trio.run(deliver, records, [len(records)], [0], 5.0)
    assert sum(b - a + 1 for a, b in whole if a) == len(records) - 1  # each event once
    assert (0, 0) in whole  # the exporter's own record goes alone
    assert max(b - a + 1 for a, b in whole) == 256
    assert all(b < (a // 256 + 1) * 256 for a, b in whole if a), "a message crossed k*256"
    rng = random.Random(9)
    chunks: list[int] = []
    while sum(chunks) < len(records):
        chunks.append(rng.randint(1, 300))
    fast, _ = trio.run(deliver, records, chunks, [0.001] * len(chunks), 5.0)
    assert fast == whole, "delivery batches changed the message boundaries"

    state = tmp_path / "state"
    pauses = [0.15 if j % 3 == 0 else 0.0 for j in range(len(chunks))]
    paused, cuts = trio.run(deliver, records, chunks, pauses, 0.05, str(state))
    assert cuts and paused != whole
    for back in (paused[5][1], paused[len(paused) // 2][1], paused[-3][1]):
        # SIGKILLed with the checkpoint at `back` (written at most every 0.5 s), and
        # every cut made since in the state file (each is written before its message)
        state.write_bytes(json.dumps({"epoch": "e1", "seq": back,
                                      "cuts": [c for c in cuts if c[1] > back]}).encode())
        again, _ = trio.run(deliver, records, [len(records)], [0], 5.0, str(state), back)
        assert again == [m for m in paused if m[0] == 0 or m[0] > back], back


def fleet_json(url: str, *args: str) -> tuple[list[dict], str]:
    r = subprocess.run([PYMAP, "events", "m*", "--fleet", url, "-o", "json", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()], r.stderr


def test_batched_messages_read_back_like_single_events(nats):
    """The same records published one message per event and batch=256: fewer messages,
    and ``pymap events --fleet -o json`` prints the same events, each naming its node."""
    import asyncio

    import nats as nats_py

    recs = mixed_records(2000) + records("node.b", "e2", 300, map_name="m3")
    single = nats.url + "?stream=SINGLE&prefix=one"
    batched = nats.url + "?stream=BATCHED&prefix=many&batch=256"

    async def publish():
        for url in (single, batched):
            async with FleetPublisher(parse_url(url)) as pub:
                r = await pub.publish(recs)
                assert (r.stored, r.duplicates) == (len(recs), 0)
        return r.messages

    messages = trio.run(publish)

    async def stored(stream: str) -> int:
        nc = await nats_py.connect(nats.url)
        try:
            return (await nc.jetstream().stream_info(stream)).state.messages
        finally:
            await nc.close()

    assert asyncio.run(stored("SINGLE")) == len(recs)
    assert asyncio.run(stored("BATCHED")) == messages < len(recs) // 10
    one, _ = fleet_json(single)
    many, _ = fleet_json(batched)
    key = lambda x: (x["node"], x.get("epoch", ""), x["seq"], x.get("payload", ""))  # noqa: E731
    assert sorted(many, key=key) == sorted(one, key=key)
    assert len(one) == len(recs) and {x["node"] for x in many} == {"n", "node.b"}
    # a batched message's events carry their own seq, map and action
    got = trio.run(read_all, batched)
    assert [(m.seq, m.map, m.action) for m in got if m.node == "n"] == \
        [(r.seq, r.map, r.action) for r in recs if r.node == "n"]


def test_reader_drops_events_stored_twice(nats):
    """A re-send cut differently (another id: JetStream stores it again) or sent after the
    duplicate window: the reader drops the events it has seen, counts and says so."""
    url = nats.url + "?stream=TWICE"

    async def publish():
        async with FleetPublisher(parse_url(url + "&batch=256")) as pub:
            await pub.publish(records("n", "e1", 300))  # 1-255, 256-300
        async with FleetPublisher(parse_url(url + "&batch=20")) as pub:
            r = await pub.publish(records("n", "e1", 60, start=281))  # 281-299, 300-319, ...
        assert r.duplicates == 0  # other ids: JetStream cannot tell
        async with FleetPublisher(parse_url(url)) as pub:
            await pub.publish(records("n", "e1", 5, start=250))  # single events again

    trio.run(publish)

    async def read():
        async with FleetSubscription(parse_url(url), follow=False) as sub:
            return [m.seq async for m in sub], sub.duplicates

    seqs, dups = trio.run(read)
    assert seqs == list(range(1, 341)) and dups == 20 + 5
    lines, err = fleet_json(url)
    assert [x["seq"] for x in lines] == list(range(1, 341))
    assert "25 duplicate event(s) dropped" in err
