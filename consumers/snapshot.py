"""Reading maps' state from the daemon: the snapshot half of the Clone pattern.

A snapshot ``get`` answers from the daemon's watched state and says which
``topic_seq`` that state includes, so a subscriber can apply exactly the
stream events after it (docs/protocol.md, Snapshot sync).  Used by
:class:`consumers.subscriber.EventStream` at start, after a gap and after a
restart, and by ``pymap events --snapshot`` without ``-f``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from watcher.wire.schema import MapInfo

from .errors import DaemonError
from .selection import Selection

if TYPE_CHECKING:
    from .client import Client

# Errors that mean "this map has no state to read now", not "the daemon failed".
GONE = ("not_found", "not_dumpable", "ambiguous")


@attrs.frozen
class ClientSnapshot:
    """A map's state as a client read it, and the ``topic_seq`` it reflects (the daemon's
    own state of a watched map is the engine's snapshot, on the other side of the wire)."""

    map: MapInfo
    seq: int  # the last topic_seq the entries include (0: none yet)
    entries: dict[bytes, bytes]  # key -> value (value_stride bytes)


async def map_names(client: Client, selection: Selection) -> list[str]:
    """The dumpable maps the selection covers now, sorted."""
    names = set()
    for sel in selection.selectors:
        for m in await client.list_maps(sel, entries=False):
            if m.dumpable and selection.matches(m.name):
                names.add(m.name)
    return sorted(names)


async def read(client: Client, name: str, reason: str,
               progress: Callable[[int], None] | None = None) -> ClientSnapshot | None:
    """The daemon's watched state of map ``name``; None if it has none (gone, not
    dumpable, or a name now shared by several maps).  ``reason`` is the wire's.

    Other tasks run between chunks (a 1,000,000-entry map is read in ~1 s of
    CPU); ``progress`` is told the entries read so far after each chunk."""
    try:
        async with client.get(name, snapshot=True, reason=reason) as dump:
            m = dump.map
            ks, vs = m.key_size, m.value_stride
            entries: dict[bytes, bytes] = {}
            async for chunk in dump.chunks():
                keys, values = chunk.keys, chunk.values
                for i in range(chunk.count):
                    entries[keys[i * ks:(i + 1) * ks]] = values[i * vs:(i + 1) * vs]
                if progress is not None:
                    progress(len(entries))
                await trio.lowlevel.checkpoint()  # ready chunks are received without one
    except DaemonError as e:
        if e.code in GONE:
            return None
        raise
    return ClientSnapshot(m, dump.seq or 0, entries)
