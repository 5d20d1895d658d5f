"""The stream's protocol edges: gaps (end to end and unit), malformed subscriptions and
requests, heartbeats, a daemon that dies under its subscribers, subscription bookkeeping."""

from __future__ import annotations

import contextlib
import json
import time
from typing import ClassVar

import pytest
import trio
import zmq
from support.events import (
    DEADLINE,
    FAST,
    Follower,
    LibFollower,
    async_status,
    await_ready,
    cli_status,
    replay_events,
    status,
    topic_key,
    wait_ready,
    wait_until,
)
from support.kernel import bpftool_entries, fill_batch, one_error_line, pattern, token, u32

from consumers.client import Client, DaemonUnavailable
from consumers.subscriber import EventStream
from watcher.kernel.sys import syscall
from watcher.wire import schema

# --- gaps, end to end ------------------------------------------------------------------


class TinyBufferStream(EventStream):
    """An EventStream whose SUB socket buffers one message: a subscriber that falls
    behind loses messages at once instead of after 100k."""

    SOCKET_OPTIONS: ClassVar[dict[int, int]] = {zmq.RCVHWM: 1, zmq.RCVBUF: 4096}


def _check_exact_losses(events: list, final_tseq: int) -> None:
    """Every ``lost`` event counts exactly the topic_seq numbers that never arrived."""
    prev = 0
    pending = None
    for e in events:
        if e.action == "lost":
            assert pending is None, "two lost events for one hole"
            pending = e.missed
            continue
        assert e.topic_seq == prev + 1 + (pending or 0), (e, prev, pending)
        prev, pending = e.topic_seq, None
    assert prev + (pending or 0) == final_tseq


@pytest.mark.kernel
async def test_gap_end_to_end(daemon_factory, maps, bpffs_dir, tmp_path):
    conf = tmp_path / "pymap.toml"
    conf.write_text("[daemon]\nstream_hwm = 1\n")
    d = daemon_factory(*FAST, "--config", str(conf))
    name = f"ev{token()}_g"
    fd, map_id = maps.create("hash", 4, 1024, 256, name=name, pin=bpffs_dir / name)
    keys = [u32(i) for i in range(100)]
    fill_batch(fd, keys, [pattern(i, 1024) for i in range(100)])
    plain = LibFollower(d.endpoint, [name], heartbeat_timeout=60, stream_class=TinyBufferStream)
    synced = LibFollower(d.endpoint, [name], snapshot=True, heartbeat_timeout=60,
                         stream_class=TinyBufferStream)
    async with Client(d.endpoint) as client, trio.open_nursery() as nursery:
        await nursery.start(plain.run)
        await nursery.start(synced.run)
        await await_ready(client, name, 2)
        await synced.await_count(100, "the start snapshot")
        syscall.map_update_elem(fd, u32(0), pattern(10**6, 1024))  # warm-up: both are live
        await plain.await_count(1)
        await synced.await_count(101)
        plain.pause()
        synced.pause()
        published = (await async_status(client))["events_published"]
        for r in range(1, 13):  # each round: 100 updates of 1 KiB values, one big message
            fill_batch(fd, keys, [pattern(r * 1000 + i, 1024) for i in range(100)])
            published += 100
            while (await async_status(client))["events_published"] < published:
                await trio.sleep(0.05)
        plain.unpause()
        synced.unpause()

        final_tseq = published  # this map's only events: topic_seq == events published

        def plain_done(evs):
            got = sum(1 for e in evs if e.key is not None)
            return got + sum(e.missed for e in evs if e.action == "lost") >= final_tseq

        await plain.await_count(0, "the plain subscriber to account for every event",
                                pred=plain_done)
        lost_plain = [e.missed for e in plain.events if e.action == "lost"]
        assert lost_plain, "no gap: the test did not make the subscriber fall behind"
        _check_exact_losses(plain.events, final_tseq)
        assert plain.stream is not None
        assert plain.stream.lost == sum(lost_plain)

        truth = bpftool_entries(map_id)
        await synced.await_count(0, "the snapshot subscriber to resync to the map",
                                 pred=lambda evs: replay_events(evs) == truth)
        actions = [e.action for e in synced.events]
        assert "lost" in actions
        i = actions.index("lost")
        assert actions[i + 1] == "resync" and synced.events[i + 1].reason == "gap"
        assert all(e.snapshot and e.reason == "gap" for e in synced.events[i + 2:]
                   if e.action in ("added", "updated", "removed") and e.seq == 0)
        lost_synced = sum(e.missed for e in synced.events if e.action == "lost")

        st = await trio.to_thread.run_sync(cli_status, d)  # as `pymap status -o json` shows
        assert st["drops_reported"] == sum(lost_plain) + lost_synced > 0
        assert st["resyncs"] >= 1
        nursery.cancel_scope.cancel()
    assert plain.error is None and synced.error is None


