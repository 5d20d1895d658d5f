"""The bpf() commands that CREATE kernel objects for the in-kernel delta engine.

Every privileged object the engine makes is made here, so a seccomp policy
(issue 12) has one place to reconcile with.  The creating commands run in the
objects broker (:mod:`..kdelta.broker`), a process of its own, when the daemon runs the
engine; the daemon itself only runs what it was handed (docs/operations.md):

* ``BPF_MAP_CREATE`` (broker): shadow and state maps owned by pymap;
* ``BPF_PROG_LOAD`` (broker): the generated iterator programs
  (``BPF_PROG_TYPE_TRACING``, expected attach type ``BPF_TRACE_ITER``) and
  socket filters;
* ``BPF_BTF_LOAD`` (broker): function info for programs with a callback;
* ``BPF_LINK_CREATE``: attaching a program to one map (``iter_info.map.map_fd``);
* ``BPF_ITER_CREATE``: one walk (a readable fd);
* ``BPF_PROG_TEST_RUN``: one run of the for_each walk, or of one of the small
  programs that write pymap's own state and shadow maps (socket filters: the
  data to write is their packet, see :mod:`..kdelta.writers`).

At start-up only (before the seccomp filter), :mod:`..discovery.mapwatch` makes its
maps and two ``BPF_PROG_TYPE_TRACEPOINT`` programs here as well, attached
with ``perf_event_open`` (:mod:`.perfevent`), not with a bpf() command.

No update or delete command is used: the engine writes its own maps from
inside the kernel, so the daemon's seccomp filter allows none (docs/operations.md).
Watched maps are only ever opened read-only (``BPF_F_RDONLY``).
"""

from __future__ import annotations

import ctypes
import errno
import threading

import watcher.kernel.sys.syscall as syscall
from watcher.kernel.btf.blob import VMLINUX_BTF
from watcher.kernel.sys.syscall import BpfError, address, bpf

BPF_PROG_LOAD = 5
BPF_BTF_LOAD = 18
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_LINK_CREATE = 28
BPF_ITER_CREATE = 33
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_ITER = 28
BPF_F_NO_PREALLOC = 1


class Unsupported(Exception):
    """The in-kernel engine cannot watch this map; the message says why."""


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 44),
    ]


class _BtfLoadAttr(ctypes.Structure):
    _fields_ = [("btf", ctypes.c_uint64), ("btf_log_buf", ctypes.c_uint64),
                ("btf_size", ctypes.c_uint32), ("btf_log_size", ctypes.c_uint32),
                ("btf_log_level", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 100)]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iter_info", ctypes.c_uint64),
        ("iter_info_len", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 100),
    ]


class _IterCreateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 120)]


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int, name: str,
               flags: int = 0) -> int:
    """A map pymap owns (shadow or state)."""
    return note_own_map(syscall.map_create(map_type, key_size, value_size, max_entries,
                                           name=name, flags=flags))


# The ids of the maps pymap made, in this process or for it (the objects broker's fds):
# the daemon never watches them or reports them as the host's maps.  A set, not a
# name rule: any program may call its map pymap_*.  Ids are not reused soon, so ids
# no longer on the host are forgotten (forget_own_maps) and the set stays bounded.
_own_map_ids: set[int] = set()
_own_lock = threading.Lock()


def note_own_map(fd: int) -> int:
    """Remember ``fd``'s map as pymap's own; returns ``fd``."""
    map_id = syscall.map_info(fd).id
    with _own_lock:
        _own_map_ids.add(map_id)
    return fd


def own_map_ids() -> frozenset[int]:
    with _own_lock:
        return frozenset(_own_map_ids)


def forget_own_maps(gone: set[int]) -> None:
    with _own_lock:
        _own_map_ids.difference_update(gone)


def load_btf(blob: bytes) -> int:
    """Load a BTF blob pymap generated (function info for callbacks)."""
    buf = ctypes.create_string_buffer(blob, len(blob))
    log_buf = ctypes.create_string_buffer(1 << 16)
    attr = _BtfLoadAttr(btf=address(buf), btf_size=len(blob), btf_log_buf=address(log_buf),
                        btf_log_size=len(log_buf), btf_log_level=1)
    try:
        return bpf(BPF_BTF_LOAD, attr, "BPF_BTF_LOAD")
    except BpfError as e:
        lines = [ln for ln in log_buf.value.decode(errors="replace").splitlines() if ln]
        raise BpfError(e.errno or errno.EINVAL, "BPF_BTF_LOAD", " | ".join(lines[-3:])) from None


