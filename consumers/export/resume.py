"""Starting an export stream where the last run's checkpoint left off.

A :class:`ResumeFromCheckpoint` start policy (consumers.startpolicy) for an
:class:`EventStream` in snapshot mode: with a checkpoint from the daemon's
current epoch, the maps' recent-events rings (``recent``) are replayed from the
event after the checkpoint, for each map whose ring still reaches back that
far.  Every other map (its ring no longer covers the gap, or the daemon
restarted since) is re-read as a fresh snapshot behind an explicit ``resync``
event.  Everything after that is the ordinary stream, with the stream's own gap
and restart handling (tail -F included).  Replayed events come in the daemon's
sequence order (after any resyncs), as the live stream delivered them the
first time.
"""

from __future__ import annotations

import time

from watcher.wire.schema import MapRef

from ..events import Event, events_of
from ..selection import Selection
from ..startpolicy import StartContext
from ..subscriber import EventStream
from .checkpoint import Position


def resuming_stream(client, selectors: list[str], resume: Position | None,
                    **kwargs) -> EventStream:
    """A snapshot-mode stream that starts from ``resume`` (None: the ordinary start)."""
    policy = None if resume is None else ResumeFromCheckpoint(resume)
    return EventStream(client, selectors, snapshot=True, start_policy=policy, **kwargs)


class ResumeFromCheckpoint:
    """Start from a checkpoint: replay what the daemon still has, resync the rest."""

    def __init__(self, resume: Position):
        self.resume = resume
        self.replayed = 0  # events taken from the daemon's rings at start

    async def start(self, stream: StartContext) -> list[Event]:
        if self.resume.epoch != stream.epoch:
            stream.count_resync()
            out = [Event("resync", MapRef(0, ""), time=time.time(),
                         reason=f"daemon restarted since the checkpoint (epoch {self.resume.epoch})")]
            return out + await stream.snapshot_all("epoch", False)
        return await self._replay(stream)

    async def _replay(self, stream: StartContext) -> list[Event]:
        resume, selection = self.resume, stream.selection
        by_map = await _recent_by_map(stream.client, selection)
        names = set(by_map) | set(await _all_names(stream.client, selection))
        out: list[Event] = []
        replayed: list[Event] = []
        for name in sorted(names):
            replay = by_map.get(name, [])
            covered = (any(m.seq <= resume.seq for m, _ in replay)  # type: ignore[attr-defined]
                       or (not replay and stream.topics.get(name, 0) == 0))
            if not covered:
                stream.count_resync()
                rows = await stream.resync(name, "gap", False)
                out.append(Event("resync", MapRef(0, name), topic_seq=stream.last(name) or 0,
                                 time=time.time(),
                                 reason="the daemon's recent events no longer cover the gap "
                                        "since the checkpoint"))
                out += rows
                continue
            for message, frames in replay:
                last = message.topic_seq + getattr(message, "count", 1) - 1  # type: ignore[attr-defined]
                stream.reflected(name, last)
                for event in events_of(message, frames, stream.formatters):
                    if event.seq > resume.seq:
                        replayed.append(event)
                        self.replayed += 1
            if not replay:
                stream.reflected(name, stream.topics.get(name, 0))
        # In the daemon's order, as they first went out: outputs that pack consecutive
        # events into messages (grouping.py) then cut the re-sends as they cut the originals.
        replayed.sort(key=lambda e: e.seq)
        return out + replayed


async def _recent_by_map(client, selection: Selection) -> dict[str, list[tuple[object, list[bytes]]]]:
    """The daemon's recent-events rings of the selected maps, per map in sequence order."""
    messages: dict[int, tuple[object, list[bytes]]] = {}
    for sel in selection.selectors:
        for message, frames in (await client.recent(sel))[0]:
            messages[message.seq] = (message, frames)
    by_map: dict[str, list[tuple[object, list[bytes]]]] = {}
    for seq in sorted(messages):
        message, frames = messages[seq]
        name = message.map.name  # type: ignore[attr-defined]
        if selection.matches(name):
            by_map.setdefault(name, []).append((message, frames))
    return by_map


async def _all_names(client, selection: Selection) -> list[str]:
    """Every map the selection covers now, buffers included."""
    names = set()
    for sel in selection.selectors:
        for m in await client.list_maps(sel, entries=False):
            if selection.matches(m.name):
                names.add(m.name)
    return sorted(names)
