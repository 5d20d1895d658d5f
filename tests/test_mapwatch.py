"""Map discovery from the kernel: the bpf() syscall tracepoints (watcher/kernel/discovery/mapwatch.py).

Real programs on the real ``syscalls:sys_enter_bpf``/``sys_exit_bpf`` tracepoints,
real maps, bpftool as the oracle:

- every map creation of another process is recorded with the map's id, type, sizes,
  flags, name and BTF id, read in the kernel (the same as ``bpftool map show``), even
  when the map is freed at once; the watcher's own process is left out;
- closing detaches everything: no pymap program, tracepoint attachment or map remains;
- through the daemon: 200 maps that live 10 ms each are all reported to a glob follower
  as ``map_created`` then ``map_removed`` with ``watch.discovery = "auto"``, while the
  same run with ``"poll"`` misses most of them (the tracepoint is what makes the
  difference); the daemon's fd count is unchanged, and once it exits nothing of it
  remains in the kernel;
- the engine's bookkeeping in-process: a creation reported while a cycle reads the ids
  is not taken for a map already gone.
"""

from __future__ import annotations

import collections
import os
import subprocess
import time

import pytest
import trio
from conftest import require
from support.catalog import FakeCatalog, record
from support.events import Follower, status, wait_until
from support.kernel import bpftool, bpftool_show, token
from test_daemon_logic import make_engine, subscribe

from watcher.kernel.asm.assembler import func_btf
from watcher.kernel.discovery import mapwatch
from watcher.kernel.maps.kinds import TYPE_IDS
from watcher.kernel.sys import create as progload
from watcher.kernel.sys import syscall
from watcher.wire import schema


def _problem() -> str | None:
    try:
        mapwatch.tracepoint("syscalls", "sys_exit_bpf")
    except mapwatch.Unavailable as e:
        return f"no bpf syscall tracepoints: {e}"
    return None


@pytest.fixture
def tracepoints(kernel):
    require(_problem())


def pymap_programs() -> list[dict]:
    return [p for p in bpftool("prog", "show") if p.get("name", "").startswith("pymap_mw")]


def attachments(pid: int) -> list[dict]:
    """``bpftool perf``: the tracepoint attachments held by process ``pid``."""
    return [a for a in bpftool("perf") if a.get("pid") == pid]


def drain(watch: mapwatch.MapWatch, want: set[int], timeout: float = 20,
          pins: list | None = None) -> dict[int, mapwatch.Created]:
    """Records until every id in ``want`` was seen; pin records go to ``pins``."""
    seen: dict[int, mapwatch.Created] = {}

    def done():
        for c in watch.read():
            if c.pinned and pins is not None:
                pins.append(c)
            elif c.map_id is not None:
                seen[c.map_id] = c
        return want <= set(seen)

    wait_until(done, f"records of maps {sorted(want - set(seen))}", timeout)
    return seen


