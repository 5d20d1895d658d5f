"""Followers hold on like ``tail -F``: a stopped follower and a daemon outage are reported
and recovered from, never a reason to exit.  Real kernel maps, real daemons, bpftool as
the oracle."""

from __future__ import annotations

import os
import signal
import time

import pytest
from support.events import FAST, Follower, replay_lines, wait_ready
from support.kernel import bpftool_entries, fill_batch, one_error_line, pattern, token, u32

from watcher.kernel.sys import syscall

pytestmark = pytest.mark.kernel

PAUSE = 30.0  # the follower is stopped this long (the figure)
OUTAGE = 10.0  # the daemon is away this long: longer than the follower's 5 s heartbeat timeout
KEYS = 2000  # entries rewritten per round: ~40 KB per poll, far past the socket buffers


def _kill_daemon(d) -> None:
    """``kill -9``: no goodbye, a stale socket file left behind."""
    d.proc.kill()
    d.proc.wait()
    d._log_file.close()  # noqa: SLF001 (the fixture's log, after kill -9)


def _rewrite(fd: int, generation: int) -> None:
    keys = [u32(n) for n in range(KEYS)]
    fill_batch(fd, keys, [pattern(generation * KEYS + n, 8) for n in range(KEYS)])


def test_follower_survives_a_pause_and_a_daemon_outage(daemon_factory, maps, bpffs_dir):
    # A small high-water mark so the daemon drops for the stopped follower quickly.
    d = daemon_factory(*FAST, "--set", "daemon.stream_hwm=4")
    name = f"ev{token()}_hold"
    fd, map_id = maps.create("hash", 4, 8, 4 * KEYS, name=name, pin=bpffs_dir / name)
    _rewrite(fd, 0)
    with Follower(d, name, "--snapshot", "-f") as f:
        f.wait_for(lambda ls: replay_lines(ls) == bpftool_entries(map_id), "the start snapshot")
        wait_ready(d, name)

        # 1. The follower is stopped for 30 s while the map keeps changing.
        os.kill(f.proc.pid, signal.SIGSTOP)
        try:
            generation, end = 1, time.monotonic() + PAUSE
            while time.monotonic() < end:
                _rewrite(fd, generation)
                generation += 1
                time.sleep(0.25)
        finally:
            os.kill(f.proc.pid, signal.SIGCONT)
        seen = len(f.snapshot())
        f.wait_for(lambda ls: any(x["action"] == "resync" and x.get("reason") == "gap"
                                  for x in ls[seen:]), "a resync after the pause", timeout=60)
        truth = bpftool_entries(map_id)
        f.wait_for(lambda ls: replay_lines(ls) == truth, "the state after the pause")
        lines = f.snapshot()
        lost = [x for x in lines if x["action"] == "lost"]
        assert lost and all(x["missed"] > 0 for x in lost), lost
        assert f.proc.poll() is None
        assert "waiting" not in f.stderr  # the follower was stopped, not the daemon

        # 2. The daemon is killed, the map changes while it is away, it comes back 10 s later.
        _kill_daemon(d)
        for n in range(KEYS, KEYS + 20):
            syscall.map_update_elem(fd, u32(n), pattern(n, 8))
        for n in range(10):
            syscall.map_delete_elem(fd, u32(n))
        time.sleep(OUTAGE)
        assert f.proc.poll() is None, f.stderr
        assert "waiting for ever for it to come back" in f.stderr
        seen = len(f.snapshot())
        d.start()
        truth = bpftool_entries(map_id)
        f.wait_for(lambda ls: any(x["action"] == "resync" and x.get("reason") == "epoch"
                                  for x in ls[seen:]), "a resync to the new daemon", timeout=60)
        f.wait_for(lambda ls: replay_lines(ls) == truth, "the state after the outage")
        corrective = [x for x in f.snapshot()[seen:] if x["action"] != "resync"]
        assert {(x["action"], x["key"]) for x in corrective} == (
            {("added", u32(n).hex()) for n in range(KEYS, KEYS + 20)}
            | {("removed", u32(n).hex()) for n in range(10)})
        assert all(x.get("snapshot") and x["reason"] == "epoch" for x in corrective)

        # 3. It goes on following the new daemon.
        wait_ready(d, name)
        syscall.map_update_elem(fd, u32(5), pattern(5, 8))
        f.wait_for(lambda ls: ls[-1]["action"] == "added" and ls[-1]["key"] == u32(5).hex()
                   and not ls[-1].get("snapshot"), "a live event from the new daemon")
        assert replay_lines(f.snapshot()) == bpftool_entries(map_id)
        assert f.proc.poll() is None
        said = [line for line in f.stderr.splitlines() if line.strip()]
        assert len(said) == 2, said  # once when the daemon went silent, once when it was back
        assert "no heartbeat" in said[0] and "waiting" in said[0]
        assert "daemon is back" in said[1]


def test_max_wait_bounds_the_wait(daemon_factory, maps, bpffs_dir):
    d = daemon_factory(*FAST)
    name = f"ev{token()}_mw"
    maps.create("hash", 4, 8, 16, name=name, pin=bpffs_dir / name)
    with Follower(d, name, "-f", "--max-wait", "2") as f:
        wait_ready(d, name)
        d.stop()
        rc = f.wait_exit(60)
        assert rc == 1
        notice, error = [line for line in f.stderr.splitlines() if line.strip()]
        assert "waiting up to 2 s" in notice
        assert "gave up" in one_error_line(error)


async def test_library_follower_holds_on_through_a_daemon_outage(daemon_factory, maps, bpffs_dir):
    """The client library's default (``hold_on=True``): a stopped daemon (SIGTERM: its
    socket file removed, unlike kill -9 above) is a ``stalled`` event, its return a
    ``resumed`` one, then ``resync`` and the corrections."""
    import trio
    from support.events import LibFollower, replay_events

    d = daemon_factory(*FAST)
    name = f"ev{token()}_libh"
    fd, map_id = maps.create("hash", 4, 8, 64, name=name, pin=bpffs_dir / name)
    for n in range(10):
        syscall.map_update_elem(fd, u32(n), pattern(n, 8))
    lib = LibFollower(d.endpoint, [name], snapshot=True, timeout=15)
    async with trio.open_nursery() as nursery:
        await nursery.start(lib.run)
        await lib.await_count(10, "the start snapshot")
        await trio.to_thread.run_sync(d.stop)
        assert not d.socket.exists()
        for n in range(20, 25):
            syscall.map_update_elem(fd, u32(n), pattern(n, 8))
        syscall.map_delete_elem(fd, u32(3))
        await lib.await_count(0, "a stalled event",
                              pred=lambda evs: any(e.action == "stalled" for e in evs))
        await trio.sleep(OUTAGE)
        assert not lib.done.is_set() and lib.error is None
        await trio.to_thread.run_sync(d.start)
        truth = bpftool_entries(map_id)
        await lib.await_count(0, "the state after the outage", timeout=60,
                              pred=lambda evs: replay_events(evs) == truth)
        actions = [e.action for e in lib.events if e.key is None]
        assert actions[:3] == ["stalled", "resumed", "resync"], actions
        assert lib.stream is not None
        assert lib.stream.epoch is not None and lib.error is None
        nursery.cancel_scope.cancel()
