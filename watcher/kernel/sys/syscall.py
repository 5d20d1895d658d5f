"""The bpf(2) syscall, through ctypes.

This is the lowest layer of pymap and the only module that issues ``bpf()``.
libbcc wraps some of these commands, but not the ones a watcher needs most
(enumerating maps by id, opening pins read-only, object info), so every
command pymap uses goes through here, with one calling convention and one
error type.

Each function builds the command's slice of ``union bpf_attr`` (see
``include/uapi/linux/bpf.h``) and returns plain Python values.  Raised errors
are :class:`BpfError` (an ``OSError`` carrying ``errno``), so callers can
tell "gone" (``ENOENT``) from "not allowed" (``EPERM``) without parsing text.

The write commands (create, update, delete) exist for tests, benchmarks and
the fixture tools only: the daemon opens every map with ``BPF_F_RDONLY``, so
the kernel itself refuses writes through its file descriptors.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

__all__ = [
    "BpfError",
    "BPF_F_RDONLY",
    "MapInfoStruct",
    "map_get_next_id",
    "map_get_fd_by_id",
    "obj_get",
    "obj_pin",
    "map_info",
    "btf_get_fd_by_id",
    "btf_raw_data",
    "map_lookup_elem",
    "map_get_next_key",
    "map_lookup_batch",
    "map_create",
    "map_update_elem",
    "map_update_batch",
    "map_delete_elem",
    "prog_test_run",
]

# Commands (enum bpf_cmd).
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_MAP_GET_NEXT_ID = 12
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_BTF_GET_FD_BY_ID = 19
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26

# Open/file flags.
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4

# The one syscall table: the numbers of the syscalls pymap issues through ctypes, per
# architecture (each architecture's asm/unistd.h); perf_event_open is :mod:`.perfevent`'s.
SYSCALL_NUMBERS = {
    "bpf": {"x86_64": 321, "aarch64": 280, "riscv64": 280, "armv7l": 386, "ppc64le": 361},
    "perf_event_open": {"x86_64": 298, "aarch64": 241, "riscv64": 241, "armv7l": 364,
                        "ppc64le": 319},
}


def syscall_number(name: str) -> int:
    """``name``'s number on this host's architecture (OSError if pymap does not know it)."""
    try:
        return SYSCALL_NUMBERS[name][platform.machine()]
    except KeyError:  # pragma: no cover - depends on the host
        raise OSError(f"pymap does not know the {name} syscall number on "
                      f"{platform.machine()}") from None


try:
    _NR_BPF = syscall_number("bpf")
except OSError as e:  # pragma: no cover - depends on the host
    raise ImportError(str(e)) from None

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


class BpfError(OSError):
    """A bpf() command failed; ``errno`` says why, ``command`` says which."""

    def __init__(self, err: int, command: str, detail: str = ""):
        message = f"{command}: {os.strerror(err)}"
        if detail:
            message += f" ({detail})"
        super().__init__(err, message)
        self.command = command


def bpf(cmd: int, attr: ctypes.Structure, name: str, detail: str = "") -> int:
    """The one entry point for ``bpf(cmd, &attr, sizeof attr)``: its result, or
    :class:`BpfError` naming the command (``name``) and ``detail``."""
    ret = _syscall(_NR_BPF, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        raise BpfError(ctypes.get_errno(), name, detail)
    return ret


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
        ("map_ifindex", ctypes.c_uint32),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 64),
    ]


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key
        ("flags", ctypes.c_uint64),
        ("pad", ctypes.c_uint8 * 96),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("pad", ctypes.c_uint8 * 72),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 112),
    ]


class _IdAttr(ctypes.Structure):
    _fields_ = [
        ("start_id", ctypes.c_uint32),  # also map_id / btf_id
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 116),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
        ("pad", ctypes.c_uint8 * 112),
    ]


class MapInfoStruct(ctypes.Structure):
    """``struct bpf_map_info`` as of Linux 6.x."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_id", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _BtfInfoStruct(ctypes.Structure):
    _fields_ = [
        ("btf", ctypes.c_uint64),
        ("btf_size", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("name", ctypes.c_uint64),
        ("name_len", ctypes.c_uint32),
        ("kernel_btf", ctypes.c_uint32),
    ]


def address(buf) -> int:
    """The address of a ctypes buffer for an attr field (0 for None)."""
    return ctypes.addressof(buf) if buf is not None else 0


_U32_MAX = 0xFFFF_FFFF


def _check_id(obj_id: int, command: str, detail: str) -> None:
    """Object ids are u32: ctypes would silently wrap a larger one onto another object."""
    if not 0 <= obj_id <= _U32_MAX:
        raise BpfError(errno.ENOENT, command, detail)


# --- enumeration and opening -------------------------------------------------


def map_get_next_id(start_id: int) -> int | None:
    """The next map id after ``start_id``, or None when there is none."""
    if start_id >= _U32_MAX:
        return None
    attr = _IdAttr(start_id=start_id)
    try:
        bpf(BPF_MAP_GET_NEXT_ID, attr, "BPF_MAP_GET_NEXT_ID")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return attr.next_id


def map_get_fd_by_id(map_id: int, flags: int = BPF_F_RDONLY) -> int:
    """Open map ``map_id``; read-only unless told otherwise."""
    _check_id(map_id, "BPF_MAP_GET_FD_BY_ID", f"id {map_id}")
    return bpf(BPF_MAP_GET_FD_BY_ID, _IdAttr(start_id=map_id, open_flags=flags),
                "BPF_MAP_GET_FD_BY_ID", f"id {map_id}")


def obj_get(path: str, flags: int = BPF_F_RDONLY) -> int:
    """Open the object pinned at ``path`` in bpffs; read-only unless told otherwise."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(BPF_OBJ_GET, _ObjAttr(pathname=address(cpath), file_flags=flags),
                "BPF_OBJ_GET", path)


def obj_pin(fd: int, path: str) -> None:
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    bpf(BPF_OBJ_PIN, _ObjAttr(pathname=address(cpath), bpf_fd=fd), "BPF_OBJ_PIN", path)


def _obj_info(fd: int, info: ctypes.Structure) -> None:
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=address(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")


def map_info(fd: int) -> MapInfoStruct:
    """``struct bpf_map_info`` of an open map (``EINVAL`` if ``fd`` is not a map)."""
    info = MapInfoStruct()
    _obj_info(fd, info)
    return info


def btf_get_fd_by_id(btf_id: int) -> int:
    _check_id(btf_id, "BPF_BTF_GET_FD_BY_ID", f"btf id {btf_id}")
    return bpf(BPF_BTF_GET_FD_BY_ID, _IdAttr(start_id=btf_id), "BPF_BTF_GET_FD_BY_ID",
                f"btf id {btf_id}")


def btf_raw_data(fd: int) -> bytes:
    """The raw BTF blob (header, types, strings) behind a BTF fd."""
    info = _BtfInfoStruct()
    _obj_info(fd, info)
    size = info.btf_size
    buf = ctypes.create_string_buffer(size)
    info = _BtfInfoStruct(btf=address(buf), btf_size=size)
    _obj_info(fd, info)
    return buf.raw[: info.btf_size]


# --- reading -------------------------------------------------------------------


def map_lookup_elem(fd: int, key: bytes, value_len: int) -> bytes | None:
    """The value at ``key``, or None when the key is not there."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_len)
    attr = _ElemAttr(map_fd=fd, key=address(kbuf), value=address(vbuf))
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, attr, "BPF_MAP_LOOKUP_ELEM")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return vbuf.raw


