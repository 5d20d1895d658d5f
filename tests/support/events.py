"""Helpers for the event-stream tests (no tests here).

- :class:`Follower`: a ``pymap events ... -o json`` subprocess whose stdout lines are
  parsed by a reader thread (or deliberately never read).
- :class:`LibFollower`: a client-library subscriber run as a trio task.
- Waiting helpers with generous deadlines (the test machine is small and noisy):
  tests wait for conditions, never for fixed times, and never assert on timings.
- Replaying events into a ``{key hex: value}`` state, comparable with
  :func:`support.kernel.bpftool_entries`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Self

import trio
import zmq
from conftest import PYMAP, TIME_SCALE

from support import procs

if TYPE_CHECKING:
    from consumers.subscriber import EventStream

DEADLINE = 20.0 * TIME_SCALE  # seconds to wait for anything the daemon should do in a few polls
FAST = ("--interval", "0.2")  # daemon flags for quick polling


# Callable[..., object]: a lambda with default arguments (lambda n=n: ...) is called with
# none, but mypy cannot match it to Callable[[], object].
def wait_until(pred: Callable[..., object], what: str, timeout: float = DEADLINE,
               step: float = 0.05):
    """Poll ``pred`` until it returns something truthy; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = pred()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


async def await_until(pred: Callable[..., object], what: str, timeout: float = DEADLINE,
                      step: float = 0.05):
    deadline = trio.current_time() + timeout
    while True:
        result = pred()
        if result:
            return result
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await trio.sleep(step)


# --- the daemon's status ------------------------------------------------------------


def cli_status(daemon) -> dict:
    """``pymap status -o json``."""
    proc = daemon.cli("status", "-o", "json", timeout=30, check=True)
    return json.loads(proc.stdout)


@contextlib.contextmanager
def dealer(endpoint: str) -> Iterator[zmq.Socket]:
    """A raw DEALER connected to the daemon's ``endpoint``, closed without lingering."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        yield sock


def status(daemon) -> dict:
    """The daemon's status, as ``pymap status -o json`` shows it, asked in-process (a CLI
    run costs a third of a second, too slow to poll with)."""
    from watcher.wire import schema

    with dealer(daemon.endpoint) as sock:
        sock.send(schema.encode(schema.StatusRequest(req=1)))
        assert sock.poll(int(DEADLINE * 1000)), "no status reply"
        reply = schema.decode(sock.recv_multipart()[0])
    assert isinstance(reply, schema.StatusReply), reply
    data = schema.converter.unstructure(reply)
    data.pop("req", None)
    return data


def topic_key(name: str) -> str:
    """How ``status`` shows the subscription prefix of exactly one map."""
    return f"map:{name}\0"


def watch_of(st: dict, name: str) -> dict | None:
    return next((w for w in st["watched"] if w["name"] == name), None)


def ready(st: dict, name: str, subscribers: int) -> bool:
    """``subscribers`` subscribe to ``name`` and the daemon has its baseline poll."""
    w = watch_of(st, name)
    return (st["subscriptions"].get(topic_key(name), 0) >= subscribers
            and w is not None and w["polls"] >= 1)


def wait_ready(daemon, name: str, subscribers: int = 1) -> dict:
    def check():
        st = status(daemon)
        return st if ready(st, name, subscribers) else None

    return wait_until(check, f"{subscribers} subscriber(s) of {name} and a baseline poll")


async def async_status(client) -> dict:
    from watcher.wire.schema import converter

    return converter.unstructure(await client.status())


async def await_ready(client, name: str, subscribers: int = 1) -> dict:
    deadline = trio.current_time() + DEADLINE
    while True:
        st = await async_status(client)
        if ready(st, name, subscribers):
            return st
        if trio.current_time() > deadline:
            raise AssertionError(f"{name} not watched by {subscribers} subscriber(s): {st}")
        await trio.sleep(0.05)


# --- CLI followers ----------------------------------------------------------------------


class Follower:
    """``pymap events ARGS -o json`` in a subprocess; ``lines`` fills as it prints.

    With ``read=False`` nobody reads its stdout: once the pipe is full it blocks
    writing, a stuck consumer.
    """

    def __init__(self, daemon, *args: str, read: bool = True, command: list[str] | None = None,
                 env: dict[str, str] | None = None):
        """``command``: how to run pymap (default: this checkout's, as this user);
        ``env``: the environment to start from (default: this process')."""
        env = {**(os.environ if env is None else env), "PYMAP_ENDPOINT": daemon.endpoint,
               "COLUMNS": "200"}
        self.argv = [*(command or [PYMAP]), "events", *args, "-o", "json"]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)
        self.lines: list[dict] = []
        self.bad: list[bytes] = []
        self._stderr: list[bytes] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._read_err, daemon=True)]
        if read:
            self._threads.append(threading.Thread(target=self._read_out, daemon=True))
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                with self._lock:
                    self.bad.append(raw)
                continue
            with self._lock:
                self.lines.append(line)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._lock:
                self._stderr.append(raw)

    @property
    def stderr(self) -> str:
        with self._lock:
            return b"".join(self._stderr).decode(errors="replace")

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.lines)

    def wait_for(self, pred: Callable[..., object], what: str,  # (see wait_until)
                 timeout: float = DEADLINE):
        def check():
            lines = self.snapshot()
            if self.proc.poll() is not None and not pred(lines):
                raise AssertionError(f"{' '.join(self.argv)} exited {self.proc.returncode} "
                                     f"waiting for {what}; stderr: {self.stderr!r}; "
                                     f"lines: {lines[-5:]}")
            return pred(lines)

        try:
            return wait_until(check, what, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; follower printed {len(self.snapshot())} lines, "
                                 f"last: {self.snapshot()[-3:]}; stderr: {self.stderr!r}") from None

    def wait_count(self, n: int, timeout: float = DEADLINE) -> list[dict]:
        self.wait_for(lambda lines: len(lines) >= n, f"{n} event lines", timeout)
        return self.snapshot()

    async def await_count(self, n: int, timeout: float = DEADLINE) -> list[dict]:
        await trio.to_thread.run_sync(self.wait_count, n, timeout)
        return self.snapshot()

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{' '.join(self.argv)} still running after {timeout:g} s") from None
        for t in self._threads:
            t.join(5)
        return self.proc.returncode

    def stop(self) -> None:
        procs.stop(self.proc, 5)
        for t in self._threads:
            t.join(1)  # before closing the pipes they read
        procs.close_quietly(self.proc.stdout, self.proc.stderr)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- library followers --------------------------------------------------------------------


