"""Benchmark: the daemon's event loop never stalls on blocking work.

Run as root: ``.venv/bin/python bench/bench_loop.py``.  The daemon (``watcher.daemon.main.run``)
runs in this process, beside one extra task, the probe, which sleeps 1 ms in a loop and
records how late each wake-up is: the loop's stall.  While it runs:

- a ring buffer (``bench_sources``' producer, ``BPF_PROG_TEST_RUN`` 20,000 records per call
  in a thread) floods the daemon's source reader, and its ``drops_map`` is read every 0.5 s;
- a 1M-entry hash map (``watch.always``) is created while watched (every entry is a new
  event: ``map_created``, then the added entries), then all its values change twice (1M
  ``updated`` events per poll);
- a client asks for a ``get --snapshot`` of it (1M entries sliced into chunks).

Figures: the probe's worst lateness (the longest the loop was held), p99, and how many
wake-ups were 10 ms or more late, beside the same probe's figures with the daemon idle
(the machine's own noise, same run); and the longest task steps in CPU time of the
loop's thread (the work one task did without yielding, which load does not inflate).
Target: worst task step <= ``TARGET_MS``.  Python threads share the GIL, so a worker
thread busy in Python code delays the loop by up to the switch interval (5 ms) per
hand-over: lateness also counts that, and the machine's other processes.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time

import numpy as np
import trio
import zmq

# bench/_common.py (beside this file) puts the repository on sys.path.
from _common import BenchError, check_root, private_bpffs, private_tmp
from bench_sources import LAYOUT, Producer

from watcher.daemon import main as daemon_main
from watcher.daemon.config import load_config
from watcher.kernel.maps.kinds import TYPE_IDS
from watcher.kernel.sys import syscall
from watcher.wire import schema

ENTRIES = 1_000_000
MAP_NAME = "bench_loop_big"
TARGET_MS = 20.0
FILL_BATCH = 1 << 17


class Probe:
    """Sleeps ``period`` in a loop and records how late each wake-up is."""

    def __init__(self, period: float = 0.001):
        self.period = period
        self.late_ms: list[float] = []
        self.recording = False

    async def run(self) -> None:
        while True:
            t0 = trio.current_time()
            await trio.sleep(self.period)
            if self.recording:
                self.late_ms.append((trio.current_time() - t0 - self.period) * 1000)

    def figures(self) -> tuple[float, float, int, int]:
        late = np.array(self.late_ms or [0.0])
        return float(late.max()), float(np.percentile(late, 99)), int((late >= 10).sum()), len(late)


class StepTimer(trio.abc.Instrument):
    """The longest single task steps, in CPU time of the loop's thread.

    The probe's lateness is what a subscriber feels, but on a loaded machine it is
    mostly the OS and the GIL handing the CPU elsewhere.  A step's CPU time is the
    work the daemon's own code did on the loop without yielding, whatever the load:
    the figure the code controls, and the task that did it.
    """

    def __init__(self):
        self.recording = False
        self.longest: list[tuple[float, str]] = []
        self._t0 = 0.0

    def before_task_step(self, task) -> None:
        self._t0 = time.thread_time()

    def after_task_step(self, task) -> None:
        if self.recording and not task.name.startswith("__main__."):  # the daemon's tasks only
            ms = (time.thread_time() - self._t0) * 1000
            if len(self.longest) < 3 or ms > self.longest[-1][0]:
                self.longest = sorted([*self.longest, (ms, task.name)], reverse=True)[:3]


class GcPauses:
    """The longest pause of Python's cyclic garbage collector (it stops every thread)."""

    def __init__(self):
        self.longest_ms = 0.0
        self._t0 = 0.0
        self.recording = False

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self.recording:
            self.longest_ms = max(self.longest_ms, (time.perf_counter() - self._t0) * 1000)


def fill(fd: int, entries: int, tag: int) -> None:
    """Set entry i to (i * 3 + tag, tag): the same keys, every value changed per tag.

    numpy builds the buffers and the batch update is one syscall per 128k entries,
    so this thread holds the GIL as little as possible (it would delay the loop too).
    """
    for lo in range(0, entries, FILL_BATCH):
        hi = min(lo + FILL_BATCH, entries)
        keys = np.arange(lo, hi, dtype=np.uint64)
        values = np.empty((hi - lo, 2), dtype=np.uint64)
        values[:, 0] = keys * 3 + tag
        values[:, 1] = tag
        syscall.map_update_batch(fd, keys.tobytes(), values.tobytes(), hi - lo)


