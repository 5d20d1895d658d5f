"""What the daemon's process loads: its resident memory is mostly its modules
(issue 20: a daemon watching a 1M-entry map within 80 MB, of which the state
is 24 MB), so modules it does not need stay out of it.

A fresh interpreter each time: this test process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Loaded only where used: the in-kernel engine's program builders (when watch.kernel_delta
# is not off), and no consumer-side module (the CLI's rendering, the exporters).
BUILDERS = ("watcher.kernel.kdelta.walker", "watcher.kernel.kdelta.programs",
            "watcher.kernel.kdelta.writers")
NOT_AT_START = (*BUILDERS, "watcher.kernel.kdelta.objects", "rich",
                "consumers.export", "consumers.top", "textual")


def loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_daemon_modules_load_no_kernel_engine_and_no_consumer():
    loaded = loaded_after("import watcher.daemon.main")
    assert "watcher.daemon.engine" in loaded  # the import did happen
    assert not {m for m in loaded if m.startswith("consumers")}
    assert not loaded & set(NOT_AT_START)


def test_with_the_engine_off_its_program_builders_never_load():
    """Off: no broker, and the seccomp allow-list needs no kernel routes."""
    loaded = loaded_after(
        "from watcher.daemon.config import Config\n"
        "from watcher.daemon.diff import start_broker\n"
        "from watcher.daemon.privileges import allowed_bpf_commands\n"
        "config = Config()\n"
        "config.watch.kernel_delta = 'off'\n"
        "assert start_broker(config.watch) is None\n"
        "assert allowed_bpf_commands(config, None)\n")
    assert not loaded & set(BUILDERS)


# The CLI's parser and what it pulls in: `pymap daemon` parses its flags with them, then
# exec's `python -m watcher.daemon` (watcher/daemon/__main__.py), which never loads them.
CLI_ONLY = ("typer", "click", "rich", "shellingham")
# Loaded only when used: prometheus_client when metrics.listen is set (collectors.py);
# never asyncio (zap.py drives pyzmq's ZAP handler from a thread of its own).
NOT_IN_THE_DAEMON = (*CLI_ONLY, "prometheus_client", "wsgiref", "asyncio", "zmq.asyncio")


def test_the_daemon_entry_point_loads_no_cli():
    loaded = loaded_after("import watcher.daemon.__main__\n"  # and what its _run imports:
                          "import trio, zmq, watcher.daemon.main, watcher.daemon.config")
    assert "watcher.daemon.__main__" in loaded
    assert not {m for m in loaded if m.split(".")[0] in NOT_IN_THE_DAEMON
                or m in NOT_IN_THE_DAEMON or m.startswith("consumers")}


def test_the_zap_handler_serves_without_asyncio():
    """A CURVE client with an allowed key gets through pymap's ZAP thread; one with an
    unknown key is refused (tests/test_curve.py covers the daemon end to end)."""
    loaded = loaded_after(
        "import zmq\n"
        "from watcher.daemon.zap import Authenticator\n"
        "ctx = zmq.Context()\n"
        "server_pub, server_sec = zmq.curve_keypair()\n"
        "good_pub, good_sec = zmq.curve_keypair()\n"
        "bad_pub, bad_sec = zmq.curve_keypair()\n"
        "auth = Authenticator(ctx, {good_pub: 'alice'})\n"
        "auth.start()\n"
        "rep = ctx.socket(zmq.REP)\n"
        "rep.curve_server, rep.curve_secretkey = True, server_sec\n"
        "rep.zap_domain = b'pymap'\n"
        "port = rep.bind_to_random_port('tcp://127.0.0.1')\n"
        "def ask(pub, sec):\n"
        "    req = ctx.socket(zmq.REQ)\n"
        "    req.linger, req.rcvtimeo = 0, 1000\n"
        "    req.curve_serverkey, req.curve_publickey, req.curve_secretkey = server_pub, pub, sec\n"
        "    req.connect(f'tcp://127.0.0.1:{port}')\n"
        "    req.send(b'hi')\n"
        "    try:\n"
        "        msg = rep.recv(copy=False) if rep.poll(1000) else None\n"
        "        if msg is None:\n"
        "            return None\n"
        "        rep.send(b'ok')\n"
        "        return msg.get('User-Id'), req.recv()\n"
        "    finally:\n"
        "        req.close()\n"
        "assert ask(good_pub, good_sec) == ('alice', b'ok')\n"
        "assert ask(bad_pub, bad_sec) is None and auth.refused == 1\n"
        "auth.stop()\n"
        "rep.close(linger=0)\n"
        "ctx.term()\n")
    assert "asyncio" not in loaded


def test_pymap_daemon_hands_over_to_the_entry_point_with_its_errors_and_exit_codes(tmp_path):
    """The handover keeps the CLI's contract: a bad flag value is one line, exit 2."""
    pymap = [sys.executable, "-c", "import sys; from consumers.cli.app import main; "
             "sys.argv[0] = 'pymap'; main()"]
    proc = subprocess.run([*pymap, "daemon", "--socket-mode", "x9", "--endpoint",
                           f"ipc://{tmp_path}/s.sock"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr == "pymap: error: --socket-mode 'x9' is not an octal mode\n"


@pytest.mark.kernel
def test_the_daemon_process_is_named_pymap_daemon(daemon):
    """After the handover the process is "pymap-daemon" (ps, top, pgrep), not "python",
    and not "pymap", the name of every client (`pkill -HUP pymap` would hang them up)."""
    assert Path(f"/proc/{daemon.proc.pid}/comm").read_text() == "pymap-daemon\n"
    assert "-m watcher.daemon" in " ".join(Path(f"/proc/{daemon.proc.pid}/cmdline")
                                           .read_text().split("\0"))  # the same process