class LibFollower:
    """``Client(endpoint).events(names)`` as a trio task: ``await nursery.start(f.run)``.

    Events are appended to ``events``; a failure of the stream is kept in ``error``
    (and ends the task) so a test can assert on it.  ``paused`` makes the task stop
    reading the stream, a subscriber that fell behind.  ``by_batch``: read the stream
    through ``stream.batches()``, each batch also kept in ``batches``.
    """

    def __init__(self, endpoint: str, names: list[str], snapshot: bool = False,
                 heartbeat_timeout: float | None = None, stream_class=None, timeout: float = 10,
                 by_batch: bool = False, **options):
        self.endpoint = endpoint
        self.names = names
        self.snapshot = snapshot
        self.heartbeat_timeout = heartbeat_timeout
        self.stream_class = stream_class
        self.timeout = timeout
        self.options = options  # more EventStream options: hold_on, max_wait, ...
        self.by_batch = by_batch
        self.events: list = []
        self.batches: list[list] = []
        self.error: BaseException | None = None
        self.done = trio.Event()
        self.resume = trio.Event()
        self.resume.set()
        self.stream: EventStream | None = None

    def pause(self) -> None:
        self.resume = trio.Event()

    def unpause(self) -> None:
        self.resume.set()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from consumers.client import Client

        started = False
        try:
            async with Client(self.endpoint, timeout=self.timeout) as client:
                if self.stream_class is None:
                    stream = client.events(self.names, snapshot=self.snapshot,
                                           heartbeat_timeout=self.heartbeat_timeout,
                                           **self.options)
                else:
                    stream = self.stream_class(client, self.names, snapshot=self.snapshot,
                                               heartbeat_timeout=self.heartbeat_timeout,
                                               **self.options)
                async with stream:
                    self.stream = stream
                    task_status.started()
                    started = True
                    if self.by_batch:
                        async for batch in stream.batches():
                            self.batches.append(batch)
                            self.events += batch
                            await self.resume.wait()
                    else:
                        async for event in stream:
                            self.events.append(event)
                            await self.resume.wait()
        except Exception as e:  # noqa: BLE001 -- kept for the test to inspect
            self.error = e
            if not started:
                task_status.started()
        finally:
            self.done.set()

    def entry_events(self) -> list:
        return [e for e in self.events if e.key is not None]

    async def await_count(self, n: int, what: str = "", timeout: float = DEADLINE,
                          pred=None) -> list:
        pred = pred or (lambda evs: len(evs) >= n)

        def check():
            if self.error is not None:
                raise AssertionError(f"library follower failed: {self.error!r}")
            return pred(self.events)

        await await_until(check, what or f"{n} library events", timeout)
        return list(self.events)


# --- normalising and replaying events ------------------------------------------------


def line_tuple(line: dict) -> tuple:
    """A CLI JSON event line, reduced to what must agree between subscribers."""
    return (line["seq"], line["action"], line["map"]["id"], line.get("key"),
            line.get("value"), line.get("old_value"))


def event_tuple(event) -> tuple:
    """A library Event, in :func:`line_tuple`'s shape."""
    return (event.seq, event.action, event.map.id,
            event.key.hex() if event.key is not None else None,
            event.value.hex() if event.value is not None else None,
            event.old_value.hex() if event.old_value is not None else None)


def _line_value(line: dict):
    if "values" in line:
        return tuple(v["value"] for v in line["values"])
    return line["value"]


def replay_lines(lines: list[dict], state: dict | None = None) -> dict:
    """Apply CLI event lines to ``{key hex: value hex | per-CPU tuple}``."""
    state = {} if state is None else state
    for line in lines:
        action = line["action"]
        if action in ("added", "updated"):
            state[line["key"]] = _line_value(line)
        elif action == "removed":
            assert line["key"] in state, f"removed a key never seen: {line}"
            del state[line["key"]]
        elif action in ("map_created", "map_removed"):
            state.clear()
    return state


def replay_events(events: list, state: dict | None = None) -> dict:
    """Apply library Events to ``{key hex: value hex}`` (non-per-CPU maps)."""
    state = {} if state is None else state
    for e in events:
        if e.action in ("added", "updated"):
            state[e.key.hex()] = e.value.hex()
        elif e.action == "removed":
            assert e.key.hex() in state, f"removed a key never seen: {e}"
            del state[e.key.hex()]
        elif e.action in ("map_created", "map_removed"):
            state.clear()
    return state


def changes(lines_or_events) -> set[tuple]:
    """(action, key, value, old value) of each entry event, as a set (order-free)."""
    out = set()
    for x in lines_or_events:
        t = line_tuple(x) if isinstance(x, dict) else event_tuple(x)
        if t[3] is not None:
            out.add((t[1], t[3], t[4], t[5]))
    return out
