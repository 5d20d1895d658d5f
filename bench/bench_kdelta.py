"""Benchmark: the in-kernel delta engine against the user-space one (issue 11).

Run as root: ``.venv/bin/python bench/bench_kdelta.py``.  One run, for a
1,000,000-entry hash map (8-byte keys, 16-byte values, ``_common.big_hash``)
and a 1,000,000-entry array (4-byte keys, 16-byte values), side by side:

(a) raw batch read: ``dump`` of the whole map into flat buffers, best of 3;
(b) an unchanged poll, user-space engine and in-kernel engine, best of 3 each
    (targets for the in-kernel poll: <= 0.35 x (a), aim 0.25 x);
(c) 10,000 changed entries (hash: 8,000 updates, 1,000 adds, 1,000 deletes;
    array: 10,000 updates) from poll start to the last event at a ZeroMQ
    subscriber in another process, best of 3, both engines (target for the
    in-kernel engine: <= 0.6 x (a)); the subscriber must get exactly the
    changes made;
(d) a real ``pymap daemon`` watching the unchanged 1M hash map at a 1 s
    interval for a subscriber: CPU seconds per second (user + system, from
    /proc/PID/stat over 10 s), once per engine;
(e) what the objects broker costs (its round trips, not the walk): a watch's
    set-up and an unchanged poll (one program load each) of a 1,000-entry hash
    map, objects made in this process against made by the broker, best of
    :data:`SMALL_REPEATS`.

(a)-(c) run with the broker, as the daemon does.

The route is the one the daemon would take on this host (its feature probe,
``watcher.kernel.features.probe``, printed first): on a host that refuses BPF
iterators (tracing programs refused with EPERM), every step, the first poll
included, runs as ``bpf_for_each_map_elem`` socket filters: the "for_each
only" route, whose ratios are then the ones printed against (a).

Where the in-kernel time goes is printed from the same runs: the iterator's
own per-element step (a walk with a program that does nothing), the walk
with fingerprints and shadow lookups (in the daemon's read() of the iterator,
output copy included), and the user-space parse/apply of the output.

Everything made is removed on the way out (maps, pins, daemon, subscriber).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import zmq
from _common import BenchError, Daemon, big_hash, check_root, private_bpffs, private_tmp
from bench_events import (
    ENTRIES,
    N_CHANGED,
    REPEATS,
    BenchMap,
    Subscriber,
    check_events,
    raw_read,
    run_trio,
    wait_polls,
)

from watcher.kernel.features import probe as features
from watcher.kernel.features.probe import Features
from watcher.kernel.kdelta.objects import Broker
from watcher.kernel.maps.kinds import TYPE_IDS
from watcher.kernel.sys import syscall
from watcher.wire import schema

TARGET_UNCHANGED, AIM_UNCHANGED, TARGET_CHANGED = 0.35, 0.25, 0.6
CPU_SECONDS = 10.0
SMALL_ENTRIES, SMALL_REPEATS = 1000, 20


class ArrayMap:
    """A pinned 1M-entry array (u32 index, 16-byte values) and 10,000-update rounds."""

    def __init__(self, pin: Path, name: str):
        self.name, self.pin = name, pin
        self.fd = syscall.map_create(TYPE_IDS["array"], 4, 16, ENTRIES, name=name)
        syscall.obj_pin(self.fd, str(pin))
        self.id = syscall.map_info(self.fd).id
        idx = np.arange(ENTRIES, dtype=np.uint32)
        for lo in range(0, ENTRIES, 1 << 17):
            k = idx[lo:lo + (1 << 17)]
            v = np.column_stack([k.astype(np.uint64), k.astype(np.uint64) ^ 0xFFFF])
            syscall.map_update_batch(self.fd, k.tobytes(), v.tobytes(), len(k))
        self.round = 0
        self.rng = np.random.default_rng(7)

    def change(self) -> dict[str, int]:
        self.round += 1
        keys = np.sort(self.rng.choice(ENTRIES, N_CHANGED, replace=False)).astype(np.uint32)
        values = np.column_stack([keys.astype(np.uint64), np.full(N_CHANGED, self.round,
                                                                   dtype=np.uint64) << 32])
        syscall.map_update_batch(self.fd, keys.tobytes(), values.tobytes(), N_CHANGED)
        return {"added": 0, "updated": N_CHANGED, "removed": 0}

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pin)
        os.close(self.fd)


def check_counts(batches: list[dict], expected: dict[str, int]) -> None:
    counts = [sum(b["actions"][a] for b in batches) for a in range(3)]
    want = [expected["added"], expected["updated"], expected["removed"]]
    if counts != want:
        raise BenchError(f"expected actions {want}, got {counts}")


def nop_walk(fd: int, host: Features) -> float | str:
    """The iterator's per-element cost alone: a program that returns at once (or why the
    host refuses it)."""
    if not host.allows(features.MAP_ITER):
        return host.why_not(features.MAP_ITER)
    from watcher.kernel.asm.assembler import R0, Asm
    from watcher.kernel.kdelta.walker import read_iter
    from watcher.kernel.sys import create as progload

    a = Asm()
    a.movi(R0, 0)
    a.exit()
    prog = progload.load_program(a.assemble(), "pymap_bench_nop", progload.BPF_PROG_TYPE_TRACING,
                                 progload.BPF_TRACE_ITER, progload.map_elem_iter_btf_id())
    try:
        best = float("inf")
        for _ in range(REPEATS):
            link = progload.attach_map_iter(prog, fd)
            try:
                t0 = time.perf_counter()
                read_iter(link)
                best = min(best, time.perf_counter() - t0)
            finally:
                os.close(link)
        return best
    finally:
        os.close(prog)


def nop_each(fd: int) -> float:
    """bpf_for_each_map_elem's own cost: a callback that returns at once, one program run."""
    from watcher.kernel.asm.assembler import R0, Asm
    from watcher.kernel.kdelta.programs import each_func_info, each_main
    from watcher.kernel.sys import create as progload

    a = Asm()
    each_main(a, fd)
    a.movi(R0, 0)
    a.exit()
    blob, info = each_func_info()
    btf = progload.load_btf(blob)
    try:
        prog = progload.load_program(a.assemble(), "pymap_bench_nop",
                                     progload.BPF_PROG_TYPE_SOCKET_FILTER, btf_fd=btf,
                                     func_info=info)
        try:
            best = float("inf")
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                syscall.prog_test_run(prog, bytes(64))
                best = min(best, time.perf_counter() - t0)
            return best
        finally:
            os.close(prog)
    finally:
        os.close(btf)


