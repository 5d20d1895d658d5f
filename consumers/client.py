"""The pymap client library: what the CLI, SIEM outputs and your tools use.

Async (trio).  One :class:`Client` owns one ZeroMQ DEALER socket and runs
one request at a time; open several clients for concurrency.  Errors from
the daemon arrive as :class:`DaemonError` with a stable ``code``; a daemon
that is not there, or does not answer within ``timeout``, raises
:class:`DaemonUnavailable`.

Example::

    async with Client() as client:
        for m in await client.list_maps("cilium_*"):
            print(m.name, m.entries)
        async with client.get("cilium_ipcache") as dump:
            async for entry in dump.entries():
                print(entry.key.hex(), entry.formatted)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio
import zmq

from watcher.kernel.sys.abi import percpu_slot
from watcher.wire import schema
from watcher.wire.globs import check_glob
from watcher.wire.schema import MapInfo
from watcher.wire.transport import recv_multipart, send_multipart

from . import endpoint as _endpoint
from .dumpread import ReplyChunk, chunk_of
from .endpoint import DEFAULT_ENDPOINT
from .errors import DaemonError, DaemonUnavailable
from .replies import expect, reply_to

if TYPE_CHECKING:
    from .subscriber import EventStream

__all__ = ["DEFAULT_ENDPOINT", "Client", "DaemonError", "DaemonUnavailable", "Dump",
           "Entry", "ReplyChunk"]


@attrs.frozen
class Entry:
    """One map entry: raw bytes, per-CPU values split, and its decoded form when known."""

    key: bytes
    value: bytes | None  # None for per-CPU maps: see ``values``
    values: list[bytes] | None = None
    formatted: dict | None = None


class Dump:
    """A ``get`` in progress: the map's metadata, its BTF, then chunks of entries."""

    def __init__(self, begin: schema.GetBegin, btf: bytes | None,
                 receive: Callable[[], Awaitable[tuple[object, list[bytes]]]]):
        self.map: MapInfo = begin.map
        self.btf = btf
        self.layout: dict | None = begin.layout  # the config's declared layout for this map
        self.total: int | None = None  # set when the stream ends
        self.seq: int | None = begin.seq
        self.epoch: str = begin.epoch
        self._receive = receive  # the get's next reply from the client that sent it

    async def chunks(self) -> AsyncIterator[ReplyChunk]:
        while True:
            message, frames = await self._receive()
            chunk = chunk_of(message, frames)
            if isinstance(chunk, int):  # the end
                self.total = chunk
                return
            yield chunk

    async def entries(self, formatter: Callable[[bytes, bytes], dict] | None = None
                      ) -> AsyncIterator[Entry]:
        """Entry by entry; slower than :meth:`chunks`, simpler to use."""
        m = self.map
        ks, vs = m.key_size, m.value_stride
        slot = percpu_slot(m.value_size)
        async for chunk in self.chunks():
            for i in range(chunk.count):
                key = chunk.keys[i * ks:(i + 1) * ks]
                raw = chunk.values[i * vs:(i + 1) * vs]
                formatted = formatter(key, raw) if formatter else None
                if m.percpu:
                    per_cpu = [raw[c * slot:c * slot + m.value_size] for c in range(m.ncpus)]
                    yield Entry(key, None, per_cpu, formatted)
                else:
                    yield Entry(key, raw, None, formatted)


