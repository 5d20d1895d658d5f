"""Event sources: BPF ring buffers and perf event arrays, read once, fanned out to all.

pymap is the one reader of each configured buffer and publishes its records
on the event stream (topic ``map:<buffer name>\\0``, the same sequence and
epoch rules as map events), so any number of subscribers share one reader,
as ``cilium monitor`` clients share Cilium's monitor agent.

One task per buffer waits on the reader's fd (``trio.lowlevel.wait_readable``;
no busy polling), then reads the burst in slices of ``read_slice`` records,
yielding to the other tasks between slices so a burst never holds the loop
for long.  Each slice becomes one ``records`` message: a lengths frame and a
data frame, no per-record Python objects.

Decoding is left to consumers, as for map entries: the daemon ships the record
layout in each batch header, and each subscriber decodes what it shows.
Decoding in the daemon would be done once for all subscribers, but it would
put a Python step per record on the one loop every subscriber depends on, and
make every record several times larger on the wire; a subscriber that only
counts or forwards records (a SIEM shipper, the benchmark) never pays for it.

Loss: a perf ring's lost-sample records become ``lost`` messages.  A ring
buffer's producer gets an error when the ring is full and the kernel reports
nothing, so a source can name a counter map (``drops_map``) in which the
program counts its failed writes; pymap reads it every ``DROPS_INTERVAL``
seconds and publishes increases as ``lost`` messages too.
"""

from __future__ import annotations

import logging
import math
import time

import attrs
import trio

from watcher.kernel.buffers import reader as attach
from watcher.kernel.buffers.perfbuf import PerfBufReader
from watcher.kernel.buffers.ringbuf import RingBufReader
from watcher.kernel.features.checks import tracefs_unreadable
from watcher.kernel.maps import find as kmaps
from watcher.kernel.maps.counters import counter_total
from watcher.kernel.prog.bccload import BccError, BccProgram

from ..decode.layout import LayoutError, parse_layout
from ..wire import schema
from .config import ConfigError
from .publisher import HEADER_ALLOWANCE, PublishedStream
from .sourceconf import SourceConfig

log = logging.getLogger("pymap.sources")

DROPS_INTERVAL = 0.5  # seconds between reads of a drops_map counter
# Bytes of records per read slice at most (one stream message), further cut to the
# stream's message_bytes: ZeroMQ's high-water mark counts messages, not bytes, so the
# per-subscriber byte bound holds only while every message stays that small.
MAX_READ_BYTES = 1 << 20


class SourceLoadError(ConfigError):
    """A configured source could not be loaded or attached; the daemon does not start."""


@attrs.define(eq=False)
class Buffer:
    """One buffer being published, with its reader and counters."""

    name: str
    kind: str  # "ringbuf" or "perf"
    origin: str
    map_id: int
    reader: RingBufReader | PerfBufReader
    config: SourceConfig
    layout: dict | None = None
    drops_fd: int | None = None
    drops_label: str = ""
    drops_base: int = 0
    maps: list[str] = attrs.Factory(list)
    records: int = 0
    lost: int = 0
    bytes: int = 0
    wakeups: int = 0
    reads: int = 0
    max_read_ms: float = 0.0

    def status(self) -> schema.SourceStatus:
        return schema.SourceStatus(
            name=self.name, kind=self.kind, origin=self.origin, map_id=self.map_id,
            records=self.records, lost=self.lost, bytes=self.bytes, wakeups=self.wakeups,
            reads=self.reads, max_read_ms=round(self.max_read_ms, 3),
            drops_map=self.drops_label, maps=self.maps)


