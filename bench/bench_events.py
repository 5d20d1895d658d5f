"""Benchmark: the event path on a 1,000,000-entry hash map.

Run as root: ``.venv/bin/python bench/bench_events.py``.  One run measures:

(a) raw read: ``watcher.kernel.maps.dump.dump`` of the whole map into flat
    buffers, joined (what any poll must at least do), best of 3;
(b) an unchanged poll: ``Engine.poll`` on the watched map when nothing
    changed, best of 3 (target: <= 1.5 x (a));
(c) 10,000 changed entries (8,000 updates, 1,000 adds, 1,000 deletes):
    from the start of ``Engine.poll`` to the arrival of the last of those
    events at a ZeroMQ subscriber in another process, best of 3 rounds
    (target: <= 3 x (a)); the subscriber must get exactly 10,000 events,
    with the right actions and keys;
(d) the resident memory of a real ``pymap daemon`` subprocess watching the
    map for a subscriber, after a few polls and after a changed poll
    (targets: VmRSS <= 80 MB, peak VmHWM <= 100 MB; issue 20).

``--memory`` runs (d) alone (the engine phases take a minute and measure time, not memory).

(a)-(c) run the daemon's own engine in this process (``Engine`` + ``PublishedStream`` +
``PublisherOwner`` on a private XPUB), because a daemon polls on its own
clock and there is no request to trigger a poll.  The poll path is the real
one; only the timing of the poll is ours.

Everything is private and removed on the way out, errors included: the map
(a private bpffs directory, its pin, our fd), the daemon, the subscriber
processes, the temporary socket directory.  Missed targets are printed as
such; the exit status is non-zero only when something failed (including a
subscriber receiving the wrong events).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import queue
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import zmq

# bench/_common.py (beside this file) puts the repository on sys.path.
from _common import BenchError, Daemon, big_hash, check_root, private_bpffs, private_tmp, procs

from watcher.kernel.features import probe as features
from watcher.wire import schema

ENTRIES = 1_000_000
MAX_ENTRIES = 1 << 20  # room for the adds of (c)
KEY_SIZE = 8
VALUE_SIZE = 16
N_UPDATED, N_ADDED, N_REMOVED = 8_000, 1_000, 1_000
N_CHANGED = N_UPDATED + N_ADDED + N_REMOVED
REPEATS = 3

TARGET_UNCHANGED = 1.5
TARGET_CHANGED = 3.0
TARGET_RSS_MB = 80.0
TARGET_HWM_MB = 100.0

def mono() -> float:
    """CLOCK_MONOTONIC: one clock for this process and the subscriber process."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def mb(nbytes: float) -> float:
    return nbytes / (1024 * 1024)


def key_sum(keys: np.ndarray) -> int:
    """A cheap fingerprint of a set of u64 keys (sum mod 2**64)."""
    return int(keys.astype(np.uint64).sum(dtype=np.uint64))


# --- the subscriber (a separate process: this file with --subscriber) ------------


def subscriber_main(endpoint: str, topic_hex: str) -> int:
    """Subscribe to one topic; print one JSON line per stream message, with its arrival time."""
    with contextlib.suppress(Exception):  # die with the parent, whatever happens to it
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.connect(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, bytes.fromhex(topic_hex))

    def emit(record: dict) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    emit({"kind": "ready"})
    try:
        while True:
            frames = sub.recv_multipart()
            arrived = mono()
            message = schema.decode(frames[1])
            if isinstance(message, schema.EventBatch):
                actions = np.frombuffer(frames[2], dtype=np.uint8)
                record = {"kind": "events", "t": arrived, "seq": message.seq,
                          "topic_seq": message.topic_seq, "count": message.count,
                          "actions": [int((actions == a).sum()) for a in range(3)],
                          "bytes": sum(len(f) for f in frames)}
                if message.key_size == 8:
                    keys = np.frombuffer(frames[3], dtype=np.uint64)
                    record["keysums"] = [key_sum(keys[actions == a]) for a in range(3)]
                emit(record)
            else:
                emit({"kind": type(message).__name__, "t": arrived})
    except (KeyboardInterrupt, SystemExit, BrokenPipeError):
        return 0
    finally:
        sub.close(linger=0)
        ctx.term()


