"""The in-kernel delta engine against the user-space one, on real kernel maps.

Differential: each test drives one real map with random adds, updates and
deletes (from this process, as another program would) and polls it with BOTH
engines after every round; the event streams must be identical.  Within one
poll the engines may order entries differently (the user-space engine follows
the dump order on some paths, the in-kernel one key order), so a poll's events
are compared as sorted lists; the action order (added, updated, removed) is
checked for both.  bpftool is the oracle for the kept state at the end.

Routes: ``for_each only`` (every step a socket filter calling
``bpf_for_each_map_elem``, what a host that refuses BPF iterators gets) runs on
every host; ``for_each`` uses iterators where the host loads them (first walk,
overflow); ``iterator`` walks with ``bpf_map_elem`` iterators alone.  Where the
host refuses iterators (tests/support/kernel.py's probe says so), a test of a
route that needs them checks the documented fallback instead: the engine is
refused with the probe's reason, and the user-space engine's events replay to
bpftool's dump.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import struct
import subprocess
import time
from typing import cast

import numpy as np
import pytest
from support.kernel import bpftool_entries, host_allows, host_features, made_up_features

from watcher.daemon.config import WatchConfig
from watcher.daemon.diff import Action, Delta, EngineSnapshot, KernelDelta, choose_engine, diff
from watcher.kernel.asm.assembler import R3, R8, Asm
from watcher.kernel.asm.readonly import check_read_only
from watcher.kernel.features import probe as kf
from watcher.kernel.kdelta import sizing
from watcher.kernel.kdelta.objects import Broker
from watcher.kernel.kdelta.programs import walk_program
from watcher.kernel.kdelta.writers import delete_program, state_program
from watcher.kernel.maps import find as kmaps
from watcher.kernel.maps.dump import dump, value_stride
from watcher.kernel.sys import syscall
from watcher.kernel.sys.abi import percpu_slot
from watcher.kernel.sys.create import Unsupported


def events(delta: Delta | None, key_size: int, stride: int) -> list[tuple]:
    if delta is None:
        return []
    assert list(delta.actions) == sorted(delta.actions), "added, then updated, then removed"
    return sorted((Action(delta.actions[i]).name,
                   delta.keys[i * key_size:(i + 1) * key_size],
                   delta.values[i * stride:(i + 1) * stride],
                   delta.old_values[i * stride:(i + 1) * stride]) for i in range(delta.count))


def user_poll(fd: int, record, prev: EngineSnapshot | None) -> tuple[EngineSnapshot, Delta | None]:
    """The user-space engine's poll, as watcher.daemon.engine does it."""
    stride = value_stride(record)
    keys, values, count = bytearray(), bytearray(), 0
    for chunk in dump(fd, record):
        keys += chunk.keys
        values += chunk.values
        count += chunk.count
    snap = EngineSnapshot(keys, values, count, record.key_size, stride)
    return snap, (None if prev is None else diff(prev, snap))


FOR_EACH_ONLY, FOR_EACH, ITERATOR = "for_each only", "for_each", "iterator"
TINY_RING = "for_each only, a one-page ring"  # every burst overflows: passes and re-sweeps
CASES = [  # (type, key size, value size, max entries, route)
    ("hash", 8, 12, 300, FOR_EACH_ONLY),
    ("hash", 8, 12, 300, TINY_RING),
    ("hash", 8, 12, 300, FOR_EACH),
    ("hash", 8, 12, 300, ITERATOR),  # the iterator route for every walk
    ("hash", 6, 40, 300, FOR_EACH_ONLY),  # odd key size; value over EXACT_MAX: hashed
    ("hash", 6, 40, 300, FOR_EACH),
    ("lru_hash", 8, 16, 300, FOR_EACH_ONLY),
    ("lru_hash", 8, 16, 300, FOR_EACH),
    ("array", 4, 12, 300, FOR_EACH_ONLY),
    ("array", 4, 12, 300, TINY_RING),
    ("array", 4, 12, 300, FOR_EACH),
    ("array", 4, 12, 300, ITERATOR),
    ("percpu_hash", 8, 12, 300, ITERATOR),  # per-CPU maps always take the iterator
    ("percpu_array", 4, 20, 300, ITERATOR),
    ("lru_percpu_hash", 4, 8, 300, ITERATOR),
]


def iterators_for(route: str) -> bool:
    """Whether a walker on ``route`` may use iterators on this host."""
    return route not in (FOR_EACH_ONLY, TINY_RING) and host_allows(kf.MAP_ITER)


def replay(first: EngineSnapshot, deltas: list[Delta | None], key_size: int, stride: int
           ) -> dict[bytes, bytes]:
    """The first state with every delta applied, as a follower rebuilds the map."""
    state = {bytes(first.keys[i * key_size:(i + 1) * key_size]):
             bytes(first.values[i * stride:(i + 1) * stride]) for i in range(first.count)}
    for delta in deltas:
        for action, key, value, _ in events(delta, key_size, stride):
            if action == "REMOVED":
                state.pop(key, None)
            else:
                state[key] = value
    return state