class Client:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0,
                 events_endpoint: str | None = None):
        self.endpoint = endpoint
        self.events_endpoint = events_endpoint  # None: ask the daemon (ping) when needed
        self.timeout = timeout
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._lock = trio.Lock()

    async def __aenter__(self) -> Client:
        self._sock = _endpoint.connect(zmq.DEALER, self.endpoint)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = None

    # --- plumbing ---

    async def _send(self, message) -> int:
        assert self._sock is not None, "use Client as an async context manager"
        message.req = next(self._ids)
        await send_multipart(self._sock, [schema.encode(message)])
        return message.req

    async def _recv(self, req: int, any_req: bool = False):
        """The next reply to request ``req`` (see :func:`consumers.replies.reply_to`)."""
        assert self._sock is not None
        while True:
            with trio.move_on_after(self.timeout) as scope:
                frames = await recv_multipart(self._sock)
            if scope.cancelled_caught:
                raise DaemonUnavailable(f"pymap daemon at {self.endpoint} did not answer "
                                        f"within {self.timeout:g} s")
            reply = reply_to(req, frames, any_req)
            if reply is not None:
                return reply

    async def _call(self, message, kind: type):
        async with self._lock:
            req = await self._send(message)
            reply, _ = await self._recv(req)
        return expect(reply, kind)

    # --- requests ---

    async def ping(self) -> schema.Pong:
        return await self._call(schema.Ping(), schema.Pong)

    async def list_maps(self, pattern: str | None = None, entries: bool = True) -> list[MapInfo]:
        """Maps whose names or pin paths match the glob ``pattern`` (all with None).

        An unparseable glob raises GlobError (a ValueError) before asking the daemon.
        """
        if pattern:
            check_glob(pattern)
        reply = await self._call(schema.ListRequest(pattern=pattern, entries=entries),
                                 schema.ListReply)
        return reply.maps

    async def status(self) -> schema.StatusReply:
        return await self._call(schema.StatusRequest(), schema.StatusReply)

    async def report_gap(self, name: str, missed: int) -> None:
        await self._call(schema.GapReport(name, missed), schema.Ack)

    async def describe(self, selector: str) -> tuple[MapInfo, bytes | None]:
        """A map's metadata and raw BTF blob (None without BTF), without its entries."""
        async with self.get(selector, entries=False) as dump:
            async for _ in dump.chunks():
                pass
        return dump.map, dump.btf

    async def recent(self, selector: str) -> tuple[list[tuple[object, list[bytes]]], schema.RecentEnd]:
        """Recent stream messages the daemon kept for maps matching ``selector`` (a glob)."""
        check_glob(selector)
        async with self._lock:
            req = await self._send(schema.RecentRequest(selector=selector))
            messages: list[tuple[object, list[bytes]]] = []
            while True:
                message, frames = await self._recv(req, any_req=True)
                if isinstance(message, schema.RecentEnd):
                    return messages, message
                messages.append((message, frames))

    def events(self, selectors: list[str], snapshot: bool = False,
               heartbeat_timeout: float | None = None, record_batches: bool = False,
               hold_on: bool = True, max_wait: float | None = None,
               entry_batches: bool = False, snapshot_rows: bool = True) -> EventStream:
        """Stream events of the maps ``selectors`` name (names or globs); see EventStream.

        (Imported here: the subscriber builds on this module, not the reverse.)

        ``hold_on`` (default): a silent or restarted daemon is waited for, up to
        ``max_wait`` seconds (None: for ever), like ``tail -F``.  ``entry_batches``:
        one ``EntryBatch`` per map events message instead of an ``Event`` per change.
        ``snapshot_rows=False``: snapshots update ``stream.entries()`` without events.
        """
        from .subscriber import EventStream

        return EventStream(self, selectors, snapshot=snapshot,
                           heartbeat_timeout=heartbeat_timeout, record_batches=record_batches,
                           hold_on=hold_on, max_wait=max_wait, entry_batches=entry_batches,
                           snapshot_rows=snapshot_rows)

    @contextlib.asynccontextmanager
    async def get(self, selector: str, snapshot: bool = False, entries: bool = True,
                  reason: str = "") -> AsyncIterator[Dump]:
        """Dump one map: ``async with client.get("name") as dump: ...``.

        With ``snapshot``, the entries are the daemon's watched state and
        ``dump.seq`` the topic sequence they reflect (see docs/protocol.md).
        """
        async with self._lock:
            req = await self._send(schema.GetRequest(selector=selector, snapshot=snapshot,
                                                     entries=entries, reason=reason))
            begin, frames = await self._recv(req)
            if not isinstance(begin, schema.GetBegin):
                raise DaemonError("bad_reply", f"expected get_begin, got {type(begin).__name__}")
            yield Dump(begin, frames[0] if begin.btf and frames else None,
                       functools.partial(self._recv, req))
