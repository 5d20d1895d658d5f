"""``pymap top``'s figures: rates per map, and what the screens share to show rates.

Two models, fed by the client library and read by the screen (consumers/cli/topui.py)
or the plain printer (consumers/cli/top.py):

- :class:`MapRates` (here): one row per watched map, from the daemon's ``status``
  (its published events by action): rates are differences of counters between
  two status replies; a new epoch (a restarted daemon) starts them again.
- :class:`consumers.topkeys.KeyRates`: one row per key of one map, from its event
  stream; it has its own module because its job (windows of polls, per-field
  deltas, picking and sorting rows among millions of keys) shares nothing with
  the per-map model but the history length and the way a rate is shown.

Nothing here re-reads a map: the snapshot the stream takes at start is the baseline.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from watcher.wire.schema import StatusReply

HISTORY = 60.0  # seconds of history behind a sparkline
SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(samples: list[float], width: int) -> str:
    """``samples`` (oldest first) as at most ``width`` block characters, the latest at the
    right; each is the largest sample of its share, scaled to the largest of all (``▁``: 0)."""
    if width <= 0:
        return ""
    if len(samples) > width:
        per = len(samples) / width
        samples = [max(samples[int(i * per):max(int((i + 1) * per), int(i * per) + 1)])
                   for i in range(width)]
    top = max(samples, default=0.0)
    if top <= 0:
        return "▁" * len(samples)
    return "".join(SPARKS[min(len(SPARKS) - 1, int(s / top * (len(SPARKS) - 1) + 0.5))]
                   for s in samples)


def rate_text(rate: float) -> str:
    """A rate for a column: 3 significant figures, thousands as k and M."""
    if rate == 0:
        return "0"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(rate) >= scale:
            return f"{rate / scale:.3g}{unit}"
    return f"{rate:.3g}" if abs(rate) >= 0.01 else f"{rate:.1e}"


# --- per map ------------------------------------------------------------------------


@attrs.define
class MapRow:
    id: int
    name: str
    type: str
    entries: int
    added: float  # per second
    updated: float
    removed: float
    events: float
    poll_ms: float
    engine: str
    memory: int  # bytes: the daemon's state for it plus in-kernel shadow maps
    trend: list[float]  # events/s, one sample per status reply, oldest first

    def as_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out.pop("trend")
        return out


MAP_SORTS = ("events", "added", "updated", "removed", "name", "type", "entries", "poll_ms",
             "engine", "memory")


class MapRates:
    """Rates per watched map from successive ``status`` replies."""

    def __init__(self, history: float = HISTORY, match: Callable[[str], bool] | None = None):
        self.history = history
        self.match = match  # the maps shown (``pymap top GLOB``); None: every watched map
        self.epoch = ""
        self.restarts = 0  # epochs seen after the first
        self.updated_at = 0.0  # wall time of the last status reply
        self.samples = 0  # status replies taken
        self._prev: dict[int, tuple[float, int, int, int, int]] = {}  # id -> (t, ev, a, u, r)
        self._trend: dict[int, deque[tuple[float, float]]] = {}  # id -> (t, events/s)
        self.rows: list[MapRow] = []

    def update(self, st: StatusReply, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if st.epoch != self.epoch:
            if self.epoch:
                self.restarts += 1
            self.epoch = st.epoch
            self._prev.clear()  # counters start again with the daemon
            self.samples = 0
        rows, seen = [], set()
        for w in st.watched:
            if self.match is not None and not self.match(w.name):
                continue
            seen.add(w.id)
            counters = (w.events, w.added, w.updated, w.removed)
            prev = self._prev.get(w.id)
            self._prev[w.id] = (now, *counters)
            rates = [0.0] * 4
            if prev is not None and now > prev[0]:
                rates = [max(0.0, (c - p) / (now - prev[0])) for c, p in zip(counters, prev[1:])]
            trend = self._trend.setdefault(w.id, deque())
            if prev is not None:
                trend.append((now, rates[0]))
            while trend and trend[0][0] < now - self.history:
                trend.popleft()
            rows.append(MapRow(w.id, w.name, w.type, w.entries, rates[1], rates[2], rates[3],
                               rates[0], w.last_poll_ms, w.engine.partition(":")[0],
                               w.state_bytes + w.kernel_bytes, [r for _, r in trend]))
        for gone in set(self._prev) - seen:  # no longer watched
            self._prev.pop(gone, None)
            self._trend.pop(gone, None)
        self.rows = rows
        self.updated_at = time.time()
        self.samples += 1

    def sorted_rows(self, by: str = "events", reverse: bool = False,
                    text: str = "") -> list[MapRow]:
        """Rows whose name contains ``text``, biggest first for figures, A-Z for names."""
        rows = [r for r in self.rows if text.lower() in r.name.lower()] if text else self.rows
        if by in ("name", "type", "engine"):
            return sorted(rows, key=lambda r: (getattr(r, by), r.name), reverse=reverse)
        return sorted(rows, key=lambda r: (-getattr(r, by), r.name), reverse=reverse)