def as_bpftool(state: dict[bytes, bytes], record) -> dict[str, str | tuple[str, ...]]:
    """A replayed state in :func:`support.kernel.bpftool_entries`' shape."""
    if not record.percpu:
        return {k.hex(): v.hex() for k, v in state.items()}
    slot = percpu_slot(record.value_size)
    return {k.hex(): tuple(v[i:i + record.value_size].hex() for i in range(0, len(v), slot))
            for k, v in state.items()}


def change_randomly(rng: random.Random, fd: int, record, keyspace: list[bytes],
                    live: set[bytes], limit: int, round_: int) -> None:
    """One round of a foreign writer: adds, one-bit changes and deletes."""
    stride = value_stride(record)
    is_array = record.type.endswith("array")
    for _ in range(rng.choice((0, 1, 5, 40, 250 if round_ % 10 == 3 else 3))):
        key = rng.choice(keyspace)
        op = rng.random()
        if op < 0.25 and not is_array and key in live:
            syscall.map_delete_elem(fd, key)
            live.discard(key)
        elif op < 0.5 and key in live:  # one byte changes: fingerprints must see it
            value = bytearray(syscall.map_lookup_elem(fd, key, stride) or bytes(stride))
            at = rng.randrange(record.value_size)
            if record.percpu:
                at += rng.randrange(stride // percpu_slot(record.value_size)) * \
                    percpu_slot(record.value_size)
            value[at] ^= 1 << rng.randrange(8)
            syscall.map_update_elem(fd, key, bytes(value))
        elif len(live) < limit or key in live:
            syscall.map_update_elem(fd, key, rng.randbytes(stride)
                                    if record.percpu else rng.randbytes(record.value_size))
            live.add(key)


@pytest.fixture(scope="module")
def broker():
    """The objects broker, as the daemon runs it: the engine's objects are made there."""
    owner = Broker()
    owner.start()
    yield owner
    owner.close()


@pytest.mark.parametrize("map_type,key_size,value_size,max_entries,route", CASES)
def test_both_engines_make_identical_events(maps, broker, map_type, key_size, value_size,
                                            max_entries, route, monkeypatch):
    rng = random.Random(f"{map_type}{key_size}{value_size}")
    if route == TINY_RING:  # 4 KiB: about 140 rows, so the 250-change bursts overflow it
        monkeypatch.setattr(sizing, "ring_bytes", lambda record, stride: 4096)
    fd, map_id = maps.create(map_type, key_size, value_size, max_entries, name="pymap_kd_t")
    record = kmaps.record_from_fd(fd)
    stride = value_stride(record)
    is_array = map_type.endswith("array")
    # LRU maps evict before they are full (per-CPU free lists): stay well below max_entries
    limit = max_entries // 3 if "lru" in map_type else max_entries
    keyspace = [struct.pack("<I", i) for i in range(max_entries)] if is_array else \
        [rng.randbytes(key_size) for _ in range(max_entries * 2)]
    ro = kmaps.open_map(map_id=map_id)
    live: set[bytes] = set()
    if route not in (FOR_EACH_ONLY, TINY_RING) and not host_allows(kf.MAP_ITER) and \
            (route == ITERATOR or record.percpu):
        try:
            check_iterator_fallback(fd, ro, map_id, record, rng, keyspace, live, limit, route)
        finally:
            syscall.os.close(ro)
        return
    for_each = route != ITERATOR
    kernel = KernelDelta(record, stride, use_for_each=for_each, broker=broker,
                         iterators=iterators_for(route))
    assert kernel.walker.each == (for_each and not record.percpu)
    try:
        u_state, _ = user_poll(ro, record, None)
        k_state, k_delta = kernel.poll(ro, None, report_all=False)
        assert k_delta is None, "the first poll only records the state"
        total = hits = 0
        overflowed = False
        extra = kernel.walker.passes - 1  # walks beyond one per poll: the first poll's too
        for round_ in range(40):
            change_randomly(rng, fd, record, keyspace, live, limit, round_)
            u_state, u_delta = user_poll(ro, record, u_state)
            k_state, k_delta = kernel.poll(ro, k_state, report_all=False)
            hits += kernel.last_walk.get("hits", 0)
            overflowed = overflowed or kernel.walker.passes > 1
            extra += max(kernel.walker.passes - 1, 0)
            expected = events(u_delta, key_size, stride)
            assert events(k_delta, key_size, stride) == expected, f"round {round_}"
            total += len(expected)
        assert total > 100, "the rounds changed too little to compare engines"
        walker = kernel.walker
        assert walker.walks + walker.quick_polls == 41 + extra
        # unchanged rounds of a for_each hash map are settled by the walk-order check, and
        # its walks find most entries through the record, removals included
        assert (walker.quick_polls > 0) == (walker.each and not is_array)
        assert (walker.record_sweeps > 0) == (walker.each and not is_array)
        assert hits > 0 if walker.each and not is_array else hits == 0
        if route == TINY_RING:
            assert overflowed, "the ring never overflowed: the passes went untested"
        # bpftool: the state the in-kernel engine keeps is what the map holds
        out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                             capture_output=True, text=True, check=True).stdout
        held = {bytes(int(b, 16) for b in e["key"]) for e in json.loads(out)}
        mine = {bytes(k_state.keys[i * key_size:(i + 1) * key_size]) for i in range(k_state.count)}
        assert mine == held
    finally:
        kernel.close()
        syscall.os.close(ro)


