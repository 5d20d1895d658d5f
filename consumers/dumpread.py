"""A map's dump read without an event loop: how ``pymap get`` reads one.

Why not :class:`consumers.client.Client`: a ``get`` is one request and then
replies in order, which a blocking DEALER reads just as well, and trio is the
largest import of the CLI (a tenth of a million-entry ``get``).  And why the
request is its own step (:class:`DumpRequest`): it goes out before the
caller imports what renders the entries (numpy, the decoders), so the
daemon's batch read, most of a big dump's time, runs while this process is
still starting; ZeroMQ queues the chunks that arrive meanwhile.

Replies are read and matched as the async client reads them
(:mod:`consumers.replies`), with the same timeout per reply; the chunks are
the async client's too (:class:`ReplyChunk`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import attrs
import zmq

from watcher.wire import schema

from . import endpoint as _endpoint
from .errors import DaemonError
from .oneshot import receive

__all__ = ["DumpRequest", "ReplyChunk", "SyncDump", "chunk_of"]

_REQ = 1  # the only request on this socket


@attrs.frozen
class ReplyChunk:
    """``count`` entries as two flat buffers: slice with ``key_size`` and ``value_stride``.

    One ``GetChunk`` reply as a client receives it (the daemon's side has its own chunks
    of a map dump: watcher.kernel.maps.dump)."""

    keys: bytes
    values: bytes
    count: int


def chunk_of(message, frames: list[bytes]) -> ReplyChunk | int:
    """A get's reply after its ``GetBegin``: a chunk, or for the ``GetEnd`` the number
    of entries the dump had.

    Anything else is a bad reply (DaemonError)."""
    if isinstance(message, schema.GetEnd):
        return message.entries
    if not isinstance(message, schema.GetChunk) or len(frames) != 2:
        raise DaemonError("bad_reply", f"unexpected {type(message).__name__} in a get")
    return ReplyChunk(frames[0], frames[1], message.count)


class DumpRequest:
    """A ``get`` sent to the daemon at ``endpoint``, its replies read by :meth:`begin`.

    ``with DumpRequest(endpoint, "name", timeout) as request: dump = request.begin()``;
    leaving the block closes the socket, unread replies and all.
    """

    def __init__(self, endpoint: str, selector: str, timeout: float = 10.0,
                 snapshot: bool = False, entries: bool = True, reason: str = ""):
        self.endpoint = endpoint
        self.timeout = timeout
        self._sock = _endpoint.connect(zmq.DEALER, endpoint)
        try:
            self._sock.send(schema.encode(schema.GetRequest(
                selector=selector, snapshot=snapshot, entries=entries, reason=reason, req=_REQ)))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> DumpRequest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close(0)

    def begin(self) -> SyncDump:
        """The map's metadata and BTF (the ``GetBegin``); its chunks follow."""
        begin, frames = self._next()
        if not isinstance(begin, schema.GetBegin):
            raise DaemonError("bad_reply", f"expected get_begin, got {type(begin).__name__}")
        return SyncDump(begin, frames[0] if begin.btf and frames else None, self._next)

    def _next(self) -> tuple[object, list[bytes]]:
        """The get's next reply, waiting at most ``timeout`` for it."""
        return receive(self._sock, _REQ, self.endpoint, self.timeout)


class SyncDump:
    """A ``get`` in progress: what :class:`consumers.client.Dump` is, read without trio."""

    def __init__(self, begin: schema.GetBegin, btf: bytes | None,
                 receive: Callable[[], tuple[object, list[bytes]]]):
        self.map: schema.MapInfo = begin.map
        self.btf = btf
        self.layout: dict | None = begin.layout  # the config's declared layout for this map
        self.total: int | None = None  # set when the stream ends
        self.seq: int | None = begin.seq
        self.epoch: str = begin.epoch
        self._receive = receive  # the get's next reply

    def chunks(self) -> Iterator[ReplyChunk]:
        while True:
            message, frames = self._receive()
            chunk = chunk_of(message, frames)
            if isinstance(chunk, int):  # the end
                self.total = chunk
                return
            yield chunk
