"""Delivery of ``pymap export``: file rotation under a live stream, several exporters
on one daemon, and faults: a syslog receiver stopped and restarted, an exporter
SIGKILLed and restarted, a daemon restarted, a buffer and a rate limit too small.
Each time the output holds every event, or an explicit record of what is missing
with its count.  Real kernel maps, a real daemon, a real rsyslog."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from support.events import Follower, wait_ready, wait_until
from support.export import (
    ExportProc,
    NameTailer,
    assert_one_id_per_event,
    entry_seqs,
    json_lines,
    record_doc,
    records,
    rotated_files,
)
from support.kernel import bpftool_entries, pattern, token, u32
from support.syslog import SD_ID, Rsyslog, parse_rfc5424

from consumers.export.formats import FORMATS
from watcher.kernel.sys import syscall

pytestmark = pytest.mark.kernel
ENTRY = ("added", "updated", "removed")
SENTINEL = u32(0xFFFFF)


def docs_of_lines(lines: list[bytes]) -> list[dict]:
    return [json.loads(line) for line in lines if line]


def syslog_docs(rs: Rsyslog, fmt: str = "json") -> list[dict]:
    """The records rsyslog received, as support.export.record_doc reads them; each
    message's structured-data ``id`` is its payload's event id."""
    docs = []
    for line in rs.lines("tcp"):
        m = parse_rfc5424(line)
        doc = record_doc(fmt, m["msg"])
        assert m["sd"][SD_ID]["id"] == doc["id"], (m["sd"], doc)
        docs.append(doc)
    return docs


def live(docs: list[dict]) -> list[dict]:
    """Entry events from the stream (seq > 0), the start-up sentinel left out."""
    return [d for d in docs if d["action"] in ENTRY and d["seq"] > 0
            and d.get("key") != SENTINEL.hex()]


def change_round(fd: int, state: dict, adds: int, removes: int = 0) -> int:
    """``removes`` of the oldest keys, then ``adds`` new ones; returns how many events
    that is (keys added in this round are never removed in it: one poll would
    coalesce the two into nothing)."""
    present = state.setdefault("present", [])
    gone = 0
    for _ in range(min(removes, len(present))):
        syscall.map_delete_elem(fd, u32(present.pop(0)))
        gone += 1
    for _ in range(adds):
        k = state.setdefault("next", 0)
        syscall.map_update_elem(fd, u32(k), pattern(k, 8))
        present.append(k)
        state["next"] = k + 1
    return adds + gone


def start_sync(fd: int, seen) -> None:
    """Write the sentinel and wait until the exporters show it: they are streaming."""
    syscall.map_update_elem(fd, SENTINEL, pattern(1, 8))
    wait_until(lambda: seen(SENTINEL.hex()), "the exporters to start streaming")


def in_order_once(seqs: list[int]) -> bool:
    return seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_file_rotation_under_a_live_stream(daemon, maps, bpffs_dir, tmp_path):
    name = f"exr{token()}"
    fd, _ = maps.create("hash", 4, 8, 4096, name=name, pin=bpffs_dir / name)
    out = tmp_path / "out" / "events.json"
    out.parent.mkdir()
    tailer = NameTailer(out)
    with ExportProc(daemon, name, "--to", f"file://{out}?max_bytes=30000&backups=100",
                    log=tmp_path / "export.log") as p:
        wait_ready(daemon, name)
        start_sync(fd, lambda key: out.exists() and key.encode() in out.read_bytes())
        state: dict = {}
        total = 0
        for _ in range(12):
            total += change_round(fd, state, adds=60, removes=30)
            wait_until(lambda n=total: len(live(_all(out))) >= n, f"{total} events in the files")
        assert p.alive(), p.stderr()
    tailed = tailer.stop()
    files = rotated_files(out)
    assert len(files) > 5, "the stream should have rotated the file several times"
    assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    assert all(f.stat().st_size <= 30000 for f in files)
    docs = _all(out)
    seqs = entry_seqs(live(docs))
    assert len(seqs) == total and in_order_once(seqs)
    # A tailer that follows the name saw the very same lines, none split, none twice.
    assert tailer.rotations >= len(files) - 1
    assert docs_of_lines(tailed.split(b"\n")) == docs


def _all(out) -> list[dict]:
    return [d for f in rotated_files(out) for d in json_lines(f)]


def test_three_exporters_and_a_follower_get_the_same_events(daemon, maps, bpffs_dir, tmp_path):
    name = f"ex3{token()}"
    fd, _ = maps.create("hash", 4, 8, 1024, name=name, pin=bpffs_dir / name)
    out_file, out_stdout = tmp_path / "file.json", tmp_path / "stdout.json"
    with Rsyslog(tmp_path) as rs, \
            ExportProc(daemon, name, "--to", f"file://{out_file}", log=tmp_path / "f.log"), \
            ExportProc(daemon, name, "--to", f"syslog+tcp://127.0.0.1:{rs.tcp}",
                       log=tmp_path / "s.log"), \
            ExportProc(daemon, name, out=out_stdout, log=tmp_path / "o.log"), \
            Follower(daemon, name, "-f") as follower:
        wait_ready(daemon, name, subscribers=4)
        outputs = {"file": lambda: json_lines(out_file), "syslog": lambda: syslog_docs(rs),
                   "stdout": lambda: json_lines(out_stdout), "follower": follower.snapshot}
        start_sync(fd, lambda key: all(any(d.get("key") == key for d in get())
                                       for get in outputs.values()))
        state: dict = {}
        total = 0
        for _ in range(5):
            total += change_round(fd, state, adds=40, removes=20)
            for which, get in outputs.items():
                wait_until(lambda get=get, n=total: len(live(get())) >= n,
                           f"{total} events: {which}")
        seen = {which: [(d["seq"], d["action"], d["key"], d["value"]) for d in live(get())]
                for which, get in outputs.items()}
    assert len(seen["file"]) == total and in_order_once([s[0] for s in seen["file"]])
    assert seen["file"] == seen["syslog"] == seen["stdout"] == seen["follower"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_receiver_down_for_10s_then_back_loses_nothing(fmt, daemon, maps, bpffs_dir, tmp_path):
    name = f"exd{token()}"
    fd, _ = maps.create("hash", 4, 8, 4096, name=name, pin=bpffs_dir / name)
    with Rsyslog(tmp_path) as rs, \
            ExportProc(daemon, name, "--format", fmt, "--to", f"syslog+tcp://127.0.0.1:{rs.tcp}",
                       log=tmp_path / "export.log") as p:
        wait_ready(daemon, name)
        start_sync(fd, lambda key: any(d.get("key") == key for d in syslog_docs(rs, fmt)))
        state: dict = {}
        total = change_round(fd, state, adds=50, removes=10)
        wait_until(lambda: len(live(syslog_docs(rs, fmt))) >= total, "events before the outage")
        rs.stop()
        down_at = time.monotonic()
        for _ in range(5):  # the stream goes on while the receiver is down
            total += change_round(fd, state, adds=40, removes=20)
            time.sleep(1.0)
        time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
        rs.start()
        total += change_round(fd, state, adds=10)
        wait_until(lambda: len(set(entry_seqs(live(syslog_docs(rs, fmt))))) >= total,
                   "every event after the receiver came back", timeout=60)
        assert p.alive(), p.stderr()
        assert "retrying" in p.stderr()
    docs = syslog_docs(rs, fmt)
    seqs = entry_seqs(live(docs))
    # At-least-once: the batch in flight when it died may come twice; nothing is missing.
    assert len(set(seqs)) == total
    assert sorted(set(seqs)) == sorted(dict.fromkeys(seqs))
    assert not [d for d in docs if d["action"] in ("dropped", "lost")]
    # The batch before the failed one is always sent again (the receiver's hang-up is seen
    # before the next send): re-sends happened, and each carried its first send's id.
    assert len(docs) > assert_one_id_per_event(docs) == total + 1  # + the sentinel
    # rsyslog's own parse of the structured data (mmpstrucdata, as docs/export.md's
    # de-duplication key for rsyslog reads it) finds the same ids
    assert rs.lines("tcp-id") == [d["id"].encode() for d in docs]


def test_buffer_overflow_while_down_is_counted_and_reported(daemon, maps, bpffs_dir, tmp_path):
    name = f"exb{token()}"
    fd, _ = maps.create("hash", 4, 8, 8192, name=name, pin=bpffs_dir / name)
    with Rsyslog(tmp_path) as rs, \
            ExportProc(daemon, name, "--to", f"syslog+tcp://127.0.0.1:{rs.tcp}",
                       "--buffer", "65536", log=tmp_path / "export.log") as p:
        wait_ready(daemon, name)
        start_sync(fd, lambda key: any(d.get("key") == key for d in syslog_docs(rs)))
        rs.stop()
        state: dict = {}
        total = change_round(fd, state, adds=3000)  # ~1 MB of events: far over 64 KiB
        time.sleep(3)
        rs.start()

        def accounted():
            docs = syslog_docs(rs)
            dropped = sum(d.get("missed", 0) for d in docs if d["action"] == "dropped")
            return dropped and len(set(entry_seqs(live(docs)))) + dropped >= total

        wait_until(accounted, "delivered + reported dropped to cover every event", timeout=60)
        assert p.alive(), p.stderr()
    docs = syslog_docs(rs)
    dropped = [d for d in docs if d["action"] == "dropped"]
    assert all("export buffer full" in d["reason"] for d in dropped)
    assert len(set(entry_seqs(live(docs)))) + sum(d["missed"] for d in dropped) == total


def test_rate_limit_drops_are_counted_as_events(daemon, maps, bpffs_dir, tmp_path):
    name = f"exl{token()}"
    fd, _ = maps.create("hash", 4, 8, 1024, name=name, pin=bpffs_dir / name)
    out = tmp_path / "out.json"
    with ExportProc(daemon, name, "--to", f"file://{out}", "--rate", "50",
                    log=tmp_path / "export.log"):
        wait_ready(daemon, name)
        start_sync(fd, lambda key: out.exists() and key.encode() in out.read_bytes())
        time.sleep(1.5)  # let the bucket fill up again after the sentinel
        state: dict = {}
        total = change_round(fd, state, adds=500)
        # One more event after the burst carries the gap marker out.
        time.sleep(1.0)
        total += change_round(fd, state, adds=1)

        def accounted():
            docs = json_lines(out)
            dropped = sum(d.get("missed", 0) for d in docs if d["action"] == "dropped")
            return dropped and len(live(docs)) + dropped >= total

        wait_until(accounted, "delivered + rate-limited to cover every event")
    docs = json_lines(out)
    dropped = [d for d in docs if d["action"] == "dropped"]
    assert all(d["reason"].startswith("rate limit") for d in dropped)
    assert len(live(docs)) + sum(d["missed"] for d in dropped) == total
    assert len(live(docs)) < total


@pytest.mark.parametrize("fmt", FORMATS)
def test_exporter_killed_and_restarted_resumes_from_the_checkpoint(fmt, daemon, maps, bpffs_dir,
                                                                   tmp_path):
    name = f"exk{token()}"
    fd, _ = maps.create("hash", 4, 8, 4096, name=name, pin=bpffs_dir / name)
    state: dict = {}
    rows = change_round(fd, state, adds=5)  # there before any exporter: its snapshot rows
    args, out, state_file = _export_args(name, tmp_path, fmt)
    # Killed before its first checkpoint: the next start sends the snapshot rows again.
    with ExportProc(daemon, *args, log=tmp_path / "export0.log") as p0:
        wait_until(lambda: len(records(out, fmt)) >= rows, "the snapshot rows")
        assert not state_file.exists()
        p0.kill()
    older = tmp_path / "older.state"
    total = _export_then_kill(daemon, fd, name, tmp_path, state, adds=50, removes=10, fmt=fmt,
                              older=older, rows=rows)
    for _ in range(3):  # changes while no exporter runs
        total += change_round(fd, state, adds=20, removes=10)
        time.sleep(0.6)
    # An older checkpoint (a SIGKILL before the next write): everything since comes again.
    state_file.write_bytes(older.read_bytes())
    with ExportProc(daemon, *args, log=tmp_path / "export2.log") as p2:
        wait_until(lambda: len(set(entry_seqs(live(records(out, fmt))))) >= total,
                   "every event, the ones made while it was dead too")
        assert p2.alive(), p2.stderr()
    docs = records(out, fmt)
    seqs = entry_seqs(live(docs))
    assert len(set(seqs)) == total  # at-least-once: a few may repeat, none is missing
    assert not [d for d in docs if d["action"] in ("resync", "lost", "dropped")]
    assert json.loads(state_file.read_text())["seq"] >= max(seqs)
    # Snapshot rows and events were sent twice, each time with the same id.
    assert len([d for d in docs if d["seq"] == 0]) == 2 * rows
    assert len(docs) > assert_one_id_per_event(docs) == rows + 1 + total  # + the sentinel


def test_daemon_restart_gives_a_resync_and_the_fresh_state(daemon, maps, bpffs_dir, tmp_path):
    name = f"exe{token()}"
    fd, map_id = maps.create("hash", 4, 8, 1024, name=name, pin=bpffs_dir / name)
    out = tmp_path / "out.json"
    with ExportProc(daemon, name, "--to", f"file://{out}", "--state-file",
                    str(tmp_path / "st"), log=tmp_path / "export.log") as p:
        wait_ready(daemon, name)
        start_sync(fd, lambda key: out.exists() and key.encode() in out.read_bytes())
        state: dict = {}
        total = change_round(fd, state, adds=30)
        wait_until(lambda: len(live(json_lines(out))) >= total, "events before the restart")
        daemon.stop()
        change_round(fd, state, adds=10, removes=5)  # while no daemon watches
        daemon.start()
        wait_until(lambda: any(d["action"] == "resync" for d in json_lines(out)),
                   "a resync record after the restart", timeout=60)
        change_round(fd, state, adds=5)
        expected = bpftool_entries(map_id)
        wait_until(lambda: replay(json_lines(out)) == expected,
                   "the exported events to rebuild the map's state", timeout=60)
        assert p.alive(), p.stderr()


def replay(docs: list[dict]) -> dict:
    """Entries the events describe.  A live resync's rows correct the state seen before
    it; the rows after a resync at start-up from a checkpoint are the whole state
    (docs/export.md, Checkpoint and resume)."""
    entries: dict = {}
    for d in docs:
        if d["action"] == "resync" and "checkpoint" in d.get("reason", ""):
            entries = {}
        elif d["action"] in ("added", "updated"):
            entries[d["key"]] = d["value"]
        elif d["action"] == "removed":
            entries.pop(d["key"], None)
    return entries


def _export_args(name: str, tmp_path, fmt: str = "json") -> tuple[tuple[str, ...], Path, Path]:
    """An exporter's arguments with a file output and a state file: (args, output, state)."""
    out, state_file = tmp_path / "out.json", tmp_path / "export.state"
    return (name, "--format", fmt, "--to", f"file://{out}", "--state-file", str(state_file)), \
        out, state_file