def check_iterator_fallback(fd: int, ro: int, map_id: int, record, rng: random.Random,
                            keyspace: list[bytes], live: set[bytes], limit: int,
                            route: str) -> None:
    """A host that refuses iterators: a walker that needs one is refused, the engine
    choice says why with the probe's errno, and the user-space engine's events, replayed
    from its first state, equal bpftool's dump after every round of changes."""
    stride = value_stride(record)
    refusal = host_features().get(kf.MAP_ITER)
    assert refusal.error, refusal
    with pytest.raises(Unsupported):
        KernelDelta(record, stride, use_for_each=route != ITERATOR, iterators=False)
    config = WatchConfig(kernel_delta_min_entries=0, kernel_delta_types=[record.type])
    engine, why = choose_engine(record, stride, config, 0, host_features())
    if record.percpu:
        assert engine is None, why
        assert why == ("user-space: per-CPU maps need a bpf_map_elem iterator (a for_each "
                       "callback sees one CPU's slot): map-element iterators refused by this "
                       f"kernel ({refusal.error})"), why
    else:  # the iterator route is never chosen where for_each works: for_each only
        assert engine is not None and why.endswith(
            f"walked by bpf_for_each_map_elem only (map-element iterators refused by this "
            f"kernel ({refusal.error}))"), why
        engine.close()
    first, _ = user_poll(ro, record, None)
    state, deltas = first, []
    total = 0
    for round_ in range(40):
        change_randomly(rng, fd, record, keyspace, live, limit, round_)
        state, delta = user_poll(ro, record, state)
        deltas.append(delta)
        total += delta.count if delta else 0
        if round_ % 10 == 9:
            replayed = replay(first, deltas, record.key_size, stride)
            assert as_bpftool(replayed, record) == bpftool_entries(map_id)
    assert total > 100, "the rounds changed too little to check the fallback"


@pytest.mark.parametrize("route", [FOR_EACH_ONLY, FOR_EACH])
def test_output_larger_than_one_read_is_complete(maps, route):
    """Output larger than its buffer must not be lost: each element writes its output
    before it commits its shadow entry, so what did not fit is walked again.  With
    iterators, the seq_file (8 pages a read) and the iterator after a full ring; without
    (for_each only, a host that refuses iterators), more for_each passes, the first
    walk's included."""
    n = 20000
    fd, map_id = maps.create("hash", 8, 16, n, name="pymap_kd_big")
    record = kmaps.record_from_fd(fd)
    keys = b"".join(struct.pack("<Q", i) for i in range(n))
    syscall.map_update_batch(fd, keys, bytes(16 * n), n)
    ro = kmaps.open_map(map_id=map_id)
    iterators = iterators_for(route)
    kernel = KernelDelta(record, 16, iterators=iterators)
    try:
        state, delta = kernel.poll(ro, None, report_all=True)
        assert delta is not None and delta.count == n == state.count
        assert kernel.walker.passes == (1 if iterators else 3), "a 256 KiB ring, 20,000 rows"
        syscall.map_update_batch(fd, keys, b"\1" * (16 * n), n)
        state, delta = kernel.poll(ro, state, report_all=False)
        assert kernel.last_walk["overflow"] > 0, "the for_each ring should have overflowed"
        assert kernel.walker.passes == (2 if iterators else 3)
        assert delta is not None and delta.count == n
        assert set(delta.actions) == {Action.UPDATED}
        assert delta.values == b"\1" * (16 * n) and delta.old_values == bytes(16 * n)
        state, delta = kernel.poll(ro, state, report_all=False)
        assert delta is not None and delta.count == 0
        # more removed keys than the ring holds: the sweep finishes through the iterator,
        # or through a second for_each sweep
        gone = n - 1000
        for i in range(gone):
            syscall.map_delete_elem(fd, struct.pack("<Q", i))
        state, delta = kernel.poll(ro, state, report_all=False)
        assert kernel.walker.sweep_fallbacks == 1
        assert delta is not None and delta.count == gone == n - state.count
        assert set(delta.actions) == {Action.REMOVED}
        assert delta.keys == keys[:8 * gone] and delta.values == b"\1" * (16 * gone)
    finally:
        kernel.close()
        syscall.os.close(ro)