async def engine_runs(bm, kind: str, tmp: Path, pin_dir: Path, out: dict,
                      host: Features) -> None:
    """(a)-(c) for one map: both engines in this process, the same subscriber."""
    import trio

    from watcher.daemon.config import Config
    from watcher.daemon.diff import supervise
    from watcher.daemon.engine import Engine
    from watcher.daemon.publisher import PublishedStream
    from watcher.kernel.maps import find as kmaps
    from watcher.wire.transport import PublisherOwner

    endpoint = f"ipc://{tmp}/kd-{kind}.sock"
    bm_type = "hash" if kind == "hash" else "array"
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.setsockopt(zmq.SNDHWM, 100_000)
    xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
    sub = None
    broker: Broker | None = None
    try:
        xpub.bind(endpoint)
        publisher = PublisherOwner(xpub)
        async with trio.open_nursery() as nursery:
            engines = {}
            broker = Broker()
            for engine_name in ("user-space", "in-kernel"):
                config = Config()
                config.daemon.bpffs = [str(pin_dir)]
                config.watch.interval = 3600.0
                config.watch.kernel_delta = "off" if engine_name == "user-space" else "auto"
                config.watch.kernel_delta_min_entries = 0
                config.watch.kernel_delta_types = [bm_type]
                stream = PublishedStream(publisher, secrets.token_hex(8), 100, 4096, 1.0)
                engines[engine_name] = Engine(config, stream, host, broker=(
                    broker if engine_name == "in-kernel" else None))
            broker.start()
            nursery.start_soon(supervise, broker)
            # XPUB gives zmq.Frames; each engine hears of every subscription.
            nursery.start_soon(publisher.serve, lambda frames: [  # type: ignore[arg-type]
                e.on_subscription([f.bytes for f in frames])  # type: ignore[func-returns-value]
                for e in engines.values()])
            sub = Subscriber(endpoint, schema.map_topic(bm.name), tmp / f"sub-{kind}.err")
            await trio.to_thread.run_sync(sub.wait_ready)
            await trio.sleep(0.5)
            fd = kmaps.open_map(map_id=bm.id)
            with kmaps.open_fd(fd):
                record = kmaps.record_from_fd(fd, (str(bm.pin),))
                out["raw"] = [raw_read(fd, record)[0] for _ in range(REPEATS)]
                out["nop_walk"] = nop_walk(fd, host)
                out["nop_each"] = nop_each(fd)
            for engine_name, engine in engines.items():
                res = out[engine_name] = {}
                t0 = time.perf_counter()
                watch = engine._start(record)  # noqa: SLF001 (one watch, without demand)
                res["setup"] = time.perf_counter() - t0
                res["engine"] = watch.engine
                if (watch.kernel is not None) != (engine_name == "in-kernel"):
                    raise BenchError(f"{engine_name} run got engine {watch.engine!r}")
                t0 = time.perf_counter()
                await engine.poll(watch)
                res["first"] = time.perf_counter() - t0
                walks, parses = [], []
                res["unchanged"] = []
                for _ in range(REPEATS):
                    t0 = time.perf_counter()
                    await engine.poll(watch)
                    res["unchanged"].append(time.perf_counter() - t0)
                    if watch.kernel is not None:
                        walks.append(watch.kernel.last_walk_s)
                        parses.append(watch.kernel.last_parse_s)
                        res["unchanged_steps"] = dict(watch.kernel.walker.timings)
                res["unchanged_walk"], res["unchanged_parse"] = walks, parses
                await trio.sleep(0.3)
                if any(i["kind"] == "events" for i in sub.drain()):
                    raise BenchError(f"{engine_name}: unchanged polls published events")
                res["changed"], walks, parses = [], [], []
                for _ in range(REPEATS):
                    expected = bm.change()
                    t0 = time.perf_counter()
                    t0m = time.clock_gettime(time.CLOCK_MONOTONIC)
                    await engine.poll(watch)
                    polled = time.perf_counter() - t0
                    batches = await trio.to_thread.run_sync(sub.collect, N_CHANGED, 120.0)
                    if kind == "hash":
                        check_events(batches, expected)
                    else:
                        check_counts(batches, expected)
                    res["changed"].append((max(b["t"] for b in batches) - t0m, polled))
                    if watch.kernel is not None:
                        walks.append(watch.kernel.last_walk_s)
                        parses.append(watch.kernel.last_parse_s)
                        res["changed_steps"] = dict(watch.kernel.walker.timings)
                res["changed_walk"], res["changed_parse"] = walks, parses
                if watch.kernel is not None:
                    res["kernel_bytes"] = watch.kernel.kernel_bytes
                    res["route"] = ("bpf_for_each_map_elem (BPF_PROG_TEST_RUN)"
                                    if watch.kernel.walker.each else "bpf_iter")
                    res["first_route"] = ("bpf_iter" if watch.kernel.walker.iterators else
                                          "bpf_for_each_map_elem passes, no iterator")
                    watch.kernel.close()
            nursery.cancel_scope.cancel()
    finally:
        if broker is not None:
            broker.close()
        if sub is not None:
            sub.stop()
        xpub.close(linger=0)
        ctx.term()