# --- gaps, unit level ------------------------------------------------------------------


class FakeDump:
    def __init__(self, info: schema.MapInfo, seq: int, entries: dict[bytes, bytes]):
        self.map, self.seq, self.epoch, self._entries = info, seq, "e1", entries

    async def chunks(self):
        from consumers.client import ReplyChunk

        yield ReplyChunk(b"".join(self._entries), b"".join(self._entries.values()),
                    len(self._entries))


class FakeClient:
    """What EventStream needs of a Client, scripted."""

    def __init__(self):
        self.gaps: list[tuple[str, int]] = []
        self.snapshots: list[tuple[int, dict[bytes, bytes]]] = []  # served in order
        self.gets: list[tuple[str, str]] = []
        self.info = schema.MapInfo(id=7, name="m", type="hash", key_size=4, value_size=4,
                                   max_entries=16, flags=0, value_stride=4)

    async def report_gap(self, name: str, missed: int) -> None:
        self.gaps.append((name, missed))

    async def list_maps(self, pattern=None, entries=True):
        return [self.info]

    @contextlib.asynccontextmanager
    async def get(self, selector, snapshot=False, entries=True, reason=""):
        self.gets.append((selector, reason))
        seq, entries_ = self.snapshots.pop(0)
        yield FakeDump(self.info, seq, entries_)


def k(n: int) -> bytes:
    return n.to_bytes(4, "little")


def batch(tseq: int, changes: list[tuple[int, int, int, int]], epoch: str = "e1",
          name: str = "m"):
    """An events message: changes are (action, key, value, old value) as small ints."""
    header = schema.EventBatch(epoch=epoch, seq=100 + tseq, count=len(changes), topic_seq=tseq,
                               time=1.0, map=schema.MapRef(7, name), key_size=4, value_stride=4)
    frames = [bytes(c[0] for c in changes), b"".join(k(c[1]) for c in changes),
              b"".join(k(c[2]) for c in changes), b"".join(k(c[3]) for c in changes)]
    return header, frames


def beat(topics: dict[str, int], epoch: str = "e1"):
    return schema.Heartbeat(epoch=epoch, seq=0, time=1.0, interval=1.0, topics=topics), []


