"""What every format is given, and the one method it implements."""

from __future__ import annotations

import abc
from typing import Any

import attrs

from watcher.wire.schema import MapInfo

from ...decoding import EntryFormatter
from ...eventjson import event_json
from ...events import EntryBatch, Event
from ..record import ExportRecord, RecordRun, covers, event_id
from .batch import BatchRenderer

# Actions about the stream itself rather than a map: they say what the receiver missed.
STREAM_ACTIONS = ("lost", "resync", "stalled", "resumed", "dropped")


@attrs.define(slots=True)
class Facts:
    """One event as every format sees it: ``doc`` is pymap's own JSON event object
    (``pymap events -o json``) with its event id first (``doc["id"]``, see
    record.event_id), the map's type and pins filled in when known, host and epoch.
    ``covers`` is what a record without a daemon seq stands for (record.covers)."""

    doc: dict[str, Any]
    event: Event
    info: MapInfo | None
    node: str
    epoch: str
    covers: str = ""

    @property
    def map_type(self) -> str:
        return self.info.type if self.info is not None else ""

    @property
    def pins(self) -> list[str]:
        return list(self.info.pinned) if self.info is not None else []

    def summary(self) -> str:
        """A one-line human message (syslog MSG fallback, ECS message, CEF msg)."""
        d = self.doc
        action, name = d["action"], d["map"]["name"] or "-"
        if action in ("lost", "dropped"):
            return f"{action}: {d.get('missed', 0)} events ({d.get('reason', '')}) on {name}"
        if action == "resync":
            return f"resync of {name}: state re-read ({d.get('reason', '')})"
        if action in ("stalled", "resumed"):
            return f"daemon {action}: {d.get('reason', '')}"
        f = d.get("formatted")
        if isinstance(f, dict) and "text" in f:
            return f"{name} {action}: {f['text']}"
        if "key" in d:
            return f"{name} {action}: key {d['key']}"
        return f"{name} {action}"


def facts(event: Event, info: MapInfo | None, fmt: EntryFormatter | None,
          node: str, epoch: str, made: str | None = None) -> Facts:
    """The facts of ``event``; ``made``: what a record the exporter made stands for, when
    the event alone does not say (``dropped``: what was dropped)."""
    tail = covers(event) if made is None else made
    doc = {"id": event_id(node, epoch, event.seq, tail), **event_json(event, info, fmt)}
    if event.action in ("dropped",) or (event.action == "lost" and event.missed):
        doc["missed"] = event.missed
    if info is not None:
        doc["map"].setdefault("type", info.type)
        doc["map"].setdefault("pinned", list(info.pinned))
    doc["host"] = node
    doc["epoch"] = epoch
    return Facts(doc, event, info, node, epoch, tail)


class Format(abc.ABC):
    """A schema.  ``payload`` defines it, one event at a time; ``render_batch`` gives the
    same bytes for a whole map events message far faster (formats/batch.py)."""

    name = ""
    text = False  # payloads are plain text, not JSON (batch templates find markers raw)

    def __init__(self, version: str):
        self.version = version  # pymap's version, for agent/product fields
        self._batch = BatchRenderer(self, self.text)

    @abc.abstractmethod
    def payload(self, f: Facts) -> bytes:
        """The event in this format: one line, no trailing newline."""

    def render_batch(self, view: EntryBatch, info: MapInfo | None, fmt: EntryFormatter | None,
                     node: str, epoch: str) -> list[ExportRecord]:
        """Every new event of ``view`` rendered, as ``render`` would render each."""
        return self._batch.render(view, info, fmt, node, epoch)

    def render_run(self, view: EntryBatch, info: MapInfo | None, fmt: EntryFormatter | None,
                   node: str, epoch: str) -> RecordRun | list[ExportRecord]:
        """``render_batch``, as one :class:`RecordRun` where it can (no object per event)."""
        return self._batch.render_run(view, info, fmt, node, epoch)

    def render(self, f: Facts) -> ExportRecord:
        e = f.event
        return ExportRecord(f.node, f.epoch, e.seq, e.map.name, e.action, e.time or 0.0,
                            self.payload(f), f.covers)
