"""The daemon's view of the host's maps: listing, selecting, describing.

Everything here is blocking (syscalls, /proc walks, dumps) and runs in a
worker thread; the trio side only awaits the results.  This is the bridge
between the kernel layer's records and the wire schema's messages.
"""

from __future__ import annotations

import errno
import fnmatch
import os

import attrs

from ..kernel import maps as kmaps
from ..kernel.dump import count_entries, value_stride
from ..kernel.maptypes import DumpMethod, dump_method, not_dumpable_reason
from ..kernel.syscall import BpfError
from ..wire.globs import GlobError, check_glob
from ..wire.schema import Holder, MapInfo


class SelectError(Exception):
    """A selector that names no map, or several; ``code`` is the wire error code."""

    def __init__(self, code: str, message: str, candidates: list[MapInfo] | None = None,
                 req: int = 0):
        super().__init__(message)
        self.code = code
        self.candidates = candidates or []
        self.req = req  # set when the request's id is known although the request is refused


def to_wire(record: kmaps.MapRecord, entries: int | None = None,
            holders: list[tuple[int, str]] | None = None) -> MapInfo:
    ncpus = kmaps.possible_cpus() if record.percpu else 1
    dumpable = dump_method(record.type) is not DumpMethod.NONE
    return MapInfo(
        id=record.id, name=record.name, type=record.type, key_size=record.key_size,
        value_size=record.value_size, max_entries=record.max_entries, flags=record.flags,
        kernel_name=record.kernel_name, btf_id=record.btf_id,
        btf_key_type_id=record.btf_key_type_id, btf_value_type_id=record.btf_value_type_id,
        memlock=record.memlock, frozen=record.frozen, pinned=list(record.pinned),
        entries=entries, holders=[Holder(pid, comm) for pid, comm in holders or ()],
        percpu=record.percpu, value_stride=value_stride(record, ncpus), ncpus=ncpus,
        dumpable=dumpable, not_dumpable_reason="" if dumpable else not_dumpable_reason(record.type),
    )


def _matches(record: kmaps.MapRecord, pattern: str) -> bool:
    names = [record.name, record.kernel_name, *record.pinned,
             *(os.path.basename(p) for p in record.pinned)]
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def check_pattern(pattern: str) -> None:
    """An unparseable glob is a bad request, not a pattern that matches nothing."""
    try:
        check_glob(pattern)
    except GlobError as e:
        raise SelectError("bad_request", str(e)) from None


def list_maps(bpffs: tuple[str, ...], pattern: str | None, with_entries: bool) -> list[MapInfo]:
    """Every map on the host (matching ``pattern``), entries counted if asked."""
    if pattern:
        check_pattern(pattern)
    records = kmaps.list_maps(bpffs)
    if pattern:
        records = [r for r in records if _matches(r, pattern)]
    holders = kmaps.map_holders()
    out = []
    for record in records:
        entries = None
        if with_entries:
            entries = _count(record)
        out.append(to_wire(record, entries, holders.get(record.id)))
    return out


def _count(record: kmaps.MapRecord) -> int | None:
    try:
        fd = kmaps.open_map(map_id=record.id)
    except OSError:
        return None  # vanished since listing, or not readable: nothing to count
    with kmaps.open_fd(fd):
        try:
            return count_entries(fd, record)
        except OSError:
            return None


def _check_pin_path(path: str, bpffs: tuple[str, ...]) -> str:
    real = os.path.realpath(path)
    for root in bpffs:
        root = os.path.realpath(root)
        if real == root or real.startswith(root + os.sep):
            return real
    raise SelectError("bad_request", f"{path} is not under a watched bpffs ({', '.join(bpffs)})")


def open_selected(selector: str, bpffs: tuple[str, ...]) -> tuple[int, kmaps.MapRecord]:
    """Open the one map ``selector`` names: ``id:N``, a pin path, or a name.

    Returns a read-only fd (the caller closes it) and the map's record.
    """
    if selector.startswith("id:"):
        if not selector[3:].isascii() or not selector[3:].isdigit():
            raise SelectError("bad_request", f"{selector!r}: id:N needs a number")
        map_id = int(selector[3:])
        return _open_by_id(map_id, bpffs, selector)
    if selector.startswith("/"):
        path = _check_pin_path(selector, bpffs)
        if os.path.isdir(path):
            raise SelectError("not_found", f"{selector} is a directory, not a pinned map")
        if not os.path.exists(path):
            raise SelectError("not_found", f"no map is pinned at {selector}")
        try:
            fd = kmaps.open_map(pin=path)
        except BpfError as e:
            raise _select_error(e, selector) from None
        try:
            record = kmaps.record_from_fd(fd, (path,))
        except BpfError:
            os.close(fd)
            raise SelectError("not_found", f"{selector} is pinned, but not a map") from None
        pins = kmaps.walk_pins(bpffs).get(record.id, [path])
        return fd, attrs.evolve(record, pinned=tuple(sorted(pins)),
                                name=kmaps.display_name(record.kernel_name, tuple(pins)))
    return _open_by_name(selector, bpffs)


def _select_error(e: OSError, selector: str) -> SelectError:
    if e.errno in (errno.EPERM, errno.EACCES):
        return SelectError("permission", f"{selector}: permission denied (the daemon needs root)")
    if e.errno == errno.ENOENT:
        return SelectError("not_found", f"no map {selector}")
    return SelectError("internal", f"{selector}: {e}")


def _open_by_id(map_id: int, bpffs: tuple[str, ...], selector: str) -> tuple[int, kmaps.MapRecord]:
    try:
        fd = kmaps.open_map(map_id=map_id)
    except BpfError as e:
        raise _select_error(e, selector) from None
    pins = tuple(kmaps.walk_pins(bpffs).get(map_id, ()))
    return fd, kmaps.record_from_fd(fd, pins)


def _open_by_name(name: str, bpffs: tuple[str, ...]) -> tuple[int, kmaps.MapRecord]:
    records = kmaps.list_maps(bpffs)
    found = [r for r in records if name in (r.name, r.kernel_name)
             or any(os.path.basename(p) == name for p in r.pinned)]
    if not found and len(name) > kmaps.KERNEL_NAME_MAX:
        # An unpinned map keeps only the first 15 characters of its name.
        cut = name[: kmaps.KERNEL_NAME_MAX]
        found = [r for r in records if r.kernel_name == cut]
    if not found:
        raise SelectError("not_found", f"no map named {name!r} (see: pymap list)")
    if len(found) > 1:
        ids = ", ".join(f"id:{r.id}" for r in found)
        raise SelectError("ambiguous", f"{len(found)} maps are named {name!r}: {ids}; "
                          "select one by id:N or pin path", [to_wire(r) for r in found])
    return _open_by_id(found[0].id, bpffs, name)


def btf_blob(record: kmaps.MapRecord) -> bytes | None:
    """The raw BTF behind a map, for clients to decode entries with; None without BTF."""
    if not record.btf_id or not record.btf_value_type_id:
        return None
    try:
        return kmaps.btf_raw(record.btf_id)
    except OSError:
        return None  # BTF object freed with its map: entries go out undecoded
