"""Benchmark: a BPF ring buffer read by pymap and fanned out to three subscribers.

Run as root: ``.venv/bin/python bench/bench_sources.py``.  One run measures:

(a) throughput: a producer writes records to a ring buffer as fast as it can
    for ``--seconds`` (a socket-filter program run in the kernel with
    ``BPF_PROG_TEST_RUN``, ``repeat`` = 20,000 per call: no syscall per
    record, about 10M records/s offered).  A real ``pymap daemon`` attached to
    the pinned ring publishes the records; three subscriber processes (client
    library, ``record_batches=True``: no Python object per record) count
    them.  Figure: records/s delivered to each subscriber, from its first to
    its last record (target: >= 500,000/s each).
(b) accounting: every produced record (counted by the program in an array) is
    either delivered or counted lost: the program counts its failed writes in
    ``dropped``, which pymap reads beside the buffer (``drops_map``) and
    publishes as ``lost``.  Checked: produced == daemon records + dropped, and
    at each subscriber records + lost == produced.
(c) the baseline: the same producer (same program, same ring size, a second
    ring) read by bcc's ``open_ring_buffer`` with a Python callback that only
    counts, in this process, in the same run.
(d) latency at 10,000 records/s: the producer writes 5 records every 0.5 ms
    for ``--latency-seconds``; each record carries ``bpf_ktime_get_ns()``
    (CLOCK_MONOTONIC) and each subscriber compares it with CLOCK_MONOTONIC
    when the batch arrives.  Figure: p50 / p99 / max per subscriber
    (target: p99 <= 10 ms).
(e)-(g) the per-record APIs (issue 20): one subscriber at a time, on a shorter
    producer run: (e) iterating per-record ``Event`` objects with decoded
    fields, a received message's at a time (``stream.batches()``, a plain
    ``for`` over each); (e') the same events, one ``async for`` step each
    (``async for event in stream``: printed for comparison, no target);
    (f) ``record_batches=True`` iterating
    ``RecordSet.rows()`` (each record's decoded fields, a tuple); (g) reading
    ``RecordSet.columns()`` (NumPy views).  Figure: records/s, and its ratio to
    the slowest subscriber's rate in (a), the raw stream rate of the same run
    (target: >= 0.25x).

The machine is small (2 CPUs here): producer, daemon and subscribers share
them, which bounds what any reader can do; the figures are printed as
measured, with the targets beside them.  Everything is private and removed
on the way out: the program (bcc cleanup), pins, daemon, subscribers.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

# bench/_common.py (beside this file) puts the repository on sys.path.
from _common import (
    BenchError,
    Daemon,
    check_root,
    private_bpffs,
    private_tmp,
)

from watcher.kernel.sys import syscall

RING_PAGES = 4096  # 16 MiB, for pymap's ring and bcc's alike
CHUNK = 20_000  # records per BPF_PROG_TEST_RUN call
TARGET_RATE = 500_000
TARGET_P99_MS = 10.0
TARGET_EVENTS_RATIO = 0.25  # per-record API / raw stream rate, same run (issue 20)
TAG_THROUGHPUT, TAG_LATENCY, TAG_EVENTS, TAG_ROWS, TAG_COLUMNS, TAG_EACH = 1, 2, 3, 4, 5, 6
PER_RECORD_PHASES = (  # label, subscriber mode, tag, held to the target
    ("(e) one subscriber iterating decoded per-record Events, stream.batches()", "events",
     TAG_EVENTS, True),
    ("(e') the same, one `async for` step per Event", "each", TAG_EACH, False),
    ("(f) one subscriber iterating RecordSet.rows() per record", "rows", TAG_ROWS, True),
    ("(g) one subscriber reading RecordSet.columns()", "columns", TAG_COLUMNS, True),
)

PRODUCER = r"""
struct rec { u64 seq; u64 ts; u32 cpu; u32 tag; };
BPF_RINGBUF_OUTPUT(rb, RING_PAGES);
BPF_RINGBUF_OUTPUT(rb_bcc, RING_PAGES);
BPF_ARRAY(produced, u64, 2);   // [0] pymap's ring, [1] bcc's ring: attempts
BPF_ARRAY(dropped, u64, 1);    // pymap's ring: failed writes (the drops_map)
BPF_ARRAY(dropped_bcc, u64, 1);
BPF_ARRAY(tag, u32, 1);        // set by the benchmark per phase

