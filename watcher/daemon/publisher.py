"""The event stream: sequence numbers, topics, batching, recent events, heartbeats.

Every event gets its place in one daemon-wide sequence (total order across
maps) and in its topic's own sequence, so a subscriber of any subset of
topics can tell a quiet topic from lost events, and count them exactly.  The epoch, random per daemon run,
tells a restarted daemon from a continuing one.  See docs/protocol.md.

Views (``[access]`` rules that restrict what a peer sees) have their own
namespaces on the same socket: a message of a map that a view with
subscribers sees goes out once more, under ``<namespace><topic>``, with the
same frames (no copy); heartbeats once per such view, listing only its
topics.  With no restricted subscriber, nothing more is sent than that.
"""

from __future__ import annotations

import collections
import fnmatch
import time
from collections.abc import Iterable
from typing import Any

from watcher.kernel.maps.find import MapRecord

from ..wire import schema
from ..wire.transport import OutFrames, frames_size
from .access import View
from .config import Config
from .diff import Delta
from .interfaces import Publisher, StreamStats

# What a message is about, for a view's decision: the map (record or MapInfo: its
# names and pins, as list and get decide), or None: its topic name (event sources).
Subject = MapRecord | schema.MapInfo | None

HEADER_ALLOWANCE = 1024  # bytes kept for a batch's JSON header within message_bytes
# Topics forgotten (nobody watches the name, no source) whose last topic_seq is kept, so
# a name that comes back continues where it was: ~150 bytes each.
GONE_TOPICS_MAX = 65536


