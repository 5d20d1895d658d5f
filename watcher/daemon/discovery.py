"""How the engine learns of new maps: from the kernel's bpf() tracepoints, or by polling.

``watch.discovery = "auto"`` loads :class:`watcher.kernel.mapwatch.MapWatch` at
start-up (before the seccomp filter: it creates maps and programs); where
that fails (no tracefs, no BTF, missing capabilities, a kernel that refuses
the programs) the daemon says why in one log line and polls, as with
``"poll"``.  Either way the engine's id-set poll keeps running: removal has
no tracepoint (a map is freed when its last reference goes, in no syscall),
so it is how ``map_removed`` is noticed, and it catches creations while the
tracepoint path is unavailable or lost records.

:meth:`Discovery.follow` is the task that waits on the ring buffer (an fd
readable while records wait, so no busy polling) and hands each batch of
creations to the engine.  Batches are spaced by :data:`COALESCE` seconds: a
creation makes the engine re-read every map's info, and a burst of creations
should cost one re-read, not one each.  Nothing is lost by waiting: each
record already holds the map's id and description, read in the kernel while
the map was alive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..kernel.mapwatch import Created, MapWatch, fdinfo_map_id

log = logging.getLogger("pymap.discovery")

COALESCE = 0.05  # seconds between two hand-overs of creations to the engine at most


class Discovery:
    """The tracepoint side of map discovery (or nothing, when polling alone)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.watch: MapWatch | None = None
        self.how = "poll"  # "tracepoint" once the programs are attached; else why not
        self.seen = 0  # creations the kernel reported
        self.lost = 0  # creations the kernel could not hand over (ring full)
        self.unresolved = 0  # creations whose map id neither the kernel nor /proc gave

    def open(self) -> None:
        """Load and attach the tracepoint programs if asked; blocking, before seccomp."""
        if self.mode == "poll":
            self.how = "poll (watch.discovery)"
            log.info("map discovery: polling map ids every watch.interval "
                     "(watch.discovery = \"poll\")")
            return
        try:
            self.watch = MapWatch()
        except (OSError, ValueError) as e:
            self.how = f"poll (tracepoints unavailable: {e})"
            log.warning("map discovery: polling map ids every watch.interval; the bpf() "
                        "syscall tracepoints cannot be used: %s", e)
            return
        self.how = "tracepoint"
        log.info("map discovery: bpf() syscall tracepoints (sys_enter_bpf/sys_exit_bpf), "
                 "with the map id poll every watch.interval for removals")

    async def follow(self, on_created: Callable[[list[Created]], None]) -> None:
        """Hand every batch of creations to ``on_created`` (the engine), forever."""
        watch = self.watch
        if watch is None:
            return
        while True:
            await trio.lowlevel.wait_readable(watch.fileno())
            created = watch.read()
            created = [c if c.record is not None else await self._resolve(c) for c in created]
            self.seen += len(created)
            try:
                lost = watch.lost()
            except OSError as e:  # a counter unreadable must not stop discovery
                log.warning("map discovery: cannot read the lost-creations counter: %s", e)
                lost = self.lost
            if lost > self.lost:
                log.warning("map discovery: %d map creations were not recorded (the "
                            "tracepoint ring was full); the id poll finds those still alive",
                            lost - self.lost)
                self.lost = lost
            on_created(created)
            await trio.sleep(COALESCE)

    async def _resolve(self, created: Created) -> Created:
        """The kernel could not name the map: ``/proc/TGID/fdinfo/FD`` may, while it is open."""
        map_id = await trio.to_thread.run_sync(fdinfo_map_id, created.tgid, created.fd)
        if map_id is None:
            self.unresolved += 1
            log.debug("map discovery: a map created by pid %d (fd %d) could not be resolved; "
                      "the id poll will see it if it lives", created.tgid, created.fd)
        return Created(created.tgid, created.fd, None, map_id)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
