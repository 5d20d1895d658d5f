"""``pymap export`` into real syslog receivers: rsyslog over UDP, TCP (octet counting)
and TLS (a throwaway CA), and syslog-ng over TCP.  Real kernel maps, a real daemon;
the tests parse what the receivers wrote and find every event, in order, with its
structured data."""

from __future__ import annotations

import json

import pytest
from conftest import require
from support.events import FAST, wait_ready, wait_until
from support.export import ExportProc
from support.kernel import pattern, token, u32
from support.syslog import SD_ID, Rsyslog, SyslogNG, parse_rfc5424

from watcher.kernel.sys import syscall

pytestmark = pytest.mark.kernel
ENTRY_ACTIONS = ("added", "updated", "removed")


@pytest.fixture
def tls_files(tmp_path):
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {k: tmp_path / f"{k}.pem" for k in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    return {k: str(v) for k, v in paths.items()}


def make_changes(fd: int, rounds: int, per_round: int, settle) -> list[tuple[str, str]]:
    """Rounds of adds, then updates and removes of half of them; returns (action, key hex)
    in the order made.  ``settle(n)`` waits until n entry events are out."""
    made: list[tuple[str, str]] = []
    for r in range(rounds):
        keys = [u32(r * per_round + i) for i in range(per_round)]
        for i, k in enumerate(keys):
            syscall.map_update_elem(fd, k, pattern(i + 1, 8))
            made.append(("added", k.hex()))
        settle(len(made))
        for i, k in enumerate(keys[: per_round // 2]):
            syscall.map_update_elem(fd, k, pattern(i + 1000, 8))
            made.append(("updated", k.hex()))
        for k in keys[per_round // 2:]:
            syscall.map_delete_elem(fd, k)
            made.append(("removed", k.hex()))
        settle(len(made))
    return made


def entry_messages(lines: list[bytes]) -> list[dict]:
    out = []
    for line in lines:
        m = parse_rfc5424(line)
        if m["msgid"] in ENTRY_ACTIONS:
            m["doc"] = json.loads(m["msg"])
            out.append(m)
    return out


def check_messages(messages: list[dict], name: str, made: list[tuple[str, str]],
                   doc_of=lambda d: d) -> None:
    seqs = [int(m["sd"][SD_ID]["seq"]) for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "events out of order or repeated"
    for m in messages:
        sd = m["sd"][SD_ID]
        doc = doc_of(m["doc"])
        assert sd["map"] == name and sd["action"] == m["msgid"] == doc["action"]
        assert int(sd["seq"]) == doc["seq"] and sd["epoch"]
        assert sd["id"] == doc["id"] == f"{m['host']}.{sd['epoch']}.{sd['seq']}"
        assert m["app"] == "pymap" and m["host"]
    got = sorted((doc_of(m["doc"])["action"], doc_of(m["doc"])["key"]) for m in messages)
    assert got == sorted(made)
    # Per key, the order of its own events is exactly the order they were made.
    order: dict[str, list[str]] = {}
    for action, key in made:
        order.setdefault(key, []).append(action)
    seen: dict[str, list[str]] = {}
    for m in messages:
        d = doc_of(m["doc"])
        seen.setdefault(d["key"], []).append(d["action"])
    assert seen == order


def test_rsyslog_udp_tcp_tls_get_every_event_in_order(daemon_factory, maps, bpffs_dir,
                                                      tmp_path, tls_files):
    d = daemon_factory(*FAST)
    name = f"ex{token()}_s"
    fd, _ = maps.create("hash", 4, 8, 1024, name=name, pin=bpffs_dir / name)
    with Rsyslog(tmp_path, tls=(tls_files["ca"], tls_files["cert"], tls_files["key"])) as rs:
        urls = {"udp": f"syslog+udp://127.0.0.1:{rs.udp}",
                "tcp": f"syslog+tcp://127.0.0.1:{rs.tcp}",
                "tls": f"syslog+tls://127.0.0.1:{rs.tls}?ca={tls_files['ca']}"}
        procs = [ExportProc(d, name, "--to", url, log=tmp_path / f"export-{k}.log")
                 for k, url in urls.items()]
        try:
            wait_ready(d, name, subscribers=3)

            def settle(n: int) -> None:
                for k in urls:
                    wait_until(lambda k=k: len(entry_messages(rs.lines(k))) >= n,
                               f"{n} events in rsyslog's {k} file")

            made = make_changes(fd, rounds=4, per_round=40, settle=settle)
            for k in urls:
                check_messages(entry_messages(rs.lines(k)), name, made)
            assert all(p.alive() for p in procs), [p.stderr() for p in procs]
        finally:
            for p in procs:
                p.stop()


def test_syslog_ng_receives_the_same_framing(daemon_factory, maps, bpffs_dir, tmp_path):
    require(SyslogNG.available())
    d = daemon_factory(*FAST)
    name = f"ex{token()}_n"
    fd, _ = maps.create("hash", 4, 8, 1024, name=name, pin=bpffs_dir / name)
    with SyslogNG(tmp_path) as ng:
        with ExportProc(d, name, "--format", "ecs", "--to", f"syslog+tcp://127.0.0.1:{ng.tcp}",
                        log=tmp_path / "export.log") as p:
            wait_ready(d, name)

            def settle(n: int) -> None:
                wait_until(lambda: len(entry_messages(ng.lines("tcp"))) >= n,
                           f"{n} events in syslog-ng's file")

            made = make_changes(fd, rounds=2, per_round=40, settle=settle)
            check_messages(entry_messages(ng.lines("tcp")), name, made,
                           doc_of=lambda doc: doc["pymap"])
            assert p.alive(), p.stderr()