class Subscriber:
    """A subscriber process and the thread that reads its report lines."""

    def __init__(self, endpoint: str, topic: bytes, stderr_path: Path):
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--subscriber", endpoint, topic.hex()],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, text=True)
        self.stderr_path = stderr_path
        self.lines: queue.Queue[dict | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def _get(self, deadline: float) -> dict:
        left = deadline - time.monotonic()
        try:
            item = self.lines.get(timeout=max(left, 0.001))
        except queue.Empty:
            raise TimeoutError from None
        if item is None:
            raise BenchError(f"subscriber exited ({self.proc.poll()}): "
                             f"{self.stderr_path.read_text(errors='replace')[-2000:]}")
        return item

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            while self._get(deadline)["kind"] != "ready":
                pass
        except TimeoutError:
            raise BenchError("subscriber did not start") from None

    def collect(self, expected: int, timeout: float) -> list[dict]:
        """Event batches until ``expected`` events arrived; error on more, fewer or a timeout."""
        deadline = time.monotonic() + timeout
        batches: list[dict] = []
        got = 0
        while got < expected:
            try:
                item = self._get(deadline)
            except TimeoutError:
                raise BenchError(f"subscriber got {got} of {expected} events "
                                 f"within {timeout:g} s") from None
            if item["kind"] == "events":
                batches.append(item)
                got += item["count"]
        # Anything more arriving right after would be a bug too.
        time.sleep(0.2)
        extra = self.drain()
        extra_events = sum(i["count"] for i in extra if i["kind"] == "events")
        if got != expected or extra_events:
            raise BenchError(f"subscriber got {got + extra_events} events, expected {expected}")
        return batches

    def drain(self) -> list[dict]:
        items: list[dict] = []
        while True:
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                return items
            if item is not None:
                items.append(item)

    def stop(self) -> None:
        procs.stop(self.proc, 5, self.proc.stdout, self._stderr)


# --- the map -------------------------------------------------------------------


class BenchMap:
    """The 1M-entry map (made by ``_common.big_hash``) and the changes we make to it."""

    def __init__(self, fd: int, name: str, pin: Path):
        from watcher.kernel.sys import syscall

        self.fd, self.name, self.pin = fd, name, pin
        self.id = syscall.map_info(fd).id
        self.present = np.arange(ENTRIES, dtype=np.uint64)  # big_hash's keys: 0 .. ENTRIES-1
        self.next_key = ENTRIES
        self.round = 0
        self.rng = np.random.default_rng(20240601)

    def _write(self, keys: np.ndarray, tag: int) -> None:
        """Value (key, tag): differs from big_hash's (3 * key, key ^ 0xFFFF) and earlier tags."""
        from watcher.kernel.sys import syscall

        for start in range(0, len(keys), 1 << 17):
            k = keys[start:start + (1 << 17)]
            values = np.column_stack([k, np.full(len(k), tag, dtype=np.uint64)])
            syscall.map_update_batch(self.fd, k.tobytes(), values.tobytes(), len(k))

    def change(self) -> dict[str, tuple[int, int]]:
        """8,000 updates, 1,000 adds, 1,000 deletes; returns action -> (count, key sum)."""
        from watcher.kernel.sys import syscall

        self.round += 1
        picked = self.rng.choice(len(self.present), N_UPDATED + N_REMOVED, replace=False)
        updated = self.present[picked[:N_UPDATED]]
        removed = self.present[picked[N_UPDATED:]]
        added = np.arange(self.next_key, self.next_key + N_ADDED, dtype=np.uint64)
        self.next_key += N_ADDED
        self._write(updated, self.round)
        self._write(added, self.round)
        for key in removed:
            syscall.map_delete_elem(self.fd, int(key).to_bytes(8, sys.byteorder))
        keep = np.ones(len(self.present), dtype=bool)
        keep[picked[N_UPDATED:]] = False
        self.present = np.concatenate([self.present[keep], added])
        return {"added": (N_ADDED, key_sum(added)), "updated": (N_UPDATED, key_sum(updated)),
                "removed": (N_REMOVED, key_sum(removed))}


def check_events(batches: list[dict], expected: dict[str, tuple[int, int]]) -> None:
    """The subscriber saw exactly the changes we made (counts per action, key sums)."""
    counts = [sum(b["actions"][a] for b in batches) for a in range(3)]
    total = sum(b["count"] for b in batches)
    if total != N_CHANGED or sum(counts) != total:
        raise BenchError(f"expected {N_CHANGED} events, got {total} (actions {counts})")
    for a, action in enumerate(("added", "updated", "removed")):
        n, ksum = expected[action]
        got_sum = sum(b["keysums"][a] for b in batches) % (1 << 64)
        if counts[a] != n or got_sum != ksum:
            raise BenchError(f"{action}: expected {n} events (key sum {ksum}), "
                             f"got {counts[a]} (key sum {got_sum})")
    seqs = sorted((b["topic_seq"], b["count"]) for b in batches)
    for (s0, n0), (s1, _) in itertools.pairwise(seqs):
        if s1 != s0 + n0:
            raise BenchError(f"topic_seq not contiguous: {seqs}")


# --- (a)-(c): the engine in this process --------------------------------------------


def raw_read(fd: int, record) -> tuple[float, int]:
    from watcher.kernel.maps.dump import dump

    t0 = time.perf_counter()
    keys, values, count = [], [], 0
    for chunk in dump(fd, record):
        keys.append(chunk.keys)
        values.append(chunk.values)
        count += chunk.count
    joined = (b"".join(keys), b"".join(values))
    elapsed = time.perf_counter() - t0
    del joined
    return elapsed, count


def kernel_only_read(fd: int, record) -> float:
    """The batch syscalls alone, into reused buffers: the floor under (a)."""
    from watcher.kernel.maps.dump import DEFAULT_CHUNK
    from watcher.kernel.sys import syscall

    keys = ctypes.create_string_buffer(DEFAULT_CHUNK * record.key_size)
    values = ctypes.create_string_buffer(DEFAULT_CHUNK * record.value_size)
    cursor = syscall.BatchCursor(fd, record.key_size)
    t0 = time.perf_counter()
    while not cursor.done:
        syscall.map_lookup_batch(cursor, keys, values, DEFAULT_CHUNK)
    return time.perf_counter() - t0


async def engine_phase(bm: BenchMap, tmp: Path, pin_dir: Path, out: dict) -> None:
    import trio

    from watcher.daemon.config import Config
    from watcher.daemon.diff import inplace as diff_mod  # poll_changes() calls its patch()
    from watcher.daemon.engine import Engine
    from watcher.daemon.publisher import PublishedStream
    from watcher.kernel.maps import find as kmaps
    from watcher.wire.transport import PublisherOwner

    config = Config()
    config.watch.kernel_delta = "off"  # this bench measures the user-space engine (see bench_kdelta)
    config.daemon.bpffs = [str(pin_dir)]
    config.watch.interval = 3600.0  # we decide when it polls
    endpoint = f"ipc://{tmp}/engine-events.sock"
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)  # set up as watcher/daemon/main.py does
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.setsockopt(zmq.SNDHWM, config.daemon.stream_hwm)
    xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
    timings: dict[str, list[float]] = defaultdict(list)
    diff_paths: list[str] = []
    orig_diff = diff_mod.patch
    sub: Subscriber | None = None
    try:
        xpub.bind(endpoint)
        publisher = PublisherOwner(xpub)
        stream = PublishedStream(publisher, secrets.token_hex(8), config.daemon.recent_events,
                        config.daemon.batch_events, config.daemon.heartbeat_interval)
        engine = Engine(config, stream, features.probe())

        # Instrument the poll's steps (same functions, timed around).
        orig_read, orig_publish = engine.poller.read_changes, stream.publish_delta

        def timed_read(watch, report_all):  # the dump streams into the compare: one step
            t0 = time.perf_counter()
            try:
                return orig_read(watch, report_all)
            finally:
                timings["read"].append(time.perf_counter() - t0)

        def timed_diff(prev, at, chunks):
            """From the first chunk that differs: the rest of the dump streamed and looked
            up in the kept rows, then the patch (or a patched copy)."""
            t0 = time.perf_counter()
            state = None
            try:
                state, delta = orig_diff(prev, at, chunks)
                return state, delta
            finally:
                timings["diff"].append(time.perf_counter() - t0)
                diff_paths.append(f"differs from entry {at:,}: "
                                  + ("patched in place" if state is prev else "patched a copy"))

        def timed_publish(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig_publish(*args, **kwargs)
            finally:
                timings["publish"].append(time.perf_counter() - t0)

        engine.poller.read_changes = timed_read  # type: ignore[method-assign]
        diff_mod.patch = timed_diff
        stream.publish_delta = timed_publish  # type: ignore[method-assign]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher.serve, lambda frames: engine.on_subscription(
                [f.bytes for f in frames]))  # the XPUB owner hands over zmq.Frames
            sub = Subscriber(endpoint, schema.map_topic(bm.name), tmp / "sub-engine.err")
            await trio.to_thread.run_sync(sub.wait_ready)
            with trio.move_on_after(15):
                while not engine.demand.wants(bm.name):
                    await trio.sleep(0.01)
            if not engine.demand.wants(bm.name):
                raise BenchError("the subscription never reached the XPUB socket")

            fd = kmaps.open_map(map_id=bm.id)
            with kmaps.open_fd(fd):
                record = kmaps.record_from_fd(fd, (str(bm.pin),))
                raw = []
                for _ in range(REPEATS):
                    elapsed, count = raw_read(fd, record)
                    if count != ENTRIES:
                        raise BenchError(f"raw read saw {count} entries, expected {ENTRIES}")
                    raw.append(elapsed)
                out["kernel_only"] = min(kernel_only_read(fd, record) for _ in range(REPEATS))
            out["raw"] = raw

            watch = engine._start(record)  # noqa: SLF001 (timing the engine's steps)
            await engine.poll(watch)  # the first poll records the state
            if watch.snapshot is None or watch.snapshot.count != ENTRIES:
                raise BenchError(f"first poll: {watch.snapshot and watch.snapshot.count} entries")
            timings.clear()

            unchanged = []
            for _ in range(REPEATS):
                t0 = mono()
                await engine.poll(watch)
                unchanged.append(mono() - t0)
            out["unchanged"] = unchanged
            out["unchanged_steps"] = {k: list(v) for k, v in timings.items()}
            await trio.sleep(0.3)
            stray = [i for i in sub.drain() if i["kind"] == "events"]
            if stray:
                raise BenchError(f"unchanged polls published {len(stray)} event batches")
            timings.clear()
            diff_paths.clear()

            changed = []
            for _ in range(REPEATS):
                expected = bm.change()
                t0 = mono()
                await engine.poll(watch)
                t_polled = mono()
                batches = await trio.to_thread.run_sync(sub.collect, N_CHANGED, 60.0)
                check_events(batches, expected)
                last = max(b["t"] for b in batches)
                changed.append({"total": last - t0, "poll": t_polled - t0,
                                "deliver": last - t_polled, "batches": len(batches),
                                "bytes": sum(b["bytes"] for b in batches)})
            out["changed"] = changed
            out["changed_steps"] = {k: list(v) for k, v in timings.items()}
            out["diff_paths"] = list(diff_paths)
            out["state_bytes"] = watch.snapshot.nbytes()
            nursery.cancel_scope.cancel()
    finally:
        diff_mod.patch = orig_diff
        if sub is not None:
            sub.stop()
        xpub.close(linger=0)
        ctx.term()