def _export_then_kill(daemon, fd: int, name: str, tmp_path, state: dict, adds: int,
                      removes: int = 0, fmt: str = "json", older: Path | None = None,
                      rows: int = 0) -> int:
    """Export (_export_args) until a round of changes is out and checkpointed, then SIGKILL
    the exporter; returns the events in the round.  ``older``: where to copy the first
    checkpoint, made before the round.  ``rows``: the snapshot rows it starts with (once
    they are out its snapshot is taken, and the sentinel is a live event)."""
    args, out, state_file = _export_args(name, tmp_path, fmt)
    before = len(records(out, fmt))
    p = ExportProc(daemon, *args, log=tmp_path / "export1.log")
    try:
        wait_ready(daemon, name)
        wait_until(lambda: len(records(out, fmt)) >= before + rows, "the snapshot rows")
        start_sync(fd, lambda key: any(d.get("key") == key for d in records(out, fmt)))
        wait_until(state_file.exists, "a checkpoint")
        if older is not None:
            older.write_bytes(state_file.read_bytes())
        total = change_round(fd, state, adds=adds, removes=removes)
        wait_until(lambda: len(live(records(out, fmt))) >= total, "events before the kill")
        time.sleep(1.0)  # a checkpoint past them
    finally:
        p.kill()
    return total


