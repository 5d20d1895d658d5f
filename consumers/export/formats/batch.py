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
from itertools import repeat
from operator import itemgetter

import attrs
import msgspec
import numpy as np
import orjson

from watcher.decode.textrows import Decimal, Part, hex_column, render_rows
from watcher.wire.schema import MapInfo

from ...decoding import EntryFormatter
from ...eventjson import formatted_entry
from ...events import ACTIONS, EntryBatch, Event
from ..record import ExportRecord, RecordRun, event_id
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
    """A payload as ``pattern % values``, values picked from (seq, key, value, old, fmt).

    ``texts`` and ``slots`` say the same for :func:`watcher.decode.textrows.render_rows`:
    ``texts[0]``, slot ``slots[0]``'s value, ``texts[1]``, ... ``texts[-1]``.
    """

    pattern: bytes
    pick: Callable[[tuple], tuple]
    texts: tuple[bytes, ...] = ()
    slots: tuple[int, ...] = ()

    def fill(self, values: tuple) -> bytes:
        return self.pattern % self.pick(values)


def make_template(payload: bytes, text: bool) -> Template | None:
    """Split a marked payload into a template, or None when it has no usable slots."""
    rx = TEXT_MARK if text else JSON_MARK
    texts: list[bytes] = []
    picks: list[int] = []
    at, closing = 0, b""
    for m in rx.finditer(payload):
        whole, inner = m.group(1), m.group(2)
        name = (whole or inner).decode()
        if name not in _INDEX:
            return None
        quote = b'"' if whole and name in QUOTED else b""  # a JSON string keeps its quotes
        texts.append(closing + payload[at:m.start()] + quote)
        picks.append(_INDEX[name])
        at, closing = m.end(), quote
    if not picks:
        return None
    texts.append(closing + payload[at:])
    getter = itemgetter(*picks)
    pick = getter if len(picks) > 1 else (lambda values: (getter(values),))
    pattern = b"%s".join(t.replace(b"%", b"%%") for t in texts)
    return Template(pattern, pick, tuple(texts), tuple(picks))


class BatchRenderer:
    """The batch fast path of one :class:`~.base.Format`."""

    def __init__(self, fmt_obj, text: bool = False):
        self.format = fmt_obj
        self.text = text  # CEF: plain text, markers raw
        self.templated = 0  # events rendered through a template (the rest: per event)

    def render(self, view: EntryBatch, info: MapInfo | None, fmt: EntryFormatter | None,
               node: str, epoch: str) -> list[ExportRecord]:
        out = self.render_run(view, info, fmt, node, epoch)
        return out.records() if isinstance(out, RecordRun) else out

    def render_run(self, view: EntryBatch, info: MapInfo | None, fmt: EntryFormatter | None,
                   node: str, epoch: str) -> RecordRun | list[ExportRecord]:
        """The events of ``view``: one :class:`RecordRun` when the column path applies
        (undecoded, templated: the common case), else one record per event."""
        message = view.message
        when = message.time or time.time()
        percpu = info is not None and info.percpu
        if percpu or (fmt is not None and self.text):
            return self._slow(view, when, info, fmt, node, epoch)
        if fmt is None:
            fast = self._columns(view, when, info, node, epoch)
            if fast is not None:
                return fast
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
                templates[action] = self._checked(event, values, info, fmt, node, epoch)[0]
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

    def _checked(self, event: Event, values: tuple, info: MapInfo | None,
                 fmt: EntryFormatter | None, node: str, epoch: str
                 ) -> tuple[Template | None, bytes]:
        """The template of ``event``'s action if it gives ``event``'s real payload from its
        ``values`` (else None), and that payload."""
        real = self.format.payload(base.facts(event, info, fmt, node, epoch))
        t = self._template(event, info, fmt, node, epoch)
        return (t if t is not None and t.fill(values) == real else None), real

    def _columns(self, view: EntryBatch, when: float, info: MapInfo | None, node: str,
                 epoch: str) -> RecordRun | None:
        """Undecoded events, each action's at once (textrows.render_rows), as one run;
        None when a template does not apply, and the caller goes event by event."""
        message, frames, start = view.message, view.frames, view.start
        acts = np.frombuffer(frames[0], np.uint8)[start:message.count]
        seq0, codes = message.seq, np.unique(acts).tolist()
        seqs: list[int] = []
        actions: list[str] = []
        texts: list[bytes] = []
        for code in codes:
            index = np.flatnonzero(acts == code) + start
            action = ACTIONS[code]
            text = self._action_rows(view, action, index, when, info, node, epoch)
            if text is None:
                return None
            seqs += (index + seq0).tolist()
            actions += repeat(action, len(index))
            texts.append(text)
        self.templated += len(seqs)
        name = message.map.name
        if len(codes) == 1:  # the lines are the run's text as they are
            return RecordRun.of(node, epoch, name, when, seqs, actions, texts[0])
        order = np.argsort(np.array(seqs), kind="stable").tolist()  # the message's order
        payloads = [p for t in texts for p in t.split(b"\n")[:-1]]
        return RecordRun.of_payloads(node, epoch, name, when, list(map(seqs.__getitem__, order)),
                                     list(map(actions.__getitem__, order)),
                                     list(map(payloads.__getitem__, order)))

    def _action_rows(self, view: EntryBatch, action: str, index: np.ndarray, when: float,
                     info: MapInfo | None, node: str, epoch: str) -> bytes | None:
        """The payloads of the events at ``index`` (all ``action``) as lines, each ended
        by a newline, in one buffer; or None."""
        message, frames = view.message, view.frames
        ks, vs, i = message.key_size, message.value_stride, int(index[0])
        key, value = frames[1][i * ks:(i + 1) * ks], frames[2][i * vs:(i + 1) * vs]
        old = frames[3][i * vs:(i + 1) * vs] if action == "updated" else None
        event = Event(action, message.map, message.seq + i, message.topic_seq + i, when,
                      key=key, value=value, old_value=old)
        values = (b"%d" % event.seq, key.hex().encode(), value.hex().encode(),
                  old.hex().encode() if old is not None else b"", b"")
        t, real = self._checked(event, values, info, None, node, epoch)
        if t is None or _INDEX["fmt"] in t.slots or any(b"\0" in x or b"\n" in x
                                                       for x in t.texts):
            return None  # NUL and newline are the renderer's own bytes
        n = len(index)
        columns: dict[int, Part] = {
            _INDEX["seq"]: Decimal(index.astype(np.uint64) + np.uint64(message.seq))}
        for name, buf, size in (("key", frames[1], ks), ("value", frames[2], vs),
                                ("old", frames[3], vs)):
            if _INDEX[name] in t.slots:
                rows = np.frombuffer(buf, np.uint8, message.count * size)
                picked = rows.reshape(message.count, size)[index].tobytes()
                columns[_INDEX[name]] = hex_column(picked, size, n)
        parts: list[Part] = [t.texts[0]]
        for slot, text in zip(t.slots, [*t.texts[1:-1], t.texts[-1] + b"\n"]):
            parts += [columns[slot], text]
        lines = render_rows(parts, n)
        return lines if lines.startswith(real + b"\n") else None

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
        return [render(base.facts(e if e.time else msgspec.structs.replace(e, time=when), info, fmt,
                                  node, epoch))
                for e in view.events()]
