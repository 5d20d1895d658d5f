"""The engine's query API as a ``typing.Protocol``: all the request server (and the
metrics scrape) may ask the engine.

Why a Protocol: the server answers clients from the engine's state, and must not
reach into the rest of it (its watches, demand or stream); annotated with this,
mypy refuses a server that does.  It lives apart from :mod:`.interfaces` because
it names the engine's own result types: :mod:`.interfaces` is imported by the
engine, so it cannot import the engine back.

Must never hold behaviour: only signatures.
"""

from __future__ import annotations

from typing import Any, Protocol

from watcher.kernel.maps.find import MapRecord

from ..wire import schema
from ..wire.transport import OutFrames
from .diff import EngineSnapshot
from .engine import EngineStatus, WatchFigures
from .interfaces import Catalog


class EngineQueries(Protocol):
    """What the request server asks the engine (the real one is
    :class:`~watcher.daemon.engine.Engine`); async methods run on the trio loop."""

    @property
    def catalog(self) -> Catalog:
        """The catalog the engine reads the host through (the server's, unless given one)."""
        ...

    def report_gap(self, name: str, missed: int) -> None:
        """A subscriber of ``name`` missed ``missed`` events (counted for ``status``)."""
        ...

    async def snapshot(self, selector: str, reason: str = ""
                       ) -> tuple[MapRecord, EngineSnapshot, int]:
        """The watched state of one map and the stream sequence it reflects (watching
        the map, held for a while, if nobody did yet)."""
        ...

    def recent(self, pattern: str) -> tuple[list[tuple[Any, OutFrames]], list[str]]:
        """Recent stream messages of the topics ``pattern`` matches, and the topics
        published now."""
        ...

    def layout_for(self, info: schema.MapInfo) -> dict | None:
        """The config's declared layout for this map, if any."""
        ...

    def status(self) -> EngineStatus:
        """The engine's and its stream's counters."""
        ...

    def watch_figures(self) -> list[WatchFigures]:
        """Each watched map's counters and cached snapshot; safe from another thread."""
        ...
