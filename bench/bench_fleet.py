"""Benchmark: a fleet publishing into a 3-node NATS JetStream cluster (docs/fleet.md).

Run: ``.venv/bin/python bench/bench_fleet.py [--nodes 8] [--events 25000] [--batch 256]``
(no root needed; it starts its own nats-server processes on free loopback
ports with data in temporary directories and stops them on the way out).

Each simulated node is one process running the exporter's NATS path,
``consumers.fleet.publish.FleetPublisher`` (exactly what ``pymap export --to
nats://`` calls per batch), fed with pymap-JSON events of realistic size
stamped with their event time; the daemon and the formats are measured by
their own benchmarks.  One run measures:

(a) baseline: one node alone into a single server (R1), events/s acked;
(b) N nodes at once into a 3-node cluster, stream with 3 replicas: events/s
    acknowledged by JetStream, all nodes together;
(c) end-to-end latency during (b): event time at the node to arrival at a
    fleet consumer (``FleetSubscription``, another process), p50 and p99;
(d) the same latency with the nodes paced, for about 10 s: the path itself
    rather than a backlog.  Paced at the target rate when (b) reached it (so
    the p99 target is judged at 50,000 events/s), otherwise at half of (b).

Each is measured twice in the same run: one JetStream message per event (the
default) and ``batch=N`` (up to N consecutive events of one map and action
per message, docs/fleet.md), each node then publishing ``--batched-events``.

Targets: (b) >= 50,000 events/s from 8 nodes, p99 <= 250 ms (c, d); each line
says met or MISSED.  The CPU seconds of the servers, publishers and consumer are
printed against the CPU time the machine had, which says where the time went.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from support.nats import nats_cluster, nats_problem, nats_server  # noqa: E402 (the test harness)

TARGET_RATE = 50_000
TARGET_P99 = 0.250
BATCH = 1024  # records per publish call (one delivery batch of the exporter)
FIRST_SEQ = 1024  # seqs start at a multiple of N, as a long-running daemon's mostly are


def payload(node: str, seq: int, t: float) -> bytes:
    """About the size of pymap's JSON line for a cilium_lxc update (~330 bytes)."""
    return (b'{"node":"%s","seq":%d,"time":"%.6f","map":{"id":4242,"name":"cilium_lxc"},'
            b'"action":"updated","key":"%08x000000000000000000000000","value":'
            b'"0a00000100000000c0a80a0b0000000000000000000000000000000000000000000000",'
            b'"old_value":"0a00000100000000c0a80a0a00000000000000000000000000000000000000000",'
            b'"formatted":{"text":"10.0.1.%d -> id=%d"}}' % (node.encode(), seq, t, seq,
                                                               seq % 250, seq))


def publisher(url: str, node: str, events: int, start, out, rate: float | None = None) -> None:
    """Publish ``events`` as fast as acks come back, or paced at ``rate`` events/s
    (a batch every 0.1 s)."""
    import trio

    from consumers.export.record import ExportRecord
    from consumers.fleet.options import parse_url
    from consumers.fleet.publish import FleetPublisher

    async def main() -> tuple[int, int, int, float, float]:
        acked = dups = messages = 0
        async with FleetPublisher(parse_url(url)) as pub:
            start.wait()
            t0 = time.time()
            size = BATCH if rate is None else max(1, int(rate / 10))
            end = FIRST_SEQ + events
            for n, first in enumerate(range(FIRST_SEQ, end, size)):
                if rate is not None:
                    await trio.sleep(max(0.0, t0 + n * 0.1 - time.time()))
                now = time.time()
                batch = [ExportRecord(node, "paced" if rate else "max", s, "cilium_lxc",
                                      "updated", now, payload(node, s, now))
                         for s in range(first, min(first + size, end))]
                r = await pub.publish(batch)
                acked += r.stored
                dups += r.duplicates
                messages += r.messages
            return acked, dups, messages, t0, time.time()

    acked, dups, messages, t0, t1 = trio.run(main)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.put(("pub", node, acked, dups, t0, t1, ru.ru_utime + ru.ru_stime, messages))