def map_get_next_key(fd: int, key: bytes | None, key_len: int) -> bytes | None:
    """The key after ``key`` (the first key when ``key`` is None), or None at the end."""
    kbuf = ctypes.create_string_buffer(key, key_len) if key is not None else None
    nbuf = ctypes.create_string_buffer(key_len)
    attr = _ElemAttr(map_fd=fd, key=address(kbuf), value=address(nbuf))
    try:
        bpf(BPF_MAP_GET_NEXT_KEY, attr, "BPF_MAP_GET_NEXT_KEY")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return nbuf.raw


class BatchCursor:
    """State for one ``BPF_MAP_LOOKUP_BATCH`` walk over a map.

    The kernel's batch token is opaque: for hash maps it is a bucket index
    (4 bytes), for arrays an index.  A ``key_size``-sized buffer (at least 8
    bytes) holds either.
    """

    def __init__(self, fd: int, key_size: int):
        self.fd = fd
        size = max(key_size, 8)
        self._in = ctypes.create_string_buffer(size)
        self._out = ctypes.create_string_buffer(size)
        self.started = False
        self.done = False

    def in_batch(self) -> int:
        """The attr's ``in_batch``: where the last batch ended (0: from the start)."""
        return address(self._in) if self.started else 0

    def out_batch(self) -> int:
        """The attr's ``out_batch``: where the kernel writes where this batch ends."""
        return address(self._out)

    def advance(self) -> None:
        """A batch was read: the next starts where it ended."""
        ctypes.memmove(self._in, self._out, ctypes.sizeof(self._in))
        self.started = True