# The only program types pymap loads: the first two after start-up too, tracepoints at
# start-up only (map discovery, before the seccomp filter).  Not BPF_PROG_TYPE_SYSCALL,
# whose bpf_sys_bpf helper issues bpf() commands from inside the kernel, unseen by seccomp.
LOADABLE_TYPES = {BPF_PROG_TYPE_SOCKET_FILTER: "socket filter",
                  BPF_PROG_TYPE_TRACING: "tracing (map element iterator)",
                  BPF_PROG_TYPE_TRACEPOINT: "tracepoint (map discovery)"}


def load_program(insns: bytes, name: str, prog_type: int, attach_type: int = 0,
                 attach_btf_id: int = 0, btf_fd: int = 0, func_info: bytes = b"") -> int:
    """Load ``insns``; on refusal, raise with the verifier's last lines as detail."""
    if prog_type not in LOADABLE_TYPES or (prog_type == BPF_PROG_TYPE_TRACING
                                           and attach_type != BPF_TRACE_ITER):
        raise ValueError(f"{name}: pymap loads only socket filters, map element "
                         f"iterators and tracepoints, not program type {prog_type}")
    license_ = ctypes.create_string_buffer(b"GPL")
    code = ctypes.create_string_buffer(insns, len(insns))
    finfo = ctypes.create_string_buffer(func_info, max(len(func_info), 1))

    def attempt(log_buf=None) -> int:
        attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=address(code),
                             license=address(license_), prog_name=name.encode()[:15],
                             expected_attach_type=attach_type, attach_btf_id=attach_btf_id)
        if func_info:
            attr.prog_btf_fd, attr.func_info_rec_size = btf_fd, 8
            attr.func_info, attr.func_info_cnt = address(finfo), len(func_info) // 8
        if log_buf is not None:
            attr.log_level, attr.log_size, attr.log_buf = 1, len(log_buf), address(log_buf)
        return bpf(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD", name)

    try:
        return attempt()
    except BpfError as first:
        if first.errno not in (errno.EACCES, errno.EINVAL):
            raise
        log_buf = ctypes.create_string_buffer(1 << 20)
        try:
            fd = attempt(log_buf)
        except BpfError:
            lines = [ln for ln in log_buf.value.decode(errors="replace").splitlines() if ln]
            raise BpfError(first.errno, "BPF_PROG_LOAD",
                           f"{name}: verifier: {' | '.join(lines[-3:])}") from None
        return fd  # pragma: no cover - refused once, accepted with a log: keep it


def attach_map_iter(prog_fd: int, map_fd: int) -> int:
    """A ``bpf_map_elem`` iterator link of ``prog_fd`` over the map behind ``map_fd``."""
    info = (ctypes.c_uint32 * 2)(map_fd, 0)
    attr = _LinkCreateAttr(prog_fd=prog_fd, attach_type=BPF_TRACE_ITER,
                           iter_info=ctypes.addressof(info), iter_info_len=ctypes.sizeof(info))
    return bpf(BPF_LINK_CREATE, attr, "BPF_LINK_CREATE")


def iter_create(link_fd: int) -> int:
    """One walk of an iterator link: read() it to the end (0) to run it."""
    return bpf(BPF_ITER_CREATE, _IterCreateAttr(link_fd=link_fd), "BPF_ITER_CREATE")


_iter_btf_id: int | None = None


def map_elem_iter_btf_id() -> int:
    """BTF id of the kernel's ``bpf_iter_bpf_map_elem`` (what the program attaches to)."""
    global _iter_btf_id
    if _iter_btf_id is None:
        with open(VMLINUX_BTF, "rb") as f:
            raw = f.read()
        from watcher.kernel.btf.cache import (
            find_func,  # at first use: the broker imports this module
        )

        found = find_func(raw, b"bpf_iter_bpf_map_elem")
        if found is None:
            raise Unsupported("this kernel's BTF has no bpf_iter_bpf_map_elem (no map "
                              "element iterators)")
        _iter_btf_id = found
    return _iter_btf_id
