"""Printing events: JSON lines for machines, aligned coloured lines for people.

Both flush per event, so ``pymap events -f -o json | jq`` sees each event as
it happens.  Map metadata (per-CPU layout, BTF) is fetched once per map id
through the client library and cached.
"""

from __future__ import annotations

import datetime
import functools
import sys
from typing import IO

import orjson
from rich.console import Console
from rich.markup import escape

from watcher.decode.bpfabi import percpu_slot
from watcher.wire.schema import MapInfo

from ..client import Client, DaemonError
from ..decoding import EntryFormatter, entry_formatter
from ..subscriber import Event
from .render import compact

ACTION_STYLES = {"added": "green", "updated": "yellow", "removed": "red",
                 "map_created": "bold green", "map_removed": "bold red",
                 "resync": "bold magenta", "lost": "bold red", "record": "cyan",
                 "records": "cyan"}


@functools.lru_cache(maxsize=256)  # every event of a poll has the poll's time
def rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


class MapCache:
    """MapInfo and entry formatter per map id, asked of the daemon once."""

    def __init__(self, client: Client, decode: bool = True):
        self.client = client
        self.decode = decode
        self._cache: dict[int, tuple[MapInfo | None, EntryFormatter | None]] = {}

    def remember(self, info: MapInfo, btf: bytes | None = None, layout: dict | None = None) -> None:
        if info.id not in self._cache or btf is not None or layout is not None:
            self._cache[info.id] = (info, entry_formatter(info, btf, layout) if self.decode
                                    else None)

    async def lookup(self, event: Event) -> tuple[MapInfo | None, EntryFormatter | None]:
        map_id = event.map.id
        if map_id not in self._cache and map_id:
            if event.info is not None and event.action in ("map_created", "map_removed"):
                self._cache[map_id] = (event.info, None)
            try:
                async with self.client.get(f"id:{map_id}", entries=False) as dump:
                    async for _ in dump.chunks():
                        pass
                self._cache.pop(map_id, None)  # built-in and declared decoders need no BTF
                self.remember(dump.map, dump.btf, dump.layout)
            except DaemonError:
                self._cache.setdefault(map_id, (event.info, None))
        return self._cache.get(map_id, (event.info, None))


def _split(info: MapInfo | None, raw: bytes | None):
    """Per-CPU values as [{cpu, value}], others as one hex string."""
    if raw is None:
        return None
    if info is not None and info.percpu:
        slot = percpu_slot(info.value_size)
        return [{"cpu": c, "value": raw[c * slot:c * slot + info.value_size].hex()}
                for c in range(info.ncpus)]
    return raw.hex()


def event_json(event: Event, info: MapInfo | None, fmt: EntryFormatter | None) -> dict:
    out: dict = {"seq": event.seq, "time": rfc3339(event.time),
                 "map": {"id": event.map.id, "name": event.map.name}, "action": event.action}
    percpu = info is not None and info.percpu
    if event.key is not None:
        out["key"] = event.key.hex()
        out["values" if percpu else "value"] = _split(info, event.value)
        out["old_values" if percpu else "old_value"] = _split(info, event.old_value)
        if fmt is not None and event.value is not None:
            out["formatted"] = fmt(event.key, event.value)
            if event.old_value is not None:
                old = fmt(event.key, event.old_value)
                out["formatted"]["old_value" if not percpu else "old_values"] = (
                    old.get("values") if percpu else old.get("value"))
                if "text" in old:
                    out["formatted"]["old_text"] = old["text"]
    if event.action in ("map_created", "map_removed") and event.info is not None:
        out["map"].update({"type": event.info.type, "key_size": event.info.key_size,
                           "value_size": event.info.value_size,
                           "max_entries": event.info.max_entries, "pinned": event.info.pinned})
    if event.action == "lost":
        out["missed"] = event.missed
    if event.action == "record" and event.value is not None:
        out["value"] = event.value.hex()
        if event.formatted is not None:
            out["formatted"] = event.formatted
    if event.action == "records" and event.records is not None:
        out["count"] = len(event.records)
    if event.reason:
        out["reason"] = event.reason
    if event.snapshot:
        out["snapshot"] = True
    return out


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
        self.console.print(self._line(record))
        self.out.flush()

    @staticmethod
    def _line(r: dict) -> str:
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
