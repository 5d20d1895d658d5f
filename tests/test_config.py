"""Config loading: every key reachable from the command line with --set."""

from __future__ import annotations

import subprocess

import pytest
from conftest import PYMAP

from watcher.daemon.config import ConfigError, load_config, parse_config, resolve


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


def test_every_table_reports_in_one_format_on_one_line(tmp_path):
    """[daemon], [watch], [[layouts]] and [[sources]] share one converter: every problem
    of the file on one line, each as PATH: WHY, an array's element named by its label."""
    conf = tmp_path / "pymap.toml"
    conf.write_text('[daemon]\nchunk_entries = true\n[watch]\nnosuch = 1\n'
                    '[[sources]]\npin = "/sys/fs/bpf/rb"\nkind = "queue"\n'
                    '[[layouts]]\nmatch = "m"\nvalue = [{ name = "a", type = "u8" }]\nvalue_size = 2\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(conf))
    assert str(e.value) == (
        f"config {conf}: daemon.chunk_entries: expected an integer, got True; "
        "watch: unknown key 'nosuch' (keys: always, discovery, interval, intervals, "
        "kernel_delta, kernel_delta_max_bytes, kernel_delta_min_entries, kernel_delta_types, "
        "linger); layouts[0] (m): value fields add up to 1 bytes, but value_size is 2: 1 (a); "
        "sources[0] (/sys/fs/bpf/rb): kind must be \"ringbuf\" or \"perf\", not 'queue'")


@pytest.mark.parametrize("text, words", [
    ("sources = 'x.c'\n", "sources: must be an array of tables"),
    ("[[sources]]\npin = '/p'\nwakeup_events = true\n", "sources[0] (/p).wakeup_events: "
     "expected an integer, got True"),
    ("[daemon]\nendpoint = 5\n", "daemon.endpoint: expected a string, got 5"),
    ("sources = ['x.c']\n", "sources[0]: expected a table, got 'x.c'"),
    ("watch = []\n", "watch: expected a table, got []"),
    ("[[metrics.maps]]\nmap = 'm'\nname = '1x'\n", "metrics.maps[0] (1x): name '1x' is not"),
])
def test_wrong_types_are_named_by_their_path(tmp_path, text, words):
    conf = tmp_path / "pymap.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(conf))
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, words", [
    ("[daemon]\nsocket_group = 'no-such-group-pymap'\n", "no group named 'no-such-group-pymap'"),
    ("[curve]\nserver_key = '/nonexistent/server.key_secret'\n", "curve: cannot read key file"),
    ("[[sources]]\nprogram = 'absent.c'\n", "sources: program '{dir}/absent.c' does not exist"),
])
def test_validation_asks_the_host_nothing_resolve_does(tmp_path, text, words):
    """Group lookups, key files and program files are the resolve step's, after validation:
    the file validates, resolving it is refused, and load_config (the daemon's) refuses it."""
    conf = tmp_path / "pymap.toml"
    conf.write_text(text)
    config = parse_config(str(conf))
    words = words.format(dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        resolve(config)
    assert words in str(e.value)
    with pytest.raises(ConfigError, match=None) as e:
        load_config(str(conf))
    assert words in str(e.value)


def test_resolve_gives_the_facts_the_daemon_uses(tmp_path):
    conf = tmp_path / "pymap.toml"
    conf.write_text("[daemon]\nsocket_group = 'root'\n")
    resolved = resolve(parse_config(str(conf)))
    assert resolved.socket_gid == 0 and resolved.curve.server is None
    assert resolved.curve.allowed == {} and resolved.config.daemon.socket_group == "root"