static __always_inline int emit(int which) {
    int zero = 0;
    u64 *p = produced.lookup(&which);
    u32 *t = tag.lookup(&zero);
    if (!p || !t)
        return 0;
    struct rec r = {};
    r.seq = __sync_fetch_and_add(p, 1);
    r.ts = bpf_ktime_get_ns();
    r.cpu = bpf_get_smp_processor_id();
    r.tag = *t;
    if (which == 0) {
        if (rb.ringbuf_output(&r, sizeof(r), 0) != 0) {
            u64 *d = dropped.lookup(&zero);
            if (d)
                __sync_fetch_and_add(d, 1);
        }
    } else if (rb_bcc.ringbuf_output(&r, sizeof(r), 0) != 0) {
        u64 *d = dropped_bcc.lookup(&zero);
        if (d)
            __sync_fetch_and_add(d, 1);
    }
    return 0;
}

int produce(struct __sk_buff *skb) { return emit(0); }
int produce_bcc(struct __sk_buff *skb) { return emit(1); }
"""
PACKET = bytes(64)
LAYOUT = ('[{ name = "seq", type = "u64" }, { name = "ts", type = "u64" }, '
          '{ name = "cpu", type = "u32" }, { name = "tag", type = "u32" }]')


def mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# --- the subscriber process ------------------------------------------------------------


def subscriber_main(endpoint: str, topic: str, mode: str) -> int:
    """Count records per tag; for the latency tag, keep each record's delay.

    Reads a JSON line {"tag": T, "total": N} on stdin: once the records and
    losses of tag T reach N, print that tag's figures as one JSON line.
    """
    import trio

    from consumers.client import Client

    per_tag: dict[int, dict] = {}
    targets: dict[int, int] = {}
    lost_total = [0]
    scope = trio.CancelScope()

    def stats(tag: int) -> dict:
        return per_tag.setdefault(tag, {"records": 0, "first": 0, "last": 0, "lat": []})

    def tally(counts: dict[int, int], now: int) -> None:
        for tag, n in counts.items():
            s = stats(tag)
            s["first"] = s["first"] or now
            s["last"] = now
            s["records"] += n

    def report_ready() -> None:
        for tag, total in list(targets.items()):
            s = stats(tag)
            if s["records"] + lost_total[0] >= total:
                lat = np.concatenate(s["lat"]) if s["lat"] else np.zeros(0)
                out = {"tag": tag, "records": s["records"], "lost": lost_total[0],
                       "seconds": (s["last"] - s["first"]) / 1e9}
                if lat.size:
                    out.update(p50_ms=float(np.percentile(lat, 50)) / 1e6,
                               p99_ms=float(np.percentile(lat, 99)) / 1e6,
                               max_ms=float(lat.max()) / 1e6)
                print(json.dumps(out), flush=True)
                del targets[tag]
                lost_total[0] = 0

    async def read_targets():
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:  # the benchmark is done with us
                scope.cancel()
                return
            msg = json.loads(line)
            targets[msg["tag"]] = msg["total"]
            report_ready()

    async def main():
        with scope:
            await follow()

    def other(ev) -> None:
        """Anything but a per-record event: a loss, a batch of (a), (d), (f), (g)."""
        now = mono_ns()
        if ev.action == "lost":
            lost_total[0] += ev.missed
        elif ev.action == "records" and mode == "rows":
            assert ev.records is not None
            counts: dict[int, int] = {}
            for row in ev.records.rows():  # per record: decoded fields
                counts[row[3]] = counts.get(row[3], 0) + 1
            tally(counts, now)
        elif ev.action == "records" and mode == "columns":
            assert ev.records is not None
            tags, sizes = np.unique(ev.records.columns()["tag"], return_counts=True)
            tally(dict(zip(tags.tolist(), sizes.tolist())), now)
        elif ev.action == "records":
            assert ev.records is not None
            arr = np.frombuffer(ev.records.data, dtype=np.uint64).reshape(-1, 3)
            tags = (arr[:, 2] >> np.uint64(32)).astype(np.uint32)
            for tag in np.unique(tags).tolist():
                sel = arr[tags == tag]
                s = stats(tag)
                s["first"] = s["first"] or now
                s["last"] = now
                s["records"] += len(sel)
                if tag == TAG_LATENCY:
                    s["lat"].append(now - sel[:, 1].astype(np.int64))
        if targets:
            report_ready()

    async def follow():
        async with Client(endpoint, timeout=30) as client, trio.open_nursery() as nursery:
            nursery.start_soon(read_targets)
            batches = mode not in ("events", "each")
            clock = time.monotonic_ns
            async with client.events([topic], record_batches=batches) as stream:
                print(json.dumps({"ready": True}), flush=True)
                if mode == "each":  # (e'): one ``async for`` step per event
                    async for ev in stream:
                        if ev.action == "record":  # the same work as (e)'s, below
                            assert ev.formatted is not None
                            tag = ev.formatted["tag"]
                            s = per_tag.get(tag) or stats(tag)
                            now = clock()
                            s["first"] = s["first"] or now
                            s["last"] = now
                            s["records"] += 1
                            if tag in targets and s["records"] + lost_total[0] >= targets[tag]:
                                report_ready()
                            continue
                        other(ev)
                    return
                async for batch in stream.batches():  # (e): a message's events at a time
                    for ev in batch:
                        if ev.action == "record":  # (e): the consumer's own work as small as
                            # (f)'s: C's clock (CLOCK_MONOTONIC, as mono_ns), a count, and a
                            # report once the tag reaches its asked total (not every target
                            # checked per record)
                            assert ev.formatted is not None
                            tag = ev.formatted["tag"]
                            s = per_tag.get(tag) or stats(tag)
                            now = clock()
                            s["first"] = s["first"] or now
                            s["last"] = now
                            s["records"] += 1
                            if tag in targets and s["records"] + lost_total[0] >= targets[tag]:
                                report_ready()
                            continue
                        other(ev)

    trio.run(main)
    return 0


class Subscriber:
    def __init__(self, endpoint: str, topic: str, mode: str, log: Path):
        self._err = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--subscriber", endpoint, topic, mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
            bufsize=1)
        self.log = log

    def read(self, timeout: float) -> dict:
        result: list = []
        stdout = self.proc.stdout
        assert stdout is not None
        t = threading.Thread(target=lambda: result.append(stdout.readline()),
                             daemon=True)
        t.start()
        t.join(timeout)
        if not result or not result[0]:
            raise BenchError(f"subscriber gave no answer within {timeout:g} s: "
                             f"{self.log.read_text(errors='replace')[-1500:]}")
        return json.loads(result[0])

    def ask(self, tag: int, total: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"tag": tag, "total": total}) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()


# --- the producer ----------------------------------------------------------------------


class Producer:
    def __init__(self):
        from bcc import BPF

        self.bpf = BPF(text=PRODUCER.replace("RING_PAGES", str(RING_PAGES)).encode())
        try:
            self.fn = self.bpf.load_func(b"produce", BPF.SOCKET_FILTER)
            self.fn_bcc = self.bpf.load_func(b"produce_bcc", BPF.SOCKET_FILTER)
        except BaseException:
            self.bpf.cleanup()
            raise

    def table(self, name: str):
        return self.bpf[name.encode()]

    def set_tag(self, tag: int) -> None:
        self.table("tag")[ctypes.c_int(0)] = ctypes.c_uint32(tag)

    def counter(self, name: str, index: int = 0) -> int:
        return self.table(name)[ctypes.c_int(index)].value

    def flood(self, fn, seconds: float) -> tuple[int, float]:
        """Call the program CHUNK times per test run, back to back, for ``seconds``."""
        calls = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            syscall.prog_test_run(fn.fd, PACKET, CHUNK)
            calls += 1
        return calls * CHUNK, time.perf_counter() - t0

    def paced(self, per_tick: int, tick: float, seconds: float) -> int:
        n = 0
        t0 = time.perf_counter()
        next_t = t0
        while next_t - t0 < seconds:
            syscall.prog_test_run(self.fn.fd, PACKET, per_tick)
            n += per_tick
            next_t += tick
            delay = next_t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        return n

    def close(self) -> None:
        self.bpf.cleanup()


# --- phases ------------------------------------------------------------------------------


def wait_accounted(daemon: Daemon, prod: Producer, name: str, timeout: float = 60.0) -> dict:
    """Wait until the daemon has published every record or counted it lost."""
    deadline = time.monotonic() + timeout
    while True:
        st = source_status(daemon, name)
        produced = prod.counter("produced", 0)
        if st and st["records"] + st["lost"] >= produced:
            return st
        if time.monotonic() > deadline:
            raise BenchError(f"daemon accounted for {st} of {produced} produced records")
        time.sleep(0.2)


def source_status(daemon: Daemon, name: str) -> dict | None:
    proc = daemon.cli("status", "-o", "json")
    if proc.returncode != 0:
        raise BenchError(f"pymap status failed: {proc.stderr}")
    return next((s for s in json.loads(proc.stdout)["sources"] if s["name"] == name), None)


def subscriptions(daemon: Daemon, name: str) -> int:
    proc = daemon.cli("status", "-o", "json")
    return json.loads(proc.stdout)["subscriptions"].get(f"map:{name}\0", 0)


def collect(subs: list[Subscriber], tag: int, total: int) -> list[dict]:
    for s in subs:
        s.ask(tag, total)
    return [s.read(120) for s in subs]


def bcc_baseline(prod: Producer, seconds: float) -> dict:
    """bcc's Python callback reader on the second ring, same producer, this process."""
    count = [0]
    first = [0.0]
    last = [0.0]

    def callback(_ctx, _data, _size):
        if not count[0]:
            first[0] = time.perf_counter()
        count[0] += 1
        last[0] = time.perf_counter()
        return 0

    prod.table("rb_bcc").open_ring_buffer(callback)
    stop = threading.Event()
    result: dict = {}

    def produce():
        result["offered"], result["seconds"] = prod.flood(prod.fn_bcc, seconds)
        stop.set()

    t = threading.Thread(target=produce)
    t.start()
    while not stop.is_set():
        prod.bpf.ring_buffer_poll(100)
    t.join()
    prod.bpf.ring_buffer_consume()
    produced = prod.counter("produced", 1)
    dropped = prod.counter("dropped_bcc")
    return {"records": count[0], "dropped": dropped, "produced": produced,
            "rate": count[0] / max(last[0] - first[0], 1e-9)}