class Sources:
    def __init__(self, configs: list[SourceConfig], stream: PublishedStream):
        self.configs = configs
        self.stream = stream
        self.buffers: list[Buffer] = []
        self._programs: list[BccProgram] = []
        self._handles: list[kmaps.MapHandle] = []  # pins this daemon opened (bcc owns its own)

    # --- opening (blocking: run in a worker thread before serving) ---

    def open(self) -> None:
        """Load every program and attach every pin; any failure stops the daemon."""
        try:
            for cfg in self.configs:
                if cfg.program:
                    self._open_program(cfg)
                else:
                    self._open_pin(cfg)
            names = [b.name for b in self.buffers]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise SourceLoadError(f"buffer name {dupes[0]!r} is published by two sources; "
                                      "topics must be unique")
        except BaseException:
            self.close()
            raise
        self.stream.add_source_topics(buf.name for buf in self.buffers)

    def _open_program(self, cfg: SourceConfig) -> None:
        assert cfg.program is not None
        log.info("loading %s with bcc", cfg.program)
        try:
            prog = BccProgram(cfg.program, cfg.cflags)
        except BccError as e:
            hint = tracefs_unreadable()
            raise SourceLoadError(f"{e}; {hint}" if hint else str(e)) from None
        self._programs.append(prog)
        found = prog.buffers()
        names = cfg.buffers or [t.name for t in found]
        if not names:  # maps only (like examples/syscount): loaded, its maps are watchable
            log.info("%s has no ring buffer or perf event array; its maps (%s) are watchable "
                     "like any other", cfg.program, ", ".join(sorted(prog.tables)) or "none")
            return
        try:
            drops = prog.table(cfg.drops_map) if cfg.drops_map else None
            tables = [prog.table(n) for n in names]
        except BccError as e:
            raise SourceLoadError(str(e)) from None
        others = sorted(t.name for t in prog.tables.values() if t.name not in names)
        for table in tables:
            if table.type not in attach.BUFFER_TYPES:
                raise SourceLoadError(f"{cfg.program}: {table.name} is a {table.type} map, not "
                                      "a ring buffer or perf event array")
            layout = cfg.layout or self._spec(table.name, prog.record_layout(table.name))
            buf = self._attach(cfg, table.name, cfg.program, table.fd, table.type,
                               table.map_id, table.max_entries, layout)
            buf.maps = others
            if drops is not None:
                self._set_drops(buf, drops.fd, drops.name)

    def _open_pin(self, cfg: SourceConfig) -> None:
        assert cfg.pin is not None and cfg.name is not None
        try:
            handle = attach.open_pinned(cfg.pin)
        except OSError as e:
            raise SourceLoadError(f"source {cfg.pin}: cannot open the pin read-write: "
                                  f"{e.strerror or e}") from None
        self._handles.append(handle)
        fd, record = handle.fd, handle.record
        kind = attach.BUFFER_TYPES.get(record.type)
        if kind is None:
            raise SourceLoadError(f"source {cfg.pin}: is a {record.type} map, not a ring buffer "
                                  "or perf event array")
        if cfg.kind and cfg.kind != kind:
            raise SourceLoadError(f"source {cfg.pin}: kind = {cfg.kind!r} but the map is a "
                                  f"{record.type}")
        if kind == "perf":
            log.warning("attaching to perf event array %s: pymap installs its own per-CPU rings "
                        "in it, which REPLACES any other reader of this buffer (they stop "
                        "receiving its records); see docs/sources.md", cfg.pin)
        else:
            log.warning("attaching to ring buffer %s: pymap consumes its records; another "
                        "consumer of the same ring would compete with pymap and each record "
                        "would reach only one of them; see docs/sources.md", cfg.pin)
        buf = self._attach(cfg, cfg.name, cfg.pin, fd, record.type, record.id,
                           record.max_entries, cfg.layout)
        if cfg.drops_map:
            try:
                drops = kmaps.MapHandle.open_pin(cfg.drops_map)  # a counter: read-only
            except OSError as e:
                raise SourceLoadError(f"source {cfg.pin}: drops_map {cfg.drops_map}: "
                                      f"{e.strerror or e}") from None
            self._handles.append(drops)
            self._set_drops(buf, drops.fd, cfg.drops_map)

    def _attach(self, cfg: SourceConfig, name: str, origin: str, fd: int, map_type: str,
                map_id: int, max_entries: int, layout: dict | None) -> Buffer:
        try:
            reader = attach.reader_for(fd, map_type, max_entries, cfg.page_cnt,
                                       cfg.wakeup_events)
        except (OSError, ValueError) as e:
            raise SourceLoadError(f"{origin}: cannot read {name}: {e}") from None
        buf = Buffer(name, attach.BUFFER_TYPES[map_type], origin, map_id, reader, cfg, layout)
        self.buffers.append(buf)
        log.info("publishing %s %s (map id %d) from %s as topic %s", buf.kind, name, map_id,
                 origin, name)
        return buf

    def _set_drops(self, buf: Buffer, fd: int, label: str) -> None:
        try:
            buf.drops_base = counter_total(fd)
        except (OSError, ValueError) as e:
            raise SourceLoadError(f"{buf.origin}: drops_map {label}: {e}") from None
        buf.drops_fd, buf.drops_label = fd, label

    @staticmethod
    def _spec(name: str, fields: list[dict] | None) -> dict | None:
        if not fields:
            return None
        try:
            return parse_layout({"match": name, "value": fields}).spec
        except LayoutError as e:
            log.warning("%s: record layout not usable (%s); records are shown as hex", name, e)
            return None

    # --- serving ---

    def topics(self) -> list[str]:
        return [b.name for b in self.buffers]

    def status(self) -> list[schema.SourceStatus]:
        return [b.status() for b in self.buffers]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for buf in self.buffers:
                nursery.start_soon(self._serve, buf)
                if buf.drops_fd is not None:
                    nursery.start_soon(self._watch_drops, buf)

    async def _serve(self, buf: Buffer) -> None:
        reader = buf.reader
        fd = reader.fileno()
        cfg = buf.config
        # Perf rings that wake every N samples are also drained on a timer, so the
        # last records of a quiet CPU never wait for N-1 more.
        timeout = cfg.flush_interval if buf.kind == "perf" and cfg.wakeup_events > 1 else math.inf
        while True:
            with trio.move_on_after(timeout):
                await trio.lowlevel.wait_readable(fd)
                buf.wakeups += 1
            reader.clear_wakeups()
            while True:
                await self.stream.room()  # meanwhile the kernel's ring holds (or counts) records
                t0 = time.perf_counter()
                chunk = reader.read(cfg.read_slice, min(MAX_READ_BYTES, self.stream.message_bytes
                                                         - HEADER_ALLOWANCE))
                when = time.time()
                if chunk.count:
                    self.stream.publish_records(buf.name, buf.map_id, chunk.count, chunk.lengths,
                                                chunk.data, buf.layout, when)
                    buf.records += chunk.count
                    buf.bytes += len(chunk.data)
                if chunk.lost:
                    self.stream.publish_lost(buf.name, buf.map_id, chunk.lost, "perf", when)
                    buf.lost += chunk.lost
                if chunk.count or chunk.lost:
                    buf.reads += 1
                    buf.max_read_ms = max(buf.max_read_ms, (time.perf_counter() - t0) * 1000)
                if not chunk.more:
                    break
                await trio.lowlevel.checkpoint()  # let the publisher and the rest run
            await trio.lowlevel.checkpoint()

    async def _watch_drops(self, buf: Buffer) -> None:
        assert buf.drops_fd is not None
        last = buf.drops_base
        while True:
            await trio.sleep(DROPS_INTERVAL)
            try:
                # A dump of a (per-CPU) map: blocking, so in a worker thread.
                total = await trio.to_thread.run_sync(counter_total, buf.drops_fd)
            except (OSError, ValueError) as e:
                log.error("%s: reading drops_map %s failed: %s", buf.name, buf.drops_label, e)
                continue
            if total > last:
                self.stream.publish_lost(buf.name, buf.map_id, total - last, "producer",
                                         time.time())
                buf.lost += total - last
            last = total

    # --- shutdown ---

    def close(self) -> None:
        for buf in self.buffers:
            try:
                buf.reader.close()
            except OSError as e:
                log.warning("closing %s: %s", buf.name, e)
        self.buffers.clear()
        for prog in self._programs:
            prog.cleanup()
        self._programs.clear()
        for handle in self._handles:
            handle.close()
        self._handles.clear()
