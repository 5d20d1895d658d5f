"""An in-memory catalog: the ``watcher.daemon.interfaces.Catalog`` Protocol, no kernel.

For in-process tests of the daemon's logic (engine cycle, request server):
they run in a second, without root.  It stands in for the catalog layer, not
for the kernel; the kernel-backed catalog is proven by the subprocess tests
against real maps and bpftool.  mypy checks it against the Protocol wherever a
test hands it to the engine or the request server.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

from watcher.daemon import catalog, errors
from watcher.daemon.catalog import MapGone
from watcher.daemon.interfaces import Handle
from watcher.kernel.maps.dump import Chunk, NotDumpable
from watcher.kernel.maps.find import MapRecord
from watcher.kernel.maps.kinds import DumpMethod, dump_method
from watcher.wire.schema import MapInfo

if TYPE_CHECKING:
    from watcher.daemon.config import Config


def record(map_id: int, name: str, type_: str = "hash", key_size: int = 4,
           value_size: int = 8, max_entries: int = 64) -> MapRecord:
    return MapRecord(id=map_id, name=name, kernel_name=name[:15], type=type_, type_id=1,
                     key_size=key_size, value_size=value_size, max_entries=max_entries,
                     flags=0, btf_id=0, btf_key_type_id=0, btf_value_type_id=0, memlock=None,
                     frozen=False)


@attrs.define
class FakeMap:
    record: MapRecord
    entries: dict[bytes, bytes] = attrs.Factory(dict)


class FakeHandle:
    """Like ``MapHandle``: a record, closed exactly once; no kernel object behind it."""

    fd = -1  # nothing to walk: the in-memory tests run the user-space engine

    def __init__(self, record: MapRecord, opened: list[FakeHandle]):
        self.record = record
        self.closed = False
        opened.append(self)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> FakeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeCatalog:
    """Maps held in dicts; ``maps`` is changed by the test between engine cycles."""

    def __init__(self, *maps: FakeMap):
        self.maps: dict[int, FakeMap] = {m.record.id: m for m in maps}
        self.opened: list[FakeHandle] = []

    def add(self, rec: MapRecord, entries: dict[bytes, bytes] | None = None) -> FakeMap:
        self.maps[rec.id] = m = FakeMap(rec, dict(entries or {}))
        return m

    def records(self, only: set[int] | None = None) -> list[MapRecord]:
        return [m.record for m in self.maps.values() if only is None or m.record.id in only]

    def ids(self) -> set[int]:
        return set(self.maps)

    def list_maps(self, pattern: str | None, with_entries: bool) -> list[MapInfo]:
        return [catalog.to_wire(m.record, len(m.entries) if with_entries else None)
                for m in self.maps.values()
                if not pattern or fnmatch.fnmatchcase(m.record.name, pattern)]

    def open_selected(self, selector: str) -> FakeHandle:
        if selector.startswith("id:"):
            found = [m for m in self.maps.values() if str(m.record.id) == selector[3:]]
        else:
            found = [m for m in self.maps.values() if m.record.name == selector]
        if not found:
            raise errors.MapNotFound(f"no map named {selector!r}")
        if len(found) > 1:
            raise errors.AmbiguousSelector(f"{len(found)} maps are named {selector!r}",
                                           [catalog.to_wire(m.record) for m in found])
        return FakeHandle(found[0].record, self.opened)

    def open_watched(self, rec: MapRecord) -> FakeHandle:
        if rec.id not in self.maps:
            raise MapGone
        return FakeHandle(rec, self.opened)

    def chunks(self, handle: Handle, chunk_entries: int) -> Iterator[Chunk]:
        if dump_method(handle.record.type) is DumpMethod.NONE:
            raise NotDumpable(handle.record.type)
        items = list(self.maps[handle.record.id].entries.items())
        for lo in range(0, len(items), chunk_entries):
            part = items[lo:lo + chunk_entries]
            yield Chunk(b"".join(k for k, _ in part), b"".join(v for _, v in part), len(part))

    def holders(self) -> dict[int, list[tuple[int, str]]]:
        return {}

    def own_ids(self) -> frozenset[int]:
        return frozenset()

    def forget_own(self, gone: set[int]) -> None:
        pass

    def btf_blob(self, rec: MapRecord) -> bytes | None:
        return None

    def reconfigure(self, config: Config) -> None:
        pass  # no bpffs roots: the maps are the test's
