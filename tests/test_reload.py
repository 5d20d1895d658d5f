"""SIGHUP reloads the config live: subscribers stay, a broken file changes nothing,
new intervals and layouts take effect."""

from __future__ import annotations

import json
import signal
import time
from typing import cast

import pytest
from support.events import Follower, status, wait_ready, wait_until, watch_of
from support.kernel import token, u32, u64

from watcher.kernel.sys import syscall

pytestmark = pytest.mark.kernel


def _write(path, interval: float, field: str = "packets", extra: str = "") -> None:
    path.write_text(f"""
[watch]
interval = {interval}
{extra}
[[layouts]]
match = "rl_*"
key = [ {{ name = "proto", type = "u32" }} ]
value = [ {{ name = "{field}", type = "u64" }} ]
""")


def _log_lines(daemon, words: str) -> list[str]:
    return [ln for ln in daemon.log.read_text().splitlines() if words in ln]


def _hup(daemon, words: str, count: int) -> None:
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(_log_lines(daemon, words)) >= count, f"{count} x {words!r} in the log")


def _reloadable(tmp_path, daemon_factory, maps):
    """A daemon on a config file (0.2 s interval, the ``rl_*`` layout) that SIGHUP
    re-reads, and a map that layout decodes: (config path, daemon, map name, map fd)."""
    conf = tmp_path / "pymap.toml"
    _write(conf, 0.2)
    d = daemon_factory("-c", str(conf))
    name = f"rl_{token()}"
    fd, _ = maps.create("hash", 4, 8, 64, name=name)
    return conf, d, name, fd


def test_subscribers_keep_receiving_across_reloads(tmp_path, daemon_factory, maps):
    _, d, name, fd = _reloadable(tmp_path, daemon_factory, maps)
    epoch = status(d)["epoch"]
    with Follower(d, name, "-f") as f:
        wait_ready(d, name)
        syscall.map_update_elem(fd, u32(1), u64(1))
        f.wait_count(1)
        for n in range(2, 5):
            _hup(d, "config reloaded", n - 1)
            syscall.map_update_elem(fd, u32(n), u64(n))
            f.wait_count(n)
        lines = f.snapshot()
        assert [line["seq"] for line in lines] == [1, 2, 3, 4]  # nothing lost, no resync
        assert f.proc.poll() is None and "daemon" not in f.stderr  # no stall, no restart seen
    st = status(d)
    assert st["epoch"] == epoch  # the same daemon run: not a restart


def test_broken_config_is_refused_with_one_line_and_the_old_one_stays(tmp_path, daemon_factory,
                                                                      maps):
    conf = tmp_path / "pymap.toml"
    name = f"rl_{token()}"
    _write(conf, 0.3, extra=f'always = ["{name}"]')
    d = daemon_factory("-c", str(conf))
    maps.create("hash", 4, 8, 64, name=name)
    wait_until(lambda: watch_of(status(d), name), f"{name} watched (always)")
    for broken in ("[watch\ninterval = 1\n", "[watch]\ninterval = -1\n",
                   "[metrics]\nlisten = \"nowhere\"\n", "[daemon]\nbogus = 1\n"):
        conf.write_text(broken)
        before = len(_log_lines(d, "reload refused"))
        _hup(d, "reload refused", before + 1)
        time.sleep(0.3)
        refused = _log_lines(d, "reload refused")
        assert len(refused) == before + 1, refused  # one line per refusal
        assert "Traceback" not in d.log.read_text()
        assert d.cli("ping").returncode == 0
    # The old config still serves: its always glob, its interval, its layout.
    watch = watch_of(status(d), name)
    assert watch is not None
    assert watch["interval"] == 0.3 and watch["reason"] == "always"
    doc = json.loads(d.cli("get", name, "-o", "json", check=True).stdout)
    assert doc["decoder"]["source"] == "layout"
    assert _log_lines(d, "config reloaded") == []


def test_changed_interval_and_layout_take_effect(tmp_path, daemon_factory, maps):
    conf, d, name, fd = _reloadable(tmp_path, daemon_factory, maps)
    syscall.map_update_elem(fd, u32(7), u64(70))
    with Follower(d, name, "-f"):
        wait_ready(d, name)
        assert cast(dict, watch_of(status(d), name))["interval"] == 0.2

        def decoded() -> dict:
            doc = json.loads(d.cli("get", name, "-o", "json", check=True).stdout)
            return doc["entries"][0]["formatted"]

        assert decoded() == {"key": {"proto": 7}, "value": {"packets": 70}}
        _write(conf, 0.2, field="bytes",
               extra=f'intervals = [ {{ pattern = "{name}", interval = 3.5 }} ]')
        _hup(d, "config reloaded", 1)
        assert cast(dict, watch_of(status(d), name))["interval"] == 3.5
        assert decoded() == {"key": {"proto": 7}, "value": {"bytes": 70}}
        # The new interval governs polling: polls slow down to one per 3.5 s.
        polls = cast(dict, watch_of(status(d), name))["polls"]
        time.sleep(4)
        assert cast(dict, watch_of(status(d), name))["polls"] - polls <= 2
