"""``pymap top MAP``'s figures: rates per key of one map, with their history.

:class:`KeyRates` is fed one map's event stream (``EventStream`` with
``snapshot=True, entry_batches=True``): each poll of the daemon is one message; a
key's change rate is its events in the window, and a numeric value field's rate
of change is its new value minus its value before the window, over the time the
window's polls cover (exact for counters: the first event in the window carries
the value of the poll before it).

Why apart from :mod:`consumers.top` (the per-map model): a map may hold millions
of keys, so this model keeps raw bytes per poll and works in numpy arrays, and
decodes only the rows it shows -- a job of its own.  Nothing here re-reads a map:
the snapshot the stream takes at start is the baseline.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np

from .top import HISTORY


def numeric_fields(formatted: dict | None) -> dict[str, float]:
    """The numbers of a decoded value by field path (``value`` for a plain number);
    per-CPU values are summed over CPUs (or their decoder's ``total`` taken)."""
    if not formatted or "error" in formatted:
        return {}
    out: dict[str, float] = {}
    if "total" in formatted:
        _flatten(formatted["total"], "", out)
    elif "values" in formatted:
        for cpu in formatted["values"]:
            one: dict[str, float] = {}
            _flatten(cpu.get("value"), "", one)
            for name, v in one.items():
                out[name] = out.get(name, 0) + v
    else:
        _flatten(formatted.get("value"), "", out)
    return out


def _flatten(obj, path: str, out: dict[str, float]) -> None:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        out[path or "value"] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(obj, list) and len(obj) <= 16:  # a short array; long ones are data
        for i, v in enumerate(obj):
            _flatten(v, f"{path}[{i}]", out)


@attrs.define
class KeyRow:
    key: bytes
    key_text: str
    changes: float  # events per second in the window
    fields: dict[str, float]  # numeric field -> change per second in the window
    value_text: str

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key.hex(), "key_text": self.key_text, "changes": self.changes,
                "fields": self.fields, "value": self.value_text}


Formatter = Callable[[bytes, bytes], dict]


class _Poll:
    """What one poll of the daemon changed: key -> [events, value before, value after],
    and (worked out once, when first shown) each key's change of every numeric field."""

    __slots__ = ("arrays", "changes", "complete", "deltas", "time")

    def __init__(self, when: float):
        self.time = when
        self.changes: dict[bytes, list] = {}
        self.deltas: dict[bytes, tuple[float, ...] | None] = {}  # None: not numbers both sides
        self.complete = False  # deltas has every key of changes
        self.arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # see _arrays


def _raw_key(key: np.generic) -> bytes:
    """A key back as bytes from its array form (big-endian unsigned, or void)."""
    if isinstance(key, np.void):
        return key.tobytes()
    return int(key).to_bytes(key.dtype.itemsize, "big")


