"""Many subscribers of one stream: CLI followers and client-library subscribers together,
stuck subscribers, and a daemon restarted under a running stream.  Real kernel maps."""

from __future__ import annotations

import functools

import pytest
import trio
import zmq
from support.events import (
    FAST,
    Follower,
    LibFollower,
    async_status,
    await_ready,
    changes,
    event_tuple,
    line_tuple,
    replay_events,
    replay_lines,
    topic_key,
)
from support.kernel import bpftool_entries, fill_batch, pattern, token, u32

from consumers.client import Client
from watcher.kernel.sys import syscall

pytestmark = pytest.mark.kernel


def has_entries(n: int, events: list) -> bool:
    """At least ``n`` entry events (the library may add stalled/resumed notices)."""
    return sum(e.key is not None for e in events) >= n


async def test_three_subscribers_see_the_same_stream(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_3"
    fd, map_id = maps.create("hash", 4, 8, 128, name=name, pin=bpffs_dir / name)
    other = f"ev{token()}_o"  # a second watched map interleaves its events in the global seq
    ofd, _ = maps.create("hash", 4, 8, 16, name=other, pin=bpffs_dir / other)
    values: dict[int, bytes] = {}
    gen = iter(range(1, 10**6))
    expected_rounds: list[set] = []

    def round_(adds, updates, deletes) -> set:
        exp: set[tuple[str, str, str, str | None]] = set()
        for n in adds:
            values[n] = pattern(next(gen), 8)
            syscall.map_update_elem(fd, u32(n), values[n])
            exp.add(("added", u32(n).hex(), values[n].hex(), None))
        for n in updates:
            old, values[n] = values[n], pattern(next(gen), 8)
            syscall.map_update_elem(fd, u32(n), values[n])
            exp.add(("updated", u32(n).hex(), values[n].hex(), old.hex()))
        for n in deletes:
            syscall.map_delete_elem(fd, u32(n))
            exp.add(("removed", u32(n).hex(), values.pop(n).hex(), None))
        syscall.map_update_elem(ofd, u32(len(expected_rounds)), pattern(next(gen), 8))
        return exp

    lib = LibFollower(d.endpoint, [name])
    with Follower(d, name, "-f") as f1, Follower(d, name, "-f") as f2, \
            Follower(d, other, "-f") as f_other:
        async with Client(d.endpoint) as client, trio.open_nursery() as nursery:
            await nursery.start(lib.run)
            await await_ready(client, name, 3)
            await await_ready(client, other, 1)
            total = 0
            for spec in [(range(20), (), ()),
                         (range(20, 30), range(10), range(10, 15)),
                         (range(10, 15), range(20, 30), range(5)),
                         ((), range(5, 10), range(15, 20)),
                         (range(40, 80), range(10, 15), range(20, 25))]:
                exp = round_(*spec)
                expected_rounds.append(exp)
                prev, total = total, total + len(exp)
                l1 = await f1.await_count(total)
                l2 = await f2.await_count(total)
                await lib.await_count(total, pred=functools.partial(has_entries, total))
                assert changes(l1[prev:total]) == exp
                assert changes(l2[prev:total]) == exp
                assert changes(lib.entry_events()[prev:total]) == exp
            nursery.cancel_scope.cancel()
        # Nothing extra arrived after the last round, and all three agree exactly.
        t1 = [line_tuple(x) for x in f1.snapshot()]
        t2 = [line_tuple(x) for x in f2.snapshot()]
        t3 = [event_tuple(e) for e in lib.entry_events()]
        assert lib.error is None
        # A loaded host may delay a heartbeat past the silence limit: the library then says
        # so (stalled, then resumed). Those are the only other events it may add.
        notices = [e.action for e in lib.events if e.key is None]
        assert set(notices) <= {"stalled", "resumed"}, notices
        assert len(t1) == total
        assert t1 == t2 == t3
        seqs = [t[0] for t in t1]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        # The other map's events took the missing global seq numbers: together, no holes.
        others = f_other.wait_count(len(expected_rounds))
        all_seqs = sorted(seqs + [x["seq"] for x in others])
        assert all_seqs == list(range(1, len(all_seqs) + 1))
        assert replay_lines(f1.snapshot()) == bpftool_entries(map_id)


async def test_stuck_subscribers_do_not_hold_back_others(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_s"
    fd, map_id = maps.create("hash", 4, 64, 2048, name=name, pin=bpffs_dir / name)
    ctx = zmq.Context()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.connect(f"ipc://{d.run_dir}/events.sock")
    stuck.setsockopt(zmq.SUBSCRIBE, b"hb")
    stuck.setsockopt(zmq.SUBSCRIBE, topic_key(name).encode())
    lib = LibFollower(d.endpoint, [name])
    try:
        with Follower(d, name, "-f", read=False) as unread, Follower(d, name, "-f") as f:
            async with Client(d.endpoint) as client, trio.open_nursery() as nursery:
                await nursery.start(lib.run)
                await await_ready(client, name, 4)
                keys = [u32(i) for i in range(1000)]
                total = 0
                for r in range(6):
                    fill_batch(fd, keys, [pattern(r * 1000 + i, 64) for i in range(1000)])
                    total += 1000
                    await f.await_count(total, timeout=40)
                    await lib.await_count(total, timeout=40)
                    with trio.fail_after(20):
                        pong = await client.ping()  # the daemon stays responsive
                    assert pong.epoch
                st = await async_status(client)
                nursery.cancel_scope.cancel()
            lines = f.snapshot()
            assert len(lines) == total == 6000
            assert [line_tuple(x) for x in lines] == [event_tuple(e) for e in lib.events]
            assert [x["seq"] for x in lines] == list(range(1, total + 1))
            assert [x["action"] for x in lines[:1000]] == ["added"] * 1000
            assert {x["action"] for x in lines[1000:]} == {"updated"}
            assert replay_lines(lines) == bpftool_entries(map_id)
            assert st["subscriptions"][topic_key(name)] == 4  # the stuck ones still count
            assert unread.proc.poll() is None, unread.stderr
    finally:
        stuck.close(0)
        ctx.term()


async def test_daemon_restart_mid_stream(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_rs"
    fd, map_id = maps.create("hash", 4, 8, 64, name=name, pin=bpffs_dir / name)
    for n in range(10):
        syscall.map_update_elem(fd, u32(n), pattern(n, 8))
    lib = LibFollower(d.endpoint, [name], snapshot=True, heartbeat_timeout=30)
    with Follower(d, name, "-f") as f:
        async with trio.open_nursery() as nursery:
            async with Client(d.endpoint) as client:
                await nursery.start(lib.run)
                await await_ready(client, name, 2)
                await lib.await_count(10, "the start snapshot")
                assert all(e.snapshot and e.action == "added" for e in lib.events)
                assert lib.stream is not None
                epoch = lib.stream.epoch
                for n in range(5):
                    syscall.map_update_elem(fd, u32(n), pattern(100 + n, 8))
                await lib.await_count(15)
                await f.await_count(5)

            await trio.to_thread.run_sync(d.stop)
            # Changes while no daemon runs: only a resync can show them.
            for n in range(20, 25):
                syscall.map_update_elem(fd, u32(n), pattern(n, 8))
            syscall.map_delete_elem(fd, u32(5))
            syscall.map_delete_elem(fd, u32(6))
            await trio.to_thread.run_sync(d.start)

            truth = bpftool_entries(map_id)
            await lib.await_count(0, "the snapshot client's resync to the new daemon",
                                  pred=lambda evs: replay_events(evs) == truth)
            resyncs = [i for i, e in enumerate(lib.events) if e.action == "resync"]
            assert len(resyncs) == 1 and lib.events[resyncs[0]].reason == "epoch"
            corrective = lib.events[resyncs[0] + 1:]
            assert changes(corrective) == (
                {("added", u32(n).hex(), pattern(n, 8).hex(), None) for n in range(20, 25)}
                | {("removed", u32(n).hex(), pattern(n, 8).hex(), None) for n in (5, 6)})
            assert all(e.snapshot and e.reason == "epoch" for e in corrective)
            assert lib.stream.epoch != epoch
            f.wait_for(lambda ls: any(x["action"] == "resync" for x in ls),
                       "the follower's resync line")
            resync_line = next(x for x in f.snapshot() if x["action"] == "resync")
            assert resync_line["reason"] == "epoch"

            # The new daemon streams on: both get new events.
            async with Client(d.endpoint) as client:
                await await_ready(client, name, 2)
                before_lib, before_f = len(lib.events), len(f.snapshot())
                for n in range(7, 10):
                    syscall.map_update_elem(fd, u32(n), pattern(200 + n, 8))
                exp = {("updated", u32(n).hex(), pattern(200 + n, 8).hex(), pattern(n, 8).hex())
                       for n in range(7, 10)}
                await lib.await_count(before_lib + 3)
                lines = await f.await_count(before_f + 3)
                assert changes(lib.events[before_lib:]) == exp
                assert changes(lines[before_f:]) == exp
                assert all(e.seq > 0 and not e.snapshot for e in lib.events[before_lib:])
                assert replay_events(lib.events) == bpftool_entries(map_id)
            assert lib.error is None
            nursery.cancel_scope.cancel()
