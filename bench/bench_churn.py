"""Map churn, discovery cost and fuzzing rate (issue 12).

1. Idle discovery on 2,000 maps: the daemon's CPU while a subscriber holds a glob that
   matches none of them (so the engine cycles every second), and the cost of one cycle's
   enumeration: the id-set walk it does now against the full info read it did before.
   Target: <= 1% of a core.
2. Churn: 1,000 maps a minute, each living 2 s, for 30 s, while 3 followers follow their
   glob: created/removed reported per follower, the daemon's fds and RSS at start and end
   (``watch.linger=5``, so gone names are forgotten within the run).
   Target: every map reported to every follower, fds back to the start, RSS flat.
3. Short-lived maps: 300 maps that live 10 ms each, one after another, seen by two
   daemons at once (the same run): one with ``watch.discovery = "auto"`` (the bpf()
   syscall tracepoints), one with ``"poll"``; the share of those maps each reported to a
   glob follower as map_created and map_removed.  Target: all of them with the
   tracepoints.  And what the attached programs cost every other bpf() caller: the
   time of 100,000 ``BPF_OBJ_GET_INFO_BY_FD`` calls with and without them.
4. Churn cost on a full host: 2,000 maps present, 1,000 maps a minute created (each
   living 2 s) for 20 s, two daemons at once (tracepoint and poll discovery), each with
   a subscriber of the churned maps' prefix: each daemon's CPU.  Target: the tracepoint daemon
   within a small factor of the polling one (a cycle reads only the new maps' info).
5. Fuzzing: pings answered per second by one client alone, then while another client
   sends malformed frames flat out (and how many of those were answered per second).
   Printed side by side; the daemon has one loop, so the two clients share it.

Run as root: ``.venv/bin/python bench/bench_churn.py [idle] [churn] [short] [cost] [fuzz]``
(no argument: all five).
"""

from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import threading
import time

import _common
import zmq  # noqa: E402
from _common import PYMAP, BenchError, check_root, private_bpffs, private_tmp, running_daemon

from watcher.daemon.catalog import HostCatalog  # noqa: E402
from watcher.kernel.discovery.mapwatch import MapWatch  # noqa: E402
from watcher.kernel.maps.kinds import TYPE_IDS  # noqa: E402
from watcher.kernel.sys import syscall
from watcher.wire import schema  # noqa: E402

MB = 1 << 20


def subdir(tmp, name: str):
    (tmp / name).mkdir()
    return tmp / name


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def idle_discovery(tmp, bpffs) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    made = [syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name=f"bidle{i}") for i in range(2000)]
    try:
        cat = HostCatalog([str(bpffs)])
        t0 = time.perf_counter()
        cat.records()
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        cat.ids()
        walk = time.perf_counter() - t0
        print(f"enumerating {len(cat.ids())} maps: full info read {full * 1000:.1f} ms "
              f"(every second before: {full * 100:.1f}% of a core), id-set walk "
              f"{walk * 1000:.1f} ms ({walk * 100:.2f}%)")
        with running_daemon(subdir(tmp, "idle"), bpffs) as d:
            ctx = zmq.Context()
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(d.endpoint.replace("pymap.sock", "events.sock"))
            sub.setsockopt(zmq.SUBSCRIBE, schema.map_topic("nomatch")[:-1])
            time.sleep(3)
            c0, t0 = cpu_seconds(d.proc.pid), time.monotonic()
            time.sleep(10)
            pct = (cpu_seconds(d.proc.pid) - c0) / (time.monotonic() - t0) * 100
            print(f"idle daemon with a subscriber, 2,000 maps: {pct:.2f}% of a core "
                  f"(target <= 1%; before: 9%)")
            sub.close(0)
            ctx.term()
    finally:
        for fd in made:
            os.close(fd)


