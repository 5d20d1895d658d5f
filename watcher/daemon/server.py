"""The request endpoint: a ZeroMQ ROUTER answering ``ping``, ``list`` and ``get``.

One :class:`~watcher.wire.transport.SocketOwner` task owns the socket; each
request runs in its own task in the server's nursery, so a long ``get``
never delays another client's ``ping``.  Every request is validated before
anything touches the kernel, and every failure becomes an ``error`` reply:
the server itself only stops when cancelled.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import attrs
import trio
import zmq

from watcher.kernel.maps.dump import NotDumpable

from ..wire import schema
from ..wire.transport import PeerGone, SocketOwner
from . import catalog, errors
from .access import Policy, Principal, View, open_visible, restricted_status
from .config import AccessConfig, DaemonConfig
from .interfaces import Catalog
from .queries import EngineQueries
from .subgate import SubscriptionGate

log = logging.getLogger("pymap.server")

MAX_REQUEST_BYTES = 64 * 1024  # requests are small; anything larger is refused unread


@attrs.define(eq=False)
class RequestPeer:
    """One DEALER peer of the request socket (the daemon's side of a consumers Client):
    its requests in flight, and what it was refused or lost."""

    scopes: set[trio.CancelScope] = attrs.Factory(set)
    dropped: int = 0  # replies dropped since the client was last told
    abused: bool = False  # refused at least once: logged (once)


class RequestServer:
    def __init__(self, sock: zmq.Socket, config: DaemonConfig, epoch: str, version: str,
                 engine: EngineQueries, sources=None, catalog: Catalog | None = None,
                 gate: SubscriptionGate | None = None, access: Policy | None = None):
        self.owner = SocketOwner(sock, config.client_outbox_bytes, on_gone=self._on_gone)
        self.access = access or Policy(AccessConfig())
        self.owner.identify = self.access.active
        self.engine = engine
        self.sources = sources  # watcher.daemon.sources.Sources: event source buffers
        self.catalog = catalog or engine.catalog
        self.gate = gate
        self.config = config
        self.epoch = epoch
        self.version = version
        self.started = time.monotonic()
        self._nursery: trio.Nursery | None = None
        self._clients: dict[bytes, RequestPeer] = {}
        self.requests_refused = 0  # refused with `busy`: too many in flight
        self.replies_dropped = 0  # could not even be queued: the client's outbox was full

    def refusals(self) -> dict[str, int]:
        """What the abuse bounds refused or dropped, for ``status`` and the metrics."""
        return {"requests_refused": self.requests_refused,
                "replies_dropped": self.replies_dropped,
                "subscriptions_refused": self.gate.stats().refused if self.gate else 0}

    def reconfigure(self, config) -> None:
        """A reloaded config (watcher.daemon.reload): chunk size, request bounds and the
        access rules (bpffs roots reach the catalog through the engine)."""
        self.config = config.daemon  # its endpoints are the running ones (reload keeps them)
        self.access = Policy(config.access)
        self.owner.identify = self.access.active

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.owner.serve(self._on_message)

    def _on_message(self, frames: list[bytes]) -> None:
        assert self._nursery is not None
        peer = frames[0]
        client = self._clients.setdefault(peer, RequestPeer())
        if len(client.scopes) >= self.config.max_requests_in_flight:
            self._refuse(peer, client, frames[1:])
            return
        if client.dropped:
            notice = errors.error_reply(errors.RepliesDropped(
                f"{client.dropped} replies to this client were dropped: it did not read them "
                f"and its queue ({self.config.client_outbox_bytes} bytes) was full"), 0)
            if self.owner.try_send(peer, [schema.encode(notice)]):
                client.dropped = 0
        scope = trio.CancelScope()
        client.scopes.add(scope)
        view = (self.access.view_for(Principal.from_metadata(*self.owner.last_identity))
                if self.owner.identify else None)
        self._nursery.start_soon(self._handle, peer, frames[1:], client, scope, view)

    def _refuse(self, peer: bytes, client: RequestPeer, frames: list[bytes]) -> None:
        """Answer ``busy`` without running the request, or drop the answer if it cannot queue."""
        self.requests_refused += 1
        if not client.abused:
            client.abused = True
            log.warning("client %s has %d requests in flight; refusing more with 'busy'",
                        peer.hex(), len(client.scopes))
        readable = len(frames) == 1 and len(frames[0]) <= MAX_REQUEST_BYTES
        busy = errors.error_reply(errors.Busy(
            f"too many requests in flight from this client (limit "
            f"{self.config.max_requests_in_flight}); read the replies, then retry"),
            schema.request_id(frames[0]) if readable else 0)
        if not self.owner.try_send(peer, [schema.encode(busy)]):
            client.dropped += 1
            self.replies_dropped += 1

    def _on_gone(self, peer: bytes) -> None:
        """The peer disconnected: its requests' work is wasted, cancel it."""
        client = self._clients.get(peer)
        if client is not None and client.scopes:
            for scope in client.scopes:
                scope.cancel()  # the last one to finish forgets the peer
            return
        self._clients.pop(peer, None)
        self.owner.forget(peer)

    def _finished(self, peer: bytes, client: RequestPeer, scope: trio.CancelScope) -> None:
        client.scopes.discard(scope)
        if not client.scopes:
            # Kept while it owes the client a `dropped` notice (a few bytes per peer).
            if self._clients.get(peer) is client and not client.dropped:
                del self._clients[peer]
            self.owner.forget(peer)

    async def _handle(self, peer: bytes, frames: list[bytes], client: RequestPeer,
                      scope: trio.CancelScope, view: View | None = None) -> None:
        try:
            with scope:
                await self._answer(peer, frames, view)
        finally:
            self._finished(peer, client, scope)

    async def _answer(self, peer: bytes, frames: list[bytes], view: View | None = None) -> None:
        """Answer one request; ``view`` (None: everything) limits the maps it may show."""
        req = 0
        try:
            request = self._parse(frames)
            req = getattr(request, "req", 0)  # stream kinds sent as requests have none
            if isinstance(request, schema.Ping):
                await self._reply(peer, schema.Pong(
                    self.version, self.epoch, time.monotonic() - self.started,
                    self.config.events_endpoint or "", req=req,
                    stream_prefix=view.namespace.decode() if view is not None else ""))
            elif isinstance(request, schema.ListRequest):
                await self._list(peer, request, view)
            elif isinstance(request, schema.GetRequest):
                if request.snapshot:
                    await self._snapshot(peer, request, view)
                else:
                    await self._get(peer, request, view)
            elif isinstance(request, schema.RecentRequest):
                await self._recent(peer, request, view)
            elif isinstance(request, schema.StatusRequest):
                await self._status(peer, request, view)
            elif isinstance(request, schema.GapReport):
                if not 0 <= request.missed <= 1 << 32 or not 0 < len(request.map) <= 4096:
                    raise errors.BadRequest("gap_report needs a map name and 0 <= missed <= 2**32")
                self.engine.report_gap(request.map, request.missed)
                await self._reply(peer, schema.Ack(req=request.req))
            else:
                raise errors.BadRequest(f"{schema.KINDS[type(request)]!r} is a reply, not a request")
        except PeerGone:
            log.debug("client went away before its reply")
        except errors.RequestError as e:
            await self._error(peer, errors.error_reply(e, req))
        except Exception as e:  # one request's failure must not stop the server
            # Errors only (an ExceptionGroup of them from a nested nursery included): a
            # cancellation, alone or grouped (BaseExceptionGroup), goes on to its scope.
            log.exception("request failed: %s", e)
            await self._error(peer, errors.error_reply(e, req))

    def _parse(self, frames: list[bytes]):
        if not frames or len(frames[0]) > MAX_REQUEST_BYTES:
            raise errors.BadRequest("request too large" if frames else "an empty request")
        if len(frames) != 1:
            raise errors.BadRequest(f"a request is 1 frame, got {len(frames)}",
                                    req=schema.request_id(frames[0]))
        try:
            request = schema.decode(frames[0])
        except schema.WireError as e:
            # Echo the req when it can be read, or a client matching by req waits forever.
            raise errors.BadRequest(str(e), req=schema.request_id(frames[0])) from None
        req = getattr(request, "req", 0)
        if not schema.valid_req(req):
            raise errors.BadRequest("req must be an integer from 0 to 2**63-1")
        if request.v != schema.SCHEMA_VERSION:
            raise errors.VersionMismatch(f"schema version {request.v} is not supported; "
                                         f"this daemon speaks {schema.SCHEMA_VERSION}", req=req)
        return request

    async def _reply(self, peer: bytes, message, *extra: bytes | memoryview) -> None:
        await self.owner.send(peer, [schema.encode(message), *extra])

    async def _error(self, peer: bytes, reply: schema.ErrorReply) -> None:
        log.info("error reply %s: %s", reply.code, reply.message,
                 extra={"code": reply.code, "req": reply.req})
        try:
            await self._reply(peer, reply)
        except PeerGone:
            pass
        except Exception as e:  # an error that cannot even be reported is only logged
            log.error("could not send an error reply: %s", e)

    async def _list(self, peer: bytes, request: schema.ListRequest, view: View | None) -> None:
        maps = await trio.to_thread.run_sync(
            self.catalog.list_maps, request.pattern, request.entries)
        if view is not None:
            maps = [m for m in maps if view.sees_map(m)]
        await self._reply(peer, schema.ListReply(maps, req=request.req))

    @staticmethod
    def _check_selector(selector: str) -> None:
        if not selector or "\0" in selector or len(selector) > 4096:
            raise errors.BadRequest("a selector is a name, id:N or pin path")

    async def _visible(self, selector: str, view: View | None) -> None:
        """Refuse a selector naming a map outside ``view`` as if no such map existed."""
        if view is not None:
            (await trio.to_thread.run_sync(open_visible, self.catalog.open_selected, selector,
                                           view)).close()

    async def _snapshot(self, peer: bytes, request: schema.GetRequest, view: View | None) -> None:
        self._check_selector(request.selector)
        await self._visible(request.selector, view)  # before the engine starts watching it
        record, snap, seq = await self.engine.snapshot(request.selector, request.reason)
        info = catalog.to_wire(record, entries=snap.count)
        btf = await trio.to_thread.run_sync(self.catalog.btf_blob, record)
        await self._reply(peer, schema.GetBegin(info, btf=btf is not None, seq=seq,
                                                epoch=self.epoch, layout=self.engine.layout_for(info),
                                                req=request.req),
                          *([btf] if btf else []))
        step = self.config.chunk_entries
        ks, vs = snap.key_size, snap.stride
        # Views of the watched state, not copies (copies of a big map hold the loop):
        # a snapshot's buffers are never changed, a poll makes a new one.
        keys, values = memoryview(snap.keys), memoryview(snap.values)
        for start in range(0, snap.count, step):
            n = min(step, snap.count - start)
            await self._reply(peer, schema.GetChunk(n, req=request.req),
                              keys[start * ks:(start + n) * ks], values[start * vs:(start + n) * vs])
        await self._reply(peer, schema.GetEnd(snap.count, req=request.req))

    async def _recent(self, peer: bytes, request: schema.RecentRequest, view: View | None) -> None:
        self._check_selector(request.selector)
        catalog.check_pattern(request.selector)
        messages, watched = self.engine.recent(request.selector)
        if view is not None:
            messages = [(h, f) for h, f in messages if view.sees_name(h.map.name)]
            watched = [name for name in watched if view.sees_name(name)]
        events = 0
        for header, frames in messages:
            events += getattr(header, "count", 1)
            # Tagged with this request's req: replays are told apart from other replies.
            replay = attrs.evolve(header, req=request.req)
            await self.owner.send(peer, [schema.encode(replay), *frames])
        await self._reply(peer, schema.RecentEnd(events, watched, req=request.req))

    async def _status(self, peer: bytes, request: schema.StatusRequest, view: View | None) -> None:
        st = self.engine.status()
        if view is not None:
            st = restricted_status(st, view)
        await self._reply(peer, schema.StatusReply(
            version=self.version, epoch=self.epoch, uptime=time.monotonic() - self.started,
            seq=st.seq, messages_published=st.messages_published,
            events_published=st.events_published, subscriptions=st.subscriptions,
            drops_reported=st.drops_reported, resyncs=st.resyncs, poll_errors=st.poll_errors,
            watched=st.watched, sources=[s for s in (self.sources.status() if self.sources else [])
                                         if view is None or view.sees_name(s.name)],
            discovery=st.discovery, creations_seen=st.creations_seen,
            creations_missed=st.creations_missed, stream_queued_bytes=st.stream_queued_bytes,
            publish_waits=st.publish_waits, facilities=st.facilities, **self.refusals(),
            req=request.req))

    async def _get(self, peer: bytes, request: schema.GetRequest, view: View | None) -> None:
        self._check_selector(request.selector)
        if view is None:
            handle = await trio.to_thread.run_sync(self.catalog.open_selected, request.selector)
        else:
            handle = await trio.to_thread.run_sync(open_visible, self.catalog.open_selected,
                                                   request.selector, view)
        with handle:
            record = handle.record
            holders = await trio.to_thread.run_sync(self.catalog.holders)
            info = catalog.to_wire(record, holders=holders.get(record.id))
            if not info.dumpable:
                raise errors.MapNotDumpable(f"{record.name} ({record.type}) has no entries to "
                                            f"show: {info.not_dumpable_reason}")
            btf = await trio.to_thread.run_sync(self.catalog.btf_blob, record)
            begin = schema.GetBegin(info, btf=btf is not None, layout=self.engine.layout_for(info),
                                    req=request.req)
            await self._reply(peer, begin, *([btf] if btf else []))
            if not request.entries:
                await self._reply(peer, schema.GetEnd(0, req=request.req))
                return
            reader = ReadAhead(self.catalog.chunks(handle, self.config.chunk_entries))
            try:
                total = 0
                while (chunk := await reader.next()) is not None:
                    total += chunk.count
                    await self._reply(peer, schema.GetChunk(chunk.count, req=request.req),
                                      chunk.keys, chunk.values)
            except NotDumpable:
                raise errors.MapNotDumpable(f"{record.type} maps hold no entries") from None
            finally:
                await reader.close()  # before the handle closes: the thread reads through it
            await self._reply(peer, schema.GetEnd(total, req=request.req))


class ReadAhead:
    """A dump's chunks read by a worker thread of their own, up to ``ahead`` chunks before
    they are sent.

    Why: read a chunk at a time from the loop (a thread hop each), the batch reads
    waited for the loop between chunks, and the loop has the other clients and the
    engine to serve: a million-entry ``get`` streamed in 0.44 to 0.49 s where its batch
    reads alone took 0.37 to 0.42 s, with gaps of up to 46 ms between chunks.  Here the
    thread reads on while the loop sends, handing each chunk over without waiting for
    the loop (``run_sync_soon``); ``ahead`` bounds what waits in memory (the outbox
    bounds the rest).  :meth:`close` stops the thread and waits for it: the map's fd
    must stay open until its last read is over.
    """

    def __init__(self, chunks: Iterator, ahead: int = 4):
        self._chunks = chunks
        self._slots = threading.Semaphore(ahead)  # chunks the thread may read ahead
        self._stop = threading.Event()
        self._send, self._receive = trio.open_memory_channel[object](math.inf)
        self._token = trio.lowlevel.current_trio_token()
        self._outcome: Any = None  # how the thread ended: an outcome (trio's) to unwrap
        self._done = trio.Event()
        self._taken = False  # a chunk was handed out: its slot is free at the next one
        trio.lowlevel.start_thread_soon(self._read, self._deliver)

    def _read(self) -> None:
        """In the worker thread: read until the dump ends or :meth:`close` says stop."""
        while True:
            self._slots.acquire()
            if self._stop.is_set() or (chunk := next(self._chunks, None)) is None:
                return
            try:
                self._token.run_sync_soon(self._send.send_nowait, chunk)
            except trio.RunFinishedError:  # the daemon is gone: nobody to send to
                return

    def _deliver(self, result: Any) -> None:
        """In the worker thread, as it ends: hand the loop how (an error, or the end)."""
        try:
            self._token.run_sync_soon(self._end, result)
        except trio.RunFinishedError:
            pass

    def _end(self, result: Any) -> None:
        self._outcome = result
        self._send.close()  # after every chunk: run_sync_soon keeps the order
        self._done.set()

    async def next(self):
        """The next chunk, or None at the end; the reader's error is raised here."""
        if self._taken:
            self._slots.release()
        try:
            chunk = await self._receive.receive()
        except trio.EndOfChannel:
            assert self._outcome is not None
            self._outcome.unwrap()
            return None
        self._taken = True
        return chunk

    async def close(self) -> None:
        """Stop the thread and wait until it has (shielded: the map's fd waits for it)."""
        self._stop.set()
        self._slots.release()
        with trio.CancelScope(shield=True):
            await self._done.wait()

