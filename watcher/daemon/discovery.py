"""How the engine learns of new maps: from the kernel's bpf() tracepoints, or by polling.

``watch.discovery = "auto"`` loads :class:`watcher.kernel.discovery.mapwatch.MapWatch` at
start-up (before the seccomp filter: it creates maps and programs); where
that fails (no tracefs, no BTF, missing capabilities, a kernel that refuses
the programs) the daemon says why in one log line and polls, as with
``"poll"``.  Either way the engine's id-set poll keeps running: removal has
no tracepoint (a map is freed when its last reference goes, in no syscall),
so it is how ``map_removed`` is noticed, and it catches creations while the
tracepoint path is unavailable or lost records.

:meth:`Discovery.follow` is the task that waits on the ring buffer (an fd
readable while records wait, so no busy polling) and hands each batch of
creations to the engine (and pins, after which the engine reads every map's
pins again).  It waits :data:`COALESCE` seconds after each wake-up: a burst of
creations costs the engine one cycle, not one each, and a map pinned right
after its creation is first read with its pin.  Nothing is lost by waiting:
each record already holds the map's id and description, read in the kernel
while the map was alive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import attrs
import trio

from watcher.kernel.discovery.mapwatch import Created, MapWatch, fdinfo_map_id
from watcher.kernel.features import probe as kf
from watcher.kernel.features.probe import Features

log = logging.getLogger("pymap.discovery")

COALESCE = 0.05  # seconds between two hand-overs of creations to the engine at most


@attrs.frozen
class DiscoveryStats:
    """How map creation is learned, and what the tracepoint path reported or missed."""

    how: str = "poll"  # "tracepoint", or "poll" and why
    seen: int = 0  # creations the kernel reported
    lost: int = 0  # creations the kernel could not hand over (ring full)
    unresolved: int = 0  # creations whose map id neither the kernel nor /proc gave


class Discovery:
    """The tracepoint side of map discovery (or nothing, when polling alone)."""

    def __init__(self, mode: str, features: Features):
        self.mode = mode
        self.features = features  # the daemon's probe: whether tracepoint programs load
        self.watch: MapWatch | None = None
        self.how = "poll"  # "tracepoint" once the programs are attached; else why not
        self.seen = 0  # creations the kernel reported
        self.lost = 0  # creations the kernel could not hand over (ring full)
        self.unresolved = 0  # creations whose map id neither the kernel nor /proc gave

    def stats(self) -> DiscoveryStats:
        """The figures for ``status`` and the metrics (ints: safe from the scrape thread)."""
        return DiscoveryStats(self.how, self.seen, self.lost, self.unresolved)

    def open(self, also_own: tuple[int, ...] = ()) -> None:
        """Load and attach the tracepoint programs if asked; blocking, before seccomp.

        ``also_own``: processes besides this one whose creations are pymap's own (the
        objects broker's pid), left out like the daemon's."""
        if self.mode == "poll":
            self.how = "poll (watch.discovery)"
            log.info("map discovery: polling map ids every watch.interval "
                     "(watch.discovery = \"poll\")")
            return
        refused = self.features.why_not(kf.TRACEPOINT)
        if refused:
            self.how = f"poll ({refused})"
            log.info("map discovery: polling map ids every watch.interval: %s", refused)
            return
        try:
            self.watch = MapWatch((os.getpid(), *also_own))
        except (OSError, ValueError) as e:
            self.how = f"poll (tracepoints unavailable: {e})"
            log.warning("map discovery: polling map ids every watch.interval; the bpf() "
                        "syscall tracepoints cannot be used: %s", e)
            return
        self.how = "tracepoint"
        log.info("map discovery: bpf() syscall tracepoints (sys_enter_bpf/sys_exit_bpf), "
                 "with the map id poll every watch.interval for removals")

    async def follow(self, on_created: Callable[[list[Created]], None],
                     on_pinned: Callable[[], None]) -> None:
        """Hand every batch of creations to ``on_created`` and pins to ``on_pinned``
        (the engine), forever.

        After the ring turns readable, wait :data:`COALESCE` before reading: a burst
        becomes one batch, and a map pinned just after its creation (libbpf,
        bpftool and Cilium pin at once) is read with its pin, so under its name.
        """
        watch = self.watch
        if watch is None:
            return
        while True:
            await trio.lowlevel.wait_readable(watch.fileno())
            await trio.sleep(COALESCE)
            records = watch.read()
            pinned = any(c.pinned for c in records)
            created = [c if c.record is not None else await self._resolve(c)
                       for c in records if not c.pinned]
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
                pinned = True  # a lost record may have been a pin: read every map again
            if pinned:
                on_pinned()
            if created:
                on_created(created)

    async def _resolve(self, created: Created) -> Created:
        """The kernel could not name the map: ``/proc/TGID/fdinfo/FD`` may, while it is open."""
        map_id = await trio.to_thread.run_sync(fdinfo_map_id, created.tgid, created.fd)
        if map_id is None:
            self.unresolved += 1
            log.debug("map discovery: a map created by pid %d (fd %d) could not be resolved; "
                      "the id poll will see it if it lives", created.tgid, created.fd)
        return Created(created.tgid, created.fd, None, fdinfo_id=map_id)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
