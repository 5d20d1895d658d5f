"""One exporter: the stream of some maps, filtered, formatted, delivered to one output.

The stream task never waits for the output: it formats each event and hands
it to :class:`~.delivery.Delivery`, whose sender task owns the output.  The
daemon's side of resilience (silence, restarts, gaps) is the client library's
``EventStream`` hold-on behaviour; what it reports (``stalled``, ``resumed``,
``lost``, ``resync``) is exported like any event, so the receiver sees it.
"""

from __future__ import annotations

import fnmatch
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs
import msgspec
import trio

from watcher.wire.schema import MapRef

from ..eventjson import MapCache
from ..events import ACTIONS, EntryBatch, Event
from ..subscriber import EventStream
from .checkpoint import Checkpoint, Position
from .delivery import Delivery, Gap
from .formats import FORMATS, facts
from .formats.base import STREAM_ACTIONS
from .outputs import make_output
from .record import ExportRecord, RecordRun, covers_dropped
from .resume import resuming_stream

BUFFER_ACTIONS = ("record", "records")


class ExportConfigError(ValueError):
    """An export spec that cannot work (one line for the user)."""


@attrs.define
class ExportSpec:
    """One exporter, as ``pymap export`` flags or an ``[[exports]]`` table give it."""

    selectors: list[str]
    to: str = "-"
    format: str = "json"
    actions: list[str] = attrs.Factory(list)  # empty: all; stream records always pass
    exclude: list[str] = attrs.Factory(list)  # map name globs to leave out
    rate: float | None = None  # events per second; drops are counted and exported
    buffer_bytes: int = 64 * 1024 * 1024
    state_file: str | None = None
    decode: bool = True
    options: dict[str, Any] = attrs.Factory(dict)  # the output's options
    name: str = ""
    node: str = ""  # the node name in records (fleets: NATS subjects); "" = the host name

    def check(self) -> None:
        if not self.selectors:
            raise ExportConfigError("at least one map name or glob is needed")
        if self.format not in FORMATS:
            raise ExportConfigError(f"unknown format {self.format!r} "
                                    f"(expected one of {', '.join(FORMATS)})")
        if self.rate is not None and self.rate <= 0:
            raise ExportConfigError("rate must be > 0 events per second")
        if self.buffer_bytes < 64 * 1024:
            raise ExportConfigError("buffer_bytes must be at least 65536")


class Exporter:
    def __init__(self, client, spec: ExportSpec, version: str,
                 on_status: Callable[[str], None] | None = None, node: str | None = None):
        spec.check()
        self.client = client
        self.spec = spec
        self.node = node or spec.node or socket.gethostname()
        self.format = FORMATS[spec.format](version)
        self.output = make_output(spec.to, spec.options)
        self.checkpoint = Checkpoint(spec.state_file)
        self.on_status = on_status or (lambda message: None)
        self.cache = MapCache(client, decode=spec.decode)
        self.epoch = ""
        self.delivery = Delivery(self.output, self._gap_record, self.checkpoint,
                                 max_bytes=spec.buffer_bytes, rate=spec.rate,
                                 on_status=self.on_status)
        self.stream: EventStream | None = None
        self.received = Position("", 0)  # the daemon's newest seq seen (metrics: lag)
        self._base = Position("", 0)

    def _gap_record(self, gap: Gap) -> ExportRecord:
        reason = gap.reason
        if gap.first_seq:
            reason += f"; seq {gap.first_seq}..{gap.last_seq}"
        event = Event("dropped", MapRef(0, ""), time=time.time(), missed=gap.count, reason=reason)
        made = covers_dropped(gap.first_seq, gap.last_seq, gap.first_id, gap.count)
        return self.format.render(facts(event, None, None, self.node, self.epoch, made))

    def wanted(self, event: Event) -> bool:
        if not self.spec.actions and not self.spec.exclude:
            return True
        if event.action in STREAM_ACTIONS:
            return True
        if self.spec.actions and event.action not in self.spec.actions:
            return False
        return not any(fnmatch.fnmatchcase(event.map.name, g) for g in self.spec.exclude)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Export until cancelled."""
        resume = self.checkpoint.load()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.delivery.run)
            self.stream = stream = resuming_stream(self.client, self.spec.selectors, resume,
                                                   entry_batches=True)
            async with stream:
                task_status.started()
                async for event in stream:
                    self.epoch = stream.epoch or ""
                    if isinstance(event, EntryBatch):
                        self._received(event.message.seq + event.start,
                                       event.message.seq + event.message.count - 1)
                        await self.put_batch(event)
                        continue
                    if event.action in ("stalled", "resumed"):
                        self.on_status(f"daemon {event.action}: {event.reason}")
                    self._received(event.seq, event.seq)
                    if not self.wanted(event):
                        continue
                    await self.put(event)

    def _received(self, first: int, last: int) -> None:
        """Events ``first`` .. ``last`` of the daemon's sequence came in."""
        if not first:
            return
        if self.received.epoch != self.epoch:  # a new daemon: lag counts from here
            self._base = Position(self.epoch, first - 1)
        if last > self.received.seq or self.received.epoch != self.epoch:
            self.received = Position(self.epoch, last)

    def lag(self) -> int:
        """Events received from the daemon and not delivered yet: the newest seq seen
        minus the checkpoint's (or minus the first one seen, before any delivery)."""
        done = self.checkpoint.position
        floor = self._base.seq
        if done is not None and done.epoch == self.received.epoch:
            floor = max(floor, done.seq)
        return max(0, self.received.seq - floor)

    async def put_batch(self, view: EntryBatch) -> None:
        """A map events message, formatted as a whole (the fast path: formats/batch.py)."""
        if self.spec.actions or self.spec.exclude:
            if any(fnmatch.fnmatchcase(view.map.name, g) for g in self.spec.exclude):
                return
            if self.spec.actions and not all(a in self.spec.actions for a in ACTIONS):
                for event in view.events():
                    if self.wanted(event):
                        await self.put(event)
                return
        info, fmt = await self.cache.lookup(Event("batch", view.map))
        out = self.format.render_run(view, info, fmt, self.node, self.epoch)
        if isinstance(out, RecordRun):
            self.delivery.put_run(out)
        else:
            self.delivery.put_many(out)

    async def put(self, event: Event) -> None:
        if event.action in BUFFER_ACTIONS or event.action in STREAM_ACTIONS:
            info, fmt = None, None
        else:
            info, fmt = await self.cache.lookup(event)
        if not event.time:
            event = msgspec.structs.replace(event, time=time.time())
        self.delivery.put(self.format.render(facts(event, info, fmt, self.node, self.epoch)))
