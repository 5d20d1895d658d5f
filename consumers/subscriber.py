"""Following the daemon's event stream, with snapshot sync and gap handling built in.

The Clone pattern (zguide ch. 5): subscribe first, wait for a heartbeat (it
proves the subscription is live), then ask for a snapshot of each map with
the topic sequence it reflects, and apply only stream events past it.

What can go wrong, and what the stream yields then:
- A gap (``topic_seq`` jumps, or a heartbeat shows a later ``topic_seq``
  than the last event seen): a ``lost`` event with the exact count, which is
  also reported to the daemon; with ``snapshot=True`` the map is then
  re-snapshotted and the differences come as corrective events after a
  ``resync`` event.
- A restarted daemon (new epoch): a ``resync`` event; with ``snapshot=True``
  every map is re-snapshotted the same way.
- A silent daemon (no heartbeat for ``heartbeat_timeout``): the stream holds
  on like ``tail -F`` (``hold_on``, the default): a ``stalled`` event, then
  it waits, ZeroMQ reconnecting underneath, until the daemon speaks again
  (a ``resumed`` event, followed by ``lost``/``resync`` for what was
  missed) or ``max_wait`` seconds have passed (DaemonUnavailable).  With
  ``hold_on=False`` the first silence raises DaemonUnavailable.
- A stopped subscriber (SIGSTOP, a suspended laptop) is not a silent
  daemon: a timer that fires far too late means this process did not run,
  so it looks again before declaring a stall, and what the daemon dropped
  meanwhile shows as ``lost`` as usual.

This module is the I/O half: sockets, waiting and the hold-on state machine.
What a message means (:mod:`consumers.events`) and whether it is in order
(:mod:`consumers.gaps`) are decided without sockets, where they can be
tested with plain values; a consumer that knows a better start than a full
snapshot passes a start policy (:mod:`consumers.startpolicy`).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, ClassVar

import trio
import zmq

from watcher.wire import schema
from watcher.wire.schema import MapRef
from watcher.wire.transport import recv_multipart

from . import endpoint, snapshot
from .errors import DaemonError, DaemonUnavailable
from .events import (
    ACTIONS,
    EntryBatch,
    Event,
    check_batch,
    diff_events,
    events_of,
    in_parts,
    record_events,
)
from .gaps import Gap, SequenceTracker
from .recordsets import FormatterCache
from .selection import Selection
from .startpolicy import StartContext, StartPolicy

if TYPE_CHECKING:
    from .client import Client

__all__ = ["EventStream", "snapshot_events"]

FIRST_BEAT_TIMEOUT = 10.0  # seconds to wait for the first heartbeat, before the interval is known
LATE = 1.0  # a timer this late (s) means this process was stopped or starved, not the daemon


RECHECK_MAX = 60.0  # seconds between namespace checks during a long stall at most


class EventStream:
    """``async with client.events([...]) as stream: async for event in stream: ...``

    or a batch at a time (the fast way through a buffer's records, see batches()),
    ``async for batch in stream.batches(): for event in batch: ...``.

    ``snapshot``: start with every entry as ``added`` and resync after gaps and
    restarts, so replaying the events gives the map's state.  ``heartbeat_timeout``:
    seconds of silence that mean the daemon is gone (default ``3 × interval + 2``).
    ``hold_on`` (default) and ``max_wait``: what a silent daemon means, see the
    module docstring.  ``record_batches``: buffers as one ``records`` event per batch.
    ``entry_batches``: each map events message as one :class:`EntryBatch` instead of
    one ``Event`` per entry change (accounting, gaps and snapshot state unchanged).
    ``snapshot_rows=False`` (snapshot mode): snapshots update :meth:`entries` without
    yielding their rows (or, after a gap or restart, their differences) as events,
    for consumers that read the state itself (``pymap top``: a 1,000,000-entry map's
    rows as events cost seconds); the ``resync`` event still says one happened, and
    :attr:`reading` tells how far a snapshot under way has got.
    ``start_policy`` (snapshot mode): replaces the start's snapshot of every map, once
    (consumers.startpolicy; the exporter resumes from its checkpoint with one).
    """

    def __init__(self, client: Client, selectors: list[str], snapshot: bool = False,
                 heartbeat_timeout: float | None = None, record_batches: bool = False,
                 hold_on: bool = True, max_wait: float | None = None,
                 entry_batches: bool = False, snapshot_rows: bool = True,
                 start_policy: StartPolicy | None = None):
        if max_wait is not None and max_wait < 0:
            raise ValueError("max_wait must be >= 0 seconds (None: wait for ever)")
        self.client = client
        self.selection = Selection(selectors)
        self.snapshot = snapshot
        self.record_batches = record_batches  # one "records" event per buffer batch
        self.entry_batches = entry_batches  # an EntryBatch per map events message
        self.snapshot_rows = snapshot_rows  # snapshots' rows yielded as events
        self.reading: tuple[str, int] | None = None  # a snapshot under way: (map, entries read)
        self._formatters = FormatterCache()
        self.heartbeat_timeout = heartbeat_timeout
        self.hold_on = hold_on  # wait through a silent daemon instead of raising
        self.max_wait = max_wait  # seconds to wait once stalled (None: for ever)
        self.lost = 0  # events missed so far (all maps)
        self.resyncs = 0
        self._seqs = SequenceTracker(self.selection.matches)
        self._start_policy = start_policy  # used once, for the first start attempt
        self._first_topics: dict[str, int] = {}  # the first heartbeat's topic_seq per map
        self._state: dict[str, dict[bytes, bytes]] = {}  # snapshot mode: name -> entries
        self._silence = heartbeat_timeout or FIRST_BEAT_TIMEOUT  # seconds that mean "gone"
        self._heard = 0.0  # trio time of the last message
        self._stalled = False
        self._pending: list[bytes] | None = None  # frames that ended a stall, not yet handled
        self._retry: str | None = None  # a resync that failed: redo it (its reason) when heard
        self._sub: zmq.Socket | None = None
        self._namespace: bytes | None = None  # the stream_prefix subscribed with

    # ZeroMQ options of the SUB socket: a deep receive queue, so a subscriber that is
    # briefly busy loses nothing (tests shrink it to provoke gaps).
    SOCKET_OPTIONS: ClassVar[dict[int, int]] = {zmq.RCVHWM: 100000}

    async def __aenter__(self) -> EventStream:
        pong = await self.client.ping()
        events = self.client.events_endpoint or endpoint.events_seen_from_here(
            self.client.endpoint, pong.events_endpoint)
        self._sub = endpoint.connect(zmq.SUB, events, self.SOCKET_OPTIONS)
        self._subscribe(pong.stream_prefix.encode())
        return self

    def _topics(self) -> list[bytes]:
        # hb last: a heartbeat then proves the map subscriptions reached the daemon too.
        return [*self.selection.subscriptions(), schema.HEARTBEAT_TOPIC]

    def _subscribe(self, namespace: bytes) -> None:
        """Subscribe in ``namespace``: a peer that access rules restrict subscribes inside
        its view's (the daemon applies nothing else of it, and publishes its maps there)."""
        assert self._sub is not None
        if namespace == self._namespace:
            return
        if self._namespace is not None:
            for topic in self._topics():
                self._sub.setsockopt(zmq.UNSUBSCRIBE, self._namespace + topic)
        self._namespace = namespace
        for topic in self._topics():
            self._sub.setsockopt(zmq.SUBSCRIBE, namespace + topic)

    async def _recheck_namespace(self, deadline: float) -> None:
        """Ask the daemon for this client's namespace again, during a stall.

        A reload that changes this client's view cuts its connection; the SUB
        reconnects with the old namespace's subscriptions, which the daemon no
        longer applies, so the stream stays silent until the client subscribes
        in the new one.  A daemon that does not answer is simply still gone.
        """
        with trio.move_on_at(deadline):
            try:
                pong = await self.client.ping()
            except DaemonError:
                return
            self._subscribe(pong.stream_prefix.encode())

    async def __aexit__(self, *exc) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
        self._sub = None

    @property
    def epoch(self) -> str | None:
        """The daemon's epoch the stream is in (None before the first heartbeat)."""
        return self._seqs.epoch

    def entries(self, name: str) -> dict[bytes, bytes]:
        """Map ``name``'s entries as the events so far make them (snapshot mode; empty
        before its snapshot).  Read-only: the stream applies every event to it."""
        return self._state.get(name, {})

    def has_state(self, name: str) -> bool:
        """Whether map ``name``'s snapshot is in (snapshot mode): :meth:`entries` holds it."""
        return name in self._state

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    def batches(self) -> AsyncIterator[list[Event]]:
        """The stream a message at a time: ``async for batch in stream.batches()``.

        Each batch is a non-empty list of events, exactly those ``async for event in
        stream`` yields, in order, grouped by the message that brought them: a notice
        (``stalled``, ``resync``...), a map's events message, or a part of a buffer
        read, whose records come at most 256 to a batch, each part made when asked
        (consumers.events.RecordEvents says why).  Why batches: an ``async for`` step
        costs about as much as building the ``Event`` itself, so a consumer of a million
        records a second loops over a batch with a plain ``for`` (docs/sources.md).
        One stream is iterated one way: events or batches, not both.
        """
        return self._batches()

    async def _events(self) -> AsyncIterator[Event]:
        async with aclosing(self._batches()) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    # --- receiving ---

    async def _recv_within(self, seconds: float):
        """The next message within ``seconds`` of silence, or None.

        A timer that fires more than LATE after its deadline means this
        process was not running (SIGSTOP, starved), not that the daemon was
        silent: wait again, since the daemon's messages are likely queued.
        """
        assert self._sub is not None
        while True:
            deadline = trio.current_time() + seconds
            with trio.move_on_at(deadline):
                frames = await recv_multipart(self._sub)
                self._heard = trio.current_time()
                return frames
            if trio.current_time() - deadline < LATE:
                return None

    async def _next_item(self) -> tuple[object, list[bytes]] | Event:
        """The next stream message as (message, frames), or a ``stalled`` or
        ``resumed`` event about the daemon itself."""
        if self._pending is not None:  # the message that ended a stall
            frames, self._pending = self._pending, None
            return self._decode(frames)
        if self._stalled:
            since = self._heard
            after = await self._await_daemon()
            if after is None:
                raise DaemonUnavailable(
                    f"no heartbeat from the pymap daemon for {trio.current_time() - since:.0f} s; "
                    f"gave up after waiting {self.max_wait:g} s for it to come back")
            self._stalled = False
            self._pending = after
            return Event("resumed", MapRef(0, ""), time=time.time(),
                         reason=f"after {self._heard - since:.0f} s of silence")
        frames = await self._recv_within(self._silence)
        if frames is None:
            silent = f"no heartbeat from the pymap daemon for {self._silence:g} s"
            if not self.hold_on or self.max_wait == 0:
                raise DaemonUnavailable(f"{silent} (is it still running?)")
            self._stalled = True
            return Event("stalled", MapRef(0, ""), time=time.time(), reason=silent)
        return self._decode(frames)

    async def _await_daemon(self) -> list[bytes] | None:
        """The first message after a stall, or None once ``max_wait`` has passed.

        Meanwhile the namespace is asked for again after one silence period, then
        at doubling intervals (at most a minute apart): a daemon that is down
        finds few pings queued for it when it comes back.
        """
        deadline = math.inf if self.max_wait is None else trio.current_time() + self.max_wait
        wait = self._silence
        while True:
            frames = await self._recv_within(max(min(wait, deadline - trio.current_time()), 0.0))
            if frames is not None or trio.current_time() >= deadline:
                return frames
            await self._recheck_namespace(deadline)
            wait = min(wait * 2, RECHECK_MAX)

    @staticmethod
    def _decode(frames: list[bytes]) -> tuple[object, list[bytes]]:
        if len(frames) < 2:
            raise DaemonError("bad_reply", "stream message without a header")
        try:
            return schema.decode(frames[1]), frames[2:]
        except schema.WireError as e:
            raise DaemonError("bad_reply", f"daemon sent {e}") from None

    async def _batches(self) -> AsyncGenerator[list[Event], None]:
        # Until the first heartbeat, the subscription may not be live yet.
        queued: list[tuple[object, list[bytes]]] = []
        while True:
            item = await self._next_item()
            if isinstance(item, Event):
                yield [item]
            elif isinstance(item[0], schema.Heartbeat):
                beat = item[0]
                break
            else:
                queued.append(item)
        self._seqs.new_epoch(beat.epoch)
        self._first_topics = dict(beat.topics)
        self._heartbeat(beat)
        if self.snapshot:
            for batch in in_parts(await self._guarded(self._start)):
                yield batch
        else:
            self._seqs.baseline(beat.topics)
        while True:
            item = queued.pop(0) if queued else await self._next_item()
            if isinstance(item, Event):
                yield [item]
                continue
            if self._retry is not None:  # the daemon is heard again: redo what it left undone
                for batch in in_parts(await self._guarded(self._snapshot_all, self._retry)):
                    yield batch
                if self._retry is not None:
                    continue  # still unanswered; the snapshot that succeeds covers this message
            for batch in in_parts(await self._guarded(self._handle, *item)):
                yield batch

    def _heartbeat(self, beat: schema.Heartbeat) -> None:
        self._silence = self.heartbeat_timeout or 3 * beat.interval + 2.0

    async def _guarded(self, step, *args) -> list[Event]:
        """Run a step that may ask the daemon; with hold_on, a daemon that does not
        answer is a stall, and a snapshot it interrupted is redone once it is heard."""
        try:
            return await step(*args)
        except DaemonUnavailable as e:
            if not self.hold_on:
                raise
            self._stalled = True  # wait for the daemon to speak again before retrying
            return [Event("stalled", MapRef(0, ""), time=time.time(), reason=str(e))]

    # --- applying ---

    async def _handle(self, message, frames: list[bytes]) -> list[Event]:
        out: list[Event] = []
        epoch = getattr(message, "epoch", None)
        if epoch is not None and self._seqs.new_epoch(epoch):
            out += await self._epoch_changed()
        if isinstance(message, schema.Heartbeat):
            self._heartbeat(message)
            for missed in self._seqs.heartbeat(message.topics):
                out += await self._gap(missed, MapRef(0, missed.name))
            return out
        if isinstance(message, (schema.EventBatch, schema.RecordBatch)):
            name, first, count = message.map.name, message.topic_seq, message.count
        elif isinstance(message, (schema.MapEvent, schema.LostRecords)):
            name, first, count = message.map.name, message.topic_seq, 1
        else:
            return out
        if not self._seqs.tracks(name):
            return out
        gap = self._seqs.gap_before(name, first)
        if gap is not None:
            out += await self._gap(gap, message.map if isinstance(message.map, MapRef)
                                   else MapRef(message.map.id, name))
        start = self._seqs.take(name, first, count)
        if start is None:
            return out  # already reflected in a snapshot
        if self.entry_batches and isinstance(message, schema.EventBatch):
            check_batch(message, frames)
            view = EntryBatch(message, frames, start)
            if self.snapshot:
                self._apply_batch(name, view)
            return [*out, view]  # type: ignore[list-item]  # entry_batches consumers expect it
        if isinstance(message, schema.RecordBatch) and not self.record_batches:
            if self.snapshot:
                self._state.setdefault(name, {})  # as _apply: records change no entries
            records = record_events(message, frames, self._formatters, start)
            return [*out, records]  # type: ignore[list-item]  # parts for _batches
        events = events_of(message, frames, self._formatters, self.record_batches)
        if start and not (self.record_batches and isinstance(message, schema.RecordBatch)):
            events = [e for e in events if e.topic_seq >= first + start]
        if self.snapshot:
            self._apply(name, events)
        if out:
            out += events
            return out
        return events  # a fresh list: a buffer's thousands of events are not copied again

    def _apply_batch(self, name: str, view: EntryBatch) -> None:
        """A message into the map's state.  One that removes nothing (the common case)
        goes in with one ``dict.update`` of C-level slices, no Python per event; else
        event by event, in order (a key added and removed in one message ends removed)."""
        state = self._state.setdefault(name, {})
        actions, keys, values, _ = view.frames
        ks, vs = view.message.key_size, view.message.value_stride
        start, end = view.start, view.message.count
        removed = ACTIONS.index("removed")
        if ks and vs and actions.find(removed, start, end) < 0:
            state.update(zip(
                map(keys.__getitem__, map(slice, range(start * ks, end * ks, ks),
                                          range((start + 1) * ks, (end + 1) * ks, ks))),
                map(values.__getitem__, map(slice, range(start * vs, end * vs, vs),
                                            range((start + 1) * vs, (end + 1) * vs, vs)))))
            return
        for i in range(start, end):  # per event: slices, no objects
            if actions[i] == removed:
                state.pop(keys[i * ks:(i + 1) * ks], None)
            else:
                state[keys[i * ks:(i + 1) * ks]] = values[i * vs:(i + 1) * vs]

    def _apply(self, name: str, events: list[Event]) -> None:
        state = self._state.setdefault(name, {})
        for e in events:
            if e.action in ("added", "updated") and e.key is not None and e.value is not None:
                state[e.key] = e.value
            elif e.action == "removed" and e.key is not None:
                state.pop(e.key, None)
            elif e.action in ("map_created", "map_removed"):
                state.clear()

    async def _gap(self, gap: Gap, ref: MapRef) -> list[Event]:
        name, missed = gap.name, gap.missed
        self.lost += missed
        out = [Event("lost", ref, topic_seq=gap.first, time=time.time(), missed=missed)]
        try:
            await self.client.report_gap(name, missed)
        except DaemonError:
            pass  # the report is a courtesy; the subscriber has already been told
        if self.snapshot:
            self._retry = self._retry or "gap"
            out += await self._resync(name, "gap")
            self._retry = None
            if name not in self._state:  # nothing to resync against (a buffer): carry on
                self._seqs.forget(name)
        else:
            # Nothing to resync against: carry on from where the stream is now.
            self._seqs.forget(name)
        return out

    async def _epoch_changed(self) -> list[Event]:
        self.resyncs += 1
        out = [Event("resync", MapRef(0, ""), time=time.time(), reason="epoch")]
        if self.snapshot:
            out += await self._snapshot_all(reason="epoch", announce=False)
        return out

    async def _start(self) -> list[Event]:
        """The snapshot-mode start: the start policy's, or every map read afresh."""
        if self._start_policy is None:
            return await self._snapshot_all("start")
        policy, self._start_policy = self._start_policy, None  # once: a retry is ordinary
        self._retry = "start"  # until it completes: redone if the daemon does not answer
        out = await policy.start(StartContext(
            self.client, self.selection, self.epoch, self._first_topics, self._formatters,
            resync=self._resync, snapshot_all=self._snapshot_all,
            reflected=self._seqs.resynced, last=self._seqs.last,
            count_resync=self._count_resync))
        self._retry = None
        return out

    def _count_resync(self) -> None:
        self.resyncs += 1

    async def _snapshot_all(self, reason: str, announce: bool = True) -> list[Event]:
        self._retry = reason  # until it completes: redone if the daemon does not answer
        out: list[Event] = []
        for name in await snapshot.map_names(self.client, self.selection):
            out += await self._resync(name, reason, announce=announce)
        self._retry = None
        return out

    async def _resync(self, name: str, reason: str, announce: bool = True) -> list[Event]:
        """Re-read one map's state; return the differences as events."""
        def progress(count: int) -> None:
            self.reading = (name, count)

        try:
            snap = await snapshot.read(self.client, name, reason, progress)
        finally:
            self.reading = None
        if snap is None:
            return []
        if reason not in ("start", "epoch"):
            self.resyncs += 1
        old = self._state.get(name, {})
        out = [] if reason == "start" or not announce else [
            Event("resync", MapRef(snap.map.id, snap.map.name), topic_seq=snap.seq,
                  time=time.time(), reason=reason)]
        if self.snapshot_rows:
            out += diff_events(snap, old, reason)
        self._state[name] = snap.entries
        self._seqs.resynced(name, snap.seq)
        return out


async def snapshot_events(client: Client, selectors: list[str]) -> list[Event]:
    """Every current entry of the selected maps as ``added`` events, without a stream."""
    out: list[Event] = []
    for name in await snapshot.map_names(client, Selection(selectors)):
        snap = await snapshot.read(client, name, "start")
        if snap is not None:
            out += diff_events(snap, {}, "start")
    return out
