"""The events a consumer sees, and how each daemon message becomes them.

Pure data and decoding, no sockets and no trio: the live stream
(:mod:`consumers.subscriber`), the recent-events replay (``recent``) and the
exporter all turn the same messages into the same :class:`Event` objects, so
the one definition of an event lives here, apart from the I/O that fetches it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import chain, repeat
from typing import TYPE_CHECKING

import attrs
import msgspec

from watcher.wire import schema
from watcher.wire.schema import MapInfo, MapRef

from .errors import DaemonError
from .recordsets import FormatterCache, MalformedRecords, RecordSet, record_set

if TYPE_CHECKING:
    # The type only: reading a snapshot needs trio, this module does not.
    from .snapshot import ClientSnapshot

__all__ = ["ACTIONS", "EntryBatch", "Event", "MapRef", "RecordEvents", "diff_events", "events_of",
           "record_events"]

ACTIONS = ("added", "updated", "removed")


class Event(msgspec.Struct, frozen=True, gc=False):
    """One thing that happened to a map, or to the stream itself.

    ``action``: added, updated, removed (entries); map_created, map_removed;
    resync (state was re-read: ``reason`` says why); lost (``missed`` events
    never arrived); stalled (the daemon fell silent: ``reason`` says for how
    long; the stream waits for it) and resumed (it speaks again: ``reason``
    says after how long).  ``seq`` is the daemon-wide sequence (0 for events the
    client made: snapshot rows, lost, resync); ``topic_seq`` the map's own sequence
    (snapshot rows and a map's resync: the last one the state read includes;
    lost: the first one missed); values are raw bytes, per-CPU
    maps' values hold every CPU's slot (see MapInfo.value_stride).

    Buffers (event sources, docs/sources.md): ``record`` (``value`` is the raw
    record, ``formatted`` its fields when the daemon sent a layout); ``lost``
    with ``reason`` "perf" or "producer" (``missed`` records never reached
    pymap); with ``record_batches=True``, one ``records`` event per batch
    (``records``: a consumers.recordsets.RecordSet, whose ``columns()`` and
    ``rows()`` keep up with millions of records a second) instead of one per
    record, whose object alone costs more than a whole record's share of those.

    Why a msgspec ``Struct`` and not an attrs class: a buffer delivers millions
    of records a second and the per-record API builds one Event each; a frozen
    attrs class's generated ``__init__`` sets its 14 fields one
    ``object.__setattr__`` at a time (1.1-1.8 us each on a small VM), a Struct
    fills them in C (0.25 us).  What users see is unchanged: the same fields,
    positional or by keyword; assigning one raises AttributeError; ``==``, hash
    and repr by field.  A changed copy is ``msgspec.structs.replace(event, ...)``
    (attrs.evolve takes attrs classes only).  ``gc=False``: the cyclic garbage
    collector does not track events (a batch of thousands otherwise triggers
    collections costing as much as building them); an event refers to nothing
    that refers back to it, so it cannot be part of a cycle (unless one stores
    an event inside its own ``formatted`` dict).  The price: no weak references
    to events (msgspec allows one or the other).
    """

    action: str
    map: MapRef
    seq: int = 0
    topic_seq: int = 0
    time: float = 0.0
    key: bytes | None = None
    value: bytes | None = None
    old_value: bytes | None = None
    info: MapInfo | None = None
    missed: int = 0
    reason: str = ""
    snapshot: bool = False
    formatted: dict | None = None
    records: RecordSet | None = None


@attrs.frozen
class EntryBatch:
    """Entry events of one ``EventBatch`` message, not yet made into :class:`Event` objects.

    Yielded instead of per-event ``Event`` objects by a stream opened with
    ``entry_batches=True``, for consumers (the exporter) that handle thousands of
    events per message and cannot afford an object each.  Events ``start`` ..
    ``count - 1`` of the message are new (earlier ones were already reflected in a
    snapshot); ``events()`` gives exactly the events the per-event API would.
    ``actions``, ``keys``, ``values``, ``olds`` are the message's flat frames:
    event ``i`` has action ``ACTIONS[actions[i]]``, key ``keys[i*key_size:(i+1)*key_size]``
    and value/old value ``value_stride`` bytes at ``i*value_stride``.
    """

    message: schema.EventBatch
    frames: list[bytes]
    start: int = 0

    @property
    def map(self) -> MapRef:
        return self.message.map

    @property
    def action(self) -> str:
        return "batch"

    def events(self) -> list[Event]:
        return events_from_batch(self.message, self.frames, self.start)

    def entries(self):
        """(index, action, key, value, old value or None) of each new event."""
        actions, keys, values, olds = self.frames
        ks, vs = self.message.key_size, self.message.value_stride
        for i in range(self.start, self.message.count):
            action = ACTIONS[actions[i]]
            yield (i, action, keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs],
                   olds[i * vs:(i + 1) * vs] if action == "updated" else None)


def check_batch(batch: schema.EventBatch, frames: list[bytes]) -> None:
    if len(frames) != 4 or len(frames[0]) != batch.count:
        raise DaemonError("bad_reply", "malformed events message")


def events_from_batch(batch: schema.EventBatch, frames: list[bytes],
                      start: int = 0) -> list[Event]:
    check_batch(batch, frames)
    actions, keys, values, olds = frames
    ks, vs = batch.key_size, batch.value_stride
    out = []
    for i in range(start, batch.count):
        action = ACTIONS[actions[i]]
        value = values[i * vs:(i + 1) * vs]
        out.append(Event(action, batch.map, batch.seq + i, batch.topic_seq + i, batch.time,
                         key=keys[i * ks:(i + 1) * ks], value=value,
                         old_value=olds[i * vs:(i + 1) * vs] if action == "updated" else None))
    return out


def event_from_map_event(message: schema.MapEvent) -> Event:
    return Event(message.action, MapRef(message.map.id, message.map.name), message.seq,
                 message.topic_seq, message.time, info=message.map)


class RecordEvents:
    """A buffer read's records as ``record`` events, made a part (CHUNK records) at a
    time, when asked: ``parts()`` (the stream's batches) or iterated.

    Why not one list: a read holds thousands of records, and each record's
    ``formatted`` dict is a container the cyclic garbage collector counts.  Made all
    before any is dropped, they start a collection every 700 or so, each walking the
    read's lists: 0.26 to 0.52 s in 3 to 6 seconds of bench_sources (e), 7 to 13 %
    of the subscriber's time.  Made CHUNK at a time and dropped as the
    consumer goes on, they are freed about as fast as they are made, and the
    collector hardly runs.  Each field is still decoded once per read (one
    ``tolist`` per column), and each Event is made in C (``map`` over the columns).
    Records ``start`` .. ``count - 1`` of the read are new (the rest were in a snapshot).
    """

    CHUNK = 256  # two parts alive (the consumer's and the next) stay under 700 dicts

    def __init__(self, batch: schema.RecordBatch, records: RecordSet, start: int = 0):
        self.batch = batch
        self.records = records
        self.start = start

    def __len__(self) -> int:
        return self.batch.count - self.start

    def __iter__(self) -> Iterator[Event]:
        return chain.from_iterable(self.parts())

    def parts(self) -> Iterator[list[Event]]:
        """The events in order, CHUNK (the last part: what is left) to a list."""
        b, start, size = self.batch, self.start, self.CHUNK
        dicts = self.records.formatted_chunks(size, start)
        values = iter(self.records.raw(start))
        seqs = iter(range(b.seq + start, b.seq + b.count))
        topic_seqs = iter(range(b.topic_seq + start, b.topic_seq + b.count))
        none = repeat(None)
        for at in range(start, b.count, size):
            n = min(size, b.count - at)
            # Positional, the loop in map(): per record only the Event itself is built.
            # The first iterable is the part's length: map stops on it before taking
            # from the shared ones (values, seqs), which the next part goes on with.
            yield list(map(Event, repeat("record", n), repeat(b.map), seqs, topic_seqs,
                           repeat(b.time), none, values, none, none, repeat(0), repeat(""),
                           repeat(False), next(dicts) if dicts is not None else none))


def record_events(batch: schema.RecordBatch, frames: list[bytes],
                  formatters: FormatterCache | None = None, start: int = 0) -> RecordEvents:
    """A buffer's batch as :class:`RecordEvents` (nothing per record made yet)."""
    layout = (formatters or FormatterCache()).layout(batch.map.name, batch.layout)
    try:
        records = record_set(batch, frames, layout)
    except MalformedRecords as e:
        raise DaemonError("bad_reply", f"malformed records message: {e}") from None
    return RecordEvents(batch, records, start)


def in_parts(events: list) -> Iterator[list[Event]]:
    """What the stream made of one message, as its batches (none when empty): the
    events as they are, or, when the last is a buffer read's :class:`RecordEvents`, its
    parts, the first with the events before it (a gap's ``lost``, say)."""
    if events and isinstance(events[-1], RecordEvents):
        *before, records = events
        parts = records.parts()
        first = before + next(parts, [])
        if first:
            yield first
        yield from parts
    elif events:
        yield events


def events_from_records(batch: schema.RecordBatch, frames: list[bytes],
                        formatters: FormatterCache | None = None,
                        as_batch: bool = False) -> list[Event]:
    """A buffer's batch as ``record`` events (or one ``records`` event with ``as_batch``)."""
    events = record_events(batch, frames, formatters)
    if as_batch:
        return [Event("records", batch.map, batch.seq, batch.topic_seq, batch.time,
                      records=events.records)]
    return list(events)


def event_from_lost(message: schema.LostRecords) -> Event:
    return Event("lost", message.map, message.seq, message.topic_seq, message.time,
                 missed=message.lost, reason=message.reason)


def events_of(message, frames: list[bytes], formatters: FormatterCache | None = None,
              record_batches: bool = False) -> list[Event]:
    """The events one stream message carries (as replayed by ``recent`` too)."""
    if isinstance(message, schema.EventBatch):
        return events_from_batch(message, frames)
    if isinstance(message, schema.RecordBatch):
        return events_from_records(message, frames, formatters, record_batches)
    if isinstance(message, schema.LostRecords):
        return [event_from_lost(message)]
    if isinstance(message, schema.MapEvent):
        return [event_from_map_event(message)]
    return []


def diff_events(snap: ClientSnapshot, old: dict[bytes, bytes], reason: str) -> list[Event]:
    """What changed from ``old`` to the snapshot, as events marked ``snapshot``."""
    m = snap.map
    ref, now, tseq = MapRef(m.id, m.name), time.time(), snap.seq
    out = []
    for key, value in snap.entries.items():
        before = old.get(key)
        if before is None:
            out.append(Event("added", ref, topic_seq=tseq, time=now, key=key, value=value,
                             reason=reason, snapshot=True, info=m))
        elif before != value:
            out.append(Event("updated", ref, topic_seq=tseq, time=now, key=key, value=value,
                             old_value=before, reason=reason, snapshot=True, info=m))
    for key, value in old.items():
        if key not in snap.entries:
            out.append(Event("removed", ref, topic_seq=tseq, time=now, key=key, value=value,
                             reason=reason, snapshot=True, info=m))
    return out