async def test_gap_unit_without_snapshot():
    client = FakeClient()
    stream = EventStream(client, ["m"])  # type: ignore[arg-type]
    out = await stream._handle(*beat({"m": 0, "other": 50}))  # noqa: SLF001 (handler unit test)
    assert out == []
    out = await stream._handle(*batch(1, [(0, 1, 10, 0), (0, 2, 20, 0)]))  # noqa: SLF001 (handler unit test)
    assert [(e.action, e.topic_seq, e.key) for e in out] == [("added", 1, k(1)), ("added", 2, k(2))]
    # topic_seq 3..5 never arrive
    out = await stream._handle(*batch(6, [(1, 1, 11, 10)]))  # noqa: SLF001 (handler unit test)
    assert [e.action for e in out] == ["lost", "updated"]
    assert out[0].missed == 3 and out[1].topic_seq == 6 and out[1].old_value == k(10)
    assert client.gaps == [("m", 3)]
    # A repeat of what was seen is not new.
    assert await stream._handle(*batch(6, [(1, 1, 11, 10)])) == []  # noqa: SLF001 (handler unit test)
    # A heartbeat says the topic is at 9: the tail 7..9 was lost.
    out = await stream._handle(*beat({"m": 9, "other": 99}))  # noqa: SLF001 (handler unit test)
    assert [(e.action, e.missed) for e in out] == [("lost", 3)]
    out = await stream._handle(*batch(10, [(2, 2, 20, 0)]))  # noqa: SLF001 (handler unit test)
    assert [e.action for e in out] == ["removed"]
    # Map events count on the same topic.
    created = schema.MapEvent(epoch="e1", seq=200, topic_seq=13, time=1.0, action="map_created",
                              map=client.info)
    out = await stream._handle(created, [])  # noqa: SLF001 (handler unit test)
    assert [(e.action, e.missed) for e in out] == [("lost", 2), ("map_created", 0)]
    # Other maps' messages are none of this stream's business.
    assert await stream._handle(*batch(50, [(0, 1, 1, 0)], name="other")) == []  # noqa: SLF001 (handler unit test)
    assert client.gaps == [("m", 3), ("m", 3), ("m", 2)]
    assert stream.lost == 8
    # A new epoch: a resync event, and numbering starts over without a false gap.
    out = await stream._handle(*batch(1, [(0, 5, 50, 0)], epoch="e2"))  # noqa: SLF001 (handler unit test)
    assert [(e.action, e.reason) for e in out] == [("resync", "epoch"), ("added", "")]
    assert stream.resyncs == 1 and client.gaps == [("m", 3), ("m", 3), ("m", 2)]


async def test_gap_unit_with_snapshot_resyncs():
    client = FakeClient()
    stream = EventStream(client, ["m"], snapshot=True)  # type: ignore[arg-type]
    client.snapshots.append((4, {k(1): k(10), k(2): k(20)}))
    out = await stream._snapshot_all(reason="start")  # noqa: SLF001 (handler unit test)
    assert sorted((e.action, e.key, e.snapshot) for e in out) == [
        ("added", k(1), True), ("added", k(2), True)]
    # Already in the snapshot: skipped.
    assert await stream._handle(*batch(3, [(0, 2, 20, 0), (0, 1, 10, 0)])) == []  # noqa: SLF001 (handler unit test)
    # 5 and 6 are lost; by the resync the daemon is at topic_seq 8.
    client.snapshots.append((8, {k(1): k(11), k(3): k(30)}))
    out = await stream._handle(*batch(7, [(1, 1, 11, 10)]))  # noqa: SLF001 (handler unit test)
    assert [(e.action, e.missed, e.reason) for e in out[:2]] == [("lost", 2, ""), ("resync", 0, "gap")]
    assert sorted((e.action, e.key, e.value, e.old_value) for e in out[2:]) == [
        ("added", k(3), k(30), None), ("removed", k(2), k(20), None),
        ("updated", k(1), k(11), k(10))]
    assert client.gets[-1] == ("m", "gap") and client.gaps == [("m", 2)]
    # 7 (this very batch) and 8 are in the resync; 8..9 overlaps, only 9 is new.
    out = await stream._handle(*batch(8, [(1, 3, 31, 30), (0, 4, 40, 0)]))  # noqa: SLF001 (handler unit test)
    assert [(e.action, e.topic_seq) for e in out] == [("added", 9)]
    assert stream.entries("m") == {k(1): k(11), k(3): k(30), k(4): k(40)}
    assert stream.resyncs == 1


# --- malformed input ----------------------------------------------------------------------


def _request(sock: zmq.Socket, *frames: bytes):
    sock.send_multipart(list(frames))
    assert sock.poll(20000), f"no reply to {frames!r:.100}"
    reply = sock.recv_multipart()
    return schema.decode(reply[0])


