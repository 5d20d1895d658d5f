"""The client library's request side, in-process and without root: one-shot calls and the
async client against a tiny in-test ROUTER, reply matching, endpoint checks, and the
import graph the CLI's start-up time depends on."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import trio
import zmq

from consumers import endpoint, oneshot
from consumers.client import Client
from consumers.errors import DaemonError, DaemonUnavailable
from watcher.wire import schema


class TinyDaemon:
    """A ROUTER in a thread that answers each request with what ``answer`` returns: a list
    of replies (first frames), sent in order."""

    def __init__(self, endpoint_: str, answer):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint_)
        self.answer = answer
        self.requests: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            peer, frame = self.sock.recv_multipart()
            request = schema.decode(frame)
            self.requests.append(request)
            for reply in self.answer(request):
                self.sock.send_multipart([peer, reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def ipc(tmp_path):
    return f"ipc://{tmp_path}/pymap.sock"


def pong(req: int) -> bytes:
    return schema.encode(schema.Pong(version="t", epoch="e1", uptime=1.0, req=req))


def test_oneshot_skips_stale_replies_and_maps_errors(ipc):
    def answer(request):
        if isinstance(request, schema.Ping):  # a late reply to something else first
            return [pong(request.req + 100), pong(request.req)]
        return [schema.encode(schema.ErrorReply("bad_request", "nope", req=request.req))]

    daemon = TinyDaemon(ipc, answer)
    try:
        assert oneshot.ping(ipc, timeout=10).epoch == "e1"
        with pytest.raises(DaemonError) as caught:
            oneshot.list_maps(ipc, "x*", timeout=10)
        assert (caught.value.code, str(caught.value)) == ("bad_request", "nope")
    finally:
        daemon.close()


def test_oneshot_wrong_reply_and_silence(ipc):
    def answer(request):
        if isinstance(request, schema.Ping):
            return [schema.encode(schema.Ack(req=request.req))]
        return []  # never answers

    daemon = TinyDaemon(ipc, answer)
    try:
        with pytest.raises(DaemonError, match="expected Pong, got Ack") as caught:
            oneshot.ping(ipc, timeout=10)
        assert caught.value.code == "bad_reply"
        with pytest.raises(DaemonUnavailable, match="did not answer within 0.3 s"):
            oneshot.status(ipc, timeout=0.3)
    finally:
        daemon.close()


async def test_async_client_matches_replies_by_req(ipc):
    daemon = TinyDaemon(ipc, lambda request: [b"not json", pong(request.req)])
    try:
        async with Client(ipc, timeout=10) as client:
            with pytest.raises(DaemonError, match="daemon sent") as caught:
                await client.ping()
            assert caught.value.code == "bad_reply"
        daemon.answer = lambda request: [pong(request.req + 7), pong(request.req)]
        async with Client(ipc, timeout=10) as client:
            assert (await client.ping()).epoch == "e1"
            assert (await client.ping()).epoch == "e1"
    finally:
        daemon.close()


def test_endpoint_checks_fail_fast(tmp_path, monkeypatch):
    with pytest.raises(DaemonUnavailable, match="not running: no socket at"):
        endpoint.check(f"ipc://{tmp_path}/none.sock")
    with pytest.raises(DaemonUnavailable, match="not running"):
        oneshot.ping(f"ipc://{tmp_path}/none.sock")
    monkeypatch.delenv("PYMAP_CURVE_SERVER_KEY", raising=False)
    monkeypatch.delenv("PYMAP_CURVE_CLIENT_CERT", raising=False)
    endpoint.check("tcp://127.0.0.1:1")  # nothing to check without a path, but:
    with pytest.raises(DaemonUnavailable, match="tcp:// needs CURVE keys"):
        endpoint.connect(zmq.DEALER, "tcp://127.0.0.1:1")  # a daemon serves TCP only with CURVE


async def test_clients_share_one_zmq_context(ipc):
    daemon = TinyDaemon(ipc, lambda request: [pong(request.req)])
    try:
        async with Client(ipc) as a, Client(ipc) as b:
            # White-box: that the clients share one context is the point.
            assert a._sock is not None and b._sock is not None  # noqa: SLF001
            assert a._sock.context is b._sock.context is zmq.Context.instance()  # noqa: SLF001
            await a.ping()
        assert not zmq.Context.instance().closed  # leaving a client keeps it for others
    finally:
        daemon.close()


@pytest.mark.parametrize("module, absent", [
    ("consumers.subscriber", "consumers.client"),  # no cycle: the subscriber needs no client
    ("consumers.events", "trio"),  # the event model is pure data ...
    ("consumers.gaps", "trio"),  # ... and so is the gap tracker
    ("consumers.cli.app", "trio"),  # ping, status and list start without trio ...
    ("consumers.cli.app", "rich"),  # ... and without rich until they print a table
    ("consumers.oneshot", "trio"),
    ("consumers.cli.render", "trio"),
])
def test_imports_stay_light(module, absent):
    code = (f"import sys, {module}; "
            f"found = [m for m in sys.modules if m == {absent!r} or m.startswith({absent!r} + '.')]; "
            "print(found); sys.exit(1 if found else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, f"importing {module} imports {proc.stdout} {proc.stderr}"


# What a run of each command may not import (bench/bench_cli.py): the commands that
# start a process for one request and one reply load neither trio, nor rich before a
# table, nor the modules of other commands; --help loads no daemon client at all.
HOT_RUNS = {
    ("ping",): ("trio", "rich", "numpy", "watcher.wire.curve", "consumers.cli.commands.maps",
                "consumers.cli.commands.events", "consumers.cli.commands.export",
                "consumers.cli.commands.keys"),
    ("status", "-o", "json"): ("trio", "rich", "numpy", "consumers.cli.commands.maps",
                               "consumers.cli.commands.events"),
    ("list", "-o", "json"): ("trio", "numpy", "consumers.cli.commands.daemon",
                             "consumers.cli.commands.events", "consumers.cli.commands.export"),
    ("--help",): ("trio", "zmq", "cattrs", "watcher.wire.schema", "consumers.oneshot",
                  "numpy"),
}


@pytest.mark.parametrize("args", list(HOT_RUNS))
def test_hot_commands_import_only_what_they_use(args):
    """A run that fails to connect still imports all its command needs before it fails."""
    absent = HOT_RUNS[args]
    # The report runs as the command leaves (app.leave: no atexit hooks are run then).
    code = ("import sys\n"
            f"absent = {absent!r}\n"
            "from consumers.cli import app\n"
            "leave = app.leave\n"
            "def report(code):\n"
            "    found = sorted(m for m in sys.modules if m in absent\n"
            "                   or any(m.startswith(a + '.') for a in absent))\n"
            "    sys.__stderr__.write(f'IMPORTED {found}\\n')\n"
            "    leave(code)\n"
            "app.leave = report\n"
            f"sys.argv = ['pymap', *{args!r}, *(['-e', 'ipc:///nonexistent/pymap.sock']"
            f" if {args[0]!r} != '--help' else [])]\n"
            "app.main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert "IMPORTED []" in proc.stderr, f"pymap {' '.join(args)}: {proc.stderr}"
    if args[0] != "--help":
        assert "pymap daemon is not running" in proc.stderr, proc.stderr


def test_the_async_client_still_runs_under_trio(ipc):
    daemon = TinyDaemon(ipc, lambda request: [pong(request.req)])

    async def main():
        async with Client(ipc) as client:
            return await client.ping()

    try:
        assert trio.run(main).version == "t"
    finally:
        daemon.close()


@pytest.mark.parametrize(("code", "status", "stderr"),
                         [(None, 0, ""), (0, 0, ""), (3, 3, ""), ("pymap: bye", 1, "pymap: bye\n")])
def test_leave_keeps_the_status_and_the_buffered_output(code, status, stderr, tmp_path):
    """app.leave ends the process without Python's teardown: the exit status is what
    SystemExit(code) would give, output still buffered on stdout is written, not lost
    (it fails without the flush), and what was logged is in its file."""
    log = tmp_path / "log"
    script = ("import logging, sys\n"
              "from consumers.cli.app import leave\n"
              f"handler = logging.FileHandler({str(log)!r})\n"
              "handler.setFormatter(logging.Formatter('%(message)s'))\n"
              "logging.getLogger().addHandler(handler)\n"
              "logging.getLogger().warning('logged')\n"
              "sys.stdout.write('x' * 1000)\n"
              f"leave({code!r})\n"
              "sys.stdout.write('never')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered stdout
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={**env, "PYTHONPATH": os.getcwd()})
    assert (proc.returncode, proc.stderr) == (status, stderr)
    assert proc.stdout == "x" * 1000
    assert log.read_text() == "logged\n"