# --- (d): a real daemon -----------------------------------------------------------------


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid``, in MB."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(rest.split()[0]) / 1024  # kB -> MB
    return found


def sample_memory(pid: int, seconds: float = 3.0, every: float = 0.05) -> dict[str, float]:
    """VmRSS sampled over ``seconds`` (several poll intervals: a poll's chunks and, in a
    poll that found changes, the sorted keys it looks the dump up in come and go), and
    VmHWM at the end."""
    rss = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rss.append(proc_memory(pid)["VmRSS"])
        time.sleep(every)
    return {"rss_min": min(rss), "rss_median": statistics.median(rss), "rss_max": max(rss),
            "hwm": proc_memory(pid)["VmHWM"], "samples": len(rss)}


def watch_status(daemon: Daemon, name: str) -> dict | None:
    proc = daemon.cli("status", "-o", "json")
    if proc.returncode != 0:
        raise BenchError(f"pymap status failed: {proc.stderr.strip()}")
    for w in json.loads(proc.stdout)["watched"]:
        if w["name"] == name:
            return w
    return None


def wait_polls(daemon: Daemon, name: str, min_polls: int, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    w = None
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise BenchError(f"daemon exited {daemon.proc.returncode}: {daemon.log_tail()}")
        w = watch_status(daemon, name)
        if w and w["entries"] == ENTRIES and w["polls"] >= min_polls:
            return w
        time.sleep(0.5)
    raise BenchError(f"daemon did not poll {name} {min_polls} times with {ENTRIES} entries "
                     f"within {timeout:g} s (last status: {w})")


def daemon_phase(bm: BenchMap, tmp: Path, pin_dir: Path, out: dict,
                 cleanup: contextlib.ExitStack) -> None:
    daemon = Daemon(tmp, pin_dir, "--interval", "1", "--set", "watch.kernel_delta=off")
    cleanup.callback(daemon.stop)
    daemon.wait_ready()
    out["daemon_idle"] = sample_memory(daemon.proc.pid, seconds=0.5)
    sub = Subscriber(f"ipc://{daemon.run_dir}/events.sock", schema.map_topic(bm.name),
                     tmp / "sub-daemon.err")
    cleanup.callback(sub.stop)
    sub.wait_ready()
    w = wait_polls(daemon, bm.name, 4)
    out["daemon_steady"] = sample_memory(daemon.proc.pid)
    # One changed poll (keys move: the sort path), delivered end to end.
    expected = bm.change()
    check_events(sub.collect(N_CHANGED, 60.0), expected)
    w = wait_polls(daemon, bm.name, w["polls"] + 3)
    out["daemon_after"] = sample_memory(daemon.proc.pid)
    out["daemon_after_status"] = w


# --- report --------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "MISSED"


def print_rows(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>9}  notes")
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>9}  {note}")
    print()