def test_engine_choice_reasons(maps):
    fd, _ = maps.create("percpu_hash", 8, 8, 100000, name="pymap_kd_types")
    engine, why = choose_engine(kmaps.record_from_fd(fd), 8, WatchConfig(), 0, host_features())
    assert engine is None and why == "user-space: percpu_hash is not in watch.kernel_delta_types"
    fd, _ = maps.create("array", 4, 8, 100000, name="pymap_kd_dflt")
    engine, why = choose_engine(kmaps.record_from_fd(fd), 8, WatchConfig(), 0, host_features())
    assert engine is not None and why.startswith("in-kernel: 100000 max entries"), why
    engine.close()
    config = WatchConfig(kernel_delta_min_entries=100, kernel_delta_types=["hash"])
    fd, _ = maps.create("lpm_trie", 8, 8, 100, name="pymap_kd_lpm", flags=1)
    engine, why = choose_engine(kmaps.record_from_fd(fd), 8, config, 0, host_features())
    assert engine is None and why == "user-space: lpm_trie maps have no bpf_map_elem iterator"
    fd, _ = maps.create("hash", 8, 8, 50, name="pymap_kd_small")
    engine, why = choose_engine(kmaps.record_from_fd(fd), 8, config, 0, host_features())
    assert engine is None and "50 max entries < kernel_delta_min_entries 100" in why
    fd, _ = maps.create("hash", 8, 8, 1000, name="pymap_kd_cap")
    record = kmaps.record_from_fd(fd)
    engine, why = choose_engine(record, 8, WatchConfig(kernel_delta_min_entries=100,
                                                       kernel_delta_types=["hash"],
                                                       kernel_delta_max_bytes=10000), 0,
                                 host_features())
    assert engine is None and "over kernel_delta_max_bytes 10000" in why
    engine, why = choose_engine(record, 8, WatchConfig(kernel_delta="off"), 0, host_features())
    assert engine is None and why == "user-space: watch.kernel_delta is off"
    engine, why = choose_engine(record, 8, config, 0, host_features())
    try:
        assert engine is not None and why.startswith("in-kernel: 1000 max entries")
        # the estimate used for the cap is never much below what the kernel charges (the
        # cap holds); kernels count differently: 6.18 charges within 10 % of it, 6.1's
        # fdinfo memlock for the same objects is under half (make test-kernels)
        assert engine.kernel_bytes > 0
        from watcher.kernel.kdelta.sizing import shadow_bytes_estimate
        assert 0.9 < shadow_bytes_estimate(record, 8) / engine.kernel_bytes < 2.5
    finally:
        if engine:
            engine.close()


def test_each_route_is_chosen_from_the_probe_and_says_why(maps):
    config = WatchConfig(kernel_delta_min_entries=0,
                         kernel_delta_types=["hash", "array", "percpu_hash"])
    fd, _ = maps.create("hash", 8, 8, 100, name="pymap_kd_route")
    hash_rec = kmaps.record_from_fd(fd)
    fd, _ = maps.create("percpu_hash", 8, 8, 100, name="pymap_kd_rpcpu")
    percpu_rec = kmaps.record_from_fd(fd)
    no_iter = made_up_features({kf.MAP_ITER: "EPERM"})
    engine, why = choose_engine(hash_rec, 8, config, 0, no_iter)
    try:
        assert engine is not None and not engine.walker.iterators and engine.walker.each
        assert why == ("in-kernel: 100 max entries, walked by bpf_for_each_map_elem only "
                       "(map-element iterators refused by this kernel (EPERM))"), why
    finally:
        if engine:
            engine.close()
    engine, why = choose_engine(percpu_rec, 8, config, 0, no_iter)
    assert engine is None and why.startswith("user-space: per-CPU maps need a bpf_map_elem "
                                             "iterator"), why
    engine, why = choose_engine(hash_rec, 8, config, 0, made_up_features({kf.PROG_TEST_RUN: "EPERM"}))
    assert engine is None and why.startswith("user-space: in-kernel engine unavailable: "
                                             "BPF_PROG_TEST_RUN refused by this kernel (EPERM)")
    if host_allows(kf.MAP_ITER):  # for_each refused, iterators loaded: the iterator route
        engine, why = choose_engine(hash_rec, 8, config, 0, made_up_features({kf.FOR_EACH: "EINVAL"}))
        try:
            assert engine is not None and not engine.walker.each, why
            assert why.endswith("walked by bpf_iter (bpf_for_each_map_elem refused by this "
                                "kernel (EINVAL))"), why
        finally:
            if engine:
                engine.close()
    else:  # neither: user space, both reasons named
        engine, why = choose_engine(hash_rec, 8, config, 0, made_up_features({kf.FOR_EACH: "EINVAL"}))
        assert engine is None and "bpf_for_each_map_elem refused by this kernel (EINVAL)" in why
        assert f"map-element iterators refused by this kernel " \
               f"({host_features().get(kf.MAP_ITER).error})" in why, why


