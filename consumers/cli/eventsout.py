"""Printing events: JSON lines for machines, aligned coloured lines for people.

Both flush per event, so ``pymap events -f -o json | jq`` sees each event as
it happens.  The JSON object and the map metadata cache live in the library
(consumers/eventjson.py), shared with the exporter.
"""

from __future__ import annotations

import sys
from typing import IO

import orjson
from rich.console import Console
from rich.markup import escape

from ..eventjson import MapCache, event_json, rfc3339
from ..events import Event
from .render import compact

__all__ = ["ACTION_STYLES", "EventPrinter", "MapCache", "event_json", "rfc3339"]

ACTION_STYLES = {"added": "green", "updated": "yellow", "removed": "red",
                 "map_created": "bold green", "map_removed": "bold red",
                 "resync": "bold magenta", "lost": "bold red", "record": "cyan",
                 "records": "cyan"}


# Why a buffer lost records (LostRecords.reason), as the table output says it.
LOSS_REASONS = {"perf": "perf ring full", "producer": "counted by the producer: ring full"}


class EventPrinter:
    def __init__(self, cache: MapCache, as_json: bool, out: IO[str] = sys.stdout):
        self.cache = cache
        self.as_json = as_json
        self.out = out
        self.console = Console(file=out, highlight=False, soft_wrap=True)
        self.count = 0

    async def print(self, event: Event) -> None:
        # Buffer records carry their own layout; there is no map entry format to look up.
        buffer_event = event.action in ("record", "records") or event.reason in LOSS_REASONS
        info, fmt = (None, None) if buffer_event else await self.cache.lookup(event)
        record = event_json(event, info, fmt)
        self.count += 1
        if self.as_json:
            self.out.write(orjson.dumps(record).decode() + "\n")
            self.out.flush()
            return
        self.console.print(event_line(record))
        self.out.flush()


def event_line(r: dict) -> str:
    """One event (its JSON document) as the table output's line: the CLI's and the fleet's."""
    style = ACTION_STYLES.get(r["action"], "")
    head = (f"{r['time'][11:23]} {r['seq']:>8} {escape(r['map']['name'] or '-'):<20} "
            f"[{style}]{r['action']:<11}[/]")
    if r["action"] == "lost":
        if r.get("reason") in LOSS_REASONS:
            return head + f" {r['missed']} records lost ({LOSS_REASONS[r['reason']]})"
        return head + f" {r['missed']} events missed"
    if r["action"] == "record":
        formatted = r.get("formatted")
        text = (" ".join(f"{k}={compact(v)}" for k, v in formatted.items()) if formatted
                else r["value"])
        return head + " " + escape(text)
    if r["action"] == "records":
        return head + f" {r.get('count', 0)} records"
    if r["action"] == "resync":
        return head + f" state re-read ({escape(r.get('reason', ''))})"
    if r["action"] in ("map_created", "map_removed"):
        m = r["map"]
        return head + f" id {m['id']} {m.get('type', '')} {' '.join(m.get('pinned', []))}"
    formatted = r.get("formatted")
    if formatted and "text" in formatted:  # built-in decoders: "KEY -> VALUE"
        key, _, value = formatted["text"].partition(" -> ")
        old = formatted.get("old_text", "").partition(" -> ")[2] or None
    elif formatted and "key" in formatted:
        key = compact(formatted["key"])
        value = compact(formatted.get("value", formatted.get("values")))
        old = formatted.get("old_value", formatted.get("old_values"))
    else:
        key = r["key"]
        value = compact(r.get("value", r.get("values")))
        old = r.get("old_value", r.get("old_values"))
    text = f"{head} {escape(key)} = {escape(value)}"
    if old is not None:
        text += f" [dim](was {escape(compact(old))})[/]"
    return text