@pytest.mark.kernel
def test_malformed_subscriptions_and_requests(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_m"
    fd, map_id = maps.create("hash", 4, 8, 16, name=name, pin=bpffs_dir / name)
    ring = f"ev{token()}_rb"
    maps.create("ringbuf", 0, 0, 4096, name=ring, pin=bpffs_dir / ring)
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB)
    dealer = ctx.socket(zmq.DEALER)
    for s in (xsub, dealer):
        s.setsockopt(zmq.LINGER, 0)
    try:
        with Follower(d, name, "-f") as f:
            wait_ready(d, name)
            xsub.connect(f"ipc://{d.run_dir}/events.sock")
            for frames in ([b"\x05junk"], [b""], [b"\x02"], [b"\xff" * 1000],
                           [b"\x01", b"second frame"], [b"\x00never-subscribed"],
                           [b"\x00" + topic_key(name).encode()], [b"\x00hb"]):
                xsub.send_multipart(frames)
            dealer.connect(d.endpoint)
            bad = [
                (b"not json", "bad_request"),
                (b"", "bad_request"),
                (b"[]", "bad_request"),
                (b'{"kind":"nonsense"}', "bad_request"),
                (b'{"kind":"gap_report","map":"x"}', "bad_request"),
                (b'{"kind":"gap_report","map":"x","missed":-1}', "bad_request"),
                (b'{"kind":"gap_report","map":"x","missed":"lots"}', "bad_request"),
                (b'{"kind":"gap_report","map":"x","missed":1.5e400}', "bad_request"),
                (b'{"kind":"gap_report","map":"' + b"x" * 5000 + b'","missed":1}', "bad_request"),
                (b'{"kind":"gap_report","map":"x","missed":1,"v":2}', "version"),
                (b'{"kind":"get","snapshot":true}', "bad_request"),
                (b'{"kind":"get","selector":"","snapshot":true}', "bad_request"),
                (b'{"kind":"get","selector":"a\\u0000b","snapshot":true}', "bad_request"),
                (b'{"kind":"get","selector":"id:abc","snapshot":true}', "bad_request"),
                (b'{"kind":"get","selector":"id:4294967295","snapshot":true}', "not_found"),
                (b'{"kind":"get","selector":"no-such-map-x","snapshot":true}', "not_found"),
                (b'{"kind":"get","selector":"/etc/passwd","snapshot":true}', "bad_request"),
                (f'{{"kind":"get","selector":"{ring}","snapshot":true}}'.encode(),
                 "not_dumpable"),
                (b'{"kind":"recent","selector":""}', "bad_request"),
                (b"{" + b" " * (70 * 1024) + b"}", "bad_request"),
            ]
            for frame, code in bad:
                reply = _request(dealer, frame)
                assert isinstance(reply, schema.ErrorReply), (frame[:80], reply)
                assert reply.code == code, (frame[:80], reply)
            reply = _request(dealer, b'{"kind":"ping","req":5}', b"extra frame")
            assert isinstance(reply, schema.ErrorReply) and reply.code == "bad_request"
            assert reply.req == 5
            # Valid JSON with a readable req that fails the schema: the error echoes the req.
            schema_invalid = [
                (b'{"kind":"nonsense","req":%d}', "bad_request"),
                (b'{"kind":"get","req":%d}', "bad_request"),
                (b'{"kind":"get","selector":null,"req":%d}', "bad_request"),
                (b'{"kind":"get","selector":7,"req":%d}', "bad_request"),
                (b'{"kind":"list","entries":"yes","req":%d}', "bad_request"),
                (b'{"kind":"events","req":%d}', "bad_request"),
                (b'{"kind":"ping","req":%d,"v":2}', "version"),
            ]
            for req, (frame, code) in enumerate(schema_invalid, start=101):
                reply = _request(dealer, frame % req)
                assert isinstance(reply, schema.ErrorReply), (frame, reply)
                assert (reply.code, reply.req) == (code, req), (frame, reply)
            # req is 0 only when it cannot be read.
            for frame in (b'{"kind":"ping","req":"7"}', b'{"kind":"ping","req":-1}',
                          b'{"kind":"nonsense"}', b'["req", 7]'):
                reply = _request(dealer, frame)
                assert isinstance(reply, schema.ErrorReply) and reply.req == 0, (frame, reply)
            # Odd but valid requests still work.
            reply = _request(dealer, b'{"kind":"gap_report","map":"x","missed":3,"req":9}')
            assert isinstance(reply, schema.Ack) and reply.req == 9
            reply = _request(dealer, b'{"kind":"gap_report","map":"x","missed":0,"extra":1}')
            assert isinstance(reply, schema.Ack)
            reply = _request(dealer, (f'{{"kind":"get","selector":"{name}","snapshot":true,'
                                      '"reason":"\\u00e9\\u0000weird"}').encode())
            assert isinstance(reply, schema.GetBegin) and reply.map.id == map_id
            while not isinstance(reply, schema.GetEnd):
                assert dealer.poll(20000), "the snapshot stream stopped"
                reply = schema.decode(dealer.recv_multipart()[0])
                assert isinstance(reply, (schema.GetChunk, schema.GetEnd)), reply

            # The daemon still serves everyone else.
            syscall.map_update_elem(fd, u32(1), pattern(1, 8))
            (line,) = f.wait_count(1)
            assert line["action"] == "added" and line["key"] == u32(1).hex()
            # Replayed messages carry the recent request's req, like its recent_end.
            dealer.send(schema.encode(schema.RecentRequest(name, req=77)))
            replayed = []
            while True:
                assert dealer.poll(20000), "no recent_end"
                msg = schema.decode(dealer.recv_multipart()[0])
                if isinstance(msg, schema.RecentEnd):
                    break
                replayed.append(msg)
            assert msg.req == 77 and msg.events == 1, msg
            assert [(type(m), m.req) for m in replayed] == [(schema.EventBatch, 77)], replayed
            assert d.cli("ping").returncode == 0
            st = cli_status(d)
            assert st["drops_reported"] == 3
            assert st["subscriptions"].get(topic_key(name)) == 1, st["subscriptions"]
            # The raw subscriber's [b"\x01", ...] is a subscription to "": read as map: and hb.
            assert st["subscriptions"].get("hb") == 2, st["subscriptions"]
            assert st["subscriptions"].get("map:") == 1, st["subscriptions"]
            # Lax but harmless: the schema converts 1.2e29 to an int (see the report); the
            # daemon must answer either way and keep running.
            reply = _request(dealer, b'{"kind":"gap_report","map":"x","missed":'
                             b'123456789012345678901234567890}')
            assert isinstance(reply, (schema.Ack, schema.ErrorReply))
            assert d.cli("ping").returncode == 0
    finally:
        xsub.close(0)
        dealer.close(0)
        ctx.term()
    assert d.proc.poll() is None