class PublishedStream:
    """The daemon's side of the event stream (consumers read it as an ``EventStream``):
    numbering, batching, views and the recent ring, over one :class:`~.interfaces.Publisher` (the socket's owner)."""

    def __init__(self, publisher: Publisher, epoch: str, recent_limit: int,
                 batch_events: int, heartbeat_interval: float, message_bytes: int = 256 << 10,
                 recent_bytes: int = 4 << 20):
        self.publisher = publisher
        self.message_bytes = message_bytes  # bytes per message at most (docs/operations.md)
        self.epoch = epoch
        self.recent_limit = recent_limit
        self.recent_bytes = recent_bytes  # the ring's bytes per topic at most (the last message stays)
        self.batch_events = batch_events
        self.heartbeat_interval = heartbeat_interval
        self.seq = 0
        self.topic_seq: dict[str, int] = {}  # topic name -> last topic_seq published on it
        # Forgotten topics' last topic_seq, oldest first; past GONE_TOPICS_MAX the oldest
        # go and the floor rises to theirs: any topic not known starts above the floor,
        # so a topic_seq never goes back within an epoch (a subscriber would drop it).
        self._gone: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._topic_floor = 0
        self.events_published = 0
        self.messages_published = 0
        # topic name -> recent (header, frames) messages, bounded by total events
        self._recent: dict[str, collections.deque[tuple[Any, OutFrames]]] = {}
        self._recent_counts: dict[str, int] = {}
        self._recent_sizes: dict[str, int] = {}  # topic name -> bytes of frames in its ring
        # Topics always listed in heartbeats (event source buffers), watched or not.
        self.source_topics: set[str] = set()
        # Namespace -> view, for the views some connection subscribes in (the engine's
        # demand decides, through set_views): each is sent the messages of the maps it sees.
        self.views: dict[bytes, View] = {}

    def set_views(self, views: dict[bytes, View]) -> None:
        """The views some connection subscribes in now, by namespace."""
        self.views = views

    def add_source_topics(self, names: Iterable[str]) -> None:
        """Event source buffers: listed in every heartbeat, watched or not, never forgotten."""
        self.source_topics.update(names)

    def stats(self) -> StreamStats:
        """Its figures (ints: safe from the metrics scrape's thread)."""
        return StreamStats(self.seq, self.messages_published, self.events_published,
                           self.publisher.outbox_bytes, self.publisher.waits)

    def reconfigure(self, config: Config) -> None:
        """A reloaded config (watcher.daemon.reload): the recent ring's, batches' and
        heartbeats' limits.  The byte bound of a message is sized once, with the sockets."""
        daemon = config.daemon
        self.recent_limit = daemon.recent_events
        self.recent_bytes = daemon.recent_bytes
        self.batch_events = daemon.batch_events
        self.heartbeat_interval = daemon.heartbeat_interval

    def last_topic_seq(self, name: str) -> int:
        """The last topic_seq published on ``name`` (for a forgotten name, at least that)."""
        tseq = self.topic_seq.get(name)
        return tseq if tseq is not None else self._gone.get(name, self._topic_floor)

    def _take_topic_seqs(self, name: str, count: int) -> int:
        """Reserve ``count`` topic sequence numbers of ``name``; the first of them."""
        first = self.last_topic_seq(name) + 1
        self.topic_seq[name] = first + count - 1
        self._gone.pop(name, None)
        return first

    def forget_topics_except(self, keep: set[str]) -> None:
        """Drop the per-topic state (recent ring, topic_seq) of every topic not in ``keep``
        nor an event source: under churn of uniquely named maps it grew ~2.5 KB per name,
        for ever.  Their last topic_seq moves to the bounded ``_gone`` table."""
        keep = keep | self.source_topics
        for name in [n for n in self.topic_seq if n not in keep]:
            self._gone[name] = self.topic_seq.pop(name)
        for name in [n for n in self._recent if n not in keep]:
            del self._recent[name]
            self._recent_counts.pop(name, None)
            self._recent_sizes.pop(name, None)
        while len(self._gone) > GONE_TOPICS_MAX:
            self._topic_floor = max(self._topic_floor, self._gone.popitem(last=False)[1])

    async def room(self) -> None:
        """Wait while the queue to ZeroMQ is over its byte bound (producers call this)."""
        await self.publisher.room()

    def namespaces(self, name: str, subject: Subject) -> list[bytes]:
        """The namespaces of the subscribed views that see this map."""
        if not self.views:
            return []
        return [ns for ns, view in self.views.items()
                if (view.sees_map(subject) if subject is not None else view.sees_name(name))]

    def _send(self, name: str, header, frames: OutFrames, events: int,
              namespaces: list[bytes]) -> None:
        topic, head = schema.map_topic(name), schema.encode(header)
        self.publisher.publish([topic, head, *frames])
        for ns in namespaces:
            self.publisher.publish([ns + topic, head, *frames])
        self.messages_published += 1
        self.events_published += events
        self._remember(name, header, frames, max(events, 1))

    def _remember(self, name: str, header, frames: OutFrames, weight: int) -> None:
        if self.recent_limit <= 0:
            return
        ring = self._recent.setdefault(name, collections.deque())
        ring.append((header, frames))
        self._recent_counts[name] = self._recent_counts.get(name, 0) + weight
        self._recent_sizes[name] = self._recent_sizes.get(name, 0) + frames_size(frames)
        while (self._recent_counts[name] > self.recent_limit
               or self._recent_sizes[name] > self.recent_bytes) and len(ring) > 1:
            old, old_frames = ring.popleft()
            self._recent_counts[name] -= max(getattr(old, "count", 1), 1)
            self._recent_sizes[name] -= frames_size(old_frames)

    def publish_delta(self, record: MapRecord, key_size: int, stride: int, delta: Delta,
                      when: float) -> None:
        """Publish ``delta`` as one or more batches of at most ``batch_events`` events."""
        name = record.name
        ref = schema.MapRef(record.id, name)
        step = self.batch_step(key_size, stride)
        # Views, not copies: slicing a million events' buffers would hold the loop, and
        # ZeroMQ sends from a buffer without copying it.  A delta is never changed after.
        actions, keys, values, old_values = (memoryview(b) for b in (
            delta.actions, delta.keys, delta.values, delta.old_values))
        namespaces = self.namespaces(name, record)
        for start in range(0, delta.count, step):
            n = min(step, delta.count - start)
            header = schema.EventBatch(
                epoch=self.epoch, seq=self.seq + 1, count=n,
                topic_seq=self._take_topic_seqs(name, n),
                time=when, map=ref, key_size=key_size, value_stride=stride)
            self.seq += n
            ks, vs = start * key_size, start * stride
            frames: OutFrames = [actions[start:start + n], keys[ks:ks + n * key_size],
                      values[vs:vs + n * stride], old_values[vs:vs + n * stride]]
            self._send(name, header, frames, n, namespaces)
        self._own_recent(name)

    def _own_recent(self, name: str) -> None:
        """Copy the views the recent ring kept: a view would keep the whole delta alive.

        Only the last ``recent_limit`` events survive in the ring, so this copy is small.
        """
        ring = self._recent.get(name) or collections.deque()
        for i in range(len(ring)):
            header, frames = ring[i]
            if any(isinstance(f, memoryview) for f in frames):
                ring[i] = (header, [bytes(f) for f in frames])

    def batch_step(self, key_size: int, stride: int) -> int:
        """Events per batch: ``batch_events``, fewer if their frames would pass ``message_bytes``.

        An event costs an action byte, a key, a value and an old value; the
        header (under 1 KiB) is allowed for.  One event always goes, whatever its size.
        """
        per_event = 1 + key_size + 2 * stride
        return max(1, min(self.batch_events, (self.message_bytes - HEADER_ALLOWANCE) // per_event))

    def publish_map_event(self, action: str, info: schema.MapInfo, when: float | None = None) -> None:
        self.seq += 1
        header = schema.MapEvent(epoch=self.epoch, seq=self.seq,
                                 topic_seq=self._take_topic_seqs(info.name, 1),
                                 time=time.time() if when is None else when,
                                 action=action, map=info)
        self._send(info.name, header, [], 1, self.namespaces(info.name, info))

    def publish_records(self, name: str, map_id: int, count: int, lengths: bytes, data: bytes,
                        layout: dict | None, when: float) -> None:
        """One read of a buffer: ``count`` records as a lengths frame and a data frame."""
        header = schema.RecordBatch(
            epoch=self.epoch, seq=self.seq + 1, count=count,
            topic_seq=self._take_topic_seqs(name, count), time=when,
            map=schema.MapRef(map_id, name), layout=layout)
        self.seq += count
        self._send(name, header, [lengths, data], count, self.namespaces(name, None))

    def publish_lost(self, name: str, map_id: int, lost: int, reason: str, when: float) -> None:
        """Records of buffer ``name`` that never reached pymap; takes one sequence number."""
        self.seq += 1
        header = schema.LostRecords(epoch=self.epoch, seq=self.seq,
                                    topic_seq=self._take_topic_seqs(name, 1), time=when,
                                    map=schema.MapRef(map_id, name), lost=lost, reason=reason)
        self._send(name, header, [], 1, self.namespaces(name, None))

    def heartbeat(self, watched_topics: list[str], watched: Iterable[MapRecord] = ()) -> None:
        """One heartbeat for everyone, and one per subscribed view listing only its topics.

        ``watched``: the watched maps (records), so a view decides on a map's pins
        as well as its name; without them, on the names in ``watched_topics``.
        """
        now = time.time()

        def beat(names: Iterable[str]) -> bytes:
            return schema.encode(schema.Heartbeat(
                epoch=self.epoch, seq=self.seq, time=now, interval=self.heartbeat_interval,
                topics={name: self.last_topic_seq(name) for name in names}))

        self.publisher.publish([schema.HEARTBEAT_TOPIC,
                                beat((*watched_topics, *self.source_topics))])
        if not self.views:
            return
        records = list(watched)
        for ns, view in self.views.items():
            names = ({r.name for r in records if view.sees_map(r)} if records
                     else {n for n in watched_topics if view.sees_name(n)})
            names |= {n for n in self.source_topics if view.sees_name(n)}
            self.publisher.publish([ns + schema.HEARTBEAT_TOPIC, beat(sorted(names))])

    def recent(self, pattern: str) -> list[tuple[Any, OutFrames]]:
        """Recent messages of every topic whose name matches ``pattern``, in sequence order."""
        found: list[tuple[Any, OutFrames]] = []
        for name, ring in self._recent.items():
            if fnmatch.fnmatchcase(name, pattern):
                found.extend(ring)
        found.sort(key=lambda item: item[0].seq)
        return found
