"""The host's maps as the engine knows them, and the creations still to settle.

Why a module of its own: keeping the host's map list current cheaply is a job
apart from deciding what to watch.  A host has thousands of maps; this reads
only what changed (new ids, pins every ``RECORDS_REFRESH`` seconds), and keeps
each creation the kernel reported (:mod:`.discovery`) until a cycle settles
it, so a map that lived a few milliseconds is still reported, from the
description the kernel took while it was alive.  pymap's own maps (the
in-kernel engine's, discovery's) are left out here: they are not the host's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from watcher.kernel.discovery.mapwatch import Created
from watcher.kernel.maps import find as kmaps

from .interfaces import Catalog

# The engine's logger: operators filter on it, and this is the engine's work.
log = logging.getLogger("pymap.engine")

RECORDS_REFRESH = 30.0  # seconds between full reads of every map's info and pins
MAX_CREATED = 65536  # creations reported by the kernel and not yet settled by a cycle

Fresh = dict[int, kmaps.MapRecord | None]  # map id -> its description at creation, if any


class Inventory:
    """The host's map records, re-read as little as possible.

    ``wake`` runs a cycle now (reading just the reported creations), ``poke`` one
    with a full walk of the ids: the engine's, given at construction.
    """

    def __init__(self, catalog: Catalog, wake: Callable[[], None], poke: Callable[[], None]):
        self.catalog = catalog
        self._wake = wake
        self._poke = poke
        # map id -> its description from the kernel (None: the id alone), until a cycle
        # settles it: reported through the normal path, or as created-and-gone
        self._created: Fresh = {}
        self.created_dropped = 0  # creations not kept: MAX_CREATED were waiting
        self._known_ids: set[int] | None = None  # None: the next read is a fresh baseline
        self._cached_records: list[kmaps.MapRecord] = []
        self._records_stale = False
        self._records_due = 0.0  # trio time of the next full read of every map's info

    def forget(self) -> None:
        """Nobody watches anything: the next cycle starts from a fresh baseline."""
        self._known_ids = None
        self._created.clear()

    def has_created(self) -> bool:
        """Are creations reported by the kernel waiting for a cycle?"""
        return bool(self._created)

    def is_new(self, map_id: int) -> bool:
        """Did ``map_id`` appear since the last settled cycle (not at the baseline)?"""
        return self._known_ids is not None and map_id not in self._known_ids

    def maps_changed(self) -> None:
        """Something was pinned, or the id set may have changed unseen: re-read maps now."""
        self._records_stale = True
        self._poke()

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
        self._wake()  # a cycle now, reading these ids only (the engine's created_only)

    async def read(self, created_only: bool) -> tuple[Fresh, list[kmaps.MapRecord]]:
        """The creations to settle now and the host's maps, pymap's own left out.

        Creations reported before the ids are read: a map among them that the
        read does not find is gone.  Later ones wait for the next cycle.
        ``created_only``: read just the reported ids, without walking every id.
        """
        fresh, self._created = self._created, {}
        noted = self.catalog.own_ids()  # noted before the read: gone if the read lacks them
        records = await self._records(set(fresh) if created_only else None)
        if own := self.catalog.own_ids():  # after the read: every own map the read can hold
            if not created_only:  # forgotten once gone from the host: the set stays small
                self.catalog.forget_own(set(noted - {r.id for r in records}))
            # pymap's own maps (the in-kernel engine's, discovery's) are not the host's
            records = [r for r in records if r.id not in own]
            fresh = {i: r for i, r in fresh.items() if i not in own}
        return fresh, records

    def created_and_gone(self, fresh: Fresh, current: dict[int, kmaps.MapRecord]
                         ) -> list[kmaps.MapRecord]:
        """Maps the kernel saw created that were gone before this cycle read the ids,
        as described at creation (to publish as ``map_created`` then ``map_removed``)."""
        known = self._known_ids or set()
        gone = []
        for map_id, record in fresh.items():
            if map_id in current or map_id in known:
                continue
            if record is None:
                log.debug("map id %d was created and freed before it could be read", map_id)
                continue
            gone.append(record)
        return gone

    def settle(self, current: dict[int, kmaps.MapRecord]) -> None:
        """The cycle is done with these ids: the next one compares with them."""
        self._known_ids = set(current)

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