def _killed_then_restarted(daemon, fd: int, name: str, tmp_path, while_dead) -> list[dict]:
    """Export with a state file, SIGKILL the exporter, run ``while_dead()``, start it
    again; returns the output once it rebuilds the map's state."""
    state: dict = {}
    _export_then_kill(daemon, fd, name, tmp_path, state, adds=30)
    args, out, _ = _export_args(name, tmp_path)
    while_dead(state)
    with ExportProc(daemon, *args, log=tmp_path / "export2.log") as p2:
        wait_until(lambda: replay(json_lines(out)) == bpftool_entries(_map_id(fd)),
                   "the output to rebuild the map's state", timeout=60)
        assert p2.alive(), p2.stderr()
    return json_lines(out)


def _map_id(fd: int) -> int:
    return syscall.map_info(fd).id


def test_restart_after_the_ring_moved_on_gives_a_resync(daemon_factory, maps, bpffs_dir,
                                                        tmp_path):
    d = daemon_factory("--set", "daemon.recent_events=16")
    name = f"exg{token()}"
    fd, _ = maps.create("hash", 4, 8, 1024, name=name, pin=bpffs_dir / name)

    def while_dead(state):
        for _ in range(3):  # 60 events: far more than the 16 the daemon keeps
            change_round(fd, state, adds=20)
            time.sleep(0.6)

    docs = _killed_then_restarted(d, fd, name, tmp_path, while_dead)
    resyncs = [x for x in docs if x["action"] == "resync"]
    assert resyncs and "no longer cover" in resyncs[0]["reason"]


def test_restart_after_a_daemon_restart_gives_a_resync(daemon, maps, bpffs_dir, tmp_path):
    name = f"exq{token()}"
    fd, _ = maps.create("hash", 4, 8, 1024, name=name, pin=bpffs_dir / name)

    def while_dead(state):
        daemon.stop()
        change_round(fd, state, adds=10, removes=5)
        daemon.start()

    docs = _killed_then_restarted(daemon, fd, name, tmp_path, while_dead)
    resyncs = [x for x in docs if x["action"] == "resync"]
    assert resyncs and "daemon restarted since the checkpoint" in resyncs[0]["reason"]