def test_generated_programs_cannot_store_through_the_watched_map():
    own = {3, 4, 5}  # shadow, state, ring; 6 is the watched map
    program = walk_program(8, 16, shadow_fd=3, state_fd=4, array=False)
    check_read_only(program, own)  # the real programs pass
    check_read_only(walk_program(8, 16, shadow_fd=3, state_fd=4, array=False, ring_fd=5,
                                  map_fd=6), own)
    check_read_only(state_program(4), own)
    check_read_only(delete_program(8, 3, 4), own)
    a = Asm()
    a.st(8, R8, 0, 1)  # *(u64 *)(value + 0) = 1: a write into the watched map
    a.exit()
    with pytest.raises(AssertionError):
        check_read_only(program[:-8] + a.assemble(), own)
    b = Asm()
    b.st(8, R3, 0, 1)  # a for_each callback's value argument
    b.exit()
    with pytest.raises(AssertionError):
        check_read_only(program[:-8] + b.assemble(), own)
    # the writer programs, pointed at the watched map instead of pymap's own
    for wrong in (state_program(6), delete_program(8, 6, 4), delete_program(8, 3, 6)):
        with pytest.raises(AssertionError):
            check_read_only(wrong, own)
    with pytest.raises(AssertionError):  # the walk's shadow insert, aimed at the watched map
        check_read_only(walk_program(8, 16, shadow_fd=6, state_fd=4, array=False), own)
    c = Asm()
    c.call(166)  # bpf_sys_bpf: not a helper pymap's programs call
    c.exit()
    with pytest.raises(AssertionError):
        check_read_only(c.assemble(), own)


def test_loader_refuses_program_types_pymap_never_loads():
    """BPF_PROG_TYPE_SYSCALL (31) could call bpf_sys_bpf: pymap's loader refuses it, and
    tracing programs other than map element iterators, before the kernel sees them."""
    from watcher.kernel.sys import create as progload

    with pytest.raises(ValueError, match="program type 31"):
        progload.load_program(bytes(16), "pymap_kd_sys", 31)
    with pytest.raises(ValueError, match="program type 26"):
        progload.load_program(bytes(16), "pymap_kd_fentry", progload.BPF_PROG_TYPE_TRACING,
                              attach_type=24)  # BPF_TRACE_FENTRY


@pytest.mark.kernel
def test_daemon_follows_a_map_in_the_kernel(daemon_factory, maps, bpffs_dir):
    """End to end: the daemon chooses the in-kernel engine, says so in status, delivers
    added/updated/removed, serves a snapshot from its kept state, and holds no
    reference that would keep a freed map alive (map_removed still arrives)."""
    from support.events import (
        FAST,
        Follower,
        changes,
        cli_status,
        replay_lines,
        status,
        wait_ready,
        wait_until,
        watch_of,
    )
    from support.kernel import bpftool_entries, token, u32

    d = daemon_factory(*FAST, "--set", "watch.kernel_delta_min_entries=0",
                       "--set", 'watch.kernel_delta_types=["hash"]')
    name = f"kd{token()}"
    pin = bpffs_dir / name
    fd, map_id = maps.create("hash", 4, 8, 64, name=name, pin=pin)
    syscall.map_update_elem(fd, u32(9), u32(90) * 2)  # before anyone watches: no event
    with Follower(d, name, "-f") as f:
        wait_ready(d, name)
        watch = watch_of(status(d), name)
        assert watch is not None
        assert watch["engine"].startswith("in-kernel:"), watch
        assert watch["kernel_bytes"] > 0
        for n in range(1, 4):
            syscall.map_update_elem(fd, u32(n), u32(n) * 2)
        f.wait_count(3)
        syscall.map_update_elem(fd, u32(1), u32(11) * 2)
        syscall.map_delete_elem(fd, u32(2))
        lines = f.wait_count(5)
        assert changes(lines[3:]) == {
            ("updated", u32(1).hex(), (u32(11) * 2).hex(), (u32(1) * 2).hex()),
            ("removed", u32(2).hex(), (u32(2) * 2).hex(), None)}
        assert replay_lines(lines, {u32(9).hex(): (u32(90) * 2).hex()}) == bpftool_entries(map_id)
        shown = d.cli("status", check=True).stdout
        assert "in-kernel" in shown
        assert any(w["engine"].startswith("in-kernel") for w in cli_status(d)["watched"])
        got = d.cli("events", name, "--snapshot", "-o", "json", timeout=30)
        assert got.returncode == 0, got.stderr
        snap = {(ln["key"], ln["value"]) for ln in map(json.loads, got.stdout.splitlines())
                if ln.get("snapshot")}
        assert snap == set(bpftool_entries(map_id).items())
        os.unlink(pin)
        maps.close(fd)
        lines = f.wait_count(6)
        assert lines[5]["action"] == "map_removed"
    wait_until(lambda: name not in {w["name"] for w in status(d)["watched"]}, "unwatched")


