"""Polling one watched map: read its state, turn it into a delta, publish it.

Why a module of its own: what a poll does to one map (which engine reads it,
the first-poll rule, the fallback from the in-kernel walk, the counters) is
independent of *which* maps are watched, which is the engine's business
(:mod:`.engine`).  The engine owns the watch table and calls :meth:`Poller.poll`.

Reads and diffs walk every entry, so they run in worker threads; those only
read and return what they found, and every change to a :class:`Watch` is made
here, on the trio loop, under the watch's lock.
"""

from __future__ import annotations

import errno
import logging
import time

import attrs
import trio

from watcher.kernel.maps import find as kmaps
from watcher.kernel.maps.kinds import DumpMethod, dump_method

from .catalog import MapGone
from .diff import Delta, EngineSnapshot, KernelDelta, poll_changes
from .interfaces import Catalog, Stream
from .memory import trim_heap

# The engine's logger: operators filter on it, and a poll is the engine's work.
log = logging.getLogger("pymap.engine")

# Entries per chunk a poll's dump streams in (a quarter of a client dump's chunk).  Each
# chunk is compared and dropped, so its buffers are what an unchanged poll costs beyond
# the kept state: ~3 MB at 64k entries of a 1M-entry map, under 1 MB at 16k (and below
# the mmap threshold, so they are reused from the heap, not mapped and unmapped).
POLL_CHUNK = 16384


@attrs.define(eq=False)
class Watch:
    """One watched map: how it is polled, its last state, and its counters."""

    record: kmaps.MapRecord
    interval: float
    stride: int
    lock: trio.Lock = attrs.Factory(trio.Lock)
    snapshot: EngineSnapshot | None = None
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

    def timed(self, elapsed_ms: float) -> None:
        """Count one poll that took ``elapsed_ms``."""
        self.polls += 1
        self.last_poll_ms = elapsed_ms
        self.poll_seconds += elapsed_ms / 1000
        self.max_poll_ms = max(self.max_poll_ms, elapsed_ms)

    @property
    def pollable(self) -> bool:
        return not self.unreadable and dump_method(self.record.type) is not DumpMethod.NONE


class Poller:
    """Polls watches through ``catalog`` and publishes their deltas on ``stream``."""

    def __init__(self, catalog: Catalog, stream: Stream):
        self.catalog = catalog
        self.stream = stream
        self.errors = 0  # polls that failed (status: poll_errors, with enumerations)

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
            read = await self._read_state(watch, report_all)
            if read is None:
                return
            snap, delta = read
            watch.snapshot = snap
            if delta is not None and delta.count:
                self.stream.publish_delta(watch.record, snap.key_size, snap.stride, delta, when)
                watch.count(delta)
                # A changed poll's temporaries (a 1M-entry map: tens of MB, freed by now)
                # go back at once, not at the next heartbeat's trim (memory.py).
                trim_heap()
            watch.timed((time.perf_counter() - t0) * 1000)
        # The daemon's queue to ZeroMQ is bounded in bytes: no next poll while this
        # one's delta is still queued past the bound (the lock is released: a snapshot
        # request for this map need not wait).
        await self.stream.room()

    async def _read_state(self, watch: Watch, report_all: bool
                          ) -> tuple[EngineSnapshot, Delta | None] | None:
        """The map's state now and its changes (None: a silent first poll,
        :func:`~.diff.first_poll_is_silent`); None instead of both: not read.

        Either engine walks every entry: one worker-thread call, never the loop's.
        """
        try:
            if watch.kernel is not None:
                # The worker only reads; what the read changes is applied here.
                snap, kernel_delta, failed = await trio.to_thread.run_sync(
                    self.read_kernel, watch, report_all)
                if failed:
                    watch.use_user_space(failed)
                return snap, kernel_delta
            return await trio.to_thread.run_sync(self.read_changes, watch, report_all)
        except MapGone:
            return None  # the next cycle reports map_removed
        except OSError as e:
            self.errors += 1
            if e.errno in (errno.EPERM, errno.EACCES):
                # Maps created BPF_F_WRONLY refuse read-only opens: say so once, stop polling.
                watch.unreadable = str(e)
                log.error("cannot read %s (id %d): %s; not polling it", watch.record.name,
                          watch.record.id, e)
                return None
            log.error("polling %s (id %d) failed: %s", watch.record.name, watch.record.id, e)
            return None

    def read_kernel(self, watch: Watch, report_all: bool
                    ) -> tuple[EngineSnapshot, Delta | None, str]:
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
        snap, delta = self.read_changes(watch, report_all)
        return snap, delta, failed

    def read_changes(self, watch: Watch, report_all: bool) -> tuple[EngineSnapshot, Delta | None]:
        """A poll on the user-space engine: a dump, and its changes from the last one.

        The dump streams into the comparison chunk by chunk (:func:`~.diff.poll_changes`):
        an unchanged map is never held twice.
        """
        with self.catalog.open_watched(watch.record) as handle:
            return poll_changes(watch.snapshot, self.catalog.chunks(handle, POLL_CHUNK),
                                watch.record.key_size, watch.stride, report_all)
