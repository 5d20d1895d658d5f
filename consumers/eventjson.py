"""pymap's own JSON event object (``pymap events -o json``) and the map metadata it needs.

A library module, not CLI code: the ``events`` command prints these objects and
the exporter's ``json`` format (and every other export format's ``pymap``
namespace) embeds them, so both take them from here.  Map metadata (per-CPU
layout, BTF) is fetched once per map id through the client library and cached.
"""

from __future__ import annotations

import datetime
import functools

from watcher.kernel.sys.abi import percpu_slot
from watcher.wire.schema import MapInfo

from .client import Client, DaemonError
from .decoding import EntryFormatter, entry_formatter
from .events import Event

__all__ = ["MapCache", "event_json", "formatted_entry", "rfc3339"]


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


def formatted_entry(fmt: EntryFormatter, key: bytes, value: bytes, old_value: bytes | None,
                    percpu: bool) -> dict:
    """The decoded entry (``formatted``), with the old value beside the new one."""
    out = fmt(key, value)
    if old_value is not None:
        old = fmt(key, old_value)
        out["old_value" if not percpu else "old_values"] = (
            old.get("values") if percpu else old.get("value"))
        if "text" in old:
            out["old_text"] = old["text"]
    return out


def event_json(event: Event, info: MapInfo | None, fmt: EntryFormatter | None) -> dict:
    out: dict = {"seq": event.seq, "time": rfc3339(event.time),
                 "map": {"id": event.map.id, "name": event.map.name}, "action": event.action}
    percpu = info is not None and info.percpu
    if event.key is not None:
        out["key"] = event.key.hex()
        out["values" if percpu else "value"] = _split(info, event.value)
        out["old_values" if percpu else "old_value"] = _split(info, event.old_value)
        if fmt is not None and event.value is not None:
            out["formatted"] = formatted_entry(fmt, event.key, event.value, event.old_value,
                                               percpu)
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