def broker_costs(host: Features) -> dict[str, tuple[float, float]]:
    """(e): best set-up and unchanged-poll seconds, in this process and by the broker."""
    from watcher.daemon.diff import KernelDelta
    from watcher.kernel.maps import find as kmaps

    fd = syscall.map_create(TYPE_IDS["hash"], 8, 8, SMALL_ENTRIES, name="pymap_bench_kds")
    broker = Broker()
    out = {}
    try:
        for i in range(SMALL_ENTRIES):
            syscall.map_update_elem(fd, i.to_bytes(8, "little"), i.to_bytes(8, "little"))
        record = kmaps.record_from_fd(fd)
        broker.start()
        for where, owner in (("in this process", None), ("by the broker", broker)):
            setups, polls = [], []
            for _ in range(SMALL_REPEATS):
                t0 = time.perf_counter()
                kernel = KernelDelta(record, 8, broker=owner,
                                     iterators=host.allows(features.MAP_ITER))
                setups.append(time.perf_counter() - t0)
                try:
                    state, _ = kernel.poll(fd, None, False)
                    state, _ = kernel.poll(fd, state, False)  # the walk-order record
                    t0 = time.perf_counter()
                    kernel.poll(fd, state, False)
                    polls.append(time.perf_counter() - t0)
                finally:
                    kernel.close()
            out[where] = (min(setups), min(polls))
    finally:
        broker.close()
        os.close(fd)
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cpu(bm, tmp: Path, pin_dir: Path, engine_name: str) -> tuple[float, dict]:
    """(d): CPU seconds per second of a real daemon watching the unchanged map."""
    sel = ["watch.kernel_delta=off"] if engine_name == "user-space" else \
        ["watch.kernel_delta_min_entries=0", 'watch.kernel_delta_types=["hash"]']
    run = tmp / f"daemon-{engine_name}"
    run.mkdir()
    daemon = Daemon(run, pin_dir, "--interval", "1", *(f for x in sel for f in ("--set", x)))
    sub = None
    try:
        daemon.wait_ready()
        sub = Subscriber(f"ipc://{daemon.run_dir}/events.sock", schema.map_topic(bm.name),
                         run / "sub.err")
        sub.wait_ready()
        w = wait_polls(daemon, bm.name, 3)
        c0, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
        time.sleep(CPU_SECONDS)
        c1, t1 = cpu_seconds(daemon.proc.pid), time.monotonic()
        w = wait_polls(daemon, bm.name, w["polls"] + 1)
        return (c1 - c0) / (t1 - t0), w
    finally:
        if sub is not None:
            sub.stop()
        daemon.stop()