def report_memory(out: dict) -> None:
    """(d): each sample's rows, then each figure against its target."""
    rows = []
    for key, label in (("daemon_idle", "(d) daemon VmRSS before any watch (imports only)"),
                       ("daemon_steady", "    VmRSS, max over 3 s, after 4+ unchanged polls"),
                       ("daemon_after", "    VmRSS, max over 3 s, after a changed poll")):
        m = out[key]
        rows.append((label, f"{m['rss_max']:.1f} MB",
                     (f"min {m['rss_min']:.1f}, median {m['rss_median']:.1f} "
                      f"({m['samples']} samples); VmHWM {m['hwm']:.1f} MB")))
    print_rows(rows)
    rss = max(out["daemon_steady"]["rss_max"], out["daemon_after"]["rss_max"])
    hwm = out["daemon_after"]["hwm"]
    print(f"daemon VmRSS = {rss:.1f} MB (target <= {TARGET_RSS_MB:g} MB): "
          f"{verdict(rss, TARGET_RSS_MB)}")
    print(f"daemon peak VmHWM = {hwm:.1f} MB (target <= {TARGET_HWM_MB:g} MB): "
          f"{verdict(hwm, TARGET_HWM_MB)}")
    s = out["daemon_after_status"]
    print(f"  daemon's own view: last poll {s['last_poll_ms']:.0f} ms, max poll "
          f"{s['max_poll_ms']:.0f} ms, state {mb(s['state_bytes']):.1f} MB, "
          f"{s['events']} events")