@pytest.mark.kernel
def test_stream_message_as_request_is_bad_request(daemon):
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(daemon.endpoint)
        for frame in (b'{"kind":"heartbeat","epoch":"x","seq":1,"time":0,"interval":1}',
                      (b'{"kind":"events","epoch":"x","seq":1,"count":0,"topic_seq":1,"time":0,'
                       b'"map":{"id":1,"name":"x"},"key_size":4,"value_stride":4}')):
            reply = _request(dealer, frame)
            assert isinstance(reply, schema.ErrorReply)
            assert reply.code == "bad_request", reply
        assert isinstance(_request(dealer, b'{"kind":"ping"}'), schema.Pong)
    finally:
        dealer.close(0)
        ctx.term()


# --- heartbeats, status and a dying daemon ---------------------------------------------------


@pytest.mark.kernel
def test_heartbeats_and_status(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_hb"
    fd, _ = maps.create("hash", 4, 8, 16, name=name, pin=bpffs_dir / name)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    try:
        with Follower(d, name, "-f") as f:
            st = wait_ready(d, name)
            sub.connect(f"ipc://{d.run_dir}/events.sock")
            sub.setsockopt(zmq.SUBSCRIBE, b"hb")
            beats: list = []
            started = time.monotonic()
            while len(beats) < 4 and time.monotonic() < started + DEADLINE:
                if sub.poll(100):
                    frames = sub.recv_multipart()
                    assert frames[0] == b"hb"
                    beats.append(schema.decode(frames[1]))
            assert len(beats) == 4, beats
            # The first may be the greeting of our own subscription; the rest come about
            # once a second (a loose bound: the machine may be busy).
            assert 1.0 <= beats[-1].time - beats[1].time <= 10.0, [b.time for b in beats]
            assert all(isinstance(b, schema.Heartbeat) for b in beats)
            assert {b.epoch for b in beats} == {st["epoch"]}
            assert all(b.interval == 1.0 for b in beats)
            assert [b.time for b in beats] == sorted(b.time for b in beats)
            assert beats[-1].topics.get(name) == 0  # watched, nothing published yet
            syscall.map_update_elem(fd, u32(1), pattern(1, 8))
            f.wait_count(1)

            st = cli_status(d)
            assert st["subscriptions"] == {"hb": 2, topic_key(name): 1}
            (w,) = [w for w in st["watched"] if w["name"] == name]
            assert w["reason"] == "subscribed" and w["entries"] == 1 and w["events"] == 1
            ping = d.cli("ping", check=True).stdout
            assert st["epoch"] in ping
    finally:
        sub.close(0)
        ctx.term()


@pytest.mark.kernel
async def test_daemon_death_is_noticed(daemon_factory, maps, bpffs_dir):
    """Without hold-on (library ``hold_on=False``, CLI ``--max-wait 0``) a dead daemon
    ends the stream with one clear error; with it, a ``stalled`` event and the wait."""
    d = daemon_factory(*FAST)
    name = f"ev{token()}_dd"
    maps.create("hash", 4, 8, 16, name=name, pin=bpffs_dir / name)
    lib = LibFollower(d.endpoint, [name], hold_on=False)
    holding = LibFollower(d.endpoint, [name], heartbeat_timeout=3)
    with Follower(d, name, "-f", "--max-wait", "0") as f:
        async with Client(d.endpoint) as client:
            await await_ready(client, name, 1)
        async with trio.open_nursery() as nursery:
            await nursery.start(lib.run)
            await nursery.start(holding.run)
            async with Client(d.endpoint) as client:
                await await_ready(client, name, 3)
            d.proc.kill()  # no goodbye: only the missing heartbeats tell
            d.proc.wait()
            with trio.fail_after(30):
                await lib.done.wait()
            await holding.await_count(1, "a stalled event",
                                      pred=lambda evs: any(e.action == "stalled" for e in evs))
            assert not holding.done.is_set() and holding.error is None
            nursery.cancel_scope.cancel()
        assert isinstance(lib.error, DaemonUnavailable), repr(lib.error)
        assert "heartbeat" in str(lib.error)
        stalled = next(e for e in holding.events if e.action == "stalled")
        assert "no heartbeat" in stalled.reason and "3 s" in stalled.reason
        rc = await trio.to_thread.run_sync(f.wait_exit, 30)
        assert rc != 0
        line = one_error_line(f.stderr)
        assert "heartbeat" in line


@pytest.mark.kernel
def test_duplicate_selectors_do_not_leak_demand(daemon_factory, maps, bpffs_dir):
    """XPUB_VERBOSER reports both of a SUB's subscriptions to one topic but only one
    unsubscription when it leaves: a subscriber must not subscribe twice."""
    d = daemon_factory(*FAST)
    name = f"ev{token()}_dup"
    maps.create("hash", 4, 8, 16, name=name, pin=bpffs_dir / name)
    with Follower(d, name, name, "-f"):
        wait_ready(d, name)
    wait_until(lambda: topic_key(name) not in status(d)["subscriptions"],
               "the subscription to go away with its subscriber")
    assert json.dumps(status(d)["subscriptions"]) == "{}"