class Follower:
    def __init__(self, endpoint: str, pattern: str):
        self.proc = subprocess.Popen([PYMAP, "events", pattern, "-f", "-o", "json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYMAP_ENDPOINT": endpoint})
        self.seen: dict[str, set[int]] = collections.defaultdict(set)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)
            if ev.get("action") in ("map_created", "map_removed"):
                self.seen[ev["action"]].add(ev["map"]["id"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def churn(tmp, bpffs, seconds: float = 30.0, rate: float = 1000 / 60, linger: float = 5) -> None:
    # A short linger: the daemon forgets a gone map's name once its hold ends, so a run
    # of 30 s shows the steady state (with the default 300 s every name is still held).
    with running_daemon(subdir(tmp, "churn"), bpffs, "--set", f"watch.linger={linger:g}") as d:
        followers = [Follower(d.endpoint, "bch_*") for _ in range(3)]
        try:
            def subscribed():
                out = d.cli("status", "-o", "json").stdout
                return out and json.loads(out)["subscriptions"].get("map:bch_", 0) >= 1
            deadline = time.monotonic() + 30
            while not subscribed():
                if time.monotonic() > deadline:
                    raise BenchError("followers did not subscribe")
                time.sleep(0.2)
            time.sleep(2)
            pid = d.proc.pid
            f0, r0 = fds(pid), rss(pid)
            ids: list[int] = []
            live: collections.deque = collections.deque()
            start = time.monotonic()
            third, r_third = int(seconds * rate / 3), r0  # past the warm-up: the slope
            while (now := time.monotonic()) < start + seconds:
                while len(ids) < (now - start) * rate:
                    fd = syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name=f"bch_{len(ids)}")
                    ids.append(syscall.map_info(fd).id)
                    if len(ids) == third:
                        r_third = rss(pid)
                    live.append((now + 2.0, fd))
                while live and live[0][0] <= now:
                    os.close(live.popleft()[1])
                time.sleep(0.01)
            while live:  # the last ones live their full lifetime too
                until, fd = live.popleft()
                time.sleep(max(0.0, until - time.monotonic()))
                os.close(fd)
            deadline = time.monotonic() + 30
            want = set(ids)
            while time.monotonic() < deadline and not all(
                    want <= f.seen["map_created"] and want <= f.seen["map_removed"]
                    for f in followers):
                time.sleep(0.5)
            time.sleep(2)
            f1, r1 = fds(pid), rss(pid)
            print(f"churn: {len(ids)} maps in {seconds:g} s ({len(ids) / seconds * 60:.0f}/min), "
                  f"3 followers")
            for i, f in enumerate(followers):
                print(f"  follower {i}: map_created {len(want & f.seen['map_created'])}/"
                      f"{len(want)}, map_removed {len(want & f.seen['map_removed'])}/{len(want)}")
            print(f"  daemon fds {f0} -> {f1}, RSS {r0 / MB:.1f} -> {r_third / MB:.1f} (a third "
                  f"in) -> {r1 / MB:.1f} MB: {(r1 - r_third) / (len(ids) - third) * 1000 / MB:.2f}"
                  f" MB per 1,000 maps after the first third (watch.linger={linger:g}; "
                  "target: every map reported, fds back to start, RSS flat)")
        finally:
            for f in followers:
                f.stop()


def short_lived(tmp, bpffs, count: int = 300, lifetime: float = 0.01) -> None:
    with running_daemon(subdir(tmp, "auto"), bpffs) as auto, \
            running_daemon(subdir(tmp, "poll"), bpffs, "--set", 'watch.discovery="poll"') as poll:
        followers = {"tracepoint": Follower(auto.endpoint, "bsh_*"),
                     "poll": Follower(poll.endpoint, "bsh_*")}
        try:
            for d in (auto, poll):
                deadline = time.monotonic() + 30
                while not (out := d.cli("status", "-o", "json").stdout) or \
                        not json.loads(out)["subscriptions"].get("map:bsh_"):
                    if time.monotonic() > deadline:
                        raise BenchError("followers did not subscribe")
                    time.sleep(0.2)
            time.sleep(2)
            ids = []
            for i in range(count):
                fd = syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name=f"bsh_{i}")
                ids.append(syscall.map_info(fd).id)
                time.sleep(lifetime)
                os.close(fd)
                time.sleep(0.005)
            want = set(ids)
            deadline = time.monotonic() + 30
            tp = followers["tracepoint"]
            while time.monotonic() < deadline and not want <= tp.seen["map_removed"]:
                time.sleep(0.5)
            time.sleep(3)  # a few poll intervals for the poller
            print(f"short-lived maps: {count} maps living {lifetime * 1000:g} ms, one after "
                  "another, seen by two daemons at once")
            for how, f in followers.items():
                both = want & f.seen["map_created"] & f.seen["map_removed"]
                print(f"  {how:>10}: {len(both)}/{count} reported created and removed "
                      f"({len(both) / count:.0%})")
        finally:
            for f in followers.values():
                f.stop()
    fd = syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name="bsh_cost")
    try:
        def calls() -> float:
            t0 = time.perf_counter()
            for _ in range(100_000):
                syscall.map_info(fd)
            return time.perf_counter() - t0
        without = min(calls() for _ in range(3))
        watch = MapWatch()
        try:
            with_tp = min(calls() for _ in range(3))
        finally:
            watch.close()
        print(f"  100,000 BPF_OBJ_GET_INFO_BY_FD calls: {without * 1000:.0f} ms without the "
              f"discovery programs, {with_tp * 1000:.0f} ms with them "
              f"({with_tp / without:.2f}x)")
    finally:
        os.close(fd)


