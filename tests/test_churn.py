"""Map churn: maps created and deleted at 1,000 a minute while a subscriber follows a glob.

Every map gets its ``map_created`` and ``map_removed``, the daemon holds no fd for a
map after it is gone, its memory stays bounded, and a name reused by a new map is
served as the new map.  10 s of churn by default, 3 minutes with PYMAP_LONG_TESTS=1.
"""

from __future__ import annotations

import collections
import json
import os
import time

import pytest
from support.events import FAST, Follower, status, wait_until
from support.kernel import token

from watcher.kernel.maps.kinds import TYPE_IDS
from watcher.kernel.sys import syscall

LONG = os.environ.get("PYMAP_LONG_TESTS") == "1"
MB = 1 << 20
RATE = 1000 / 60  # maps per second
LIFETIME = 2.0  # seconds each map lives: the id-set poll (every 0.2 s here) sees it


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.kernel
def test_map_churn_is_reported_without_leaks(daemon_factory, kernel):
    d = daemon_factory(*FAST)
    pid = d.proc.pid
    prefix = f"c{token()[:5]}_"
    duration = 180 if LONG else 10
    created: dict[int, str] = {}
    live: collections.deque[tuple[float, int, int]] = collections.deque()  # (until, fd, id)
    with Follower(d, f"{prefix}*", "-f") as follower:
        wait_until(lambda: any(k.startswith(f"map:{prefix}") for k in status(d)["subscriptions"]),
                   "the follower's subscription")
        time.sleep(1)  # the engine's first cycle after it is a baseline
        # A first map, so the follower is known to see creations before the churn starts.
        fd = syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name=f"{prefix}first")
        first = syscall.map_info(fd).id
        created[first] = f"{prefix}first"
        follower.wait_for(lambda lines: any(ln["map"]["id"] == first for ln in lines),
                          "the first map_created")
        os.close(fd)
        time.sleep(1)
        fds_before, rss_before = open_fds(pid), rss(pid)
        start = time.monotonic()
        n = 0
        try:
            while (now := time.monotonic()) < start + duration:
                while n < (now - start) * RATE:
                    name = f"{prefix}{n % 5000}"
                    fd = syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name=name)
                    map_id = syscall.map_info(fd).id
                    created[map_id] = name
                    live.append((now + LIFETIME, fd, map_id))
                    n += 1
                while live and live[0][0] <= now:
                    os.close(live.popleft()[1])
                time.sleep(0.01)
        finally:
            while live:
                os.close(live.popleft()[1])

        def reported(lines):
            seen = collections.defaultdict(set)
            for ln in lines:
                if ln.get("action") in ("map_created", "map_removed"):
                    seen[ln["action"]].add(ln["map"]["id"])
            return (set(created) <= seen["map_created"] and set(created) <= seen["map_removed"]
                    and seen)

        seen = follower.wait_for(reported, f"map_created and map_removed for {len(created)} maps",
                                 timeout=120)
        assert set(created) <= seen["map_created"] and set(created) <= seen["map_removed"]
        time.sleep(1)
        fds_after = wait_until(lambda: (f := open_fds(pid)) <= fds_before and f or None,
                               f"the daemon's fds back to {fds_before}")
        rss_after = rss(pid)
        print(f"churned {n} maps in {duration} s ({n / duration * 60:.0f}/min): "
              f"{len(seen['map_created'])} created and {len(seen['map_removed'])} removed "
              f"reported; daemon fds {fds_before} -> {fds_after}, RSS "
              f"{rss_before / MB:.1f} -> {rss_after / MB:.1f} MB")
        assert rss_after - rss_before < 40 * MB

        # A reused name is the new map, never the old one's state.
        name = created[max(created)]
        fd = syscall.map_create(TYPE_IDS["hash"], 4, 8, 16, name=name)
        try:
            new_id = syscall.map_info(fd).id
            listed = json.loads(d.cli("list", name, "-o", "json", "--no-entries",
                                      check=True).stdout)
            rows = listed if isinstance(listed, list) else [listed]
            assert [r["id"] for r in rows] == [new_id], rows
        finally:
            os.close(fd)
