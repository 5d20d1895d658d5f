"""`pymap list` against the real kernel, with bpftool as the oracle."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import need_bcc
from support.kernel import BccMaps, bpftool_dump, bpftool_show, build_zoo, token

pytestmark = pytest.mark.kernel


def _list(daemon, *args: str) -> dict[int, dict]:
    proc = daemon.cli("list", "-o", "json", *args, check=True)
    data = json.loads(proc.stdout)
    assert isinstance(data, list)
    by_id = {m["id"]: m for m in data}
    assert len(by_id) == len(data), "a map id is listed twice"
    return by_id


def _assert_same_map(ours: dict, theirs: dict) -> None:
    """pymap's record of one map against bpftool's."""
    assert ours["id"] == theirs["id"]
    assert ours["kernel_name"] == theirs.get("name", "")
    assert ours["type"] == theirs["type"]
    assert ours["key_size"] == theirs["bytes_key"]
    assert ours["value_size"] == theirs["bytes_value"]
    assert ours["max_entries"] == theirs["max_entries"]
    assert ours["flags"] == theirs["flags"]
    assert ours["btf_id"] == theirs.get("btf_id", 0)
    assert ours["memlock"] == theirs["bytes_memlock"]
    assert ours["frozen"] == bool(theirs["frozen"])
    assert sorted(ours["pinned"]) == sorted(theirs.get("pinned", []))


def test_list_agrees_with_bpftool(daemon, maps, bpffs_dir):
    zoo = build_zoo(maps, bpffs_dir, token())
    ours = _list(daemon)
    for z in zoo:
        assert z.id in ours, f"{z} missing from pymap list"
        m = ours[z.id]
        _assert_same_map(m, bpftool_show(z.id))
        assert m["name"] == z.name
        assert m["pinned"] == ([str(z.pin)] if z.pin else [])
        if z.expected is None:
            assert m["entries"] is None, f"{z}: a {z.kind} holds no entries"
            assert m["not_dumpable_reason"]
        else:
            assert m["entries"] == len(bpftool_dump(z.id)) == len(z.expected), z
    arrays = [z for z in zoo if z.kind in ("array", "percpu_array")]
    for z in arrays:
        assert ours[z.id]["entries"] == ours[z.id]["max_entries"]


def test_list_json_fields(daemon, maps, bpffs_dir):
    _, map_id = maps.create("hash", 4, 4, 8, name=f"pt{token()}_f", pin=bpffs_dir / "f")
    m = _list(daemon)[map_id]
    assert set(m) >= {"id", "name", "type", "key_size", "value_size", "max_entries", "entries",
                      "flags", "pinned", "kernel_name", "btf_id", "memlock", "frozen", "holders"}
    # The test process holds an fd to the map; the daemon's own fds are not reported.
    assert os.getpid() in [h["pid"] for h in m["holders"]]
    assert daemon.proc.pid not in [h["pid"] for h in m["holders"]]
    assert m["entries"] == 0


def test_list_btf_maps_agree_with_bpftool(daemon):
    need_bcc()
    bcc = BccMaps(token())
    try:
        ours = _list(daemon)
        btf_ids = set()
        for name, map_id in bcc.ids.values():
            _assert_same_map(ours[map_id], bpftool_show(map_id))
            assert ours[map_id]["name"] == name
            assert ours[map_id]["btf_id"] > 0, "bcc should have given the map BTF"
            assert ours[map_id]["entries"] == len(bpftool_dump(map_id))
            btf_ids.add(ours[map_id]["btf_id"])
        assert len(btf_ids) == 1  # one BTF object for the whole bcc module
    finally:
        bcc.close()


def test_list_pattern(daemon, maps, bpffs_dir):
    tag = token()
    zoo = build_zoo(maps, bpffs_dir, tag)
    _, other = maps.create("hash", 4, 4, 8, name=f"po{tag}_other")

    listed = _list(daemon, f"pt{tag}_*")
    assert set(listed) == {z.id for z in zoo}

    # A pin path (or its file name) matches too.
    pinned = next(z for z in zoo if z.pin)
    assert set(_list(daemon, str(pinned.pin))) == {pinned.id}
    assert set(_list(daemon, f"*/{pinned.pin.name}")) >= {pinned.id}

    # --no-entries skips counting.
    for m in _list(daemon, f"pt{tag}_*", "--no-entries").values():
        assert m["entries"] is None

    assert set(_list(daemon, f"po{tag}_*")) == {other}

    # No match: empty list on stdout, a note on stderr, exit 1.
    proc = daemon.cli("list", f"nomatch{tag}*", "-o", "json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == []
    assert "Traceback" not in proc.stderr and "no map matches" in proc.stderr


def test_list_table(daemon, maps, bpffs_dir):
    tag = token()
    zoo = build_zoo(maps, bpffs_dir, tag)
    proc = daemon.cli("list", f"pt{tag}_*", check=True)
    lines = proc.stdout.splitlines()  # piped: a header, then one plain line per map
    assert lines[0].split()[:2] == ["ID", "NAME"] and len(lines) == 1 + len(zoo)
    for z in zoo:
        assert any(z.name in line.split() for line in lines[1:]), z.name


def test_one_holders_walk_answers_requests_close_in_time(maps):
    """Finding holders walks every process's fds whatever map is asked about, and a
    follower asks once per new map: requests within ``HOLDERS_MAX_AGE`` share one walk
    (concurrent ones wait for it), and a later request walks again and sees a new holder."""
    from concurrent.futures import ThreadPoolExecutor

    from watcher.daemon.catalog import HOLDERS_MAX_AGE, HostCatalog

    def holder(fd: int) -> subprocess.Popen:  # pymap leaves its own process out of holders
        return subprocess.Popen(["sleep", "60"], pass_fds=[fd])

    cat = HostCatalog(())
    fd, map_id = maps.create("hash", 4, 4, 8, name=f"hw{token()}")
    first = holder(fd)
    later = None
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: cat.holders(), range(32)))
        assert cat.holders_walks == 1
        assert all(first.pid in [pid for pid, _ in a.get(map_id, [])] for a in answers)
        later = holder(fd)
        assert later.pid not in [pid for pid, _ in cat.holders()[map_id]]  # the shared walk
        time.sleep(HOLDERS_MAX_AGE + 0.1)
        assert later.pid in [pid for pid, _ in cat.holders()[map_id]]
        assert cat.holders_walks == 2
    finally:
        for p in (first, later):
            if p is not None:
                p.kill()
                p.wait()
