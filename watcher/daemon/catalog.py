"""The daemon's view of the host's maps: listing, selecting, describing.

Everything here is blocking (syscalls, /proc walks, dumps) and runs in a
worker thread; the trio side only awaits the results.  This is the bridge
between the kernel layer's records and the wire schema's messages.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

from watcher.kernel.btf import cache as kbtf
from watcher.kernel.maps import find as kmaps
from watcher.kernel.maps.dump import Chunk, count_entries, dump, value_stride
from watcher.kernel.maps.kinds import DumpMethod, dump_method, not_dumpable_reason
from watcher.kernel.sys import create as progload
from watcher.kernel.sys.cpus import possible_cpus
from watcher.kernel.sys.syscall import BpfError

from ..wire.globs import GlobError, check_glob
from ..wire.schema import Holder, MapInfo
from . import errors
from .interfaces import Handle

if TYPE_CHECKING:
    from .config import Config


class MapGone(Exception):
    """The map was freed since it was listed."""


def to_wire(record: kmaps.MapRecord, entries: int | None = None,
            holders: list[tuple[int, str]] | None = None) -> MapInfo:
    ncpus = possible_cpus() if record.percpu else 1
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
        raise errors.BadRequest(str(e)) from None


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
        handle = kmaps.MapHandle.open_id(record.id, record.pinned)
    except OSError:
        return None  # vanished since listing, or not readable: nothing to count
    with handle:
        try:
            return count_entries(handle.fd, record)
        except OSError:
            return None


def _check_pin_path(path: str, bpffs: tuple[str, ...]) -> str:
    real = os.path.realpath(path)
    for root in bpffs:
        root = os.path.realpath(root)
        if real == root or real.startswith(root + os.sep):
            return real
    raise errors.BadRequest(f"{path} is not under a watched bpffs ({', '.join(bpffs)})")


def open_selected(selector: str, bpffs: tuple[str, ...]) -> kmaps.MapHandle:
    """Open the one map ``selector`` names: ``id:N``, a pin path, or a name.

    Returns a read-only handle, which the caller closes.
    """
    if selector.startswith("id:"):
        if not selector[3:].isascii() or not selector[3:].isdigit():
            raise errors.BadRequest(f"{selector!r}: id:N needs a number")
        map_id = int(selector[3:])
        return _open_by_id(map_id, bpffs, selector)
    if selector.startswith("/"):
        path = _check_pin_path(selector, bpffs)
        if os.path.isdir(path):
            raise errors.MapNotFound(f"{selector} is a directory, not a pinned map")
        if not os.path.exists(path):
            raise errors.MapNotFound(f"no map is pinned at {selector}")
        try:
            fd = kmaps.open_map(pin=path)
        except BpfError as e:
            raise _select_error(e, selector) from None
        try:
            handle = kmaps.MapHandle.adopt(fd, (path,))
        except BpfError:
            raise errors.MapNotFound(f"{selector} is pinned, but not a map") from None
        record = handle.record
        pins = kmaps.walk_pins(bpffs).get(record.id, [path])
        handle.record = attrs.evolve(record, pinned=tuple(sorted(pins)),
                                     name=kmaps.display_name(record.kernel_name, tuple(pins)))
        return handle
    return _open_by_name(selector, bpffs)


def _select_error(e: OSError, selector: str) -> errors.RequestError:
    if e.errno in (errno.EPERM, errno.EACCES):
        return errors.PermissionDenied(f"{selector}: permission denied (the daemon needs root)")
    if e.errno == errno.ENOENT:
        return errors.MapNotFound(f"no map {selector}")
    return errors.InternalError(f"{selector}: {e}")


def _open_by_id(map_id: int, bpffs: tuple[str, ...], selector: str) -> kmaps.MapHandle:
    try:
        return kmaps.MapHandle.open_id(map_id, tuple(kmaps.walk_pins(bpffs).get(map_id, ())))
    except BpfError as e:
        raise _select_error(e, selector) from None


def _open_by_name(name: str, bpffs: tuple[str, ...]) -> kmaps.MapHandle:
    records = kmaps.list_maps(bpffs)
    found = [r for r in records if name in (r.name, r.kernel_name)
             or any(os.path.basename(p) == name for p in r.pinned)]
    if not found and len(name) > kmaps.KERNEL_NAME_MAX:
        # An unpinned map keeps only the first 15 characters of its name.
        cut = name[: kmaps.KERNEL_NAME_MAX]
        found = [r for r in records if r.kernel_name == cut]
    if not found:
        raise errors.MapNotFound(f"no map named {name!r} (see: pymap list)")
    if len(found) > 1:
        ids = ", ".join(f"id:{r.id}" for r in found)
        raise errors.AmbiguousSelector(f"{len(found)} maps are named {name!r}: {ids}; "
                                       "select one by id:N or pin path", [to_wire(r) for r in found])
    return _open_by_id(found[0].id, bpffs, name)


def btf_blob(record: kmaps.MapRecord) -> bytes | None:
    """The BTF behind a map, for clients to decode entries with; None without BTF.

    Standalone: a kernel module's split BTF comes merged onto vmlinux's.
    """
    if not record.btf_id or not record.btf_value_type_id:
        return None
    try:
        return kbtf.standalone_blob(record.btf_id)
    except OSError:
        return None  # BTF object freed with its map: entries go out undecoded


HOLDERS_MAX_AGE = 1.0  # seconds a walk of /proc for map holders answers for


class HostCatalog:
    """The catalog of the host's maps, through the kernel: what the engine and the
    request server ask the host (the :class:`~.interfaces.Catalog` seam).

    They take a catalog as a parameter, so the daemon's logic runs against this one
    and in-process tests run it against an in-memory one that mypy checks against
    the same Protocol.  Every method blocks: call them in a worker thread.
    """

    def __init__(self, bpffs: tuple[str, ...] | list[str]):
        self.bpffs = tuple(bpffs)
        self.holders_walks = 0  # walks of /proc for holders (tests count them)
        self._holders_lock = threading.Lock()
        self._holders: tuple[float, dict[int, list[tuple[int, str]]]] | None = None

    def records(self, only: set[int] | None = None) -> list[kmaps.MapRecord]:
        """Every map on the host (or the ``only`` ids), with its pins (no dumps, but a
        syscall or three per map, and a walk of the pins)."""
        return kmaps.list_maps(self.bpffs, only)

    def ids(self) -> set[int]:
        """Every map id on the host: one syscall per map, nothing opened or read."""
        return set(kmaps.map_ids())

    def list_maps(self, pattern: str | None, with_entries: bool) -> list[MapInfo]:
        return list_maps(self.bpffs, pattern, with_entries)

    def open_selected(self, selector: str) -> kmaps.MapHandle:
        return open_selected(selector, self.bpffs)

    def open_watched(self, record: kmaps.MapRecord) -> kmaps.MapHandle:
        """Reopen a listed map by id; :class:`MapGone` if it was freed since."""
        try:
            return kmaps.MapHandle.open_id(record.id, record.pinned)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise MapGone from None
            raise

    def chunks(self, handle: Handle, chunk_entries: int) -> Iterator[Chunk]:
        """``handle``'s entries, ``chunk_entries`` at a time (``NotDumpable`` for ring buffers...)."""
        return dump(handle.fd, handle.record, chunk_entries)

    def own_ids(self) -> frozenset[int]:
        """Ids of the maps pymap itself made (watcher.kernel.sys.create): never watched."""
        return progload.own_map_ids()

    def forget_own(self, gone: set[int]) -> None:
        progload.forget_own_maps(gone)

    def holders(self) -> dict[int, list[tuple[int, str]]]:
        """Map id -> the processes holding it, as of at most ``HOLDERS_MAX_AGE`` ago.

        Finding holders walks every process's fds (a readlink each), whatever map
        is asked about, and a follower asks once per new map: under churn that was
        half a core.  One walk answers every map, so requests share it: concurrent
        ones wait for the walk in progress instead of starting their own.
        """
        with self._holders_lock:
            now = time.monotonic()
            if self._holders is None or now - self._holders[0] > HOLDERS_MAX_AGE:
                self._holders = (now, kmaps.map_holders())
                self.holders_walks += 1
            return self._holders[1]

    def btf_blob(self, record: kmaps.MapRecord) -> bytes | None:
        return btf_blob(record)

    def reconfigure(self, config: Config) -> None:
        """A reloaded config (watcher.daemon.reload): the bpffs roots pins are found under."""
        self.bpffs = tuple(config.daemon.bpffs)