def report(results: dict) -> None:
    print(f"pymap bench_kdelta: {ENTRIES:,} entries, 16-byte values, {os.cpu_count()} CPUs, "
          f"kernel {os.uname().release}")
    host = results["host"]
    iterators = host.allows(features.MAP_ITER)
    print("host (the daemon's feature probe): " + (
        "map-element iterators load: the for_each route, iterators for first polls and "
        "overflow" if iterators else f"{host.why_not(features.MAP_ITER)}: the for_each only "
        "route, every step a bpf_for_each_map_elem socket filter"))
    for kind, out in results["maps"].items():
        raw = min(out["raw"])
        print()
        print(f"{kind} ({'8' if kind == 'hash' else '4'}-byte keys)")
        print(f"  (a) raw batch read, best of {REPEATS}: {raw:.3f} s  "
              f"(all: {', '.join(f'{x:.3f}' for x in out['raw'])})")
        for engine_name in ("user-space", "in-kernel"):
            res = out[engine_name]
            un = min(res["unchanged"])
            ch, polled = min(res["changed"])
            print(f"  {engine_name:<10} set-up {res['setup'] * 1000:.1f} ms; "
                  f"first poll {res['first']:.3f} s; unchanged poll {un:.3f} s "
                  f"= {un / raw:.2f}x raw; {N_CHANGED:,} changed -> subscriber {ch:.3f} s "
                  f"= {ch / raw:.2f}x raw (poll {polled:.3f} s)")
        k = out["in-kernel"]
        un, ch = min(k["unchanged"]) / raw, min(k["changed"])[0] / raw
        print(f"  in-kernel unchanged poll / raw read = {un:.2f} (target <= {TARGET_UNCHANGED}, "
              f"aim {AIM_UNCHANGED}): {'met' if un <= TARGET_UNCHANGED else 'MISSED'}")
        print(f"  in-kernel changed-10k delivery / raw read = {ch:.2f} (target <= "
              f"{TARGET_CHANGED}): {'met' if ch <= TARGET_CHANGED else 'MISSED'}")
        print(f"  in-kernel route after the first poll: {k['route']} (the first poll: "
              f"{k['first_route']}); daemon's reason: {k['engine']}")
        for phase in ("unchanged", "changed"):
            steps = k.get(f"{phase}_steps") or {}
            print(f"  in-kernel {phase} poll, last run: " + "; ".join(
                f"{name} {sec:.3f} s" for name, sec in steps.items()))
        nop = out["nop_walk"]
        print(f"  where the in-kernel time goes: bpf_iter step alone (nop program) "
              f"{f'{nop:.3f} s' if isinstance(nop, float) else nop}; for_each step alone "
              "(nop callback) "
              f"{out['nop_each']:.3f} s; walk incl. fingerprint, shadow lookup, output copy: "
              f"unchanged {', '.join(f'{x:.3f}' for x in k['unchanged_walk'])} s, changed "
              f"{', '.join(f'{x:.3f}' for x in k['changed_walk'])} s; user-space parse/apply: "
              f"unchanged {', '.join(f'{x:.3f}' for x in k['unchanged_parse'])} s, changed "
              f"{', '.join(f'{x:.3f}' for x in k['changed_parse'])} s; shadow maps "
              f"{k['kernel_bytes'] / 2**20:.1f} MiB")
    print()
    for engine_name, (cps, w) in results["daemon"].items():
        print(f"(d) daemon watching the unchanged 1M hash map every 1 s, {engine_name}: "
              f"{cps:.3f} CPU s/s (last poll {w['last_poll_ms']:.0f} ms; {w['engine']})")
    print()
    for where, (setup, poll) in results["small"].items():
        print(f"(e) {SMALL_ENTRIES:,}-entry hash map, objects made {where}: watch set-up "
              f"{setup * 1000:.2f} ms, unchanged poll {poll * 1000:.3f} ms "
              f"(best of {SMALL_REPEATS})")


