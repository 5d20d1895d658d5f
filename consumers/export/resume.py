"""Starting an export stream where the last run's checkpoint left off.

An :class:`EventStream` in snapshot mode whose start step is replaced: with a
checkpoint from the daemon's current epoch, the maps' recent-events rings
(``recent``) are replayed from the event after the checkpoint, for each map
whose ring still reaches back that far.  Every other map (its ring no longer
covers the gap, or the daemon restarted since) is re-read as a fresh snapshot
behind an explicit ``resync`` event.  Everything after that is the ordinary
stream, with the stream's own gap and restart handling (tail -F included).
Replayed events come in the daemon's sequence order (after any resyncs), as the
live stream delivered them the first time.
"""

from __future__ import annotations

import time

from watcher.wire import schema
from watcher.wire.schema import MapRef

from ..events import Event, events_of
from ..selection import Selection
from ..subscriber import EventStream
from .checkpoint import Position


class ResumingStream(EventStream):
    def __init__(self, client, selectors: list[str], resume: Position | None, **kwargs):
        super().__init__(client, selectors, snapshot=True, **kwargs)
        self.resume = resume
        self.replayed = 0  # events taken from the daemon's rings at start
        self._beat_topics: dict[str, int] = {}

    def _heartbeat(self, beat: schema.Heartbeat) -> None:
        super()._heartbeat(beat)
        self._beat_topics = beat.topics

    async def _snapshot_all(self, reason: str, announce: bool = True) -> list[Event]:
        if reason != "start" or self.resume is None:
            return await super()._snapshot_all(reason, announce)
        resume, self.resume = self.resume, None  # once: later snapshots are ordinary
        if resume.epoch != self.epoch:
            self.resyncs += 1
            out = [Event("resync", MapRef(0, ""), time=time.time(),
                         reason=f"daemon restarted since the checkpoint (epoch {resume.epoch})")]
            return out + await super()._snapshot_all("epoch", announce=False)
        return await self._replay(resume)

    async def _replay(self, resume: Position) -> list[Event]:
        self._retry = "start"
        messages: dict[int, tuple[object, list[bytes]]] = {}
        for sel in self.selection.selectors:
            for message, frames in (await self.client.recent(sel))[0]:
                messages[message.seq] = (message, frames)  # type: ignore[attr-defined]
        by_map: dict[str, list[tuple[object, list[bytes]]]] = {}
        for seq in sorted(messages):
            message, frames = messages[seq]
            name = message.map.name  # type: ignore[attr-defined]
            if self.selection.matches(name):
                by_map.setdefault(name, []).append((message, frames))
        names = set(by_map) | {n for n in await _all_names(self.client, self.selection)}
        out: list[Event] = []
        replayed: list[Event] = []
        for name in sorted(names):
            replay = by_map.get(name, [])
            covered = (any(m.seq <= resume.seq for m, _ in replay)  # type: ignore[attr-defined]
                       or (not replay and self._beat_topics.get(name, 0) == 0))
            if not covered:
                self.resyncs += 1
                rows = await self._resync(name, "gap", announce=False)
                out.append(Event("resync", MapRef(0, name), topic_seq=self._seqs.last(name) or 0,
                                 time=time.time(),
                                 reason="the daemon's recent events no longer cover the gap "
                                        "since the checkpoint"))
                out += rows
                continue
            for message, frames in replay:
                last = message.topic_seq + getattr(message, "count", 1) - 1  # type: ignore[attr-defined]
                self._seqs.resynced(name, last)
                for event in events_of(message, frames, self._formatters):
                    if event.seq > resume.seq:
                        replayed.append(event)
                        self.replayed += 1
            if not replay:
                self._seqs.resynced(name, self._beat_topics.get(name, 0))
        self._retry = None
        # In the daemon's order, as they first went out: outputs that pack consecutive
        # events into messages (grouping.py) then cut the re-sends as they cut the originals.
        replayed.sort(key=lambda e: e.seq)
        return out + replayed


async def _all_names(client, selection: Selection) -> list[str]:
    """Every map the selection covers now, buffers included."""
    names = set()
    for sel in selection.selectors:
        for m in await client.list_maps(sel, entries=False):
            if selection.matches(m.name):
                names.add(m.name)
    return sorted(names)