def per_record_phase(daemon: Daemon, prod: Producer, name: str, mode: str, tag: int,
                     tmp: Path, seconds: float, subs: list[Subscriber]) -> tuple[dict, int]:
    """One subscriber in ``mode`` alone; the producer floods for ``seconds``."""
    sub = Subscriber(daemon.endpoint, name, mode, tmp / f"sub-{mode}.log")
    subs.append(sub)
    sub.read(30)
    while subscriptions(daemon, name) < 1:
        time.sleep(0.1)
    time.sleep(1.5)
    prod.set_tag(tag)
    before = prod.counter("produced", 0)
    dropped_before = prod.counter("dropped")
    prod.flood(prod.fn, seconds)
    wait_accounted(daemon, prod, name)
    total = prod.counter("produced", 0) - before
    (g,) = collect([sub], tag, total)
    sub.stop()
    subs.remove(sub)
    deadline = time.monotonic() + 10
    while subscriptions(daemon, name) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # gone: the next phase's wait for its subscriber means it
    return g, prod.counter("dropped") - dropped_before


def run(args) -> int:
    failures: list[str] = []
    with private_bpffs() as pins, private_tmp() as tmp:
        prod = Producer()
        daemon = None
        subs: list[Subscriber] = []
        try:
            name = "bench_rb"
            syscall.obj_pin(prod.table("rb").map_fd, str(pins / name))
            syscall.obj_pin(prod.table("dropped").map_fd, str(pins / "bench_dropped"))
            conf = tmp / "pymap.toml"
            conf.write_text(f'[[sources]]\npin = "{pins / name}"\nkind = "ringbuf"\n'
                            f'drops_map = "{pins / "bench_dropped"}"\n'
                            f"read_slice = {args.read_slice}\nlayout = {LAYOUT}\n")
            daemon = Daemon(tmp, pins, "--config", str(conf))
            daemon.wait_ready()
            for i in range(3):
                subs.append(Subscriber(daemon.endpoint, name, "batches", tmp / f"sub{i}.log"))
            for s in subs:
                if not s.read(30).get("ready"):
                    raise BenchError("subscriber did not start")
            deadline = time.monotonic() + 30
            while subscriptions(daemon, name) < 3:
                if time.monotonic() > deadline:
                    raise BenchError("subscribers did not subscribe")
                time.sleep(0.1)
            time.sleep(1.5)  # a heartbeat: the subscriptions are live at every subscriber

            # (a) + (b): flood.
            prod.set_tag(TAG_THROUGHPUT)
            _, secs = prod.flood(prod.fn, args.seconds)
            st = wait_accounted(daemon, prod, name)
            produced = prod.counter("produced", 0)
            dropped = prod.counter("dropped")
            got = collect(subs, TAG_THROUGHPUT, produced)
            print(f"(a) producer: {produced:,} records offered in {secs:.2f} s "
                  f"({produced / secs / 1e6:.2f} M/s), ring {RING_PAGES * 4 // 1024} MiB, "
                  f"read_slice {args.read_slice}")
            print(f"    daemon: {st['records']:,} published, {st['lost']:,} lost "
                  f"(producer-counted), {st['wakeups']:,} wakeups, "
                  f"max read slice {st['max_read_ms']:.1f} ms")
            for i, g in enumerate(got):
                rate = g["records"] / g["seconds"] if g["seconds"] else 0.0
                ok = "ok" if rate >= TARGET_RATE else "MISSED"
                print(f"    subscriber {i + 1}: {g['records']:,} records in {g['seconds']:.2f} s "
                      f"= {rate:,.0f} records/s, {g['lost']:,} lost events "
                      f"(target >= {TARGET_RATE:,}/s: {ok})")
                if rate < TARGET_RATE:
                    failures.append(f"subscriber {i + 1} rate")
            acc_daemon = st["records"] + dropped == produced and st["lost"] == dropped
            acc_subs = all(g["records"] + g["lost"] == produced for g in got)
            print(f"(b) accounting: produced {produced:,} = published {st['records']:,} + "
                  f"dropped {dropped:,}: {'ok' if acc_daemon else 'MISMATCH'}; every subscriber "
                  f"records + lost == produced: {'ok' if acc_subs else 'MISMATCH'} "
                  f"{[g['records'] + g['lost'] for g in got]}")
            if not (acc_daemon and acc_subs):
                raise BenchError("records were neither delivered nor counted lost")

            # (c) bcc's Python callback, same producer, same run.
            prod.set_tag(TAG_THROUGHPUT)
            base = bcc_baseline(prod, args.seconds)
            print(f"(c) bcc open_ring_buffer + Python callback: {base['records']:,} of "
                  f"{base['produced']:,} ({base['dropped']:,} dropped) = {base['rate']:,.0f} "
                  "records/s")
            slowest = min(g["records"] / g["seconds"] for g in got if g["seconds"])
            print(f"    pymap per subscriber (slowest of 3) / bcc callback: "
                  f"{slowest / base['rate']:.2f}x")

            # (d) latency at 10k/s.
            prod.set_tag(TAG_LATENCY)
            before = prod.counter("produced", 0)
            n = prod.paced(5, 0.0005, args.latency_seconds)
            st = wait_accounted(daemon, prod, name)
            lat = collect(subs, TAG_LATENCY, n)
            print(f"(d) latency at {n / args.latency_seconds:,.0f} records/s "
                  f"({n:,} records, {prod.counter('produced', 0) - before - n} extra):")
            for i, g in enumerate(lat):
                ok = "ok" if g.get("p99_ms", 1e9) <= TARGET_P99_MS else "MISSED"
                print(f"    subscriber {i + 1}: p50 {g.get('p50_ms', 0):.2f} ms, "
                      f"p99 {g.get('p99_ms', 0):.2f} ms, max {g.get('max_ms', 0):.2f} ms, "
                      f"{g['records']:,} records, {g['lost']} lost "
                      f"(target p99 <= {TARGET_P99_MS:g} ms: {ok})")
                if g.get("p99_ms", 1e9) > TARGET_P99_MS:
                    failures.append(f"subscriber {i + 1} p99")
            for s in subs:
                s.stop()
            subs.clear()

            # (e)-(g) the per-record APIs, one subscriber each, against (a)'s raw rate.
            for label, mode, tag, targeted in PER_RECORD_PHASES:
                g, dropped = per_record_phase(daemon, prod, name, mode, tag, tmp,
                                              min(args.seconds, 1.0), subs)
                rate = g["records"] / g["seconds"] if g["seconds"] else 0.0
                ratio = rate / slowest if slowest else 0.0
                ok = "met" if ratio >= TARGET_EVENTS_RATIO else "MISSED"
                verdict = (f"target >= {TARGET_EVENTS_RATIO:g}x: {ok}" if targeted
                           else "for comparison, no target")
                print(f"{label}: {g['records']:,} records in {g['seconds']:.2f} s = "
                      f"{rate:,.0f} records/s ({dropped:,} dropped by the producer)\n"
                      f"    / raw stream rate of (a) (slowest subscriber): {ratio:.2f}x "
                      f"({verdict})")
                if targeted and ratio < TARGET_EVENTS_RATIO:
                    failures.append(f"{mode} rate")
        finally:
            for s in subs:
                s.stop()
            if daemon is not None:
                daemon.stop()
            prod.close()
    if failures:
        print(f"targets missed: {', '.join(failures)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscriber", nargs=3, metavar=("ENDPOINT", "TOPIC", "MODE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="producer flood duration for (a) and (c)")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--read-slice", type=int, default=8192)
    args = parser.parse_args()
    if args.subscriber:
        return subscriber_main(*args.subscriber)
    try:
        check_root()
        return run(args)
    except BenchError as e:
        print(f"bench_sources: FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
