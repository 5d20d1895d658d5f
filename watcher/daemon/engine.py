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

The engine is the loop that ties the parts together and answers the request
server; each part lives in its own module: who wants which maps (:mod:`.demand`),
the host's map list and the creations to settle (:mod:`.inventory`), and what a
poll of one map does (:mod:`.polling`).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from watcher.kernel.discovery.mapwatch import Created
from watcher.kernel.features.probe import Features
from watcher.kernel.maps import find as kmaps
from watcher.kernel.maps.dump import value_stride
from watcher.kernel.maps.kinds import DumpMethod, dump_method

from ..wire import schema
from ..wire.transport import OutFrames
from . import catalog, errors
from .access import Policy, View
from .catalog import HostCatalog
from .config import Config
from .demand import Demand, Holds, wanted
from .diff import EngineSnapshot, choose_engine
from .discovery import Discovery, DiscoveryStats
from .interfaces import Catalog, Stream
from .inventory import Inventory
from .polling import Poller, Watch

if TYPE_CHECKING:  # the in-kernel engine's objects are loaded only when it runs
    from watcher.kernel.kdelta.objects import Broker

log = logging.getLogger("pymap.engine")

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
    snapshot: EngineSnapshot | None
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
    ``catalog`` (a :class:`~watcher.daemon.interfaces.Catalog`: the host's, or a test's).
    """

    def __init__(self, config: Config, stream: Stream, features: Features,
                 catalog: Catalog | None = None, discovery: Discovery | None = None,
                 broker: Broker | None = None, views: dict[bytes, View] | None = None):
        self.config = config
        self.features = features  # the daemon's one probe of the host (kernel/features.py)
        self.discovery = discovery
        self.catalog: Catalog = catalog or HostCatalog(config.daemon.bpffs)
        self.stream = stream
        self.demand = Demand()
        self.holds = Holds()
        self.inventory = Inventory(self.catalog, wake=self._wake_up, poke=self.poke)
        self.poller = Poller(self.catalog, stream)
        self.watches: dict[int, Watch] = {}
        self._discover_due = 0.0  # trio time of the next id walk
        self._poked = False
        self._wake = trio.Event()
        self.enumeration_errors = 0  # failed walks of the host's maps (status: poll_errors)
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
        self.demand.set_views(views)
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

    def _wake_up(self) -> None:
        """Run a cycle now, without a walk of every id unless one is due."""
        self._wake.set()

    def watched_topics(self) -> list[str]:
        return sorted({w.record.name for w in self.watches.values()})

    # --- the loop ---

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.discovery is not None:
                nursery.start_soon(self.discovery.follow, self.maps_created, self.maps_changed)
            await self._loop()

    def maps_created(self, created: list[Created]) -> None:
        """The kernel saw maps created (:mod:`.discovery`): settled by a cycle now."""
        self.inventory.maps_created(created)

    def maps_changed(self) -> None:
        """Something was pinned, or the id set may have changed unseen: re-read maps now."""
        self.inventory.maps_changed()

    async def _loop(self) -> None:
        while True:
            self._wake = trio.Event()
            started = trio.current_time()
            idle = not (self.watches or self.holds or self.config.always_watched()
                        or self.demand.any_maps())
            try:
                if idle:  # nobody watches anything: not even enumerate
                    self.inventory.forget()  # the next cycle is a fresh baseline
                    self.stream.forget_topics_except(set())
                    self._discover_due = started + self.config.watch.interval
                else:
                    # A wake-up for a watch that is due polls it; the map ids are walked
                    # once per interval or when poked, not at every due watch (with
                    # thousands of maps, the walk and the matching are what cost).
                    discover, self._poked = self._poked or started >= self._discover_due, False
                    await self.cycle(discover, created_only=not discover
                                     and self.inventory.has_created())
            except OSError as e:  # enumeration itself failed: log, count, keep going
                self.enumeration_errors += 1
                log.error("enumerating maps failed: %s", e)
            due = min((w.next_due for w in self.watches.values() if w.pollable),
                      default=self._discover_due)
            tick = max(min(due, self._discover_due) - trio.current_time(), 0.01)
            with trio.move_on_after(tick):
                await self._wake.wait()

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
        fresh, records = await self.inventory.read(created_only)
        current = {r.id: r for r in records}
        # Only the new maps need looking at when nothing but creations woke the cycle.
        check = [current[i] for i in fresh if i in current] if created_only else records
        wants = await trio.to_thread.run_sync(wanted, check, scopes, always)
        now = time.monotonic()
        for map_id in [i for i in self.watches if i not in current]:
            gone = self.watches.pop(map_id)
            self.stream.publish_map_event("map_removed", catalog.to_wire(gone.record))
        for record in check:
            watch = self.watches.get(record.id)
            if watch is None and record.id not in wants and record.name not in self.holds:
                continue  # the many maps nobody wants: nothing more to do on the loop
            reason = self.holds.why_watched(record.name, now, wants.get(record.id),
                                            self.config.watch.linger)
            if reason is None:
                if watch is not None:
                    del self.watches[record.id]  # nobody wants it any more
                continue
            if watch is None:
                created = record.id in fresh or self.inventory.is_new(record.id)
                watch = self._start(record)
                if created:
                    self.stream.publish_map_event("map_created", catalog.to_wire(record))
                    await self.poll(watch, report_all=True)
            watch.reason = reason
        # Maps the kernel saw created and gone before this read: created, then removed.
        for record in self.inventory.created_and_gone(fresh, current):
            if wanted([record], scopes, always):
                info = catalog.to_wire(record)
                self.stream.publish_map_event("map_created", info)
                self.stream.publish_map_event("map_removed", info)
        self.inventory.settle(current)
        if not created_only:
            self._forget(now)

    def _forget(self, now: float) -> None:
        """What is kept per map name goes once nothing wants the name: expired holds (a
        gone map's was never looked at again, and kept the engine from idling), and the
        stream's per-topic state.  Under churn of uniquely named maps both grew for ever."""
        self.holds.expire(now)
        self.stream.forget_topics_except({w.record.name for w in self.watches.values()}
                                         | self.holds.names())

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

    async def poll(self, watch: Watch, report_all: bool = False) -> None:
        """Poll one watch now (:meth:`.polling.Poller.poll`)."""
        await self.poller.poll(watch, report_all)

    def heartbeat(self) -> None:
        self.stream.heartbeat(self.watched_topics(), [w.record for w in self.watches.values()])

    # --- the query API of the request server ---

    def report_gap(self, name: str, missed: int) -> None:
        self.drops_reported += missed
        log.warning("a subscriber of %s missed %d events", name, missed)

    async def snapshot(self, selector: str, reason: str = ""
                       ) -> tuple[kmaps.MapRecord, EngineSnapshot, int]:
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
        self.holds.hold(record.name, time.monotonic() + max(self.config.watch.linger, 10.0),
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
            # The reply streams views of its buffers across awaits: never patched again
            # (the next changed poll patches a copy; EngineSnapshot says why).
            return watch.record, watch.snapshot.share(), self.stream.last_topic_seq(record.name)

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
            poll_errors=self.enumeration_errors + self.poller.errors,
            watched=self._watch_status(),
            discovery=found.how,
            creations_missed={"ring_full": found.lost, "unresolved": found.unresolved,
                              "queue_full": self.inventory.created_dropped},
            creations_seen=found.seen,
            stream_queued_bytes=stream.queued_bytes, publish_waits=stream.publish_waits,
            facilities=[schema.FacilityStatus(f.name, f.title, f.state, f.detail, f.error,
                                              f.degrades, f.fix)
                        for f in self.features.facilities])

    def watch_figures(self) -> list[WatchFigures]:
        """Each watched map's counters and cached snapshot (never a kernel read).

        Safe from another thread (the metrics scrape): it copies the watch table
        first; a poll patches a snapshot in place, so its rows are read under the
        snapshot's lease (:meth:`~.diff.EngineSnapshot.lease`).
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
            kernel_bytes=w.kernel.kernel_bytes if w.kernel else 0)
            for w in sorted(self.watches.values(), key=lambda w: w.record.id)]