def test_shadow_full_mid_walk_sweeps_and_walks_again(maps):
    """Half the keys replaced at once: new keys arrive while the removed ones still fill
    the shadow map.  The walk then sweeps and walks again; events stay identical."""
    n = 300
    fd, map_id = maps.create("hash", 8, 8, n, name="pymap_kd_churn")
    record = kmaps.record_from_fd(fd)
    old = [struct.pack("<Q", i) for i in range(n)]
    new = [struct.pack("<Q", 1000 + i) for i in range(n // 2)]
    for k in old:
        syscall.map_update_elem(fd, k, k)
    ro = kmaps.open_map(map_id=map_id)
    kernel = KernelDelta(record, 8, iterators=host_allows(kf.MAP_ITER))
    try:
        u_state, _ = user_poll(ro, record, None)
        k_state, _ = kernel.poll(ro, None, report_all=False)
        for gone, come in zip(old[::2], new, strict=True):
            syscall.map_delete_elem(fd, gone)
            syscall.map_update_elem(fd, come, come)
        u_state, u_delta = user_poll(ro, record, u_state)
        k_state, k_delta = kernel.poll(ro, k_state, report_all=False)
        assert kernel.last_walk["full"] > 0, "the shadow map never filled: nothing tested"
        assert events(k_delta, 8, 8) == events(u_delta, 8, 8)
        assert len(events(k_delta, 8, 8)) == n
        u_state, u_delta = user_poll(ro, record, u_state)
        k_state, k_delta = kernel.poll(ro, k_state, report_all=False)
        assert events(k_delta, 8, 8) == events(u_delta, 8, 8) == []
    finally:
        kernel.close()
        syscall.os.close(ro)


def test_kernel_lets_programs_write_through_a_read_only_fd(maps):
    """Why the generated code is checked: attaching an iterator, or loading a program that
    names a map, ignores the fd's mode, and both may store into the map's values
    (docs/architecture.md).  A host that refuses iterators refuses this one at load, with
    the errno its probe gave; the for_each half holds on every host."""
    from watcher.kernel.asm.assembler import JEQ, R0, R1
    from watcher.kernel.kdelta.walker import read_iter
    from watcher.kernel.sys import create as progload

    fd, map_id = maps.create("hash", 8, 8, 4, name="pymap_kd_ro")
    syscall.map_update_elem(fd, struct.pack("<Q", 1), struct.pack("<Q", 7))
    a = Asm()
    a.ldx(8, R8, R1, 24)
    a.jmp(JEQ, R8, 0, "out")
    a.st(8, R8, 0, 42)
    a.label("out")
    a.movi(R0, 0)
    a.exit()
    ro = kmaps.open_map(map_id=map_id)
    try:
        expected = 7
        if host_allows(kf.MAP_ITER):
            prog = progload.load_program(a.assemble(), "pymap_kd_rotest",
                                         progload.BPF_PROG_TYPE_TRACING,
                                         progload.BPF_TRACE_ITER, progload.map_elem_iter_btf_id())
            try:
                link = progload.attach_map_iter(prog, ro)
                try:
                    read_iter(link)
                finally:
                    os.close(link)
            finally:
                os.close(prog)
            expected = 42
        else:
            with pytest.raises(OSError) as refused:
                progload.load_program(a.assemble(), "pymap_kd_rotest",
                                      progload.BPF_PROG_TYPE_TRACING, progload.BPF_TRACE_ITER,
                                      progload.map_elem_iter_btf_id())
            assert errno_name(refused.value) == host_features().get(kf.MAP_ITER).error
        assert syscall.map_lookup_elem(fd, struct.pack("<Q", 1), 8) == struct.pack("<Q", expected)
        # nor when a program names the map (as the for_each walk does) through that fd
        _bump_in_place(ro, 1)
        assert syscall.map_lookup_elem(fd, struct.pack("<Q", 1), 8) == \
            struct.pack("<Q", expected + 1)
    finally:
        os.close(ro)


def errno_name(e: OSError) -> str:
    import errno as errno_module
    return errno_module.errorcode.get(e.errno or 0, "")


def _bump_in_place(map_fd: int, key: int) -> None:
    """A real BPF program (socket filter, run once) that adds 1 to the first u64 of the
    value of ``key`` through its lookup pointer: an in-place update, as counters do,
    which keeps the element where it is in its bucket (the walk order does not change)."""
    from watcher.kernel.asm.assembler import ADD, JEQ, R0, R1, R2, R10
    from watcher.kernel.sys import create as progload

    a = Asm()
    a.ld_imm64(R1, key)
    a.stx(8, R10, -8, R1)
    a.ld_map_fd(R1, map_fd)
    a.mov(R2, R10)
    a.alu64(ADD, R2, -8)
    a.call(1)  # bpf_map_lookup_elem
    a.jmp(JEQ, R0, 0, "out")
    a.ldx(8, R1, R0, 0)
    a.alu64(ADD, R1, 1)
    a.stx(8, R0, 0, R1)
    a.label("out")
    a.movi(R0, 0)
    a.exit()
    prog = progload.load_program(a.assemble(), "pymap_kd_bump",
                                 progload.BPF_PROG_TYPE_SOCKET_FILTER)
    try:
        syscall.prog_test_run(prog, bytes(64))
    finally:
        os.close(prog)


def test_walk_order_check_sees_in_place_updates(maps):
    """An unchanged hash map is settled by the walk-order check alone; a value changed in
    place by a program (order unchanged) must still be delivered."""
    n = 1000
    fd, map_id = maps.create("hash", 8, 16, n, name="pymap_kd_inpl")
    keys = b"".join(struct.pack("<Q", i) for i in range(n))
    syscall.map_update_batch(fd, keys, b"".join(struct.pack("<QQ", i, 7) for i in range(n)), n)
    record = kmaps.record_from_fd(fd)
    ro = kmaps.open_map(map_id=map_id)
    iterators = host_allows(kf.MAP_ITER)
    kernel = KernelDelta(record, 16, iterators=iterators)
    try:
        # the first walk records everything: with the iterator (no walk record), or with a
        # for_each walk that also writes the walk record the check compares with
        state, _ = kernel.poll(ro, None, report_all=False)
        state, delta = kernel.poll(ro, state, report_all=False)
        quick = 0 if iterators else 1  # after an iterator walk: a full for_each walk first
        assert delta is not None and delta.count == 0 and kernel.walker.quick_polls == quick
        state, delta = kernel.poll(ro, state, report_all=False)
        quick += 1
        assert delta is not None and delta.count == 0 and kernel.walker.quick_polls == quick
        _bump_in_place(fd, 500)
        state, delta = kernel.poll(ro, state, report_all=False)
        assert kernel.walker.quick_polls == quick, "the check must see the changed value"
        assert events(delta, 8, 16) == [("UPDATED", struct.pack("<Q", 500),
                                         struct.pack("<QQ", 501, 7), struct.pack("<QQ", 500, 7))]
        state, delta = kernel.poll(ro, state, report_all=False)
        assert delta is not None and delta.count == 0 and kernel.walker.quick_polls == quick + 1
    finally:
        kernel.close()
        os.close(ro)


def test_a_failing_walk_falls_back_to_user_space_with_one_warning(maps, caplog):
    """A walk the kernel refuses (here: the state map fd replaced by /dev/null under the
    engine) costs one warning; the map goes on through user space, events intact."""
    from watcher.daemon.config import Config
    from watcher.daemon.engine import Engine

    fd, map_id = maps.create("hash", 8, 8, 64, name="pymap_kd_fail")
    for i in range(3):
        syscall.map_update_elem(fd, struct.pack("<Q", i), struct.pack("<Q", i))
    config = Config()
    config.watch.kernel_delta_min_entries = 0
    engine = Engine(config, None, host_features())  # type: ignore[arg-type]  # read_kernel publishes nothing
    watch = engine._start(kmaps.record_from_fd(fd))  # noqa: SLF001 (one watch, driven)
    assert watch.kernel is not None and watch.engine.startswith("in-kernel:")
    snap, delta, _ = engine.poller.read_kernel(watch, report_all=False)
    watch.snapshot = snap
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, watch.kernel.walker.state_fd)
    finally:
        os.close(null)
    syscall.map_update_elem(fd, struct.pack("<Q", 1), struct.pack("<Q", 11))
    with caplog.at_level("WARNING", logger="pymap.engine"):
        snap, delta, failed = engine.poller.read_kernel(watch, report_all=False)
    watch.use_user_space(failed)  # what the poll does on the loop
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "in-kernel walk failed" in warnings[0].getMessage()
    assert watch.kernel is None and watch.engine.startswith("user-space: in-kernel walk failed")
    assert events(delta, 8, 8) == [("UPDATED", struct.pack("<Q", 1), struct.pack("<Q", 11),
                                    struct.pack("<Q", 1))]


def test_a_dead_broker_leaves_maps_on_user_space_with_one_warning_each(maps, caplog):
    """The objects broker killed under a running engine: one warning that the engine is
    unavailable, one for the map whose next walk needed a program; the map goes on through
    user space, and a map watched later starts there without another warning."""
    from watcher.daemon.config import Config
    from watcher.daemon.engine import Engine

    fd, _ = maps.create("hash", 8, 8, 64, name="pymap_kd_dead")
    later, _ = maps.create("hash", 8, 8, 64, name="pymap_kd_later")
    for i in range(3):
        syscall.map_update_elem(fd, struct.pack("<Q", i), struct.pack("<Q", i))
    config = Config()
    config.watch.kernel_delta_min_entries = 0
    broker = Broker()
    broker.start()
    engine = Engine(config, None, host_features(), broker=broker)  # type: ignore[arg-type]
    try:
        watch = engine._start(kmaps.record_from_fd(fd))  # noqa: SLF001 (one watch, driven)
        assert watch.kernel is not None and watch.engine.startswith("in-kernel:")
        watch.snapshot, _, _ = engine.poller.read_kernel(watch, report_all=False)
        syscall.map_update_elem(fd, struct.pack("<Q", 1), struct.pack("<Q", 11))
        watch.snapshot, _, _ = engine.poller.read_kernel(watch, report_all=False)  # a for_each walk
        assert watch.kernel is not None
        assert broker.proc is not None
        broker.proc.kill()
        broker.proc.wait()
        syscall.map_update_elem(fd, struct.pack("<Q", 2), struct.pack("<Q", 22))
        with caplog.at_level("WARNING"):
            snap, delta, failed = engine.poller.read_kernel(watch, report_all=False)
            watch.use_user_space(failed)  # what the poll does on the loop
            other = engine._start(kmaps.record_from_fd(later))  # noqa: SLF001 (one watch, driven)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 2, warnings
        assert "the in-kernel engine is unavailable" in warnings[0]
        assert "in-kernel walk failed" in warnings[1]
        assert watch.kernel is None
        assert events(delta, 8, 8) == [("UPDATED", struct.pack("<Q", 2),
                                        struct.pack("<Q", 22), struct.pack("<Q", 2))]
        assert other.kernel is None
        assert other.engine.startswith("user-space: objects broker unavailable"), other.engine
    finally:
        broker.close()


def held_map_ids(pid: int) -> dict[int, str]:
    """Ids and names of the maps process ``pid`` and its children hold fds of."""
    pids = {pid}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        pids |= {int(c) for c in (task / "children").read_text().split()}
    held = {map_id for map_id, procs in kmaps.map_holders().items()
            if any(p in pids for p, _ in procs)}
    return {r.id: r.name for r in kmaps.list_maps(only=held)}


@pytest.mark.kernel
def test_the_engines_own_maps_are_not_the_hosts(daemon_factory, maps, bpffs_dir):
    """The in-kernel engine's maps (the objects broker makes them) are named ``pymap_kd_*``
    and so match a ``pymap_*`` glob, but they are pymap's, not the host's: the daemon
    never watches them or reports them, by their ids, whatever their names."""
    from support.events import FAST, Follower, status, wait_until, watch_of
    from support.kernel import token, u32

    d = daemon_factory(*FAST, "--set", "watch.kernel_delta_min_entries=0",
                       "--set", 'watch.kernel_delta_types=["hash"]')
    first = f"pymap_o{token()}"
    fd, _ = maps.create("hash", 4, 8, 64, name=first, pin=bpffs_dir / first)
    with Follower(d, "pymap_*", "-f") as f:
        wait_until(lambda: (watch_of(status(d), first) or {}).get("polls", 0) >= 2,
                   "the glob's map watched")
        # the in-kernel engine made its maps for it
        assert cast(dict, watch_of(status(d), first))["engine"].startswith("in-kernel:")
        second = f"pymap_n{token()}"  # made after the first's engine: its own come later
        fd2, _ = maps.create("hash", 4, 8, 64, name=second, pin=bpffs_dir / second)
        f.wait_for(lambda lines: any(ln.get("action") == "map_created"
                                     and ln["map"]["name"] == second for ln in lines),
                   "the second map's map_created")
        syscall.map_update_elem(fd2, u32(1), u32(1) * 2)  # past the cycles after its engine
        f.wait_for(lambda lines: any(ln.get("action") == "added" for ln in lines),
                   "the second map's change")
        time.sleep(1)  # five more intervals: time for a watch of an own map to start
        # Judged by id: other maps of the host may match pymap_*, another pymap daemon's
        # own (pymap_kd_*, pymap_mw_*) among them, and to this daemon those are the host's.
        reported = {ln["map"]["id"]: ln["map"]["name"]
                    for ln in f.lines if ln.get("action") == "map_created"}
        watched = {w["id"]: w["name"] for w in status(d)["watched"]}
        assert second in reported.values() and {first, second} <= set(watched.values())
        own = held_map_ids(d.proc.pid)
        assert any(name.startswith("pymap_kd") for name in own.values()), own  # engine's maps
        leaked = {name for map_id, name in (reported | watched).items() if map_id in own}
        assert not leaked, leaked
        maps.close(fd2)
        maps.close(fd)


@pytest.mark.parametrize("seed", range(6))
def test_state_rebuild_equals_delete_then_insert(seed, monkeypatch):
    """The kept state's rebuild after removals and additions (one copy, slice by slice)
    against numpy's delete-then-insert, with adds and removals at the same spots, at the
    ends, and in runs; also past the step limit, where it takes numpy's way."""
    from watcher.daemon.diff import inkernel as kdelta

    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 400))
    sk = np.unique(rng.integers(0, 10_000, size=n).astype(np.uint64) * 2)
    sv = rng.integers(0, 256, size=(len(sk), 12), dtype=np.uint8)
    rpos = np.sort(rng.choice(len(sk), size=int(rng.integers(0, len(sk) + 1)), replace=False)) \
        if len(sk) else np.zeros(0, dtype=np.intp)
    add_k = np.unique(rng.integers(-1, 10_002, size=int(rng.integers(0, 300))).astype(np.uint64)
                      * 2 + 1)  # odd: never present
    add_v = rng.integers(0, 256, size=(len(add_k), 12), dtype=np.uint8)
    keep = np.ones(len(sk), dtype=bool)
    keep[rpos] = False
    want_k = np.sort(np.concatenate([sk[keep], add_k]))
    want_v = np.concatenate([sv[keep], add_v])[np.argsort(np.concatenate([sk[keep], add_k]),
                                                          kind="stable")]
    for limit in (kdelta._REBUILD_STEPS, 0):  # noqa: SLF001 (the rebuild alone)
        monkeypatch.setattr(kdelta, "_REBUILD_STEPS", limit)
        got = kdelta._rebuild(sk, sv, rpos, add_k, add_v, 12)  # noqa: SLF001 (the rebuild alone)
        assert got.count == len(want_k)
        assert np.array_equal(got.key_array(), want_k)
        assert np.array_equal(got.value_rows(), want_v)
        assert got.order is not None
        assert np.array_equal(got.order, np.arange(len(want_k)))
