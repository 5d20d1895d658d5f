"""Config loading: every key reachable from the command line with --set."""

from __future__ import annotations

import subprocess

import pytest
from conftest import PYMAP

from watcher.daemon.config import ConfigError, load_config


def test_set_reaches_every_section_and_parses_toml_values(tmp_path):
    conf = tmp_path / "pymap.toml"
    conf.write_text("[daemon]\nstream_hwm = 10\n[watch]\nlinger = 5\n")
    c = load_config(str(conf), settings=[
        "daemon.stream_hwm=7", "watch.linger=60", 'watch.always=["cilium_*"]',
        "daemon.log_level=debug", "daemon.socket_mode=0o640", "daemon.seccomp=false"])
    assert c.daemon.stream_hwm == 7  # applied after the file
    assert c.watch.linger == 60.0
    assert c.watch.always == ["cilium_*"]
    assert c.daemon.log_level == "debug"  # a bare word is a string
    assert c.daemon.socket_mode == 0o640
    assert c.daemon.seccomp is False


@pytest.mark.parametrize("setting, words", [
    ("stream_hwm=1", "SECTION.KEY=VALUE"),
    ("daemon.nosuch=1", "nosuch"),
    ("daemon.stream_hwm=0", "stream_hwm"),
    ("watch.always=cilium_*", "list of strings"),
    ('daemon.seccomp="false"', "true or false"),  # bool("false") would turn it on
    ("daemon.seccomp=0", "true or false"),
    ('watch.discovery="kprobe"', r"'discovery' must be in \['auto', 'poll'\]"),
])
def test_bad_set_is_one_clear_error(setting, words):
    with pytest.raises(ConfigError, match=words.replace("*", r"\*")):
        load_config(None, settings=[setting])


def test_daemon_refuses_a_bad_set_with_exit_2():
    proc = subprocess.run([PYMAP, "daemon", "--set", "daemon.chunk_entries=0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "chunk_entries" in lines[0] and "Traceback" not in proc.stderr
