"""``pymap top``: what feeds its models (trio tasks), its tables, and the plain printer.

The screen (topui.py, Textual) and the printer (``--once``, ``-n N``, ``-o json``, a
pipe) show the same :class:`View`; only the screen imports Textual.

- ``pymap top [GLOB]``: :func:`feed_maps` asks the daemon's ``status`` once per
  refresh (with a GLOB it also follows those maps' events, so the daemon watches
  them while top runs).
- ``pymap top MAP``: :func:`feed_keys` follows MAP's event stream with a snapshot
  first (the subscriber's hold-on, resync and gap handling included); the snapshot
  is the stream's state, not rows as events (``snapshot_rows=False``), and is read
  chunk by chunk while refreshes go on.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

import attrs
import orjson
import trio
from rich.console import Console

from ..errors import DaemonUnavailable
from ..events import EntryBatch
from ..selection import Selection
from ..top import MapRates, rate_text, sparkline
from ..topkeys import KeyRates
from . import render
from .columns import Cell, Column, print_table

if TYPE_CHECKING:
    from ..client import Client, Dump
    from ..decoding import Decoding

TREND_WIDTH = 20  # characters of sparkline

MAP_COLUMNS = (
    Column("Name", keep=True), Column("Type", drop=5), Column("Entries", right=True, drop=4),
    Column("Added/s", right=True, drop=7), Column("Updated/s", right=True, drop=6),
    Column("Removed/s", right=True, drop=8), Column("Events/s", right=True, keep=True),
    Column("Poll", right=True, drop=9), Column("Engine", drop=10),
    Column("Memory", right=True, drop=3), Column("Trend", drop=2),
)
MAP_SORTS = ("name", "type", "entries", "added", "updated", "removed", "events", "poll_ms",
             "engine", "memory")  # by column, the trend has none


@attrs.define
class Status:
    """The status line: where the daemon is, and what happened to the stream."""

    endpoint: str
    state: str = "connecting"
    note: str = ""  # the last stall's end
    stream_note: str = ""  # the last resync or gap
    stalled_at: float | None = None
    refreshes: int = 0
    stalls: int = 0  # the stream's stalled events so far
    lost: int = 0  # events the stream missed (its lost events' counts)
    resyncs: int = 0  # the stream's resync events
    progress: Callable[[], str] | None = None  # what a snapshot under way has read

    def counts(self) -> dict[str, int]:
        return {"stalls": self.stalls, "lost": self.lost, "resyncs": self.resyncs}

    def stalled(self, why: str) -> None:
        if self.stalled_at is None:
            self.stalled_at = time.monotonic()
        self.state = f"STALLED: {why}; waiting for it (like tail -F)"

    def resumed(self, why: str = "") -> None:
        if self.stalled_at is not None:
            gone = time.monotonic() - self.stalled_at
            self.note = f"daemon back at {_clock()} {why or f'after {gone:.0f} s'}"
        self.stalled_at = None
        self.state = "live"

    def line(self) -> str:
        reading = self.progress() if self.progress is not None else ""
        return "  ".join(x for x in (_clock(), self.state, reading, self.note,
                                     self.stream_note, self.endpoint) if x)


def _clock() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


@attrs.define
class View:
    """What a refresh shows, the same for the screen and the printer."""

    status: Status
    map_name: str = ""  # the map of a per-key top; "" for the per-map one
    maps: MapRates | None = None
    keys: KeyRates | None = None
    by: str = ""  # sort column ("": the default)
    reverse: bool = False
    text: str = ""  # filter
    window: float = 5.0
    cells: bool = True  # tables are drawn (JSON lines need no sparklines)

    def ready(self) -> bool:
        """Rates can be shown: two status replies, or the map's state (the stream's
        snapshot, the baseline) is in."""
        if self.keys is not None:
            return self.keys.ready()
        return self.maps is not None and self.maps.samples >= 2

    def check_sort(self) -> None:
        """A usage error (ValueError) for a sort column this view does not have."""
        if self.by and self.ready() and self.by not in self.sorts():
            raise ValueError(f"no column {self.by!r} to sort by; one of: {', '.join(self.sorts())}")

    def sorts(self) -> tuple[str, ...]:
        if self.keys is not None:
            return ("key", *self.keys.learn(), "changes", "value")
        return MAP_SORTS

    def table(self, limit: int) -> tuple[list[Column], list[list[Cell]], list[dict]]:
        """(columns, rows of cells, rows as JSON) of the first ``limit`` rows."""
        if self.keys is not None:
            return self._key_table(self.keys, limit)
        if self.maps is None:
            return [*MAP_COLUMNS], [], []
        rows = self.maps.sorted_rows(self.by or "events", self.reverse, self.text)[:limit]
        cells: list[list[Cell]] = [
            [r.name, r.type, str(r.entries), rate_text(r.added), rate_text(r.updated),
             rate_text(r.removed), rate_text(r.events), f"{r.poll_ms:.1f}ms", r.engine or "-",
             render.size_text(r.memory), sparkline(r.trend, TREND_WIDTH)] for r in rows]
        return [*MAP_COLUMNS], cells, [r.as_json() for r in rows]

    def _key_table(self, keys: KeyRates, limit: int):
        fields = keys.learn()
        columns = [Column("Key", keep=True)]
        columns += [Column(f"{f}/s", right=True, drop=0 if i == 0 else 10 + i)
                    for i, f in enumerate(fields)]
        columns += [Column("Changes/s", right=True, drop=3 if fields else 0),
                    Column("Value", drop=2), Column("Trend", drop=1)]
        rows = keys.rows(self.by, self.reverse, self.text, limit)
        cells: list[list[Cell]] = [
            [r.key_text, *(rate_text(r.fields.get(f, 0.0)) for f in fields),
             rate_text(r.changes), r.value_text, sparkline(keys.trend(r.key), TREND_WIDTH)]
            for r in rows] if self.cells else []
        return columns, cells, [r.as_json() for r in rows]

    def title(self) -> str:
        if self.keys is not None:
            order = self.by or (self.keys.fields[0] if self.keys.fields else "changes")
            head = (f"pymap top {self.map_name}: {len(self.keys.entries())} keys, "
                    f"rates over {self.window:g} s")
        else:
            order = self.by or "events"
            count = len(self.maps.rows) if self.maps else 0
            head = f"pymap top: {count} watched maps"
        head += f", by {order}{' (reversed)' if self.reverse else ''}"
        if self.text:
            head += f", filter {self.text!r}"
        return head

    def print(self, console: Console, out: IO[str], as_json: bool, limit: int) -> None:
        """One refresh, as a table (plain when piped) or one JSON line."""
        self.cells = not as_json
        columns, cells, data = self.table(limit) if self.ready() else ([], [], [])
        self.status.refreshes += 1
        if as_json:
            out.write(orjson.dumps({
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
                "map": self.map_name or None,
                "keys": len(self.keys.entries()) if self.keys is not None else None,
                "status": self.status.state,
                "progress": self.status.progress() if self.status.progress else "",
                "note": self.status.note, "stream": self.status.counts(), "rows": data}).decode() + "\n")
            out.flush()
            return
        print_table(console, columns, cells, title=f"{self.title()}  ·  {self.status.line()}")
        out.flush()


# --- feeding ------------------------------------------------------------------------


async def feed_maps(client: Client, view: View, selectors: list[str], delay: float,
                    max_wait: float | None) -> None:
    """Status once per ``delay``; with ``selectors``, their events are followed too (so the
    daemon watches those maps) and only their maps are shown."""
    view.maps = MapRates(match=Selection(selectors).matches if selectors else None)
    async with trio.open_nursery() as nursery:
        if selectors:
            nursery.start_soon(_follow_only, client, view.status, selectors, max_wait)
        await _poll_status(client, view, delay, max_wait)
        nursery.cancel_scope.cancel()


async def _poll_status(client: Client, view: View, delay: float,
                       max_wait: float | None) -> None:
    assert view.maps is not None
    while True:
        try:
            st = await client.status()
        except DaemonUnavailable as e:
            view.status.stalled(str(e))
            assert view.status.stalled_at is not None
            if max_wait is not None and time.monotonic() - view.status.stalled_at > max_wait:
                raise
            await trio.sleep(delay)
            continue
        restarted = view.maps.epoch not in ("", st.epoch)
        view.maps.update(st)
        if restarted:
            view.status.resumed(f"restarted (new epoch {st.epoch}); rates start again")
        elif view.status.stalled_at is not None or view.status.state == "connecting":
            view.status.resumed()
        await trio.sleep(delay)


async def _follow_only(client: Client, status: Status, selectors: list[str],
                       max_wait: float | None) -> None:
    """Keep ``selectors`` subscribed (so watched) while top runs; counts come from status."""
    async with client.events(selectors, entry_batches=True, max_wait=max_wait) as stream:
        async for event in stream:
            _stream_state(status, event)


def _stream_state(status: Status, event) -> None:
    if event.action == "stalled":
        status.stalls += 1
        status.stalled(event.reason)
    elif event.action == "resumed":
        status.resumed(f"after {event.reason.removeprefix('after ')}")
    elif event.action == "resync":
        status.resyncs += 1
        status.stream_note = f"resynced at {_clock()} ({event.reason})"
    elif event.action == "lost":
        status.lost += event.missed
        status.stream_note = f"{event.missed} events missed at {_clock()}; rates start again"


async def feed_keys(client: Client, selector: str, view: View,
                    decide: Callable[[Dump], Decoding | None], max_wait: float | None) -> None:
    """Follow one map's events, a snapshot first, into ``view.keys``."""
    async with client.get(selector, entries=False) as dump:
        async for _ in dump.chunks():
            pass
    decoding = decide(dump)
    name = view.map_name = dump.map.name
    async with client.events([name], snapshot=True, entry_batches=True, snapshot_rows=False,
                             max_wait=max_wait) as stream:
        view.keys = KeyRates(lambda: stream.entries(name),
                             decoding.formatter if decoding else None,
                             render.key_text, render.value_text, view.window,
                             ready=lambda: stream.has_state(name))
        view.status.state = "live"

        def reading() -> str:
            return f"reading the map's state: {stream.reading[1]:,} keys" if stream.reading else ""

        view.status.progress = reading
        async for event in stream:
            if isinstance(event, EntryBatch):
                view.keys.add_batch(event)
            else:
                _stream_state(view.status, event)
                view.keys.add_event(event)


async def print_refreshes(view: View, count: int, delay: float, as_json: bool,
                          console: Console, out: IO[str], limit: int) -> None:
    """``count`` refreshes (0: until stopped), ``delay`` apart, once rates can be shown.
    Until then, JSON lines until stopped say how far start-up has got (no rows), one a
    ``delay``: a big map's snapshot takes seconds."""
    n, start = 0, trio.current_time()
    while not view.ready():
        await trio.sleep(0.05)
        if as_json and not count and trio.current_time() >= start + (n + 1) * delay:
            n += 1
            view.print(console, out, as_json, limit)
    if not n:  # the first rates a refresh after they can be had; else keep the pace
        start = trio.current_time()
    view.check_sort()
    printed = 0
    while not count or printed < count:
        n += 1
        printed += 1
        await trio.sleep_until(max(start + n * delay, trio.current_time()))  # a steady pace
        view.print(console, out, as_json, limit)
