"""The watch engine: which maps to poll, polling them, turning dumps into events.

Demand-driven: a map is polled only while someone subscribes to a topic
covering it (learned from the XPUB socket), a snapshot of it was asked for,
the config lists it under ``watch.always``, or it is lingering after its
last subscriber left (so ``pymap events NAME`` still has recent events).

Once per ``watch.interval`` (or when poked: a subscription, a pin) a cycle
walks the host's map ids (one syscall per map, nothing opened) to notice
maps appearing and disappearing, and reads the info of new ids only (every
map's info and pins every ``RECORDS_REFRESH`` seconds, or after a pin); every
wake-up polls the watched maps that are due.  A map recreated under the same
name gets a new id, so it shows as ``map_removed`` of the old id and
``map_created`` of the new one.

With tracepoint discovery (:mod:`.discovery`) the kernel also reports each
creation as it happens, with the map's description read while it was alive:
a cycle runs at once (reading those ids only), and a map that is already gone
by then (it lived a few milliseconds) is still published, as ``map_created``
then ``map_removed``.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import time
from typing import Any

import attrs
import trio

from watcher.kernel.discovery.mapwatch import Created
from watcher.kernel.features.probe import Features
from watcher.kernel.kdelta.objects import Broker
from watcher.kernel.maps import find as kmaps
from watcher.kernel.maps.dump import value_stride
from watcher.kernel.maps.kinds import DumpMethod, dump_method

from ..wire import schema
from ..wire.transport import OutFrames
from . import catalog, errors
from .access import NAMESPACE_BYTES, Policy, View
from .catalog import Catalog, MapGone
from .config import Config
from .delta import Delta, Snapshot, diff, snapshot_as_added
from .discovery import Discovery, DiscoveryStats
from .kdelta import KernelDelta, choose_engine
from .publisher import Stream

log = logging.getLogger("pymap.engine")

RECORDS_REFRESH = 30.0  # seconds between full reads of every map's info and pins
MAX_CREATED = 65536  # creations reported by the kernel and not yet settled by a cycle


@attrs.define(eq=False)
class Watch:
    record: kmaps.MapRecord
    interval: float
    stride: int
    lock: trio.Lock = attrs.Factory(trio.Lock)
    snapshot: Snapshot | None = None
    next_due: float = 0.0
    polls: int = 0
    last_poll_ms: float = 0.0
    max_poll_ms: float = 0.0
    poll_seconds: float = 0.0  # all polls together, for the poll-duration metric
    events: int = 0
    by_action: list[int] = attrs.Factory(lambda: [0, 0, 0])  # added, updated, removed (pymap top)
    reason: str = ""
    unreadable: str = ""  # why the map cannot be read (e.g. created write-only): not polled
    kernel: KernelDelta | None = None  # the in-kernel engine, when chosen (kdelta.py)
    engine: str = ""  # which engine polls it and why (status, debug log)

    def count(self, delta: Delta) -> None:
        """Add a published delta to the event counters (``status``: events, added, ...)."""
        self.events += delta.count
        for action in range(3):  # Action.ADDED, UPDATED, REMOVED: one C-level scan each
            self.by_action[action] += delta.actions.count(action)

    def use_user_space(self, why: str) -> None:
        """The in-kernel walk failed (``why``): user space from now on.  On the loop."""
        if self.kernel is not None:
            self.kernel.close()
        self.kernel, self.engine = None, f"user-space: in-kernel walk failed: {why}"

    @property
    def pollable(self) -> bool:
        return not self.unreadable and dump_method(self.record.type) is not DumpMethod.NONE


Scope = tuple[View | None, bytes]  # (the view a prefix is limited to, or None; the prefix)


class Demand:
    """Topic prefixes that at least one subscriber connection holds.

    The subscription gate (watcher/daemon/subgate.py) reports a topic when a
    connection first takes it and again when it lets go of it or is gone, so
    a prefix is held while some connection holds it; ``prefixes`` counts the
    subscribe requests seen per held prefix, for ``pymap status``.  A prefix in
    a view's namespace (``v<hash>:map:...``, ``views``: the namespaces of the
    access rules in force) covers only the maps that view sees.
    """

    def __init__(self):
        self.prefixes: dict[bytes, int] = {}  # prefix -> subscribe requests seen
        self._holders: dict[bytes, int] = {}  # prefix -> connections holding it
        self.views: dict[bytes, View] = {}  # namespace -> view

    def update(self, message: bytes) -> bool:
        """Apply one subscription change; True if it was a subscribe."""
        if not message or message[0] not in (0, 1):
            return False
        prefix = bytes(message[1:])
        if message[0] == 1:
            self._holders[prefix] = self._holders.get(prefix, 0) + 1
            self.prefixes[prefix] = self.prefixes.get(prefix, 0) + 1
            return True
        left = self._holders.get(prefix, 0) - 1
        if left > 0:
            self._holders[prefix] = left
        else:
            self._holders.pop(prefix, None)
            self.prefixes.pop(prefix, None)
        return False

    def scopes(self) -> tuple[Scope, ...]:
        """Each held prefix as (its view, or None: unrestricted; the prefix within it)."""
        out = []
        for prefix in self.prefixes:
            ns = prefix[:NAMESPACE_BYTES]
            view = self.views.get(ns) if prefix.startswith(b"v") else None
            out.append((view, prefix[len(ns):]) if view is not None else (None, prefix))
        return tuple(out)

    def active_views(self) -> dict[bytes, View]:
        """The views some connection subscribes in: the stream publishes for these."""
        return {ns: view for ns, view in self.views.items()
                if any(p.startswith(ns) for p in self.prefixes)}

    def any_maps(self) -> bool:
        """Could any subscription cover a map topic at all?"""
        prefix = schema.MAP_TOPIC_PREFIX
        return any(p.startswith(prefix) or prefix.startswith(p) for _, p in self.scopes())

    def wants(self, name: str) -> bool:
        return self.covers(self.scopes(), name)

    @staticmethod
    def covers(scopes: tuple[Scope, ...], name: str, record: kmaps.MapRecord | None = None
               ) -> bool:
        topic = schema.map_topic(name)
        return any(topic.startswith(p) and (view is None or (
            view.sees_map(record) if record is not None else view.sees_name(name)))
            for view, p in scopes)


@attrs.frozen
class EngineStatus:
    """The engine's and its stream's counters, for a ``status`` reply."""

    seq: int
    messages_published: int
    events_published: int
    subscriptions: dict[str, int]
    drops_reported: int
    resyncs: int
    poll_errors: int
    watched: list[schema.WatchStatus]
    discovery: str = "poll"  # how map creation is learned: "tracepoint" or "poll"
    # Creations the tracepoint path could not report, by why (the id poll still finds
    # those that live): ring_full, unresolved (no map id), queue_full (MAX_CREATED).
    creations_missed: dict[str, int] = attrs.Factory(dict)
    creations_seen: int = 0  # creations the tracepoint path reported
    # The queue to ZeroMQ (bounded by stream_queue_bytes): bytes in it now, and how
    # often a poll or buffer read waited for room.
    stream_queued_bytes: int = 0
    publish_waits: int = 0
    facilities: list[schema.FacilityStatus] = attrs.Factory(list)  # the host probe's answers


@attrs.frozen
class WatchFigures:
    """One watched map's counters and its last snapshot, for the metrics scrape."""

    record: kmaps.MapRecord
    snapshot: Snapshot | None
    polls: int
    poll_seconds: float
    last_poll_ms: float
    events: int