class KeyRates:
    """Per-key rates of one map from its event stream.

    ``entries``: the stream's state of the map (every key, for keys that did not
    change lately); ``formatter``: as ``get`` decodes (None: hex, no fields);
    ``key_text``/``value_text``: how ``get`` shows them; ``ready``: whether ``entries``
    holds the map yet (the snapshot may take seconds).

    Cost: each change is kept as raw bytes (no decoding) when it arrives; a refresh
    decodes each poll's changed values once (the first refresh that shows it), and
    keys and values only for the rows it shows.
    """

    def __init__(self, entries: Callable[[], Mapping[bytes, bytes]], formatter: Formatter | None,
                 key_text: Callable[[bytes, dict | None], str],
                 value_text: Callable[[bytes, dict | None], str],
                 window: float = 5.0, history: float = HISTORY,
                 ready: Callable[[], bool] = lambda: True):
        self.entries = entries
        self.ready = ready  # the baseline (the stream's snapshot) is in
        self.formatter = formatter
        self._key_text, self._value_text = key_text, value_text
        self.window = window
        self.history = history
        self.fields: list[str] = []  # numeric fields, from the first value decoded
        self._unpack: Callable[[bytes], tuple] | None = None  # a value's fields in one unpack
        self.polls: deque[_Poll] = deque()
        self.events = 0  # entry events counted (not snapshot rows)
        self._received: tuple[float, float] | None = None  # (daemon time, local monotonic)
        self._texts: dict[bytes, str] = {}  # key -> its text (keys never change)
        self.started = time.monotonic()

    # -- feeding --

    def add_batch(self, batch) -> None:
        """One EntryBatch (a poll's changes, or part of them)."""
        when = batch.message.time
        poll = self.polls[-1] if self.polls and self.polls[-1].time == when else None
        if poll is None:
            if self.polls and self.fields:  # the last poll is whole: its arrays now, not
                self._arrays(self.polls[-1])  # in the refresh that first shows it
            poll = _Poll(when)
            self.polls.append(poll)
        poll.complete = False
        poll.arrays = None
        self._received = (when, time.monotonic())
        changes = poll.changes
        for _, action, key, value, old in batch.entries():
            rec = changes.get(key)
            new = None if action == "removed" else value
            if rec is None:
                changes[key] = [1, old, new]
            else:
                rec[0] += 1
                rec[2] = new
                poll.deltas.pop(key, None)
            self.events += 1
        self._trim()

    def add_event(self, event) -> None:
        """A per-event ``Event``: snapshot rows are the baseline (nothing to count);
        a resync, a restart or a gap makes the rates start again."""
        if event.snapshot or event.action in ("stalled", "resumed", "lost"):
            if not self.fields and event.key is not None and event.value is not None:
                self._learn_fields(event.key, event.value)
            if event.action == "lost":
                self.reset()
            return
        if event.action in ("resync", "map_created", "map_removed"):
            self.reset()

    def reset(self) -> None:
        self.polls.clear()
        self._received = None
        self.started = time.monotonic()

    def _trim(self) -> None:
        oldest = self.polls[-1].time - self.history - self.window
        while self.polls and self.polls[0].time < oldest:
            self.polls.popleft()

    def learn(self) -> list[str]:
        """The numeric fields, learnt from the map's first entry if not yet known."""
        if not self.fields:
            for key, value in self.entries().items():
                self._learn_fields(key, value)
                break
        return self.fields

    def _learn_fields(self, key: bytes, value: bytes) -> None:
        if self.formatter is None:
            return
        numbers = numeric_fields(self.formatter(key, value))
        self.fields = list(numbers)
        # Values of plain integers (a declared layout, flat BTF): one struct unpack per
        # value instead of decoding, once it is seen to give the decoder's numbers.
        rows = getattr(self.formatter, "value_rows", None)
        if rows is not None and self.fields:
            unpack, names = rows[0].unpack, rows[1] or ["value"]
            got = unpack(value)
            if (names == self.fields and all(type(x) in (int, float) for x in got)
                    and list(got) == list(numbers.values())):
                self._unpack = unpack

    # -- reading --

    def daemon_now(self) -> float:
        """Now on the daemon's clock (polls are stamped with it; a remote daemon's may differ)."""
        if self._received is None:
            return time.time()
        when, local = self._received
        return when + (time.monotonic() - local)

    def _fields_of(self, key: bytes, value: bytes | None) -> dict[str, float]:
        if value is None or self.formatter is None:
            return {}
        return numeric_fields(self.formatter(key, value))

    def _delta(self, poll: _Poll, key: bytes) -> tuple[float, ...] | None:
        """Each field's change by ``key`` in ``poll`` (None: a side is not a number)."""
        try:
            return poll.deltas[key]
        except KeyError:
            pass
        _, old, new = poll.changes[key]
        delta = None
        if old is not None and new is not None and self._unpack is not None:
            delta = tuple(y - x for x, y in zip(self._unpack(old), self._unpack(new)))
        elif old is not None and new is not None:
            a, b = self._fields_of(key, old), self._fields_of(key, new)
            if a and b:
                delta = tuple(b[f] - a[f] if f in a and f in b else 0.0 for f in self.fields)
        poll.deltas[key] = delta
        return delta

    def _poll_deltas(self, poll: _Poll) -> dict[bytes, tuple[float, ...] | None]:
        if not poll.complete:
            deltas, unpack = poll.deltas, self._unpack
            for key, (_, old, new) in poll.changes.items():
                if key in deltas:
                    continue
                if unpack is None or old is None or new is None:
                    self._delta(poll, key)
                else:
                    deltas[key] = tuple(y - x for x, y in zip(unpack(old), unpack(new)))
            poll.complete = True
        return poll.deltas

    def key_text(self, key: bytes) -> str:
        text = self._texts.get(key)
        if text is None:
            if len(self._texts) > 100_000:
                self._texts.clear()
            value = self.entries().get(key)
            fmt = self.formatter(key, value) if self.formatter and value is not None else None
            text = self._texts[key] = self._key_text(key, fmt)
        return text

    def _arrays(self, poll: _Poll) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The poll as flat arrays: keys (sortable in byte order), events, and each
        field's change (a row per key, NaN where a side is not a number)."""
        if poll.arrays is None:
            deltas = self._poll_deltas(poll) if self.fields else {}
            keys = list(poll.changes)
            width = len(keys[0]) if keys else 1
            kind = f">u{width}" if width in (1, 2, 4, 8) else f"V{width}"
            nan = (math.nan,) * len(self.fields)
            poll.arrays = (
                np.frombuffer(b"".join(keys), dtype=kind),
                np.fromiter((rec[0] for rec in poll.changes.values()), np.float64, len(keys)),
                np.array([deltas.get(k) or nan for k in keys],
                         np.float64).reshape(len(keys), len(self.fields)))
        return poll.arrays

    def rows(self, by: str = "", reverse: bool = False, text: str = "",
             limit: int = 50) -> list[KeyRow]:
        """The ``limit`` first rows: keys that changed in the window sorted ``by`` ("key",
        "changes", "value" or a field name; "" is the first field, else changes), then
        keys that did not, in map order."""
        fields = self.learn()
        by = by or (fields[0] if fields else "changes")
        now = self.daemon_now()
        times = [p.time for p in self.polls]
        # The window's changes happened after the poll before its first one, up to the
        # last poll (or, on a quiet map, about now): exact spans, not the refresh's.
        every = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 1.0
        end = max(times[-1], now - every) if times else now
        first = bisect.bisect_right(times, now - self.window)
        window = [self._arrays(self.polls[i]) for i in range(first, len(times))]
        window = [w for w in window if len(w[0])]
        out: list[KeyRow] = []
        changed: set[bytes] = set()
        if window:
            # Every key of the window once (in byte order), with its events, its fields'
            # changes and the span since the poll before its first change.
            spans = np.array([max(end - (times[i - 1] if i > 0 else times[i] - every), 1e-3)
                              for i in range(first, len(times)) if len(self.polls[i].changes)])
            keys, firsts, inverse = np.unique(np.concatenate([w[0] for w in window]),
                                              return_index=True, return_inverse=True)
            inverse = inverse.reshape(-1)
            events = np.bincount(inverse, np.concatenate([w[1] for w in window]), len(keys))
            # polls in time order: a key's first occurrence is in its first poll
            covered = np.repeat(spans, [len(w[0]) for w in window])[firsts]
            deltas = np.concatenate([w[2] for w in window])
            sums = np.zeros((len(keys), len(fields)))
            for j in range(len(fields)):
                col = deltas[:, j]
                sums[:, j] = np.bincount(inverse, np.nan_to_num(col), len(keys))
            known = np.bincount(inverse, ~np.isnan(deltas[:, 0]), len(keys)) > 0 \
                if fields else np.zeros(len(keys), bool)
            picked = np.arange(len(keys))
            if text:
                needle = text.lower()
                picked = np.array([i for i, k in enumerate(keys)
                                   if needle in self.key_text(_raw_key(k)).lower()], np.int64)
            out = self._pick(keys, picked, events / covered, sums / covered[:, None], known,
                             by, reverse, limit)
            if len(out) < limit:
                changed = {_raw_key(k) for k in keys}
        if len(out) < limit:  # quiet keys fill the screen
            needle = text.lower()
            for key, value in self.entries().items():
                if len(out) >= limit:
                    break
                if key in changed or (needle and needle not in self.key_text(key).lower()):
                    continue
                out.append(self._row(key, 0.0, dict.fromkeys(fields, 0.0), value))
        return out

    def _pick(self, keys: np.ndarray, picked: np.ndarray, changes: np.ndarray,
              rates: np.ndarray, known: np.ndarray, by: str, reverse: bool,
              limit: int) -> list[KeyRow]:
        """The first ``limit`` rows of the window's keys (``picked`` of them) in order
        ``by``: only they are decoded (by figures, ties go by raw key while picking, by
        key text as shown)."""
        fields = self.fields

        def row(i: int) -> KeyRow:
            key = _raw_key(keys[i])
            new = next(p.changes[key][2] for p in reversed(self.polls) if key in p.changes)
            figures = dict(zip(fields, map(float, rates[i]))) if known[i] else {}
            return self._row(key, float(changes[i]), figures, new)

        if by == "key":
            texts = sorted(((self.key_text(_raw_key(keys[i])), int(i)) for i in picked),
                           reverse=reverse)
            return [row(i) for _, i in texts[:limit]]
        if by == "value":
            built = [row(int(i)) for i in picked]
            return sorted(built, key=lambda r: r.value_text, reverse=reverse)[:limit]
        figure = changes if by not in fields else np.where(known, rates[:, fields.index(by)], 0.0)
        order = picked[np.argsort(-figure[picked], kind="stable")]
        chosen = (order[::-1] if reverse else order)[:limit]
        rows = [row(int(i)) for i in chosen]
        by_key = {r.key: float(figure[i]) for r, i in zip(rows, chosen)}
        rows.sort(key=lambda r: (-by_key[r.key], r.key_text), reverse=reverse)
        return rows

    def _row(self, key: bytes, changes: float, fields: dict[str, float],
             new: bytes | None) -> KeyRow:
        value = new if new is not None else self.entries().get(key)
        fmt = self.formatter(key, value) if self.formatter and value is not None else None
        text = "(removed)" if value is None else self._value_text(value, fmt)
        return KeyRow(key, self.key_text(key), changes, fields, text)

    def trend(self, key: bytes) -> list[float]:
        """Per poll of the history: the key's first field's change per second (its
        events, for a map without numeric fields)."""
        out, prev = [], None
        for poll in self.polls:
            gap = poll.time - prev if prev is not None else 0.0
            prev = poll.time
            rec = poll.changes.get(key)
            if gap <= 0:
                continue  # the first poll: no time to divide by
            if rec is None:
                out.append(0.0)
            elif not self.fields:
                out.append(rec[0] / gap)
            else:
                delta = self._delta(poll, key)
                out.append(max(delta[0], 0.0) / gap if delta else 0.0)
        return out