def consumer(url: str, expected: int, ready, out) -> None:
    """Read ``expected`` events with a fleet consumer, fetching about 1,000 events at a
    time (16,384 when batched: 64 messages of 256)."""
    import trio

    from consumers.fleet.options import parse_url
    from consumers.fleet.subscribe import FleetSubscription

    async def main() -> list[float]:
        lat: list[float] = []
        options = parse_url(url)
        async with FleetSubscription(options, follow=True,
                                     batch=1000 if options.batch == 1 else 16384) as sub:
            ready.set()
            with trio.move_on_after(300):
                async for batch in sub.batches():
                    lat.extend(m.received - m.time for m in batch)
                    await sub.ack(batch)
                    if len(lat) >= expected:
                        break
        return lat

    lat = trio.run(main)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.put(("con", lat, ru.ru_utime + ru.ru_stime))


def _create_stream(url: str) -> None:
    import trio

    from consumers.fleet.options import parse_url
    from consumers.fleet.publish import FleetPublisher

    async def create() -> None:
        async with FleetPublisher(parse_url(url)):
            pass

    trio.run(create)


def stream_state(url: str, stream: str) -> tuple[int, int]:
    """(bytes, messages) the stream stores: what events cost there, headers and framing
    included."""
    import asyncio

    import nats

    from consumers.fleet.options import parse_url

    async def ask() -> tuple[int, int]:
        nc = await nats.connect(list(parse_url(url).servers))
        try:
            state = (await nc.jetstream().stream_info(stream)).state
            return state.bytes, state.messages
        finally:
            await nc.close()

    return asyncio.run(ask())


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(url: str, nodes: int, events: int, with_consumer: bool, servers,
        rate: float | None = None) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = ctx.Event()
    ready = ctx.Event()
    cpu0 = {s.name: cpu_of(s.proc.pid) for s in servers}
    procs = [ctx.Process(target=publisher, args=(url, f"node-{i:02d}", events, start, out, rate))
             for i in range(nodes)]
    if with_consumer:
        _create_stream(url)  # the consumer binds to it before anyone publishes
        con = ctx.Process(target=consumer, args=(url, nodes * events, ready, out))
        con.start()
        if not ready.wait(60):
            raise RuntimeError("the fleet consumer did not start")
        procs.append(con)
    for p in procs[:nodes]:
        p.start()
    time.sleep(1.0)  # every publisher connected and waiting
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    pubs = [r for r in results if r[0] == "pub"]
    acked = sum(r[2] for r in pubs)
    if acked != nodes * events or any(r[3] for r in pubs):
        raise RuntimeError(f"acked {acked} of {nodes * events}, duplicates "
                           f"{sum(r[3] for r in pubs)}")
    t0, t1 = min(r[4] for r in pubs), max(r[5] for r in pubs)
    res = {"rate": acked / (t1 - t0), "wall": t1 - t0, "pub_cpu": sum(r[6] for r in pubs),
           "load": os.getloadavg()[0], "messages": sum(r[7] for r in pubs),
           "server_cpu": sum(cpu_of(s.proc.pid) - cpu0[s.name] for s in servers)}
    for r in results:
        if r[0] == "con":
            lat = sorted(r[1])
            if len(lat) < nodes * events:
                raise RuntimeError(f"the fleet consumer got {len(lat)} of {nodes * events}")
            res.update(p50=lat[len(lat) // 2], p99=lat[int(len(lat) * 0.99)],
                       mean=statistics.fmean(lat), con_cpu=r[2], samples=len(lat))
    return res


def mode(cluster_url: str, name: str, query: str, nodes: int, events: int,
         servers, one) -> dict:
    """(a) to (d) for one way of packing events into messages."""
    with one() as single_server:
        single = run(single_server.url + f"?stream={name}1&max_bytes=2GiB{query}", 1, events,
                     False, [single_server])
    url = cluster_url + f"?stream={name}3&max_bytes=2GiB{query}"
    fleet = run(url, nodes, events, True, servers)
    stored, messages = stream_state(cluster_url, f"{name}3")
    fleet.update(single=single, stored_event=stored / (nodes * events),
                 stored_message=stored / messages)
    # (d) latency below saturation, paced, for ~10 s
    paced_rate = TARGET_RATE if fleet["rate"] >= TARGET_RATE else fleet["rate"] / 2
    per_node = paced_rate / nodes
    fleet["paced"] = run(url, nodes, int(per_node * 10), True, servers, rate=per_node)
    fleet["paced_rate"] = paced_rate
    return fleet


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(title: str, r: dict, nodes: int, events: int, cores: int) -> None:
    total = nodes * events
    single, paced = r["single"], r["paced"]
    per_msg = total / r["messages"]
    print(f" {title}")
    print(f"  (a) 1 node  -> 1 server (R1):         {single['rate']:>9,.0f} events/s acked "
          f"({single['rate'] / (events / single['messages']):,.0f} messages/s)")
    print(f"  (b) {nodes} nodes -> 3-node cluster (R3):  {r['rate']:>9,.0f} events/s acked "
          f"({total:,} in {r['wall']:.1f} s; {r['rate'] / single['rate']:.2f} x (a); "
          f"per node {r['rate'] / nodes:,.0f}/s; {r['rate'] / per_msg:,.0f} messages/s, "
          f"{per_msg:.1f} events each)   target >= {TARGET_RATE:,}: "
          f"{verdict(r['rate'] >= TARGET_RATE)}")
    print(f"  (c) event time -> fleet consumer:     p50 {r['p50'] * 1000:.0f} ms, "
          f"p99 {r['p99'] * 1000:.0f} ms ({r['samples']:,} events)   "
          f"target p99 <= {TARGET_P99 * 1000:.0f} ms: {verdict(r['p99'] <= TARGET_P99)}")
    why = "the target rate" if r["paced_rate"] == TARGET_RATE else "half of (b)"
    print(f"  (d) same, paced at {r['paced_rate']:,.0f} events/s ({why}): p50 "
          f"{paced['p50'] * 1000:.0f} ms, p99 {paced['p99'] * 1000:.0f} ms "
          f"({paced['samples']:,} events)   target p99 <= {TARGET_P99 * 1000:.0f} ms: "
          f"{verdict(paced['p99'] <= TARGET_P99)}")
    print(f"  stored per replica: {r['stored_event']:.0f} bytes per event "
          f"({r['stored_message']:,.0f} per message); CPU per event during (b): servers "
          f"{r['server_cpu'] / total * 1e6:.1f} us (3 replicas together), publisher "
          f"{r['pub_cpu'] / total * 1e6:.1f} us, consumer {r['con_cpu'] / total * 1e6:.1f} us; "
          f"{cores} cores x {r['wall']:.1f} s = {cores * r['wall']:.1f} CPU-s available, "
          f"used: servers {r['server_cpu']:.1f}, publishers {r['pub_cpu']:.1f}, consumer "
          f"{r['con_cpu']:.1f} (load average {r['load']:.1f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--events", type=int, default=25_000, help="events per node, one per message")
    ap.add_argument("--batched-events", type=int, default=100_000,
                    help="events per node with batch=N")
    ap.add_argument("--batch", type=int, default=256, help="N: events per message")
    args = ap.parse_args()
    if (problem := nats_problem()) is not None:
        print(f"bench_fleet: {problem}", file=sys.stderr)
        return 1
    cores = os.cpu_count() or 1
    with nats_cluster(3) as cluster:
        per_event = mode(cluster.url, "BENCH", "", args.nodes, args.events,
                         cluster.servers, nats_server)
        batched = mode(cluster.url, "BATCH", f"&batch={args.batch}&prefix=batched",
                       args.nodes, args.batched_events, cluster.servers, nats_server)
    print(f"bench_fleet ({cores} cores, nats-server {_server_version()}, payload "
          f"{len(payload('node-00', 1, 0.0))} bytes, {BATCH} events per publish call)")
    report(f"one message per event (default), {args.events:,} events per node:", per_event,
           args.nodes, args.events, cores)
    report(f"batch={args.batch} (up to {args.batch} events per message), "
           f"{args.batched_events:,} events per node:", batched, args.nodes,
           args.batched_events, cores)
    return 0


def _server_version() -> str:
    import subprocess

    from support.nats import NATS_SERVER

    assert NATS_SERVER is not None  # main() stops first without it (nats_problem)
    out = subprocess.run([NATS_SERVER, "--version"], capture_output=True, text=True).stdout
    return out.strip().rsplit("v", 1)[-1]


if __name__ == "__main__":
    sys.exit(main())