def churn_cost(tmp, bpffs, seconds: float = 20.0, rate: float = 1000 / 60) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    made = [syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name=f"bfull{i}")
            for i in range(2000)]
    try:
        with running_daemon(subdir(tmp, "cost_auto"), bpffs) as auto, \
                running_daemon(subdir(tmp, "cost_poll"), bpffs,
                               "--set", 'watch.discovery="poll"') as poll, \
                running_daemon(subdir(tmp, "cost_followed"), bpffs) as followed:
            daemons = {"tracepoint": auto, "poll": poll, "tracepoint, CLI follower": followed}
            # A bare subscriber of the glob's prefix on the first two: discovery's cost.
            # The third has a `pymap events -f -o json` follower, which adds a `get` (no
            # entries: metadata, holders) per new map: what a user's follower costs.
            follower = Follower(followed.endpoint, "bcc_*")
            ctx = zmq.Context()
            subs = []
            for d in (auto, poll):
                sub = ctx.socket(zmq.SUB)
                sub.setsockopt(zmq.LINGER, 0)
                sub.connect(d.endpoint.replace("pymap.sock", "events.sock"))
                sub.setsockopt(zmq.SUBSCRIBE, schema.MAP_TOPIC_PREFIX + b"bcc_")
                subs.append(sub)
            try:
                time.sleep(3)
                cpu0 = {how: cpu_seconds(d.proc.pid) for how, d in daemons.items()}
                t0 = time.monotonic()
                live: collections.deque = collections.deque()
                ids: list[int] = []
                while (now := time.monotonic()) < t0 + seconds:
                    while len(ids) < (now - t0) * rate:
                        fd = syscall.map_create(TYPE_IDS["hash"], 4, 8, 16,
                                                name=f"bcc_{len(ids)}")
                        ids.append(syscall.map_info(fd).id)
                        live.append((now + 2.0, fd))
                    while live and live[0][0] <= now:
                        os.close(live.popleft()[1])
                    time.sleep(0.01)
                while live:
                    os.close(live.popleft()[1])
                elapsed = time.monotonic() - t0
                print(f"churn cost, {len(ids)} maps created in {seconds:g} s among 2,000 others:")
                for how, d in daemons.items():
                    pct = (cpu_seconds(d.proc.pid) - cpu0[how]) / elapsed * 100
                    print(f"  {how:>25} daemon: {pct:.1f}% of a core")
                print(f"  (the follower saw {len(follower.seen['map_created'])}/{len(ids)} "
                      f"map_created)")
            finally:
                follower.stop()
                for sub in subs:
                    sub.close(0)
                ctx.term()
    finally:
        for fd in made:
            os.close(fd)


def ping_rate(endpoint: str, seconds: float, in_flight: int = 16) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    end = time.monotonic() + seconds
    req = done = outstanding = 0
    while time.monotonic() < end:
        while outstanding < in_flight:
            req += 1
            sock.send(schema.encode(schema.Ping(req=req)))
            outstanding += 1
        if sock.poll(5000):
            sock.recv_multipart()
            done += 1
            outstanding -= 1
    sock.close(0)
    ctx.term()
    return done / seconds


def fuzz_rate(tmp, bpffs, seconds: float = 5.0) -> None:
    with running_daemon(subdir(tmp, "fuzz"), bpffs) as d:
        alone = ping_rate(d.endpoint, seconds)
        stop = threading.Event()
        answered = [0]

        def fuzzer():
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(d.endpoint)
            rnd = __import__("random").Random(12)
            outstanding = 0
            while not stop.is_set():
                while outstanding < 32:
                    junk = [rnd.randbytes(rnd.randint(0, 200)),
                            b'{"kind":"get","selector":"../x","req":%d,"v":1}' % rnd.randint(1, 9),
                            b'{"kind":"nope","req":5}', b"\xff\xfe"][rnd.randint(0, 3)]
                    sock.send(junk)
                    outstanding += 1
                if sock.poll(1000):
                    sock.recv_multipart()
                    answered[0] += 1
                    outstanding -= 1
            sock.close(0)
            ctx.term()

        t = threading.Thread(target=fuzzer, daemon=True)
        t.start()
        time.sleep(0.5)
        a0 = answered[0]
        fuzzed = ping_rate(d.endpoint, seconds)
        junk_rate = (answered[0] - a0) / seconds
        stop.set()
        t.join(10)
        print(f"requests: {alone:.0f} pings/s alone; {fuzzed:.0f} pings/s while fuzzed "
              f"({fuzzed / alone:.2f} of alone), {junk_rate:.0f} malformed requests/s answered "
              f"meanwhile ({(fuzzed + junk_rate) / alone:.2f} of the rate alone in all)")


def main() -> int:
    try:
        check_root()
        parts = {"idle": idle_discovery, "churn": churn, "short": short_lived,
                 "cost": churn_cost, "fuzz": fuzz_rate}
        chosen = sys.argv[1:] or list(parts)
        if unknown := set(chosen) - set(parts):
            raise BenchError(f"unknown part {sorted(unknown)}; choose from {list(parts)}")
        with private_tmp() as tmp, private_bpffs() as bpffs:
            for name in chosen:
                parts[name](tmp, bpffs)
    except BenchError as e:
        print(f"bench_churn: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    assert _common  # imported for its sys.path line
    sys.exit(main())
