"""`pymap events` against the real kernel: maps mutated while the daemon watches them.

Every test drives mutations in rounds and waits (with generous deadlines) until
each round has been observed, so a round may land in one poll or be split across
two without changing what is expected: no key is touched twice within a round.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import time
from typing import cast

import pytest
from support.events import (
    FAST,
    Follower,
    changes,
    line_tuple,
    replay_lines,
    status,
    wait_ready,
    wait_until,
    watch_of,
)
from support.kernel import NCPUS, bpftool_entries, lpm_key, pattern, percpu_value, token, u32

from watcher.kernel.sys import syscall

pytestmark = pytest.mark.kernel

RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def k12(n: int) -> bytes:
    return n.to_bytes(4, "little") + b"\xab" * 4 + n.to_bytes(4, "big")


def v20(n: int, gen: int = 0) -> bytes:
    return pattern(n * 100 + gen, 20)


def _check_lines(lines: list[dict], name: str, map_id: int) -> None:
    now = datetime.datetime.now(datetime.UTC)
    for line in lines:
        assert RFC3339_Z.match(line["time"]), line
        when = datetime.datetime.fromisoformat(line["time"])
        assert abs((now - when).total_seconds()) < 600, line
        assert line["map"] == {"id": map_id, "name": name}, line
    seqs = [line["seq"] for line in lines]
    # Only this map is watched by this daemon: the global sequence has no holes.
    assert seqs == list(range(1, len(lines) + 1)), seqs


def test_follow_hash_added_updated_removed(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_h"
    fd, map_id = maps.create("hash", 12, 20, 64, name=name, pin=bpffs_dir / name)
    syscall.map_update_elem(fd, k12(99), v20(99))  # present before anyone watches: no event
    with Follower(d, name, "-f") as f:
        wait_ready(d, name)
        values = {}

        # Round 1: five adds.
        for n in range(1, 6):
            values[n] = v20(n)
            syscall.map_update_elem(fd, k12(n), values[n])
        lines = f.wait_count(5)
        assert changes(lines) == {("added", k12(n).hex(), v20(n).hex(), None)
                                  for n in range(1, 6)}

        # Round 2: update 1 and 2, delete 3 and 4 (removed carries the last value).
        expected: set[tuple[str, str, str, str | None]] = set()
        for n in (1, 2):
            syscall.map_update_elem(fd, k12(n), v20(n, 1))
            expected.add(("updated", k12(n).hex(), v20(n, 1).hex(), values[n].hex()))
            values[n] = v20(n, 1)
        for n in (3, 4):
            syscall.map_delete_elem(fd, k12(n))
            expected.add(("removed", k12(n).hex(), values.pop(n).hex(), None))
        lines = f.wait_count(9)
        assert changes(lines[5:]) == expected

        # Round 3: delete an updated key, re-add a deleted one, update another, the
        # pre-existing key too (it was in the baseline, so it is an update).
        syscall.map_delete_elem(fd, k12(1))
        syscall.map_update_elem(fd, k12(3), v20(3, 2))
        syscall.map_update_elem(fd, k12(5), v20(5, 2))
        syscall.map_update_elem(fd, k12(99), v20(99, 2))
        lines = f.wait_count(13)
        assert changes(lines[9:]) == {
            ("removed", k12(1).hex(), v20(1, 1).hex(), None),
            ("added", k12(3).hex(), v20(3, 2).hex(), None),
            ("updated", k12(5).hex(), v20(5, 2).hex(), v20(5).hex()),
            ("updated", k12(99).hex(), v20(99, 2).hex(), v20(99).hex()),
        }
        _check_lines(lines, name, map_id)
        for line in lines:
            assert set(line) >= {"seq", "time", "map", "action", "key", "value", "old_value"}
            assert (line["old_value"] is None) == (line["action"] != "updated")
        # Nothing more than the changes: give the daemon a few more polls.
        polls = cast(dict, watch_of(status(d), name))["polls"]
        wait_until(lambda: cast(dict, watch_of(status(d), name))["polls"] >= polls + 3,
                   "three more polls")
        assert len(f.snapshot()) == 13
        assert not f.bad, f.bad
        # The replayed stream, plus the entry that was there from the start, is the map.
        state = replay_lines(lines, {k12(99).hex(): v20(99).hex()})
        assert state == bpftool_entries(map_id)


def _wait_gone(map_id: int) -> None:
    def gone():
        try:
            fd = syscall.map_get_fd_by_id(map_id)
        except OSError as e:
            return e.errno == errno.ENOENT
        os.close(fd)
        return False

    wait_until(gone, f"map id {map_id} to be freed")


def test_map_recreated_under_same_pin(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_r"
    pin = bpffs_dir / name
    fd, old_id = maps.create("hash", 4, 8, 16, name=name, pin=pin)
    with Follower(d, name, "-f") as f:
        wait_ready(d, name)
        syscall.map_update_elem(fd, u32(1), pattern(1, 8))
        f.wait_count(1)

        os.unlink(pin)
        maps.close(fd)
        _wait_gone(old_id)
        fd, new_id = maps.create("hash", 4, 8, 16, name=name, pin=pin)
        assert new_id != old_id
        syscall.map_update_elem(fd, u32(2), pattern(2, 8))
        syscall.map_update_elem(fd, u32(3), pattern(3, 8))
        lines = f.wait_count(5)
        assert [ln["action"] for ln in lines] == [
            "added", "map_removed", "map_created", "added", "added"], lines
        assert lines[1]["map"]["id"] == old_id and lines[1]["map"]["name"] == name
        created = lines[2]["map"]
        assert created["id"] == new_id and created["name"] == name
        assert created["type"] == "hash" and created["pinned"] == [str(pin)]
        assert {(ln["map"]["id"], ln["key"], ln["value"]) for ln in lines[3:]} == {
            (new_id, u32(2).hex(), pattern(2, 8).hex()),
            (new_id, u32(3).hex(), pattern(3, 8).hex())}
        assert [ln["seq"] for ln in lines] == sorted(ln["seq"] for ln in lines)
        assert replay_lines(lines) == bpftool_entries(new_id)


def test_percpu_hash_one_cpu_slot(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_pc"
    fd, map_id = maps.create("percpu_hash", 4, 8, 16, name=name, pin=bpffs_dir / name)
    with Follower(d, name, "-f") as f:
        wait_ready(d, name)
        before = [pattern(10 + c, 8) for c in range(NCPUS)]
        syscall.map_update_elem(fd, u32(7), percpu_value(8, before))
        (line,) = f.wait_count(1)
        assert line["action"] == "added" and line["key"] == u32(7).hex()
        assert "value" not in line
        assert line["values"] == [{"cpu": c, "value": before[c].hex()} for c in range(NCPUS)]
        assert line["old_values"] is None

        after = list(before)
        after[-1] = pattern(999, 8)  # only the last CPU's slot changes
        syscall.map_update_elem(fd, u32(7), percpu_value(8, after))
        line = f.wait_count(2)[1]
        assert line["action"] == "updated"
        assert line["values"] == [{"cpu": c, "value": after[c].hex()} for c in range(NCPUS)]
        assert line["old_values"] == [{"cpu": c, "value": before[c].hex()} for c in range(NCPUS)]

        syscall.map_delete_elem(fd, u32(7))
        line = f.wait_count(3)[2]
        assert line["action"] == "removed"
        assert line["values"] == [{"cpu": c, "value": after[c].hex()} for c in range(NCPUS)]
        assert replay_lines(f.snapshot()) == bpftool_entries(map_id) == {}


def test_lpm_trie_prefixes(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_lpm"
    fd, map_id = maps.create("lpm_trie", 8, 8, 64, name=name, flags=1, pin=bpffs_dir / name)
    prefixes = [lpm_key(8, bytes([10, 0, 0, 0])), lpm_key(16, bytes([10, 1, 0, 0])),
                lpm_key(24, bytes([10, 1, 2, 0])), lpm_key(32, bytes([192, 168, 0, 1]))]
    with Follower(d, name, "-f") as f:
        wait_ready(d, name)
        for n, key in enumerate(prefixes):
            syscall.map_update_elem(fd, key, pattern(n, 8))
        lines = f.wait_count(4)
        assert changes(lines) == {("added", k.hex(), pattern(n, 8).hex(), None)
                                  for n, k in enumerate(prefixes)}
        syscall.map_delete_elem(fd, prefixes[1])
        syscall.map_update_elem(fd, prefixes[2], pattern(50, 8))
        lines = f.wait_count(6)
        assert changes(lines[4:]) == {
            ("removed", prefixes[1].hex(), pattern(1, 8).hex(), None),
            ("updated", prefixes[2].hex(), pattern(50, 8).hex(), pattern(2, 8).hex())}
        assert replay_lines(lines) == bpftool_entries(map_id)


def test_late_joiner_with_snapshot(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_j"
    fd, map_id = maps.create("hash", 4, 8, 256, name=name, pin=bpffs_dir / name)
    for n in range(40):  # before anyone watches
        syscall.map_update_elem(fd, u32(n), pattern(n, 8))
    gen = iter(range(1000, 100000))

    def round_(adds, updates, deletes):
        for n in adds:
            syscall.map_update_elem(fd, u32(n), pattern(next(gen), 8))
        for n in updates:
            syscall.map_update_elem(fd, u32(n), pattern(next(gen), 8))
        for n in deletes:
            syscall.map_delete_elem(fd, u32(n))
        return len(adds) + len(updates) + len(deletes)

    with Follower(d, name, "-f") as first:
        wait_ready(d, name)
        seen = round_(range(40, 50), range(10), range(10, 15))
        first.wait_count(seen)
        with Follower(d, name, "-f", "--snapshot") as joiner:
            # Race the joiner's start on purpose: mutate while it starts up and
            # snapshots, spread over a second or so.
            for i in range(10):
                seen += round_([50 + i], [20 + i], [30 + i] if i < 5 else [])
                time.sleep(0.1)
            joiner.wait_for(lambda ls: ls, "the joiner's snapshot")
            seen += round_(range(60, 70), range(5), range(40, 45))
            first.wait_count(seen)
            truth = bpftool_entries(map_id)
            joiner.wait_for(lambda ls: replay_lines(ls) == truth,
                            "the joiner's state to equal the map")
            lines = joiner.snapshot()
        snap = [ln for ln in lines if ln.get("snapshot")]
        assert snap and all(ln["action"] == "added" for ln in snap)
        assert lines[:len(snap)] == snap, "snapshot lines come first"
        assert all(ln["seq"] == 0 for ln in snap)
        live = [ln["seq"] for ln in lines[len(snap):]]
        assert live == sorted(set(live)), "live events in order, no repeats"
        # The joiner's live events are exactly the first follower's tail.
        tail = {line_tuple(ln) for ln in first.snapshot() if ln["seq"] in set(live)}
        assert tail == {line_tuple(ln) for ln in lines[len(snap):]}


def test_recent_events_without_follow(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_rc"
    fd, _ = maps.create("hash", 4, 8, 16, name=name, pin=bpffs_dir / name)
    quiet = f"ev{token()}_q"
    maps.create("hash", 4, 8, 16, name=quiet, pin=bpffs_dir / quiet)
    with Follower(d, name, "-f") as f:
        wait_ready(d, name)
        for n in range(3):
            syscall.map_update_elem(fd, u32(n), pattern(n, 8))
        f.wait_count(3)
        syscall.map_delete_elem(fd, u32(1))
        followed = f.wait_count(4)
    # The follower is gone; the map lingers, so its recent events are kept.
    proc = d.cli("events", name, "-o", "json", timeout=30)
    assert proc.returncode == 0, proc.stderr
    import json

    recent = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [line_tuple(x) for x in recent] == [line_tuple(x) for x in followed]
    assert proc.stderr == ""
    table = d.cli("events", name, timeout=30)
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("added") == 3 and "removed" in table.stdout

    proc = d.cli("events", quiet, "-o", "json", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "not being watched" in proc.stderr
    assert "Traceback" not in proc.stderr