def snapshot_request(endpoint: str, selector: str, timeout: float = 120.0) -> int:
    """A ``get`` snapshot over a plain DEALER (own context, own thread); the entry count."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    try:
        sock.connect(endpoint)
        sock.send(schema.encode(schema.GetRequest(selector, snapshot=True, req=7)))
        while True:
            frames = sock.recv_multipart()
            msg = schema.decode(frames[0])
            if isinstance(msg, schema.ErrorReply):
                raise BenchError(f"snapshot failed: {msg.code}: {msg.message}")
            if isinstance(msg, schema.GetEnd):
                return msg.entries
    finally:
        sock.close()
        ctx.term()


async def scenario(args, pins, tmp, prod: Producer) -> dict:
    syscall.obj_pin(prod.table("rb").map_fd, str(pins / "bench_rb"))
    syscall.obj_pin(prod.table("dropped").map_fd, str(pins / "bench_dropped"))
    conf = tmp / "pymap.toml"
    run_dir = tmp / "run"
    conf.write_text(
        f'[daemon]\nendpoint = "ipc://{run_dir}/pymap.sock"\nbpffs = ["{pins}"]\n'
        f'log_level = "error"\n'
        # The bench creates and fills maps in this same process: no bpf() filter on it.
        f'seccomp = false\n'
        f'[watch]\ninterval = 1.0\nalways = ["{MAP_NAME}"]\nkernel_delta = "{args.kernel_delta}"\n'
        f'[[sources]]\npin = "{pins / "bench_rb"}"\nkind = "ringbuf"\n'
        f'drops_map = "{pins / "bench_dropped"}"\nlayout = {LAYOUT}\n')
    config = load_config(str(conf))
    probe = Probe()
    steps = StepTimer()
    trio.lowlevel.add_instrument(steps)
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)
    stop_flood = threading.Event()
    flooded = [0]

    def flood() -> None:
        while not stop_flood.is_set():
            flooded[0] += prod.flood(prod.fn, 0.2)[0]

    out: dict = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon_main.run, config)
        nursery.start_soon(probe.run)
        await trio.sleep(1.5)  # a first engine cycle: the map's creation is then an event
        # Baseline, same run: the daemon idle, so lateness is only the machine's load.
        idle = Probe()
        with trio.move_on_after(args.idle_seconds):
            idle.recording = True
            await idle.run()
        out["idle_worst"], out["idle_p99"], _, _ = idle.figures()
        probe.recording = steps.recording = gc_pauses.recording = True
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        t0 = time.perf_counter()
        # Creating (preallocating) and freeing a 1M-entry map takes the kernel a while:
        # in threads, or the bench itself would be the stall it measures.
        fd = await trio.to_thread.run_sync(
            lambda: syscall.map_create(TYPE_IDS["hash"], 8, 16, ENTRIES, name=MAP_NAME))
        try:
            await trio.to_thread.run_sync(fill, fd, ENTRIES, 0)
            for tag in range(1, args.rounds + 1):
                await trio.sleep(1.5)  # at least one poll with the previous values
                await trio.to_thread.run_sync(fill, fd, ENTRIES, tag)
            await trio.sleep(1.5)
            got = await trio.to_thread.run_sync(
                snapshot_request, config.daemon.endpoint, MAP_NAME)
            if got != ENTRIES:
                raise BenchError(f"snapshot had {got} entries, not {ENTRIES}")
            await trio.sleep(1.0)
        finally:
            await trio.to_thread.run_sync(os.close, fd)
            stop_flood.set()
            await trio.to_thread.run_sync(flooder.join)
        out["seconds"] = time.perf_counter() - t0
        probe.recording = steps.recording = gc_pauses.recording = False
        nursery.cancel_scope.cancel()
    out["worst"], out["p99"], out["late10"], out["wakeups"] = probe.figures()
    out["records"] = flooded[0]
    out["steps"] = steps.longest
    out["gc_ms"] = gc_pauses.longest_ms
    gc.callbacks.remove(gc_pauses)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle-seconds", type=float, default=3.0,
                        help="baseline: the probe alone, before the load")
    parser.add_argument("--rounds", type=int, default=2, help="times every value changes")
    parser.add_argument("--kernel-delta", choices=["off", "auto"], default="off",
                        help="watch.kernel_delta: off (default) measures the user-space "
                             "engine, whose dumps and diffs are the heavier work")
    args = parser.parse_args()
    try:
        check_root()
        with private_bpffs() as pins, private_tmp() as tmp:
            prod = Producer()
            try:
                out = trio.run(scenario, args, pins, tmp, prod)
            finally:
                prod.close()
    except BenchError as e:
        print(f"bench_loop: {e}", file=sys.stderr)
        return 1
    worst_step = out["steps"][0][0] if out["steps"] else 0.0
    ok = "ok" if worst_step <= TARGET_MS else "MISSED"
    print(f"loop stall (kernel_delta {args.kernel_delta}) during a {ENTRIES:,}-entry map poll ({args.rounds + 1} rounds of "
          f"{ENTRIES:,} events) + snapshot + ring buffer flood ({out['records']:,} records "
          f"offered in {out['seconds']:.1f} s):")
    print(f"    worst stall {out['worst']:.1f} ms, p99 {out['p99']:.2f} ms, "
          f"{out['late10']} of {out['wakeups']:,} 1-ms wake-ups >= 10 ms late")
    print(f"    baseline, same run, daemon idle: worst {out['idle_worst']:.1f} ms, "
          f"p99 {out['idle_p99']:.2f} ms (the machine's own noise)")
    print("    longest task steps (loop thread CPU time): " + ", ".join(
        f"{ms:.1f} ms {'.'.join(name.split('.')[-2:])}" for ms, name in out["steps"])
        + f" (target <= {TARGET_MS:.0f} ms: {ok}); longest garbage collection "
        f"{out['gc_ms']:.1f} ms")
    return 0 if ok == "ok" else 2


if __name__ == "__main__":
    sys.exit(main())