@pytest.mark.kernel
def test_creations_are_recorded_with_the_kernel_description(tracepoints):
    watch = mapwatch.MapWatch(own_tgids=(1,))  # not our tgid: our creations are recorded
    btf_fd = progload.load_btf(func_btf([("f", 0, True)])[0])  # type 1: an 8-byte int
    fds = []
    # other pymap daemons on the host have their own: only this process' count here
    ours = {a["prog_id"] for a in attachments(os.getpid())}
    try:
        assert len(ours) == 2 and ours <= {p["id"] for p in pymap_programs()}
        fd = syscall.map_create(TYPE_IDS["hash"], 8, 8, 32, name="mw_btf", flags=1,
                                btf_fd=btf_fd, btf_key_type_id=1, btf_value_type_id=1)
        fds.append(fd)
        gone = syscall.map_create(TYPE_IDS["array"], 4, 16, 7, name="mw_gone")
        gone_id = syscall.map_info(gone).id
        os.close(gone)  # freed before anyone reads the record
        ids = {syscall.map_info(fd).id, gone_id}
        seen = drain(watch, ids)
        for map_id in ids - {gone_id}:
            shown, rec = bpftool_show(map_id), seen[map_id].record
            assert rec is not None
            assert (rec.name, rec.type, rec.key_size, rec.value_size, rec.max_entries,
                    rec.flags, rec.btf_id) == (
                shown["name"], shown["type"], shown["bytes_key"], shown["bytes_value"],
                shown["max_entries"], shown["flags"], shown["btf_id"])
            assert shown["btf_id"] > 0
        rec = seen[gone_id].record
        assert rec is not None
        assert (rec.name, rec.type, rec.key_size, rec.value_size, rec.max_entries) == (
            "mw_gone", "array", 4, 16, 7)
        assert seen[gone_id].tgid == os.getpid() and watch.lost() == 0
        # a failed creation is no record
        with pytest.raises(OSError):
            syscall.map_create(TYPE_IDS["hash"], 0, 8, 16, name="mw_bad")
        assert [c for c in watch.read() if c.record and c.record.name == "mw_bad"] == []
    finally:
        for fd in fds:
            os.close(fd)
        os.close(btf_fd)
        watch.close()
        watch.close()  # idempotent
    assert attachments(os.getpid()) == []
    assert not ours & {p["id"] for p in pymap_programs()}


@pytest.mark.kernel
def test_the_objects_brokers_creations_are_left_out(tracepoints, bpffs_dir):
    """The in-kernel engine's maps are made by the objects broker, another process:
    the daemon passes its pid, and the programs leave its creations out as its own."""
    from watcher.kernel.kdelta.objects import Broker

    broker = Broker()
    broker.start()
    assert broker.proc is not None
    watch = mapwatch.MapWatch((os.getpid(), broker.proc.pid))
    objects = broker.engine()
    try:
        made = objects.create_map(TYPE_IDS["hash"], 4, 8, 16, "pymap_kd_test")
        made_id = syscall.map_info(made).id
        pin = bpffs_dir / "after"
        subprocess.run(["bpftool", "map", "create", str(pin), "type", "hash", "key", "4",
                        "value", "8", "entries", "16", "name", "mw_after"], check=True)
        after_id = bpftool("map", "show", "pinned", str(pin))["id"]
        seen = drain(watch, {after_id})  # the broker's came first: it would be here
        assert made_id not in seen
        os.close(made)
    finally:
        objects.release()
        watch.close()
        broker.close()


@pytest.mark.kernel
def test_own_process_is_left_out_and_others_are_seen(tracepoints, bpffs_dir):
    watch = mapwatch.MapWatch()  # this process is the "daemon"
    try:
        own = syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name="mw_own")
        own_id = syscall.map_info(own).id
        os.close(own)
        pin = bpffs_dir / "other"
        subprocess.run(["bpftool", "map", "create", str(pin), "type", "hash", "key", "4",
                        "value", "8", "entries", "16", "name", "mw_other"], check=True)
        other_id = bpftool("map", "show", "pinned", str(pin))["id"]
        pins: list = []
        seen = drain(watch, {other_id}, pins=pins)
        assert own_id not in seen
        other_rec = seen[other_id].record
        assert other_rec is not None and other_rec.name == "mw_other"
        other = seen[other_id].tgid
        # bpftool pinned it: a pin record of the same process (ours are left out)
        wait_until(lambda: pins.extend(c for c in watch.read() if c.pinned) or  # type: ignore[func-returns-value]
                   any(c.tgid == other for c in pins), "the pin record")
        assert all(c.tgid != os.getpid() for c in pins)
    finally:
        watch.close()


@pytest.mark.kernel
def test_an_unresolved_record_falls_back_to_fdinfo(maps):
    fd, map_id = maps.create("hash", 4, 8, 16, name="mw_fdinfo")
    raw = mapwatch.RECORD.pack(*[0] * 9, os.getpid(), fd, mapwatch.UNRESOLVED, b"")
    created = mapwatch.parse_record(raw)
    assert created.record is None and (created.tgid, created.fd) == (os.getpid(), fd)
    assert mapwatch.fdinfo_map_id(os.getpid(), fd) == map_id
    maps.close(fd)
    assert mapwatch.fdinfo_map_id(os.getpid(), fd) is None  # closed: nothing to say


