"""``pymap top`` as a person uses it: in tmux, against a real daemon and real maps.

A paced writer (support/top.py) increments key 1 of a counter map 200 times a
second and key 2 20 times; the map is decoded with a declared layout (u32 id ->
u64 calls), so ``calls/s`` is the truth the screen must show.  Writers run for a
bounded time; tmux sessions are killed, daemons stopped and maps closed at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid

import pytest
from conftest import require
from support.events import wait_until
from support.top import TOP_LAYOUT, CounterWriter, rate_of, tmux_top

FAST = ("--interval", "0.2")
A, B = '{"id":1}', '{"id":2}'  # the keys as get shows them with the layout
TRUTH = {1: 200.0, 2: 20.0}


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        require("tmux is not installed (make setup installs it)")


@pytest.fixture
def counters(maps, bpffs_dir, daemon_factory, tmp_path):
    """(daemon, map fd, map name): a pinned u32 -> u64 hash map, its layout in the config."""
    name = f"top{uuid.uuid4().hex[:8]}"
    conf = tmp_path / "top.toml"
    conf.write_text(TOP_LAYOUT.format(name=name))
    fd, _ = maps.create("hash", 4, 8, 64, name=name, pin=bpffs_dir / name)
    daemon = daemon_factory("--config", str(conf), *FAST)
    return daemon, fd, name


def _env(daemon) -> dict[str, str]:
    return {"PYMAP_ENDPOINT": daemon.endpoint, **daemon.client_env}


def _rates_right(screen: str) -> bool:
    a, b = rate_of(screen, A), rate_of(screen, B)
    return (a is not None and b is not None and abs(a - TRUTH[1]) <= 0.15 * TRUTH[1]
            and abs(b - TRUTH[2]) <= 0.15 * TRUTH[2])


def _when(top, pred) -> str | None:
    """The screen if ``pred(screen)``."""
    screen = top.screen()
    return screen if pred(screen) else None


def _row_index(screen: str, name: str) -> int:
    return next(i for i, line in enumerate(screen.splitlines()) if f" {name} " in line)


@pytest.mark.parametrize("width", [80, 200])
def test_key_rates_on_screen(tmux, counters, width):
    daemon, fd, name = counters
    with CounterWriter(fd, TRUTH, seconds=30), \
            tmux_top([_pymap(), "top", name], _env(daemon), width, 24) as top:
        screen = wait_until(lambda: _when(top, lambda s: _rates_right(s)),
                            f"both rates within 15% on screen at {width} columns", timeout=25)
        assert _row_index(screen, A) < _row_index(screen, B), screen  # busiest first
        for line in screen.splitlines():  # names whole, every line within the width
            assert len(line) <= width
        assert re.search(r"live", screen), screen
        top.keys("q")
        wait_until(top.dead, "top to quit on q", timeout=10)


def test_sort_filter_pause_quit(tmux, counters):
    daemon, fd, name = counters
    with CounterWriter(fd, TRUTH, seconds=30), \
            tmux_top([_pymap(), "top", name], _env(daemon), 100, 24) as top:
        wait_until(lambda: _rates_right(top.screen()), "rates on screen", timeout=25)
        top.keys("1")  # by key: id 1 first either way; reversed: id 2 first
        wait_until(lambda: "by key" in top.screen(), "sorted by key")
        top.keys("r")
        screen = wait_until(lambda: _when(top, lambda s: "(reversed)" in s),
                            "reversed")
        assert _row_index(screen, B) < _row_index(screen, A), screen
        top.keys("/")
        top.keys("-l", '"id":1')
        top.keys("Enter")
        screen = wait_until(lambda: _when(top, lambda s: "filter" in s), "filtered")
        wait_until(lambda: _when(top, lambda s: B not in s and A in s), "only key 1 left",
                   timeout=5)
        top.keys("Escape")
        wait_until(lambda: B in top.screen(), "the filter cleared")
        top.keys("p")
        paused = wait_until(lambda: _when(top, lambda s: "PAUSED" in s), "paused")
        time.sleep(1.5)
        assert rate_of(top.screen(), A) == rate_of(paused, A)  # frozen while paused
        top.keys("p")
        top.keys("q")
        wait_until(top.dead, "top to quit on q", timeout=10)
        assert "status 0" in top.screen() or top.dead()


def test_daemon_restart_shows_stall_and_recovery(tmux, counters):
    daemon, fd, name = counters
    with CounterWriter(fd, TRUTH, seconds=60), \
            tmux_top([_pymap(), "top", name], _env(daemon), 120, 24) as top:
        wait_until(lambda: _rates_right(top.screen()), "rates on screen", timeout=25)
        daemon.stop()
        wait_until(lambda: "STALLED" in top.screen(), "the stall in the status line", timeout=20)
        daemon.start()
        screen = wait_until(lambda: _when(top, lambda s: "daemon back" in s),
                            "the recovery in the status line", timeout=30)
        assert "STALLED" not in screen, screen
        wait_until(lambda: _rates_right(top.screen()), "correct rates after the restart",
                   timeout=30)
        top.keys("q")
        wait_until(top.dead, "top to quit", timeout=10)


def test_two_thousand_maps_stay_responsive(tmux, maps, daemon_factory):
    prefix = f"t{uuid.uuid4().hex[:5]}_"
    for i in range(2000):
        maps.create("array", 4, 8, 1, name=f"{prefix}{i}")
    daemon = daemon_factory("--always", f"{prefix}*")
    with tmux_top([_pymap(), "top"], _env(daemon), 200, 40) as top:
        wait_until(lambda: re.search(r"(\d+) watched maps", top.screen())
                   and int(re.search(r"(\d+) watched maps", top.screen())[1]) >= 2000,
                   "2,000 maps on screen", timeout=60)
        for key, title in (("1", "by name"), ("r", "(reversed)")):
            t0 = time.monotonic()
            top.keys(key)
            wait_until(lambda t=title: t in top.screen(), f"the screen to show {title}",
                       timeout=5, step=0.02)
            assert time.monotonic() - t0 <= 1.0, f"{key}: refresh took over a second"
        top.keys("q")
        wait_until(top.dead, "top to quit", timeout=10)


def test_plain_once_and_json(counters):
    daemon, fd, name = counters
    with CounterWriter(fd, TRUTH, seconds=20):
        proc = daemon.cli("top", name, "--once", "--window", "3", check=True, timeout=60)
        lines = proc.stdout.splitlines()
        assert lines[0].startswith(f"pymap top {name}:"), proc.stdout
        assert lines[1].split() == ["KEY", "CALLS/S", "CHANGES/S", "VALUE", "TREND"]
        assert lines[2].startswith(A), proc.stdout  # piped: plain columns, busiest first
        time.sleep(3)  # a full window of writes
        proc = daemon.cli("top", name, "-n", "2", "-o", "json", check=True, timeout=60)
        refreshes = [json.loads(x) for x in proc.stdout.splitlines()]
        assert len(refreshes) == 2
        last = {r["key_text"]: r for r in refreshes[-1]["rows"]}
        assert abs(last[A]["fields"]["calls"] - 200) <= 30, last
        assert abs(last[B]["fields"]["calls"] - 20) <= 3, last
        proc = daemon.cli("top", "-n", "1", check=True, timeout=60)  # every watched map
        assert any(line.split()[0] == name for line in proc.stdout.splitlines()[2:]), proc.stdout


@pytest.mark.parametrize("args, words", [
    (["top", "no_such_map_x", "--once"], "no_such_map_x"),
    (["top", "--sort", "nope", "--once"], "no column 'nope'"),
    (["top", "[bad", "--once"], "glob"),
    (["top", "*", "--raw", "--once"], "--raw and --layout"),
])
def test_bad_input_is_one_line(daemon, args, words):
    proc = daemon.cli(*args, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words in proc.stderr, proc.stderr


def _pymap() -> str:
    from conftest import PYMAP

    return PYMAP
