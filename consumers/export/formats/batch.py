"""Formatting a whole map events message at once: templates instead of a document per event.

Within one ``EventBatch`` every event of one action has the same map, time,
host and epoch, so its formatted payload differs from its neighbours' only in a
few places: the sequence number, the key, value and old value (hex), and the
decoded entry.  The format renders one real event of each action with those
fields replaced by markers (``"\\x00seq\\x00"`` ...); the output, split at the
markers, is a template that gives every other event's payload with one C-level
``bytes %`` each.  The hex of all keys/values is taken once per message and
sliced.  The per-event path (:meth:`Format.payload`) stays the definition: each
template is checked against it on its first event, and anything a template
cannot express (per-CPU values, decoders that put text in the message,
formats that opt out) takes the per-event path.  tests/test_export_batch.py
checks both paths give byte-identical output.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from operator import itemgetter

import attrs
import orjson

from watcher.wire.schema import MapInfo

from ...decoding import EntryFormatter
from ...eventjson import formatted_entry
from ...events import EntryBatch, Event
from ..record import ExportRecord, event_id
from . import base

SLOTS = ("seq", "key", "value", "old", "fmt")
_INDEX = {name: i for i, name in enumerate(SLOTS)}
# JSON: a marker that is a whole string value ("\u0000key\u0000"), or inside one.
JSON_MARK = re.compile(rb'"\\u0000(\w+)\\u0000"|\\u0000(\w+)\\u0000')
TEXT_MARK = re.compile(rb"()\x00(\w+)\x00")  # CEF: inside text, never quoted
# Whole-value slots that are JSON strings keep their quotes around the raw text.
QUOTED = {"key", "value", "old"}


def mark(name: str) -> str:
    return f"\x00{name}\x00"


@attrs.frozen
class Template:
    """A payload as ``pattern % values``, values picked from (seq, key, value, old, fmt)."""

    pattern: bytes
    pick: Callable[[tuple], tuple]

    def fill(self, values: tuple) -> bytes:
        return self.pattern % self.pick(values)


def make_template(payload: bytes, text: bool) -> Template | None:
    """Split a marked payload into a template, or None when it has no usable slots."""
    rx = TEXT_MARK if text else JSON_MARK
    parts: list[bytes] = []
    picks: list[int] = []
    at = 0
    for m in rx.finditer(payload):
        whole, inner = m.group(1), m.group(2)
        name = (whole or inner).decode()
        if name not in _INDEX:
            return None
        parts.append(payload[at:m.start()].replace(b"%", b"%%"))
        parts.append(b'"%s"' if whole and name in QUOTED else b"%s")
        picks.append(_INDEX[name])
        at = m.end()
    if not picks:
        return None
    parts.append(payload[at:].replace(b"%", b"%%"))
    getter = itemgetter(*picks)
    pick = getter if len(picks) > 1 else (lambda values: (getter(values),))
    return Template(b"".join(parts), pick)


class BatchRenderer:
    """The batch fast path of one :class:`~.base.Format`."""

    def __init__(self, fmt_obj, text: bool = False):
        self.format = fmt_obj
        self.text = text  # CEF: plain text, markers raw
        self.templated = 0  # events rendered through a template (the rest: per event)

    def render(self, view: EntryBatch, info: MapInfo | None, fmt: EntryFormatter | None,
               node: str, epoch: str) -> list[ExportRecord]:
        message = view.message
        when = message.time or time.time()
        percpu = info is not None and info.percpu
        if percpu or (fmt is not None and self.text):
            return self._slow(view, when, info, fmt, node, epoch)
        entries = list(view.entries())
        decoded = ([formatted_entry(fmt, k, v, o, False) for _, _, k, v, o in entries]
                   if fmt is not None else None)
        if decoded is not None and any("text" in d for d in decoded):
            return self._slow(view, when, info, fmt, node, epoch)
        frames = view.frames
        ks, vs = message.key_size, message.value_stride
        kx, vx, ox = (frames[1].hex().encode(), frames[2].hex().encode(),
                      frames[3].hex().encode())
        templates: dict[str, Template | None] = {}
        out: list[ExportRecord] = []
        name, seq0 = message.map.name, message.seq
        for n, (i, action, key, value, old) in enumerate(entries):
            seq = seq0 + i
            fj = orjson.dumps(decoded[n]) if decoded is not None else b""
            values = (b"%d" % seq, kx[2 * i * ks:2 * (i + 1) * ks],
                      vx[2 * i * vs:2 * (i + 1) * vs],
                      ox[2 * i * vs:2 * (i + 1) * vs] if old is not None else b"", fj)
            if action not in templates:
                event = Event(action, message.map, seq, message.topic_seq + i, when,
                              key=key, value=value, old_value=old)
                real = self.format.payload(base.facts(event, info, fmt, node, epoch))
                t = self._template(event, info, fmt, node, epoch)
                templates[action] = t if t is not None and t.fill(values) == real else None
            t = templates[action]
            if t is None:
                event = Event(action, message.map, seq, message.topic_seq + i, when,
                              key=key, value=value, old_value=old)
                payload = self.format.payload(base.facts(event, info, fmt, node, epoch))
            else:
                payload = t.fill(values)
                self.templated += 1
            out.append(ExportRecord(node, epoch, seq, name, action, when, payload))
        return out

    def _template(self, event: Event, info: MapInfo | None, fmt: EntryFormatter | None,
                  node: str, epoch: str) -> Template | None:
        f = base.facts(event, info, fmt, node, epoch)
        d = f.doc
        d["seq"] = mark("seq")
        d["id"] = event_id(node, epoch, mark("seq"))
        d["key"] = mark("key")
        d["value"] = mark("value")
        if d.get("old_value") is not None:
            d["old_value"] = mark("old")
        if "formatted" in d:
            d["formatted"] = mark("fmt")
        return make_template(self.format.payload(f), self.text)

    def _slow(self, view: EntryBatch, when: float, info: MapInfo | None,
              fmt: EntryFormatter | None, node: str, epoch: str) -> list[ExportRecord]:
        render = self.format.render
        return [render(base.facts(e if e.time else attrs.evolve(e, time=when), info, fmt, node,
                             epoch))
                for e in view.events()]
