"""The daemon's seams, as ``typing.Protocol``\\ s: what the engine and the request
server may ask of the host (:class:`Catalog`, handing out :class:`Handle`\\ s), what
the engine asks of the event stream (:class:`Stream`, with its figures as
:class:`StreamStats`), and what a stream may ask of the socket owner it publishes
through (:class:`Publisher`).

Why Protocols: the daemon's logic runs against the kernel in production and
against in-memory fakes in tests (``tests/support/catalog.py``, the recorder in
``tests/test_daemon_logic.py``).  Written down here, mypy checks both sides
against one list: a method the engine starts calling, or a fake that drifts
from the real thing, is a type error instead of a test that passes for the
wrong reason.  The request server's view of the engine is in :mod:`.queries`.

Must never hold behaviour: only signatures.  Nothing here imports the modules
that use these seams (the engine, the stream), so every one of them can.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, Self

import attrs

from watcher.kernel.maps.dump import Chunk
from watcher.kernel.maps.find import MapRecord

from ..wire.schema import MapInfo
from ..wire.transport import OutFrames

if TYPE_CHECKING:
    from .access import View
    from .config import Config
    from .diff import Delta


class Handle(Protocol):
    """An open map as a catalog hands it out: its record and fd, closed once."""

    @property
    def record(self) -> MapRecord: ...

    @property
    def fd(self) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class Catalog(Protocol):
    """What the engine and the request server ask the host's maps.

    Every method blocks (syscalls, /proc walks, dumps): call them in a worker thread.
    The real one is :class:`~watcher.daemon.catalog.HostCatalog`.
    """

    def records(self, only: set[int] | None = None) -> list[MapRecord]:
        """Every map on the host (or the ``only`` ids), with its pins."""
        ...

    def ids(self) -> set[int]:
        """Every map id on the host, nothing opened."""
        ...

    def list_maps(self, pattern: str | None, with_entries: bool) -> list[MapInfo]: ...

    def open_selected(self, selector: str) -> Handle:
        """The map a request names (name, ``id:N`` or pin path); a ``RequestError`` if none."""
        ...

    def open_watched(self, record: MapRecord) -> Handle:
        """Reopen a listed map by id; ``MapGone`` if it was freed since."""
        ...

    def chunks(self, handle: Handle, chunk_entries: int) -> Iterator[Chunk]: ...

    def own_ids(self) -> frozenset[int]:
        """Ids of the maps pymap itself made: never watched."""
        ...

    def forget_own(self, gone: set[int]) -> None: ...

    def holders(self) -> dict[int, list[tuple[int, str]]]:
        """Map id -> the (pid, command) of each process holding it."""
        ...

    def btf_blob(self, record: MapRecord) -> bytes | None: ...

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: what of it the catalog keeps (the bpffs roots)."""
        ...


class Publisher(Protocol):
    """What a stream asks of the socket owner it publishes through (the real one is
    :class:`~watcher.wire.transport.PublisherOwner`): queue frames, wait for room,
    and the queue's figures for ``status``."""

    @property
    def outbox_bytes(self) -> int:
        """Bytes queued to ZeroMQ now."""
        ...

    @property
    def waits(self) -> int:
        """Times a producer waited for room."""
        ...

    def publish(self, frames: OutFrames) -> None:
        """Queue ``frames``; never waits."""
        ...

    async def room(self) -> None:
        """Return once the queue is under its byte bound."""
        ...


@attrs.frozen
class StreamStats:
    """The stream's figures for ``status`` and the metrics (a value, not behaviour: it is
    what :meth:`Stream.stats` returns)."""

    seq: int  # the last sequence number published
    messages_published: int
    events_published: int
    # The queue to ZeroMQ (bounded by stream_queue_bytes): bytes in it now, and how
    # often a poll or buffer read waited for room.
    queued_bytes: int
    publish_waits: int


class Stream(Protocol):
    """What the engine and its poller ask of the event stream (the real one is
    :class:`~watcher.daemon.publisher.PublishedStream`): publish, number, remember,
    and say how it is doing."""

    @property
    def source_topics(self) -> set[str]:
        """Topics of the event sources (published by them, not by the engine)."""
        ...

    def set_views(self, views: dict[bytes, View]) -> None:
        """The access views some subscriber uses: messages go out once more for each."""
        ...

    def stats(self) -> StreamStats: ...

    def last_topic_seq(self, name: str) -> int: ...

    def forget_topics_except(self, keep: set[str]) -> None:
        """Drop per-topic state of every topic not in ``keep`` (its seq floor stays)."""
        ...

    async def room(self) -> None:
        """Return once the queue to ZeroMQ is under its byte bound."""
        ...

    def publish_delta(self, record: MapRecord, key_size: int, stride: int, delta: Delta,
                      when: float) -> None: ...

    def publish_map_event(self, action: str, info: MapInfo, when: float | None = None
                          ) -> None: ...

    def heartbeat(self, watched_topics: list[str], watched: Iterable[MapRecord] = ()) -> None:
        ...

    def recent(self, pattern: str) -> list[tuple[Any, OutFrames]]: ...
