"""Failure paths: malformed wire requests, missing or forbidden daemon, lifecycle, config."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import orjson
import pytest
from conftest import PYMAP
from support.events import dealer
from support.kernel import one_error_line

pytestmark = pytest.mark.kernel

REPLY_TIMEOUT_MS = 30_000


def _exchange(endpoint: str, frames: list[bytes]) -> list[bytes]:
    """Send one multipart message from a fresh DEALER and return the reply frames."""
    with dealer(endpoint) as sock:
        sock.send_multipart(frames)
        assert sock.poll(REPLY_TIMEOUT_MS), f"no reply to {frames[0][:80]!r}"
        return sock.recv_multipart()


def _assert_serving(daemon) -> None:
    assert daemon.proc.poll() is None, f"daemon died: {daemon.log.read_text()[-3000:]}"
    reply = json.loads(_exchange(daemon.endpoint, [b'{"kind":"ping","req":7,"v":1}'])[0])
    assert reply["kind"] == "pong" and reply["req"] == 7
    daemon.cli("ping", check=True)


PONG = orjson.dumps({"kind": "pong", "version": "1", "epoch": "x", "uptime": 1.0, "v": 1})

MALFORMED = {
    "invalid json": ([b"{not json"], "bad_request"),
    "binary garbage": ([b"\xff\xfe\x00\x01"], "bad_request"),
    "empty frame": ([b""], "bad_request"),
    "json null": ([b"null"], "bad_request"),
    "json array": ([b"[1, 2]"], "bad_request"),
    "json string": ([b'"ping"'], "bad_request"),
    "no kind": ([b'{"v": 1}'], "bad_request"),
    "unknown kind": ([b'{"kind": "explode", "v": 1}'], "bad_request"),
    "kind not a string": ([b'{"kind": 5, "v": 1}'], "bad_request"),
    "get without selector": ([b'{"kind": "get", "v": 1}'], "bad_request"),
    "get with empty selector": ([b'{"kind": "get", "selector": "", "v": 1}'], "bad_request"),
    "get with NUL in selector": ([b'{"kind": "get", "selector": "a\\u0000b", "v": 1}'],
                                 "bad_request"),
    "req not a number": ([b'{"kind": "ping", "req": "abc", "v": 1}'], "bad_request"),
    "v null": ([b'{"kind": "ping", "v": null}'], "bad_request"),
    "version 99": ([b'{"kind": "ping", "v": 99}'], "version"),
    "get with version 99": ([b'{"kind": "get", "selector": "x", "v": 99}'], "version"),
    "two frames": ([b'{"kind": "ping", "v": 1}', b"extra"], "bad_request"),
    "1 MB frame": ([b'{"kind": "ping", "v": 1, "pad": "' + b"x" * (1 << 20) + b'"}'],
                   "bad_request"),
    "a reply kind (pong)": ([PONG], "bad_request"),
    "a reply kind (error)": ([b'{"kind": "error", "code": "x", "message": "y", "v": 1}'],
                             "bad_request"),
    "a reply kind (get_chunk)": ([b'{"kind": "get_chunk", "count": 3, "v": 1}'], "bad_request"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request(daemon, case):
    frames, code = MALFORMED[case]
    reply = _exchange(daemon.endpoint, frames)
    assert len(reply) == 1
    message = json.loads(reply[0])
    assert message["kind"] == "error", message
    assert message["code"] == code, message
    assert message["message"]
    _assert_serving(daemon)


def test_pipelined_requests(daemon):
    """One client sends 50 pings without waiting: 50 pongs, in any order."""
    with dealer(daemon.endpoint) as sock:
        for i in range(50):
            sock.send_multipart([orjson.dumps({"kind": "ping", "req": i + 1, "v": 1})])
        reqs: set[int] = set()
        for _ in range(50):
            assert sock.poll(REPLY_TIMEOUT_MS), f"{len(reqs)} of 50 pongs"
            reqs.add(json.loads(sock.recv_multipart()[0])["req"])
    assert reqs == set(range(1, 51))
    _assert_serving(daemon)


def test_malformed_burst(daemon):
    """Every malformed request at once, interleaved with pings, on one socket."""
    with dealer(daemon.endpoint) as sock:
        for frames, _ in MALFORMED.values():
            sock.send_multipart(frames)
            sock.send_multipart([b'{"kind":"ping","req":1,"v":1}'])
        kinds: list[str] = []
        for _ in range(2 * len(MALFORMED)):
            assert sock.poll(REPLY_TIMEOUT_MS), f"{len(kinds)} of {2 * len(MALFORMED)} replies"
            kinds.append(json.loads(sock.recv_multipart()[0])["kind"])
    assert kinds.count("error") == len(MALFORMED)
    assert kinds.count("pong") == len(MALFORMED)
    _assert_serving(daemon)


def test_request_id_out_of_range(daemon):
    for raw in (b'{"kind": "ping", "req": 1e30, "v": 1}',
                b'{"kind": "ping", "req": 18446744073709551616, "v": 1}'):
        with dealer(daemon.endpoint) as sock:
            sock.send_multipart([raw])
            if sock.poll(5000):
                assert json.loads(sock.recv_multipart()[0])["kind"] in ("error", "pong")
        _assert_serving(daemon)


def test_abandoned_get_does_not_stop_the_daemon(daemon, maps, bpffs_dir):
    """A client that asks for a big dump and disconnects without reading it."""
    from support.kernel import fill_batch, token, u64

    name = f"ab{token()}"
    fd, _ = maps.create("hash", 8, 8, 50_000, name=name, pin=bpffs_dir / name)
    fill_batch(fd, [u64(i) for i in range(50_000)], [u64(i) for i in range(50_000)])
    for _ in range(3):
        with dealer(daemon.endpoint) as sock:
            sock.send_multipart([orjson.dumps({"kind": "get", "selector": name, "v": 1})])
            assert sock.poll(REPLY_TIMEOUT_MS)
            assert json.loads(sock.recv_multipart()[0])["kind"] == "get_begin"
    _assert_serving(daemon)
    doc = json.loads(daemon.cli("get", name, "-o", "json", check=True).stdout)
    assert doc["count"] == 50_000


# --- the CLI without a usable daemon --------------------------------------------------


def test_daemon_absent():
    proc = subprocess.run([PYMAP, "list", "-e", "ipc:///tmp/nonexistent/x.sock"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "not running" in one_error_line(proc.stderr)
    assert proc.stdout == ""


def test_daemon_absent_stale_socket(tmp_path):
    """A socket file nobody listens on: a bounded wait, then one line."""
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    proc = subprocess.run([PYMAP, "ping", "-e", f"ipc://{path}", "--timeout", "1"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    one_error_line(proc.stderr)


def _as_nobody(pymap: str, *args: str) -> subprocess.CompletedProcess:
    """``pymap ARGS`` as nobody, from a copy nobody can read (see support/nobody.py)."""
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           pymap, *args], check=False, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COLUMNS": "200"})


@pytest.fixture
def open_dir_daemon(daemon_factory):
    """A daemon whose socket sits in a world-searchable directory (mode 0755)."""
    run_dir = Path(tempfile.mkdtemp(prefix="pymap-perm-", dir="/tmp"))
    run_dir.chmod(0o755)
    endpoint = f"ipc://{run_dir}/pymap.sock"
    d = daemon_factory("--endpoint", endpoint, start=False)  # the last --endpoint wins
    d.endpoint, d.socket = endpoint, run_dir / "pymap.sock"
    try:
        d.start()
        yield d
    finally:
        d.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_socket_mode(daemon, open_dir_daemon):
    for d in (daemon, open_dir_daemon):
        st = os.stat(d.socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
        assert (st.st_uid, st.st_gid) == (0, 0)
    # The directory the daemon made for its socket is root-only.
    assert stat.S_IMODE(os.stat(daemon.run_dir).st_mode) & 0o007 == 0


def test_permission_denied(open_dir_daemon, nobody_pymap):
    for args in (["list"], ["get", "anything"], ["ping"]):
        proc = _as_nobody(nobody_pymap, *args, "-e", open_dir_daemon.endpoint)
        assert proc.returncode != 0, args
        assert "permission denied" in one_error_line(proc.stderr).lower()
    _assert_serving(open_dir_daemon)


def test_permission_denied_in_private_dir(daemon, nobody_pymap):
    proc = _as_nobody(nobody_pymap, "list", "-e", daemon.endpoint)
    assert proc.returncode != 0
    assert "permission denied" in one_error_line(proc.stderr).lower()


# --- daemon lifecycle -----------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_cleanly(daemon, signum):
    assert daemon.socket.exists()
    daemon.proc.send_signal(signum)
    assert daemon.proc.wait(30) == 0
    assert not daemon.socket.exists()
    assert not list(daemon.run_dir.glob("*.sock")), "a socket file was left behind"
    assert "Traceback" not in daemon.log.read_text()


def test_second_daemon_refused(daemon, bpffs_dir):
    proc = subprocess.run([PYMAP, "daemon", "--endpoint", daemon.endpoint, "--bpffs",
                           str(bpffs_dir)], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    line = one_error_line(proc.stderr)
    assert "is serving" in line and daemon.endpoint in line
    assert daemon.socket.exists()
    _assert_serving(daemon)


def test_stale_socket_replaced(daemon_factory, tmp_path):
    """A socket file left by a daemon that died is not a reason to refuse to start."""
    d = daemon_factory(start=False)
    d.run_dir.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(d.socket))
    s.close()
    d.start()
    _assert_serving(d)


def test_tcp_endpoint_in_use(bpffs_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([PYMAP, "daemon", "--endpoint", f"tcp://127.0.0.1:{port}",
                               "--bpffs", str(bpffs_dir)], check=False, capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode != 0
    one_error_line(proc.stderr)


BAD_CONFIGS = [
    pytest.param("[daemon\nendpoint = ", "not valid TOML", id="not toml"),
    pytest.param("[daemon]\nbogus = 1\n", "bogus", id="unknown key"),
    pytest.param("[deamon]\nendpoint = 'ipc:///tmp/x.sock'\n", "deamon", id="unknown section"),
    pytest.param("[daemon]\nendpoint = 'http://localhost:1'\n", "endpoint", id="bad endpoint"),
    pytest.param("[daemon]\nendpoint = 5\n", "endpoint", id="endpoint not a string"),
    pytest.param("[daemon]\nsocket_mode = 0o666\n", "socket_mode", id="world-writable socket"),
    pytest.param("[daemon]\nchunk_entries = 0\n", "chunk_entries", id="bad chunk size"),
    pytest.param("[daemon]\nlog_level = 'loud'\n", "log_level", id="bad log level"),
    pytest.param("[daemon]\nsocket_group = 'no-such-group-pymap'\n", "no-such-group-pymap",
                 id="unknown group"),
]


@pytest.mark.parametrize("text, words", BAD_CONFIGS)
def test_bad_config(tmp_path, text, words):
    path = tmp_path / "pymap.toml"
    path.write_text(text)
    proc = subprocess.run([PYMAP, "daemon", "-c", str(path)], check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert words in one_error_line(proc.stderr)


def test_missing_config(tmp_path):
    proc = subprocess.run([PYMAP, "daemon", "-c", str(tmp_path / "absent.toml")],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot read config" in one_error_line(proc.stderr)


def test_bad_endpoint_flag():
    proc = subprocess.run([PYMAP, "daemon", "--endpoint", "udp://x"], check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "endpoint" in one_error_line(proc.stderr)