def main() -> int:
    if len(sys.argv) > 1:
        print(f"usage: {sys.argv[0]}   (no arguments; needs root)", file=sys.stderr)
        return 2
    results: dict = {"maps": {}, "daemon": {}, "host": features.probe()}
    with contextlib.ExitStack() as cleanup:
        try:
            check_root()
            tmp = cleanup.enter_context(private_tmp())
            pin_dir = cleanup.enter_context(private_bpffs())
            name = f"pmkd_{secrets.token_hex(3)}"
            fd = cleanup.enter_context(big_hash(pin_dir / name, ENTRIES, name,
                                                max_entries=1 << 20))
            hash_map = BenchMap(fd, name, pin_dir / name)
            out: dict = {}
            results["maps"]["hash"] = out
            run_trio(engine_runs, hash_map, "hash", tmp, pin_dir, out, results["host"])
            aname = f"pmkda_{secrets.token_hex(3)}"
            array = ArrayMap(pin_dir / aname, aname)
            cleanup.callback(array.close)
            results["maps"]["array"] = out = {}
            run_trio(engine_runs, array, "array", tmp, pin_dir, out, results["host"])
            for engine_name in ("user-space", "in-kernel"):
                results["daemon"][engine_name] = daemon_cpu(hash_map, tmp, pin_dir, engine_name)
            results["small"] = broker_costs(results["host"])
        except BenchError as e:
            print(f"bench_kdelta: FAILED: {e}", file=sys.stderr)
            return 1
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