# --- through the daemon ---------------------------------------------------------------

CHURN = 200
LIFETIME = 0.01


def churn(prefix: str, n: int = CHURN) -> dict[int, str]:
    """``n`` maps that live ~10 ms each, one after the other; id -> name."""
    created = {}
    for i in range(n):
        name = f"{prefix}{i}"
        fd = syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name=name)
        created[syscall.map_info(fd).id] = name
        time.sleep(LIFETIME)
        os.close(fd)
        time.sleep(0.005)
    return created


def reported(lines: list[dict]) -> dict[str, list[int]]:
    """Map ids per action, in the order printed; ``"order"``: (action, id) as printed."""
    seen = collections.defaultdict(list)
    for ln in lines:
        if ln.get("action") in ("map_created", "map_removed"):
            seen[ln["action"]].append(ln["map"]["id"])
            seen["order"].append((ln["action"], ln["map"]["id"]))
    return seen


def follow_churn(d, prefix: str, expect_all: bool) -> tuple[dict[int, str], dict]:
    with Follower(d, f"{prefix}*", "-f") as follower:
        wait_until(lambda: any(k.startswith(f"map:{prefix}")
                               for k in status(d)["subscriptions"]), "the subscription")
        time.sleep(2)  # the engine's first cycle after it is a baseline
        created = churn(prefix)
        if expect_all:
            follower.wait_for(lambda lines: set(created) <= set(reported(lines)["map_removed"]),
                              f"map_removed for all {len(created)} maps", timeout=120)
        else:
            time.sleep(3)  # a few poll intervals: whatever the poll saw is reported
        return created, reported(follower.snapshot())


@pytest.mark.kernel
def test_ten_ms_maps_are_all_reported_with_tracepoints_not_with_the_poll(
        daemon_factory, tracepoints):
    d = daemon_factory()  # watch.discovery = "auto" is the default
    pid = d.proc.pid
    wait_until(lambda: len(attachments(pid)) == 2, "the daemon's two tracepoint attachments")
    assert "map discovery: bpf() syscall tracepoints" in d.log.read_text()
    assert status(d)["discovery"] == "tracepoint"
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    created, seen = follow_churn(d, f"t{token()[:5]}_", expect_all=True)
    # each map: created before removed, exactly once each
    assert sorted(seen["map_created"]) == sorted(created) == sorted(seen["map_removed"])
    position = {event: i for i, event in enumerate(seen["order"])}
    assert all(position["map_created", i] < position["map_removed", i] for i in created)
    print(f"tracepoint discovery: {len(seen['map_created'])}/{len(created)} maps of "
          f"{LIFETIME * 1000:.0f} ms reported")
    st = status(d)
    assert st["creations_seen"] >= len(created)
    assert st["creations_missed"] == {"ring_full": 0, "unresolved": 0, "queue_full": 0}
    fds_after = wait_until(lambda: (f := len(os.listdir(f"/proc/{pid}/fd"))) <= fds_before
                           and f or None, f"the daemon's fds back to {fds_before}")
    assert fds_after <= fds_before
    programs = {a["prog_id"] for a in attachments(pid)}
    assert len(programs) == 2 and programs <= {p["id"] for p in pymap_programs()}
    assert d.stop() == 0
    assert attachments(pid) == []
    remaining = {p["id"] for p in pymap_programs()}
    assert not programs & remaining, "the daemon's tracepoint programs outlived it"

    poller = daemon_factory("--set", 'watch.discovery="poll"')
    assert "map discovery: polling map ids" in poller.log.read_text()
    assert status(poller)["discovery"] == "poll (watch.discovery)"
    assert attachments(poller.proc.pid) == []
    created, seen = follow_churn(poller, f"p{token()[:5]}_", expect_all=False)
    polled = len(set(seen["map_created"]) & set(created))
    print(f"poll discovery: {polled}/{len(created)} maps of {LIFETIME * 1000:.0f} ms reported")
    assert polled < len(created) / 2


