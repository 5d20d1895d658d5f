"""Remote access: tcp:// endpoints only with CURVE; an allowed key lists, gets and follows,
an unknown key gets nothing, and TCP without keys is refused."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import PYMAP
from support.curve import make_keys, start_tcp_daemon
from support.events import Follower, dealer
from support.kernel import bpftool_entries, one_error_line, token, u32, u64
from support.prometheus import free_port

from watcher.kernel.sys import syscall
from watcher.wire import schema

pytestmark = pytest.mark.kernel


@pytest.fixture
def tcp_daemon(tmp_path, bpffs_dir):
    d = start_tcp_daemon(tmp_path, bpffs_dir)
    yield d
    d.stop()


def test_allowed_key_lists_gets_and_follows(tcp_daemon, maps, monkeypatch):
    d = tcp_daemon
    name = f"cv_{token()}"
    fd, map_id = maps.create("hash", 4, 8, 64, name=name)
    for n in range(5):
        syscall.map_update_elem(fd, u32(n), u64(n * 10))
    listed = d.cli("list", name, "-o", "json", check=True).stdout
    assert f'"{name}"' in listed
    doc = json.loads(d.cli("get", name, "-o", "json", check=True).stdout)
    got = {e["key"]: e["value"] for e in doc["entries"]}
    assert got == bpftool_entries(map_id)
    for var, value in d.client_env.items():
        monkeypatch.setenv(var, value)  # the Follower inherits the client's keys
    with Follower(d, name, "-f") as f:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not f.snapshot():
            syscall.map_update_elem(fd, u32(99), u64(int(time.monotonic() * 1000)))
            time.sleep(0.5)
        lines = f.snapshot()
        assert lines and lines[0]["map"]["name"] == name, f.stderr
        assert lines[0]["key"] == u32(99).hex()
    # Flags work as well as the environment.
    flags = d.cli("ping", "--curve-server-key", d.client_env["PYMAP_CURVE_SERVER_KEY"],
                  "--curve-client-cert", d.client_env["PYMAP_CURVE_CLIENT_CERT"],
                  env={"PYMAP_CURVE_SERVER_KEY": "", "PYMAP_CURVE_CLIENT_CERT": ""})
    assert flags.returncode == 0, flags.stderr


def test_unknown_key_gets_nothing(tcp_daemon):
    d = tcp_daemon
    mallory = {"PYMAP_CURVE_CLIENT_CERT": str(d.keys / "mallory" / "mallory.key_secret")}
    for args in (("ping", "--timeout", "3"), ("list", "--timeout", "3")):
        proc = d.cli(*args, env=mallory, timeout=60)
        assert proc.returncode != 0
        assert "did not answer" in one_error_line(proc.stderr)
    # Without CURVE at all, a raw ZeroMQ client gets no reply either.
    with dealer(d.endpoint) as sock:
        sock.send(schema.encode(schema.Ping(req=1)))
        assert sock.poll(3000) == 0
    assert "refused a CURVE client with an unknown key" in d.log.read_text()
    assert d.cli("ping", check=True).returncode == 0  # the allowed client is still served


def test_tcp_client_without_keys_fails_fast(tcp_daemon):
    proc = tcp_daemon.cli("ping", env={"PYMAP_CURVE_SERVER_KEY": "", "PYMAP_CURVE_CLIENT_CERT": ""})
    assert proc.returncode != 0
    assert "needs CURVE" in one_error_line(proc.stderr)


def test_tcp_without_keys_is_refused(tmp_path, bpffs_dir):
    port = free_port()
    proc = subprocess.run([PYMAP, "daemon", "--endpoint", f"tcp://127.0.0.1:{port}",
                           "--bpffs", str(bpffs_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "needs CURVE" in one_error_line(proc.stderr)
    keys = make_keys(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[curve]\nserver_key = "{keys}/server/server.key"\nclients = "{keys}/clients"\n')
    proc = subprocess.run([PYMAP, "daemon", "-c", str(bad), "--endpoint",
                           f"tcp://127.0.0.1:{port}", "--bpffs", str(bpffs_dir)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no secret key" in one_error_line(proc.stderr)