def map_lookup_batch(cursor: BatchCursor, keys, values, max_count: int) -> int:
    """Copy the next batch of entries into ``keys``/``values`` (ctypes buffers).

    Returns how many entries were copied.  Sets ``cursor.done`` at the end of
    the map (``ENOENT``, which may come with a last few entries).  ``ENOSPC``
    (a hash bucket larger than ``max_count``) propagates so the caller can grow
    its buffers and retry from the same cursor.
    """
    attr = _BatchAttr(
        in_batch=cursor.in_batch(),
        out_batch=cursor.out_batch(),
        keys=address(keys),
        values=address(values),
        count=max_count,
        map_fd=cursor.fd,
    )
    ret = _syscall(_NR_BPF, BPF_MAP_LOOKUP_BATCH, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            cursor.done = True
            return attr.count
        # ENOSPC comes with nothing copied: the kernel copies whole buckets only.
        raise BpfError(err, "BPF_MAP_LOOKUP_BATCH")
    cursor.advance()
    return attr.count


# --- writing (tests, benchmarks, fixtures; never the daemon) -----------------


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "", flags: int = 0, btf_fd: int = 0, btf_key_type_id: int = 0,
               btf_value_type_id: int = 0) -> int:
    attr = _MapCreateAttr(
        map_type=map_type, key_size=key_size, value_size=value_size,
        max_entries=max_entries, map_flags=flags, map_name=name.encode()[:15],
        btf_fd=btf_fd, btf_key_type_id=btf_key_type_id, btf_value_type_id=btf_value_type_id,
    )
    return bpf(BPF_MAP_CREATE, attr, "BPF_MAP_CREATE", name)


def map_update_elem(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    bpf(BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=fd, key=address(kbuf), value=address(vbuf),
                                        flags=flags), "BPF_MAP_UPDATE_ELEM")


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    vbuf = ctypes.create_string_buffer(values, len(values))
    attr = _BatchAttr(keys=address(kbuf), values=address(vbuf), count=count, map_fd=fd)
    bpf(BPF_MAP_UPDATE_BATCH, attr, "BPF_MAP_UPDATE_BATCH")


def map_delete_elem(fd: int, key: bytes) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    bpf(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=address(kbuf)), "BPF_MAP_DELETE_ELEM")


BPF_PROG_TEST_RUN = 10


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 96),
    ]


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1) -> tuple[int, int]:
    """Run a program ``repeat`` times on ``data`` in the kernel (benchmarks and tests:
    a socket filter that writes records makes a producer with no syscall per record).
    Returns (return value, average duration in ns)."""
    buf = ctypes.create_string_buffer(data, len(data))
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(data), data_in=address(buf),
                        repeat=repeat)
    bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return attr.retval, attr.duration
