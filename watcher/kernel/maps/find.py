"""Finding maps: every map on the host by id, every pin under bpffs, metadata.

A map has three handles and none is perfect: its **id** is unique but changes
when the map is recreated; its **name** is cut to 15 characters by the kernel
and repeats (every bcc tool has an ``events``); its **pin path** is stable but
only pinned maps have one.  :class:`MapRecord` carries all three, and the
display name is the pin file's name when the kernel's name is a cut-down
prefix of it (``cilium_lb4_serv`` -> ``cilium_lb4_services_v2``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Iterator

import attrs

import watcher.kernel.sys.syscall as syscall
from watcher.kernel.maps.kinds import PERCPU_TYPES, type_name
from watcher.kernel.sys.abi import KERNEL_NAME_MAX

DEFAULT_BPFFS = "/sys/fs/bpf"


@attrs.frozen
class MapRecord:
    """What the kernel says about one map, plus its pins."""

    id: int
    name: str  # display name: full pin name when the kernel's is cut short
    kernel_name: str
    type: str
    type_id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    btf_id: int
    btf_key_type_id: int
    btf_value_type_id: int
    memlock: int | None
    frozen: bool
    pinned: tuple[str, ...] = ()

    @property
    def percpu(self) -> bool:
        return self.type in PERCPU_TYPES


@contextlib.contextmanager
def open_fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


class MapHandle:
    """An open map: its fd and its record, closed exactly once (read-only unless a source
    reader opened it to consume a buffer: see attach.open_pinned).

    Raw fds crossing layers get closed twice or never; a handle owns its fd
    (like cilium/ebpf's ``Map``): :meth:`close` is idempotent, ``with`` closes
    it, and using it after close raises instead of touching a reused fd number.
    """

    __slots__ = ("_fd", "record")

    def __init__(self, fd: int, record: MapRecord):
        self._fd = fd
        self.record = record

    @classmethod
    def open_id(cls, map_id: int, pins: tuple[str, ...] = ()) -> MapHandle:
        """Open map ``map_id`` read-only; ``pins`` go into its record."""
        return cls.adopt(syscall.map_get_fd_by_id(map_id), pins)

    @classmethod
    def open_pin(cls, path: str) -> MapHandle:
        """Open the map pinned at ``path`` read-only (``BpfError`` if it is not a map)."""
        return cls.adopt(syscall.obj_get(path), (path,))

    @classmethod
    def adopt(cls, fd: int, pins: tuple[str, ...] = ()) -> MapHandle:
        """Own ``fd`` (closed here if it is not a map: ``BpfError`` EINVAL)."""
        try:
            return cls(fd, record_from_fd(fd, pins))
        except BaseException:
            os.close(fd)
            raise

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"map handle of {self.record.name} (id {self.record.id}) is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> MapHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self._fd}"
        return f"<MapHandle {self.record.name} id {self.record.id} {state}>"


def open_map(map_id: int | None = None, pin: str | None = None) -> int:
    """A read-only fd for a map given by id or pin path.

    Read-only on purpose: pymap observes, and the kernel enforces that for us.
    """
    if pin is not None:
        return syscall.obj_get(pin)
    assert map_id is not None
    return syscall.map_get_fd_by_id(map_id)


def fdinfo(fd: int, pid: int | str = "self") -> dict[str, str]:
    """``/proc/PID/fdinfo/FD`` as fields (empty when the fd is closed or unreadable)."""
    fields: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
    except OSError:
        pass
    return fields


def display_name(kernel_name: str, pins: tuple[str, ...]) -> str:
    """The name users know a map by (see the module docstring)."""
    for pin in pins:
        base = os.path.basename(pin)
        if not kernel_name or (len(kernel_name) >= KERNEL_NAME_MAX and base.startswith(kernel_name)):
            return base
    return kernel_name


def record_from_fd(fd: int, pins: tuple[str, ...] = ()) -> MapRecord:
    info = syscall.map_info(fd)
    fields = fdinfo(fd)
    kname = info.name.decode(errors="replace")
    memlock = fields.get("memlock")
    return MapRecord(
        id=info.id,
        name=display_name(kname, pins),
        kernel_name=kname,
        type=type_name(info.type),
        type_id=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
        btf_id=info.btf_id,
        btf_key_type_id=info.btf_key_type_id,
        btf_value_type_id=info.btf_value_type_id,
        memlock=int(memlock) if memlock and memlock.isdigit() else None,
        frozen=fields.get("frozen", "0") == "1",
        pinned=tuple(sorted(pins)),
    )


def map_ids() -> Iterator[int]:
    """Every map id on the host, in increasing order."""
    current = 0
    while (nxt := syscall.map_get_next_id(current)) is not None:
        yield nxt
        current = nxt


def walk_pins(roots: tuple[str, ...] = (DEFAULT_BPFFS,)) -> dict[int, list[str]]:
    """Map id -> pin paths, for every map pinned under ``roots`` (recursively).

    Pinned programs, links and unreadable entries are skipped: a pin walk must
    not fail because of one odd file.
    """
    found: dict[int, list[str]] = {}
    for root in roots:
        for dirpath, _dirnames, filenames in os.walk(root, onerror=lambda e: None):
            for filename in filenames:
                path = os.path.join(dirpath, filename)
                try:
                    fd = syscall.obj_get(path)
                except OSError:
                    continue
                with open_fd(fd):
                    try:
                        info = syscall.map_info(fd)
                    except OSError:
                        continue  # a program or link pin, not a map
                    found.setdefault(info.id, []).append(path)
    return found


def list_maps(roots: tuple[str, ...] = (DEFAULT_BPFFS,),
              only: Iterable[int] | None = None) -> list[MapRecord]:
    """Every map on the host (or the ``only`` ids), with its pins; maps that vanish
    meanwhile are left out."""
    pins = walk_pins(roots)
    records = []
    for map_id in (map_ids() if only is None else sorted(only)):
        try:
            fd = syscall.map_get_fd_by_id(map_id)
        except OSError as e:
            if e.errno == errno.ENOENT:
                continue  # freed between GET_NEXT_ID and GET_FD_BY_ID
            if e.errno == errno.EPERM:
                # Maps created write-only refuse a read-only open; show them anyway.
                try:
                    fd = syscall.map_get_fd_by_id(map_id, flags=0)
                except OSError:
                    continue
            else:
                raise
        with open_fd(fd):
            records.append(record_from_fd(fd, tuple(pins.get(map_id, ()))))
    return records


def map_holders() -> dict[int, list[tuple[int, str]]]:
    """Map id -> [(pid, comm)] of processes holding an fd to it.

    Reads ``/proc/*/fd`` and ``fdinfo``: cheap next to a dump, and it needs no
    BPF iterator program.  pymap's own process is left out.
    """
    holders: dict[int, list[tuple[int, str]]] = {}
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        seen: set[int] = set()
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:bpf-map":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("map_id:"):
                            seen.add(int(line.split()[1]))
                            break
            except (OSError, ValueError):
                continue
        if seen:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            for map_id in seen:
                holders.setdefault(map_id, []).append((pid, comm))
    return holders