@pytest.mark.kernel
def test_a_pin_renames_a_known_map_at_once(daemon_factory, tracepoints, bpffs_dir):
    """A map pinned after the daemon read it is re-read at once (not at the 30 s refresh):
    its display name becomes the pin's, and a subscriber of that name gets it watched."""
    d = daemon_factory()
    long_name = f"mw{token()}_pinned_later"  # the kernel keeps 15 characters of it
    fd = syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name=long_name[:15])
    try:
        map_id = syscall.map_info(fd).id
        with Follower(d, f"{long_name}*", "-f"):
            wait_until(lambda: status(d)["subscriptions"], "the subscription")
            time.sleep(2)  # the daemon has read the map, under its kernel name
            assert all(w["id"] != map_id for w in status(d)["watched"])
            t0 = time.monotonic()
            syscall.obj_pin(fd, str(bpffs_dir / long_name))
            wait_until(lambda: any(w["id"] == map_id and w["name"] == long_name
                                   for w in status(d)["watched"]),
                       "the map watched under its pin name", timeout=15)
            print(f"pinned map watched under its pin name after "
                  f"{time.monotonic() - t0:.2f} s (the full re-read is every 30 s)")
            assert time.monotonic() - t0 < 15
    finally:
        os.close(fd)


# --- the engine's bookkeeping, in-process ------------------------------------------------


async def test_created_and_gone_maps_are_reported_and_late_reports_wait():
    cat = FakeCatalog()
    cat.add(record(10, "flows"))
    engine, rec = make_engine(cat)
    subscribe(engine, b"map:flows")  # a glob's prefix: flows*
    await engine.cycle()  # baseline: 10 is known

    def created(*recs):
        return [mapwatch.Created(99, 3, r) for r in recs]

    # 11 lived and died between two cycles; 12 is alive; 13 is nobody's interest; 10 known
    engine.maps_created(created(record(11, "flows_a"), record(13, "other"), record(10, "flows")))
    cat.add(record(12, "flows_b"))
    engine.maps_created(created(record(12, "flows_b")))
    await engine.cycle()
    events = [(m.action, m.map.id) for m, _ in rec.messages(schema.MapEvent)]
    assert events == [("map_created", 12), ("map_created", 11), ("map_removed", 11)]

    # A creation reported while the cycle reads the ids is judged by the next cycle,
    # which sees the map.
    real_ids = cat.ids

    def ids_then_create():
        out = real_ids()
        trio.from_thread.run_sync(engine.maps_created, created(record(14, "flows_c")))
        return out

    cat.ids = ids_then_create  # type: ignore[method-assign]
    await engine.cycle()
    cat.ids = real_ids  # type: ignore[method-assign]
    assert [(m.action, m.map.id) for m, _ in rec.messages(schema.MapEvent)][3:] == []
    cat.add(record(14, "flows_c"))
    await engine.cycle()
    events = [(m.action, m.map.id) for m, _ in rec.messages(schema.MapEvent)][3:]
    assert events == [("map_created", 14)]

    # A cycle woken only by reported creations reads those ids, without walking every id.
    def no_walk():
        raise AssertionError("walked every map id for a reported creation")

    cat.ids = no_walk  # type: ignore[method-assign]
    cat.add(record(16, "flows_e"))
    engine.maps_created(created(record(15, "flows_d"), record(16, "flows_e")))
    await engine.cycle(discover=False, created_only=True)
    events = [(m.action, m.map.id) for m, _ in rec.messages(schema.MapEvent)][4:]
    assert events == [("map_created", 16), ("map_created", 15), ("map_removed", 15)]