def report(out: dict) -> None:
    """(a)-(c): each measurement, the ratios against their targets, where the time goes."""
    raw = min(out["raw"])
    unchanged = min(out["unchanged"])
    best = min(out["changed"], key=lambda c: c["total"])
    changed = best["total"]
    print_rows([
        ("(a) raw read: dump + join, best of 3", f"{raw:.3f} s",
         "all: " + ", ".join(f"{x:.3f}" for x in out["raw"])),
        ("    of which the batch syscalls alone", f"{out['kernel_only']:.3f} s", ""),
        ("(b) unchanged poll, best of 3", f"{unchanged:.3f} s",
         "all: " + ", ".join(f"{x:.3f}" for x in out["unchanged"])),
        (f"(c) {N_CHANGED:,} changed: poll start -> last event at subscriber, best of 3",
         f"{changed:.3f} s", "all: " + ", ".join(f"{c['total']:.3f}" for c in out["changed"])),
        ("    poll returned / delivery after it (best round)",
         f"{best['poll']:.3f} s", (f"+ {best['deliver'] * 1000:.1f} ms, {best['batches']} "
                                     f"messages, {mb(best['bytes']):.2f} MB")),
    ])
    r_unchanged, r_changed = unchanged / raw, changed / raw
    print(f"unchanged poll / raw read = {r_unchanged:.2f} (target <= {TARGET_UNCHANGED:g}): "
          f"{verdict(r_unchanged, TARGET_UNCHANGED)}")
    print(f"changed-10k delivery / raw read = {r_changed:.2f} (target <= {TARGET_CHANGED:g}): "
          f"{verdict(r_changed, TARGET_CHANGED)}")
    print()
    print("where the time goes (engine poll steps, seconds, each run; read = dump, compare "
          "and diff, of which diff = from the first differing chunk: the rest of the dump, "
          "its lookups, the patch):")
    for phase in ("unchanged_steps", "changed_steps"):
        steps = out[phase]
        parts = [f"{k} {', '.join(f'{x:.3f}' for x in steps.get(k, []))}"
                 for k in ("read", "diff", "publish") if steps.get(k)]
        print(f"  {phase.replace('_steps', ''):<9}: " + "; ".join(parts))
    print(f"  diff path for the changed polls: {', '.join(out['diff_paths'])}")
    if any(not p.startswith("differs from entry 0:") for p in out["diff_paths"]):
        print("    (a hash map update re-links the element at the head of its bucket, so even "
              "updates of\n     existing keys change the dump's key order: the entries "
              "after it are looked up by key)")
    d = out["changed_steps"]
    if d.get("read"):
        overhead = [c["poll"] - r - p for c, r, p in
                    zip(out["changed"], d["read"], d.get("publish", [0] * 3))]
        print(f"  changed poll outside read/publish (threads, bookkeeping): "
              f"{', '.join(f'{x * 1000:.1f} ms' for x in overhead)}")
    print(f"  watched state in the engine: {mb(out['state_bytes']):.1f} MB")
    print()