class Engine:
    """Watches maps and publishes their changes.

    The request server asks it only through the query API at the end of this
    class (:meth:`snapshot`, :meth:`recent`, :meth:`layout_for`,
    :meth:`status`, :meth:`report_gap`), and the metrics scrape through
    :meth:`status` and :meth:`watch_figures`; the host is reached only through
    ``catalog`` (a :class:`~watcher.daemon.catalog.Catalog`, or a test's).
    """

    def __init__(self, config: Config, stream: Stream, features: Features,
                 catalog: Catalog | None = None, discovery: Discovery | None = None,
                 broker: Broker | None = None, views: dict[bytes, View] | None = None):
        self.config = config
        self.features = features  # the daemon's one probe of the host (kernel/features.py)
        self.discovery = discovery
        # map id -> its description from the kernel (None: the id alone), until a cycle
        # settles it: reported through the normal path, or as created-and-gone
        self._created: dict[int, kmaps.MapRecord | None] = {}
        self.created_dropped = 0
        self.catalog = catalog or Catalog(config.daemon.bpffs)
        self.stream = stream
        self.demand = Demand()
        self.watches: dict[int, Watch] = {}
        self._known_ids: set[int] | None = None
        self._cached_records: list[kmaps.MapRecord] = []
        self._records_stale = False
        self._records_due = 0.0  # trio time of the next full read of every map's info
        self._discover_due = 0.0  # trio time of the next id walk
        self._poked = False
        self._holds: dict[str, tuple[float, str]] = {}  # name -> (until, reason)
        self._wake = trio.Event()
        self.poll_errors = 0
        self.drops_reported = 0
        self.resyncs = 0
        self.broker = broker  # makes the in-kernel engine's objects (None: engine off)
        if views:
            self.set_views(views)  # the access rules' restricted views, by namespace

    # --- demand ---

    def on_subscription(self, frames: list[bytes]) -> None:
        """XPUB callback: a subscription changed; re-evaluate soon, greet new subscribers."""
        subscribed = self.demand.update(frames[0])
        self.stream.set_views(self.demand.active_views())
        if subscribed:
            self.heartbeat()
        self.poke()

    def set_views(self, views: dict[bytes, View]) -> None:
        """The access rules' views by namespace (at start and on reload)."""
        self.demand.views = views
        self.stream.set_views(self.demand.active_views())
        self.poke()

    def reconfigure(self, config: Config) -> None:
        """A reloaded config (watcher.daemon.reload): always globs, per-map intervals,
        layouts, the catalog's bpffs and the access rules' views; in effect at once."""
        self.config = config
        self.catalog.reconfigure(config)
        now = trio.current_time()
        for watch in self.watches.values():
            interval = config.watch.interval_for(watch.record.name)
            if interval != watch.interval:
                log.info("%s: polled every %g s (was %g s)", watch.record.name, interval,
                         watch.interval)
                watch.interval = interval
                watch.next_due = min(watch.next_due, now + interval)
        self.set_views(Policy(config.access).views())  # pokes: a cycle now, not at the next tick

    def poke(self) -> None:
        """Run a cycle with discovery now (demand or the host's maps changed)."""
        self._poked = True
        self._wake.set()

    @staticmethod
    def _wanted(records: list[kmaps.MapRecord], scopes: tuple[Scope, ...],
                always: tuple[str, ...]) -> dict[int, str]:
        """Map id -> "subscribed" or "always", for the maps demand or config want.

        A host has thousands of maps: matching each against every subscription and glob
        is a worker thread's job (on copies of the demand), not the loop's.
        """
        wanted = {}
        for record in records:
            if Demand.covers(scopes, record.name, record):
                wanted[record.id] = "subscribed"
            elif any(fnmatch.fnmatchcase(record.name, p) for p in always):
                wanted[record.id] = "always"
        return wanted

    def _why_watched(self, name: str, now: float, wanted: str | None) -> str | None:
        """Why to watch ``name`` (None: not to); ``wanted`` is :meth:`_wanted`'s answer."""
        if wanted == "subscribed":
            self._holds[name] = (now + self.config.watch.linger, "lingering")
            return wanted
        if wanted is not None:
            return wanted
        until, reason = self._holds.get(name, (0.0, ""))
        if until > now:
            return reason
        self._holds.pop(name, None)
        return None

    def watched_topics(self) -> list[str]:
        return sorted({w.record.name for w in self.watches.values()})

    # --- the loop ---

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.discovery is not None:
                nursery.start_soon(self.discovery.follow, self.maps_created, self.maps_changed)
            await self._loop()

    async def _loop(self) -> None:
        while True:
            self._wake = trio.Event()
            started = trio.current_time()
            idle = not (self.watches or self._holds or self.config.always_watched()
                        or self.demand.any_maps())
            try:
                if idle:  # nobody watches anything: not even enumerate
                    self._known_ids = None  # the next cycle is a fresh baseline
                    self.stream.forget_topics_except(set())
                    self._discover_due = started + self.config.watch.interval
                    self._created.clear()
                else:
                    # A wake-up for a watch that is due polls it; the map ids are walked
                    # once per interval or when poked, not at every due watch (with
                    # thousands of maps, the walk and the matching are what cost).
                    discover, self._poked = self._poked or started >= self._discover_due, False
                    await self.cycle(discover, created_only=not discover and bool(self._created))
            except OSError as e:  # enumeration itself failed: log, count, keep going
                self.poll_errors += 1
                log.error("enumerating maps failed: %s", e)
            due = min((w.next_due for w in self.watches.values() if w.pollable),
                      default=self._discover_due)
            tick = max(min(due, self._discover_due) - trio.current_time(), 0.01)
            with trio.move_on_after(tick):
                await self._wake.wait()

    async def _records(self, created: set[int] | None = None) -> list[kmaps.MapRecord]:
        """The host's maps: re-read only what the id set says changed (or to catch pins).

        Map ids are not reused soon, so an id seen before is the same map: when
        the id set changed, only the new ids' info is read (with a walk of the
        pins), and maps whose ids went are dropped.  With tracepoint discovery a
        cycle follows every creation, so reading all maps each time would cost a
        host with thousands of maps a core under churn.  Pins added to or removed
        from known maps are caught by a full read every ``RECORDS_REFRESH``
        seconds, or at once when told (:meth:`maps_changed`: a pin the kernel
        reported, or a return from idle).

        ``created``: ids the kernel reported created, when nothing else is due:
        read just those, without walking every id.
        """
        if created is not None and self._known_ids is not None:
            cached = {r.id for r in self._cached_records}
            if new := created - cached:
                self._cached_records = self._cached_records + await trio.to_thread.run_sync(
                    self.catalog.records, new)
            return self._cached_records
        ids = await trio.to_thread.run_sync(self.catalog.ids)
        if (self._known_ids is None or self._records_stale
                or trio.current_time() >= self._records_due):
            self._records_stale = False
            self._records_due = trio.current_time() + RECORDS_REFRESH
            self._cached_records = await trio.to_thread.run_sync(self.catalog.records)
        elif ids != (cached := {r.id for r in self._cached_records}):
            kept = [r for r in self._cached_records if r.id in ids]
            if new := ids - cached:
                kept += await trio.to_thread.run_sync(self.catalog.records, new)
            self._cached_records = kept
        return self._cached_records

    def maps_changed(self) -> None:
        """Something was pinned, or the id set may have changed unseen: re-read maps now."""
        self._records_stale = True
        self.poke()

    def maps_created(self, created: list[Created]) -> None:
        """The kernel saw maps created (:mod:`.discovery`): run a cycle now.

        Each id is kept until a cycle settles it, so a map gone before the cycle
        looks is still reported.  An id already known was reported by the poll.
        """
        for c in created:
            map_id = c.map_id
            if map_id is None or (self._known_ids is not None and map_id in self._known_ids):
                continue
            if len(self._created) >= MAX_CREATED:
                self.created_dropped += 1  # counted; the poll still sees the live ones
                continue
            self._created[map_id] = c.record
        self._wake.set()  # a cycle now, reading these ids only (cycle's created_only)

    async def cycle(self, discover: bool = True, created_only: bool = False) -> None:
        """Walk the map ids (``discover``) and publish what came and went; poll due watches.

        ``created_only``: instead of the walk, look only at the creations the kernel
        reported (a map gone since is published as created and removed); removals of
        other maps wait for the next walk, one ``watch.interval`` at most.
        """
        if discover:
            self._discover_due = trio.current_time() + self.config.watch.interval
            await self._discover()
        elif created_only:
            await self._discover(created_only=True)
        for watch in list(self.watches.values()):
            if watch.pollable and watch.next_due <= trio.current_time():
                await self.poll(watch)

    async def _discover(self, created_only: bool = False) -> None:
        scopes, always = self.demand.scopes(), tuple(self.config.always_watched())
        # Creations reported before the ids are read: a map among them that the read
        # below does not find is gone.  Later ones wait for the next cycle.
        fresh, self._created = self._created, {}
        noted = self.catalog.own_ids()  # noted before the read: gone if the read lacks them
        records = await self._records(set(fresh) if created_only else None)
        if own := self.catalog.own_ids():  # after the read: every own map the read can hold
            if not created_only:  # forgotten once gone from the host: the set stays small
                self.catalog.forget_own(set(noted - {r.id for r in records}))
            # pymap's own maps (the in-kernel engine's, discovery's) are not the host's
            records = [r for r in records if r.id not in own]
            fresh = {i: r for i, r in fresh.items() if i not in own}
        current = {r.id: r for r in records}
        # Only the new maps need looking at when nothing but creations woke the cycle.
        check = [current[i] for i in fresh if i in current] if created_only else records
        wanted = await trio.to_thread.run_sync(self._wanted, check, scopes, always)
        now = time.monotonic()
        for map_id in [i for i in self.watches if i not in current]:
            gone = self.watches.pop(map_id)
            self.stream.publish_map_event("map_removed", catalog.to_wire(gone.record))
        for record in check:
            watch = self.watches.get(record.id)
            if watch is None and record.id not in wanted and record.name not in self._holds:
                continue  # the many maps nobody wants: nothing more to do on the loop
            reason = self._why_watched(record.name, now, wanted.get(record.id))
            if reason is None:
                if watch is not None:
                    del self.watches[record.id]  # nobody wants it any more
                continue
            if watch is None:
                created = record.id in fresh or (self._known_ids is not None
                                                 and record.id not in self._known_ids)
                watch = self._start(record)
                if created:
                    self.stream.publish_map_event("map_created", catalog.to_wire(record))
                    await self.poll(watch, report_all=True)
            watch.reason = reason
        self._report_gone(fresh, current, scopes, always)
        self._known_ids = set(current)
        if not created_only:
            self._forget(now)

    def _forget(self, now: float) -> None:
        """What is kept per map name goes once nothing wants the name: expired holds (a
        gone map's was never looked at again, and kept the engine from idling), and the
        stream's per-topic state.  Under churn of uniquely named maps both grew for ever."""
        self._holds = {name: hold for name, hold in self._holds.items() if hold[0] > now}
        self.stream.forget_topics_except({w.record.name for w in self.watches.values()}
                                         | set(self._holds))

    def _report_gone(self, fresh: dict[int, kmaps.MapRecord | None],
                     current: dict[int, kmaps.MapRecord], scopes: tuple[Scope, ...],
                     always: tuple[str, ...]) -> None:
        """Maps the kernel saw created that were gone before this cycle read the ids:
        ``map_created`` and ``map_removed`` from the description taken at creation."""
        known = self._known_ids or set()
        for map_id, record in fresh.items():
            if map_id in current or map_id in known:
                continue
            if record is None:
                log.debug("map id %d was created and freed before it could be read", map_id)
                continue
            if self._wanted([record], scopes, always):
                info = catalog.to_wire(record)
                self.stream.publish_map_event("map_created", info)
                self.stream.publish_map_event("map_removed", info)

    def _start(self, record: kmaps.MapRecord) -> Watch:
        watch = Watch(record, self.config.watch.interval_for(record.name),
                      value_stride(record) if dump_method(record.type) is not DumpMethod.NONE else 0)
        self.watches[record.id] = watch
        if watch.pollable:
            in_use = sum(w.kernel.kernel_bytes for w in self.watches.values() if w.kernel)
            watch.kernel, watch.engine = choose_engine(record, watch.stride, self.config.watch,
                                                       in_use, self.features, self.broker)
            log.debug("%s (id %d): %s", record.name, record.id, watch.engine)
        log.info("watching %s (id %d, every %g s)", record.name, record.id, watch.interval,
                 extra={"map": record.name, "map_id": record.id, "interval": watch.interval})
        return watch

    # --- polling ---

    async def poll(self, watch: Watch, report_all: bool = False) -> None:
        """Dump the map and publish what changed since the last poll.

        The first poll of a map only records its state, unless ``report_all``
        (a map created while watched: its entries are new, so they are events).
        """
        if not watch.pollable:
            return
        async with watch.lock:
            watch.next_due = trio.current_time() + watch.interval
            t0 = time.perf_counter()
            when = time.time()
            kernel_delta: Delta | None = None
            try:
                if watch.kernel is not None:
                    # The worker only reads; what the read changes is applied here.
                    snap, kernel_delta, failed = await trio.to_thread.run_sync(
                        self._read_kernel, watch, report_all)
                    if failed:
                        watch.use_user_space(failed)
                else:
                    snap = await trio.to_thread.run_sync(self._read, watch)
            except MapGone:
                return  # the next cycle reports map_removed
            except OSError as e:
                self.poll_errors += 1
                if e.errno in (errno.EPERM, errno.EACCES):
                    # Maps created BPF_F_WRONLY refuse read-only opens: say so once, stop polling.
                    watch.unreadable = str(e)
                    log.error("cannot read %s (id %d): %s; not polling it", watch.record.name,
                              watch.record.id, e)
                    return
                log.error("polling %s (id %d) failed: %s", watch.record.name, watch.record.id, e)
                return
            if watch.kernel is not None:
                watch.snapshot = snap
                if kernel_delta is not None and kernel_delta.count:
                    self.stream.publish_delta(watch.record, snap.key_size, snap.stride,
                                              kernel_delta, when)
                    watch.count(kernel_delta)
            elif watch.snapshot is None and not report_all:
                watch.snapshot = snap
            else:
                prev = watch.snapshot or Snapshot.empty(snap.key_size, snap.stride)
                # Both walk every entry: a worker thread's job, never the loop's.
                delta = await (trio.to_thread.run_sync(snapshot_as_added, snap)
                               if watch.snapshot is None
                               else trio.to_thread.run_sync(diff, prev, snap))
                watch.snapshot = snap
                if delta.count:
                    self.stream.publish_delta(watch.record, snap.key_size, snap.stride,
                                              delta, when)
                    watch.count(delta)
            elapsed = (time.perf_counter() - t0) * 1000
            watch.polls += 1
            watch.last_poll_ms = elapsed
            watch.poll_seconds += elapsed / 1000
            watch.max_poll_ms = max(watch.max_poll_ms, elapsed)
        # The daemon's queue to ZeroMQ is bounded in bytes: no next poll while this
        # one's delta is still queued past the bound (the lock is released: a snapshot
        # request for this map need not wait).
        await self.stream.room()

    def _read_kernel(self, watch: Watch, report_all: bool
                     ) -> tuple[Snapshot, Delta | None, str]:
        """A poll on the in-kernel engine (a worker thread's job: it changes no watch).

        The third item is why the walk failed ("" if it did not): the state was read in
        user space instead, and the caller moves the watch there (:meth:`Watch.use_user_space`).
        """
        assert watch.kernel is not None
        with self.catalog.open_watched(watch.record) as handle:
            try:
                return (*watch.kernel.poll(handle.fd, watch.snapshot, report_all), "")
            except OSError as e:
                log.warning("%s (id %d): in-kernel walk failed, using user space: %s",
                            watch.record.name, watch.record.id, e)
                failed = str(e)
        snap = self._read(watch)
        if watch.snapshot is None:
            return snap, (snapshot_as_added(snap) if report_all else None), failed
        return snap, diff(watch.snapshot, snap), failed

    def _read(self, watch: Watch) -> Snapshot:
        keys, values, count = self.catalog.read_entries(watch.record)
        return Snapshot(keys, values, count, watch.record.key_size, watch.stride)

    def heartbeat(self) -> None:
        self.stream.heartbeat(self.watched_topics(), [w.record for w in self.watches.values()])

    # --- the query API of the request server ---

    def report_gap(self, name: str, missed: int) -> None:
        self.drops_reported += missed
        log.warning("a subscriber of %s missed %d events", name, missed)

    async def snapshot(self, selector: str, reason: str = ""
                       ) -> tuple[kmaps.MapRecord, Snapshot, int]:
        """The watched state of one map and the stream sequence it reflects.

        Starts watching the map (held for ``watch.linger``) if nobody did yet.
        """
        if reason in ("gap", "epoch"):
            self.resyncs += 1
        with await trio.to_thread.run_sync(self.catalog.open_selected, selector) as handle:
            record = handle.record  # the watch reopens the map by id at each poll
        if dump_method(record.type) is DumpMethod.NONE:
            raise errors.MapNotDumpable(f"{record.name} ({record.type}) has no entries to "
                                        "snapshot")
        self._holds[record.name] = (time.monotonic() + max(self.config.watch.linger, 10.0),
                                    "snapshot")
        watch = self.watches.get(record.id)
        if watch is None:
            watch = self._start(record)
            watch.reason = "snapshot"
        if watch.snapshot is None:
            await self.poll(watch)
        async with watch.lock:
            if watch.snapshot is None:
                raise errors.MapVanished(f"{record.name} could not be read")
            return watch.record, watch.snapshot, self.stream.last_topic_seq(record.name)

    def recent(self, pattern: str) -> tuple[list[tuple[Any, OutFrames]], list[str]]:
        """Recent stream messages of the topics ``pattern`` matches, and which of those
        topics are published now (watched maps and event source buffers)."""
        names = {w.record.name for w in self.watches.values()} | self.stream.source_topics
        watched = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
        return self.stream.recent(pattern), watched

    def layout_for(self, info: schema.MapInfo) -> dict | None:
        """The config's declared layout for this map (first [[layouts]] match), if any."""
        return self.config.layout_for([info.name, info.kernel_name], info.pinned)

    def status(self) -> EngineStatus:
        stream = self.stream.stats()
        found = self.discovery.stats() if self.discovery else DiscoveryStats()
        return EngineStatus(
            seq=stream.seq, messages_published=stream.messages_published,
            events_published=stream.events_published,
            # A copy first (one C-level step): the metrics scrape calls this from its thread.
            subscriptions={p.decode(errors="replace"): n
                           for p, n in tuple(self.demand.prefixes.items())},
            drops_reported=self.drops_reported, resyncs=self.resyncs,
            poll_errors=self.poll_errors, watched=self._watch_status(),
            discovery=found.how,
            creations_missed={"ring_full": found.lost, "unresolved": found.unresolved,
                              "queue_full": self.created_dropped},
            creations_seen=found.seen,
            stream_queued_bytes=stream.queued_bytes, publish_waits=stream.publish_waits,
            facilities=[schema.FacilityStatus(f.name, f.title, f.state, f.detail, f.error,
                                              f.degrades, f.fix)
                        for f in self.features.facilities])

    def watch_figures(self) -> list[WatchFigures]:
        """Each watched map's counters and cached snapshot (never a kernel read).

        Safe from another thread (the metrics scrape): it copies the watch table
        first, and a snapshot is never changed once made (a poll makes a new one).
        """
        return [WatchFigures(w.record, w.snapshot, w.polls, w.poll_seconds, w.last_poll_ms,
                             w.events) for w in tuple(self.watches.values())]

    def _watch_status(self) -> list[schema.WatchStatus]:
        return [schema.WatchStatus(
            id=w.record.id, name=w.record.name, type=w.record.type,
            entries=w.snapshot.count if w.snapshot else 0, interval=w.interval, polls=w.polls,
            last_poll_ms=round(w.last_poll_ms, 3), max_poll_ms=round(w.max_poll_ms, 3),
            events=w.events, added=w.by_action[0], updated=w.by_action[1],
            removed=w.by_action[2], state_bytes=w.snapshot.nbytes() if w.snapshot else 0,
            reason=w.reason, engine=w.engine,
            kernel_bytes=w.kernel.kernel_bytes if w.kernel else 0) for w in sorted(self.watches.values(), key=lambda w: w.record.id)]
