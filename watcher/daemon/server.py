"""The request endpoint: a ZeroMQ ROUTER answering ``ping``, ``list`` and ``get``.

One :class:`~watcher.wire.transport.SocketOwner` task owns the socket; each
request runs in its own task in the server's nursery, so a long ``get``
never delays another client's ``ping``.  Every request is validated before
anything touches the kernel, and every failure becomes an ``error`` reply:
the server itself only stops when cancelled.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time

import attrs
import trio
import zmq

from ..kernel import maps as kmaps
from ..kernel.dump import NotDumpable, dump
from ..wire import schema
from ..wire.transport import PeerGone, SocketOwner
from . import catalog
from .config import DaemonConfig
from .engine import Engine
from .subgate import SubscriptionGate

log = logging.getLogger("pymap.server")

MAX_REQUEST_BYTES = 64 * 1024  # requests are small; anything larger is refused unread


@attrs.define(eq=False)
class Client:
    """One DEALER peer's requests in flight, and what it was refused or lost."""

    scopes: set[trio.CancelScope] = attrs.Factory(set)
    dropped: int = 0  # replies dropped since the client was last told
    abused: bool = False  # refused at least once: logged (once)


class RequestServer:
    def __init__(self, sock: zmq.Socket, config: DaemonConfig, epoch: str, version: str,
                 engine: Engine, sources=None, gate: SubscriptionGate | None = None):
        self.owner = SocketOwner(sock, config.client_outbox_bytes, on_gone=self._on_gone)
        self.engine = engine
        self.sources = sources  # watcher.daemon.sources.Sources: event source buffers
        self.gate = gate
        self.config = config
        self.bpffs = tuple(config.bpffs)
        self.epoch = epoch
        self.version = version
        self.started = time.monotonic()
        self._nursery: trio.Nursery | None = None
        self._clients: dict[bytes, Client] = {}
        self.requests_refused = 0  # refused with `busy`: too many in flight
        self.replies_dropped = 0  # could not even be queued: the client's outbox was full

    def reconfigure(self, config) -> None:
        """A reloaded config (watcher.daemon.reload): chunk size, bpffs roots."""
        self.config = config.daemon  # its endpoints are the running ones (reload keeps them)
        self.bpffs = tuple(config.daemon.bpffs)

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.owner.serve(self._on_message)

    def _on_message(self, frames: list[bytes]) -> None:
        assert self._nursery is not None
        peer = frames[0]
        client = self._clients.setdefault(peer, Client())
        if len(client.scopes) >= self.config.max_requests_in_flight:
            self._refuse(peer, client, frames[1:])
            return
        if client.dropped:
            notice = schema.ErrorReply("dropped", f"{client.dropped} replies to this client "
                                       "were dropped: it did not read them and its queue "
                                       f"({self.config.client_outbox_bytes} bytes) was full")
            if self.owner.try_send(peer, [schema.encode(notice)]):
                client.dropped = 0
        scope = trio.CancelScope()
        client.scopes.add(scope)
        self._nursery.start_soon(self._handle, peer, frames[1:], client, scope)

    def _refuse(self, peer: bytes, client: Client, frames: list[bytes]) -> None:
        """Answer ``busy`` without running the request, or drop the answer if it cannot queue."""
        self.requests_refused += 1
        if not client.abused:
            client.abused = True
            log.warning("client %s has %d requests in flight; refusing more with 'busy'",
                        peer.hex(), len(client.scopes))
        try:
            req = getattr(self._parse(frames), "req", 0)
        except catalog.SelectError as e:
            req = e.req
        busy = schema.ErrorReply(
            "busy", f"too many requests in flight from this client (limit "
            f"{self.config.max_requests_in_flight}); read the replies, then retry", req=req)
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

    def _finished(self, peer: bytes, client: Client, scope: trio.CancelScope) -> None:
        client.scopes.discard(scope)
        if not client.scopes:
            # Kept while it owes the client a `dropped` notice (a few bytes per peer).
            if self._clients.get(peer) is client and not client.dropped:
                del self._clients[peer]
            self.owner.forget(peer)

    async def _handle(self, peer: bytes, frames: list[bytes], client: Client,
                      scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._answer(peer, frames)
        finally:
            self._finished(peer, client, scope)

    async def _answer(self, peer: bytes, frames: list[bytes]) -> None:
        req = 0
        try:
            request = self._parse(frames)
            req = getattr(request, "req", 0)  # stream kinds sent as requests have none
            if isinstance(request, schema.Ping):
                await self._reply(peer, schema.Pong(self.version, self.epoch,
                                                    time.monotonic() - self.started,
                                                    self.config.events_endpoint, req=req))
            elif isinstance(request, schema.ListRequest):
                await self._list(peer, request)
            elif isinstance(request, schema.GetRequest):
                if request.snapshot:
                    await self._snapshot(peer, request)
                else:
                    await self._get(peer, request)
            elif isinstance(request, schema.RecentRequest):
                await self._recent(peer, request)
            elif isinstance(request, schema.StatusRequest):
                await self._status(peer, request)
            elif isinstance(request, schema.GapReport):
                if not 0 <= request.missed <= 1 << 32 or not 0 < len(request.map) <= 4096:
                    raise catalog.SelectError("bad_request", "gap_report needs a map name and "
                                              "0 <= missed <= 2**32")
                self.engine.report_gap(request.map, request.missed)
                await self._reply(peer, schema.Ack(req=request.req))
            else:
                raise catalog.SelectError("bad_request",
                                          f"{schema.KINDS[type(request)]!r} is a reply, not a request")
        except PeerGone:
            log.debug("client went away before its reply")
        except catalog.SelectError as e:
            await self._error(peer, e.req or req, e.code, str(e), e.candidates)
        except Exception as e:  # one request's failure must not stop the server
            log.exception("request failed: %s", e)
            await self._error(peer, req, "internal", f"internal error: {e}")
        except trio.Cancelled:
            raise
        except BaseException as e:  # noqa: BLE001 - an ExceptionGroup from a nested nursery
            log.exception("request failed: %s", e)

    def _parse(self, frames: list[bytes]):
        if len(frames) != 1:
            raise catalog.SelectError("bad_request", f"a request is 1 frame, got {len(frames)}")
        if len(frames[0]) > MAX_REQUEST_BYTES:
            raise catalog.SelectError("bad_request", "request too large")
        try:
            request = schema.decode(frames[0])
        except schema.WireError as e:
            raise catalog.SelectError("bad_request", str(e)) from None
        req = getattr(request, "req", 0)
        if isinstance(req, bool) or not isinstance(req, int) or not 0 <= req < 1 << 63:
            raise catalog.SelectError("bad_request", "req must be an integer from 0 to 2**63-1")
        if request.v != schema.SCHEMA_VERSION:
            raise catalog.SelectError("version", f"schema version {request.v} is not supported; "
                                      f"this daemon speaks {schema.SCHEMA_VERSION}",
                                      req=getattr(request, "req", 0))
        return request

    async def _reply(self, peer: bytes, message, *extra: bytes) -> None:
        await self.owner.send(peer, [schema.encode(message), *extra])

    async def _error(self, peer, req, code, message, candidates=()) -> None:
        log.info("error reply %s: %s", code, message, extra={"code": code, "req": req})
        try:
            await self._reply(peer, schema.ErrorReply(code, message, list(candidates), req=req))
        except PeerGone:
            pass
        except Exception as e:  # an error that cannot even be reported is only logged
            log.error("could not send an error reply: %s", e)

    async def _list(self, peer: bytes, request: schema.ListRequest) -> None:
        maps = await trio.to_thread.run_sync(
            catalog.list_maps, self.bpffs, request.pattern, request.entries)
        await self._reply(peer, schema.ListReply(maps, req=request.req))

    @staticmethod
    def _check_selector(selector: str) -> None:
        if not selector or "\0" in selector or len(selector) > 4096:
            raise catalog.SelectError("bad_request", "a selector is a name, id:N or pin path")

    async def _snapshot(self, peer: bytes, request: schema.GetRequest) -> None:
        self._check_selector(request.selector)
        record, snap, seq = await self.engine.snapshot(request.selector, request.reason)
        info = catalog.to_wire(record, entries=snap.count)
        btf = await trio.to_thread.run_sync(catalog.btf_blob, record)
        await self._reply(peer, schema.GetBegin(info, btf=btf is not None, seq=seq,
                                                epoch=self.epoch, layout=self._layout_for(info),
                                                req=request.req),
                          *([btf] if btf else []))
        step = self.config.chunk_entries
        ks, vs = snap.key_size, snap.stride
        for start in range(0, snap.count, step):
            n = min(step, snap.count - start)
            await self._reply(peer, schema.GetChunk(n, req=request.req),
                              snap.keys[start * ks:(start + n) * ks],
                              snap.values[start * vs:(start + n) * vs])
        await self._reply(peer, schema.GetEnd(snap.count, req=request.req))

    def _layout_for(self, info: schema.MapInfo) -> dict | None:
        """The config's declared layout for this map (first [[layouts]] match), if any."""
        return self.engine.config.layout_for([info.name, info.kernel_name], info.pinned)

    async def _recent(self, peer: bytes, request: schema.RecentRequest) -> None:
        self._check_selector(request.selector)
        catalog.check_pattern(request.selector)
        messages = self.engine.stream.recent(request.selector)
        names = {w.record.name for w in self.engine.watches.values()}
        names |= set(self.sources.topics() if self.sources else ())  # always published
        watched = sorted(n for n in names if fnmatch.fnmatchcase(n, request.selector))
        events = 0
        for header, frames in messages:
            events += getattr(header, "count", 1)
            await self.owner.send(peer, [schema.encode(header), *frames])
        await self._reply(peer, schema.RecentEnd(events, watched, req=request.req))

    async def _status(self, peer: bytes, request: schema.StatusRequest) -> None:
        engine, stream = self.engine, self.engine.stream
        await self._reply(peer, schema.StatusReply(
            version=self.version, epoch=self.epoch, uptime=time.monotonic() - self.started,
            seq=stream.seq, messages_published=stream.messages_published,
            events_published=stream.events_published,
            subscriptions={p.decode(errors="replace"): n for p, n in engine.demand.prefixes.items()},
            drops_reported=engine.drops_reported, resyncs=engine.resyncs,
            poll_errors=engine.poll_errors, watched=engine.status(),
            sources=self.sources.status() if self.sources else [],
            requests_refused=self.requests_refused, replies_dropped=self.replies_dropped,
            subscriptions_refused=self.gate.refused if self.gate else 0, req=request.req))

    async def _get(self, peer: bytes, request: schema.GetRequest) -> None:
        self._check_selector(request.selector)
        fd, record = await trio.to_thread.run_sync(
            catalog.open_selected, request.selector, self.bpffs)
        try:
            holders = await trio.to_thread.run_sync(kmaps.map_holders)
            info = catalog.to_wire(record, holders=holders.get(record.id))
            if not info.dumpable:
                raise catalog.SelectError(
                    "not_dumpable", f"{record.name} ({record.type}) has no entries to show: "
                    f"{info.not_dumpable_reason}")
            btf = await trio.to_thread.run_sync(catalog.btf_blob, record)
            begin = schema.GetBegin(info, btf=btf is not None, layout=self._layout_for(info),
                                    req=request.req)
            await self._reply(peer, begin, *([btf] if btf else []))
            if not request.entries:
                await self._reply(peer, schema.GetEnd(0, req=request.req))
                return
            chunks = dump(fd, record, self.config.chunk_entries)
            total = 0
            while (chunk := await trio.to_thread.run_sync(next, chunks, None)) is not None:
                total += chunk.count
                await self._reply(peer, schema.GetChunk(chunk.count, req=request.req),
                                  chunk.keys, chunk.values)
            await self._reply(peer, schema.GetEnd(total, req=request.req))
        except NotDumpable:
            raise catalog.SelectError("not_dumpable", f"{record.type} maps hold no entries") from None
        finally:
            os.close(fd)
