"""``pymap export`` refusing bad input with one line and a non-zero exit, and its
``[[exports]]`` config parsing.  Bad URLs, formats and configs need no daemon; a
dead daemon is a private endpoint nobody serves."""

from __future__ import annotations

import subprocess

import pytest
from conftest import PYMAP

from consumers.export.config import load
from consumers.export.exporter import ExportConfigError


def export(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([PYMAP, "export", *args, "-e", f"ipc://{tmp_path}/none.sock",
                           "--timeout", "2"], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    (["m", "--to", "gopher://x"], "unknown output"),
    (["m", "--format", "xml"], "unknown format 'xml'"),
    (["m", "--to", "file://relative/path"], "expected file:///ABSOLUTE/PATH"),
    (["m", "--to", "syslog+tcp://:601"], "no host"),
    (["m", "--to", "syslog+tls://127.0.0.1:6514?ca=/nonexistent.pem"], "TLS setup"),
    (["m", "--to", "nats://127.0.0.1:4222?batch=0"], "batch=0: events per message, 1 to 1000"),
    (["m", "--to", "nats://127.0.0.1:4222?batch=8&linger=soon"], "option linger='soon'"),
    ([], "give at least one map name"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message, tmp_path):
    proc = export(*args, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymap: error:") and message in lines[0], \
        proc.stderr


def test_dead_daemon_is_one_line(tmp_path):
    proc = export("m", tmp_path=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("pymap: error:") and "Traceback" not in proc.stderr


def test_exports_tables(tmp_path):
    conf = tmp_path / "export.toml"
    conf.write_text('''
[[exports]]
name = "siem"
maps = ["cilium_*"]
format = "ocsf"
to = "syslog+tls://127.0.0.1:6514"
ca = "/etc/ca.pem"
rate = 100.0

[[exports]]
name = "archive"
selectors = ["a", "b"]
to = "file:///var/log/x.json"
max_bytes = 1000
''')
    siem, archive = load(str(conf))
    assert siem.selectors == ["cilium_*"] and siem.format == "ocsf" and siem.rate == 100.0
    assert siem.options == {"ca": "/etc/ca.pem"}
    assert archive.options == {"max_bytes": 1000} and archive.format == "json"


@pytest.mark.parametrize(("text", "message"), [
    ("[[exports]]\nname='a'\nmaps=['m']\nbogus=1\n", "unknown key 'bogus'"),
    ("[[exports]]\nname='a'\nmaps='m'\n", "exports[0] (a): selectors: expected a list of strings"),
    ("[[exports]]\nname='a'\nmaps=['m']\n[[exports]]\nname='a'\nmaps=['n']\n", "unique name"),
    ("[[exports]]\nmaps=['m']\nformat='xml'\n", "unknown format"),
    ("[daemon]\n", "no [[exports]] tables"),
    ("[[exports]\n", "config"),
])
def test_bad_exports_tables(tmp_path, text, message):
    conf = tmp_path / "export.toml"
    conf.write_text(text)
    with pytest.raises(ExportConfigError, match=None) as e:
        load(str(conf))
    assert message in str(e.value)
    proc = subprocess.run([PYMAP, "export", "-c", str(conf)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
