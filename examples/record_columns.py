"""Keep up with a buffer's records by the million: the columnar record API.

    .venv/bin/python examples/record_columns.py execs
    .venv/bin/python examples/record_columns.py --rows execs      # each record, decoded
    .venv/bin/python examples/record_columns.py --events execs    # per-record Events
    .venv/bin/python examples/record_columns.py -e ipc:///tmp/p/pymap.sock bench_rb

Follows event sources (ring buffers, perf arrays) with ``record_batches=True``:
one event per batch, whose ``records`` (a RecordSet) gives the batch's fields as
NumPy columns viewing the received bytes, or each record's decoded fields as a
tuple (``--rows``).  Every second it prints records/s, records lost, and per
field a summary: min..max of a number, the most frequent value of a text.
``--events`` makes the same summary from per-record ``Event`` objects (each
record's ``formatted`` fields), read a batch at a time through
``stream.batches()``: the object-per-record API at its fastest.
See docs/sources.md ("The record API") and examples/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import numpy as np
import trio

from consumers.client import DEFAULT_ENDPOINT, Client, DaemonError
from consumers.events import Event
from consumers.recordsets import RecordSet, ShortRecords


class Window:
    """What one second of batches held: counts, and per field its summary so far."""

    def __init__(self):
        self.records = 0
        self.lost = 0
        self.low: dict[str, int] = {}
        self.high: dict[str, int] = {}
        self.texts: dict[str, Counter] = {}

    def add_columns(self, records: RecordSet) -> None:
        """The NumPy way: one operation per field and batch, none per record."""
        self.records += len(records)
        for name, column in records.columns().items():
            if column.dtype.kind in "iu" and column.ndim == 1 and len(column):
                low, high = int(column.min()), int(column.max())
                self.low[name] = min(self.low.get(name, low), low)
                self.high[name] = max(self.high.get(name, high), high)
            elif column.dtype.kind == "S":  # char[N]: bytes up to the NULs
                values, counts = np.unique(column, return_counts=True)
                top = self.texts.setdefault(name, Counter())
                for v, n in zip(values.tolist(), counts.tolist()):
                    top[v.decode("utf-8", "replace")] += n

    def add_rows(self, records: RecordSet) -> None:
        """The per-record way: each record's fields decoded (enum names, address text)."""
        for row in records.rows():
            print("  ".join(f"{n}={v}" for n, v in zip(records.names, row)))
        self.records += len(records)

    def add_events(self, batch: list[Event]) -> None:
        """The per-record ``Event`` way, one received message's events at a time: a plain
        ``for``, no ``await`` per record; each record's fields decoded in ``formatted``."""
        for event in batch:
            if event.action == "lost":
                self.lost += event.missed
            elif event.action == "record":
                self.records += 1
                for name, value in (event.formatted or {}).items():
                    if isinstance(value, int):  # bool too, as the column's 0/1
                        self.low[name] = min(self.low.get(name, value), int(value))
                        self.high[name] = max(self.high.get(name, value), int(value))
                    elif isinstance(value, str):  # text, enum names, addresses
                        self.texts.setdefault(name, Counter())[value] += 1

    def report(self, seconds: float) -> str:
        parts = [f"{self.records / seconds:,.0f} records/s", f"{self.lost:,} lost"]
        parts += [f"{n} {self.low[n]}..{self.high[n]}" for n in self.low]
        parts += [f"{n} mostly {c.most_common(1)[0][0]!r}" for n, c in self.texts.items() if c]
        return ", ".join(parts)


async def follow(endpoint: str, names: list[str], how: str) -> None:
    """``how``: "columns", "rows" (a RecordSet per batch) or "events" (an Event per record)."""
    async with Client(endpoint) as client:  # noqa: SIM117 (nested on purpose, as in the docs)
        async with client.events(names, record_batches=how != "events") as stream:
            window, started = Window(), time.monotonic()
            async for batch in stream.batches():  # a message's events (a read's in parts)
                if how == "events":
                    window.add_events(batch)
                else:
                    for event in batch:
                        add_batch_event(window, event, how == "rows")
                if time.monotonic() - started >= 1.0:
                    print(window.report(time.monotonic() - started), flush=True)
                    window, started = Window(), time.monotonic()


def add_batch_event(window: Window, event: Event, rows: bool) -> None:
    """One event of a ``record_batches=True`` stream: a batch of records, or a loss."""
    if event.action == "records" and event.records is not None:
        try:
            (window.add_rows if rows else window.add_columns)(event.records)
        except ShortRecords:  # records shorter than their layout: one by one
            window.records += len(event.records)
        except ValueError:  # no layout: raw bytes only (event.records[i])
            window.records += len(event.records)
    elif event.action == "lost":
        window.lost += event.missed


def main() -> int:
    parser = argparse.ArgumentParser(description="Summarise buffers' records, column-wise.")
    parser.add_argument("names", nargs="+", metavar="NAME", help="a source's buffer name")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--rows", action="store_const", dest="how", const="rows",
                     default="columns",
                     help="print each record's decoded fields instead of summaries")
    how.add_argument("--events", action="store_const", dest="how", const="events",
                     help="summarise per-record Events (stream.batches()) instead of columns")
    parser.add_argument("--endpoint", "-e", default=DEFAULT_ENDPOINT,
                        help=f"the daemon's request endpoint (default: {DEFAULT_ENDPOINT}; "
                             "or set PYMAP_ENDPOINT)")
    args = parser.parse_args()
    try:
        trio.run(follow, args.endpoint, args.names, args.how)
    except KeyboardInterrupt:
        return 130
    except DaemonError as e:
        print(f"record_columns: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