def run_trio(fn, *args) -> None:
    """``trio.run``, with an interrupt or a BenchError from inside a nursery unwrapped."""
    import trio

    try:
        trio.run(fn, *args)
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        stack: list[BaseException] = [group]
        while stack:
            e = stack.pop()
            if isinstance(e, BaseExceptionGroup):
                stack.extend(e.exceptions)
            else:
                leaves.append(e)
        for kind in (KeyboardInterrupt, SystemExit, BenchError):
            for e in leaves:
                if isinstance(e, kind):
                    raise e from group
        raise


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--subscriber":
        return subscriber_main(sys.argv[2], sys.argv[3])
    memory_only = sys.argv[1:] == ["--memory"]
    if len(sys.argv) > 1 and not memory_only:
        print(f"usage: {sys.argv[0]} [--memory]   (needs root)", file=sys.stderr)
        return 2
    terminated = []

    def on_sigterm(*_):
        # Become a Ctrl-C, which trio delivers safely inside its run, and clean up the same way.
        terminated.append(True)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in background
    signal.signal(signal.SIGTERM, on_sigterm)
    out: dict = {}
    with contextlib.ExitStack() as cleanup:
        try:
            check_root()
            tmp = cleanup.enter_context(private_tmp())
            pin_dir = cleanup.enter_context(private_bpffs())
            name = f"pmbench_{secrets.token_hex(3)}"  # 14 chars: the kernel keeps it whole
            t0 = time.perf_counter()
            fd = cleanup.enter_context(big_hash(pin_dir / name, ENTRIES, name,
                                                max_entries=MAX_ENTRIES))
            fill_s = time.perf_counter() - t0
            bm = BenchMap(fd, name, pin_dir / name)
            if not memory_only:
                run_trio(engine_phase, bm, tmp, pin_dir, out)
            daemon_phase(bm, tmp, pin_dir, out, cleanup)
        except BenchError as e:
            print(f"bench_events: FAILED: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"bench_events: {'terminated' if terminated else 'interrupted'}",
                  file=sys.stderr)
            return 143 if terminated else 130
    print(f"pymap bench_events: hash map, {ENTRIES:,} entries ({KEY_SIZE}-byte keys, "
          f"{VALUE_SIZE}-byte values), {os.cpu_count()} CPUs; filled in {fill_s:.2f} s")
    print()
    if not memory_only:
        report(out)
    report_memory(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
