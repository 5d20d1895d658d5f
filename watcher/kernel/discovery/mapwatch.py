"""Map creation, learned from the kernel: the ``bpf(2)`` syscall tracepoints.

Why: discovery by polling the map ids misses a map that lives less than one
poll interval.  This kernel (lockdown=integrity) refuses kprobes, fentry and
LSM programs, but the syscall tracepoints ``syscalls:sys_enter_bpf`` and
``sys_exit_bpf`` load, and ``bpf_probe_read_kernel`` is allowed (lockdown's
integrity level only forbids *writing* kernel memory; reading is what the
confidentiality level takes away).

Two programs, generated with :mod:`..asm.assembler` (no compiler: bcc would cost ~11 s
and ~110 MB per compile):

* on ``sys_enter_bpf`` with ``cmd == BPF_MAP_CREATE`` from any process but the
  daemon itself: remember the thread (key ``pid_tgid``) in an LRU hash, with
  the requested map type read from the caller's ``union bpf_attr``;
* on ``sys_exit_bpf`` of a remembered thread: forget it, and if the call
  returned an fd, resolve that fd to its ``struct bpf_map`` **in the kernel**
  (``task->files->fdt->fd[ret]->private_data``, offsets from the kernel's
  BTF, read with ``bpf_probe_read_kernel``) and write the map's id, type,
  sizes, flags, BTF ids and name to a ring buffer.  The map is alive at that
  moment (its creator holds the fd until the syscall has returned), so the
  record describes it even if it is freed 10 ms later, before the daemon
  reads the record.

``BPF_OBJ_PIN`` calls that succeed are recorded too, as a bare "something was
pinned": a pin path is how pymap names a map whose kernel name is cut to 15
characters (``cilium_lb4_serv`` -> ``cilium_lb4_services_v2``), and a map is
often pinned just after it is created, so its pins must be read again then.

A resolution can fail (another thread of the creator closed the fd in between,
or the fd now holds something that is not the requested map type): then the
record says so and carries the creator's tgid and fd, and the reader tries
``/proc/TGID/fdinfo/FD`` (``map_id:``), which works while the fd is open.

pymap's own creations (its discovery maps, the in-kernel delta engine's maps
made by the objects broker) are skipped in the kernel, by tgid: the id-set poll
sees those as it always did.

All objects are made at start-up, before the seccomp filter (see
:mod:`watcher.daemon.privileges`); afterwards the ring is only read through
its mmap and the lost counter through ``BPF_MAP_LOOKUP_ELEM``.  Closing the
tracepoint events detaches the programs; :meth:`MapWatch.close` closes
everything once, and a finalizer does if nobody did.
"""

from __future__ import annotations

import os
import re
import struct
import weakref

import attrs

import watcher.kernel.sys.create as progload
import watcher.kernel.sys.perfevent as perfevent
import watcher.kernel.sys.syscall as syscall
from watcher.kernel.asm.assembler import (
    ADD,
    JEQ,
    JGE,
    JNE,
    JSLT,
    LSH,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R8,
    R9,
    R10,
    RSH,
    Asm,
)
from watcher.kernel.asm.helpers import Helper
from watcher.kernel.btf.cache import member_offsets
from watcher.kernel.buffers.ringbuf import RingBufReader
from watcher.kernel.maps.find import MapRecord, fdinfo
from watcher.kernel.maps.kinds import TYPE_IDS, type_name

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
RING_BYTES = 256 << 10  # 4,096 records: far more creations than one wakeup ever sees
PENDING_THREADS = 4096  # threads inside bpf(BPF_MAP_CREATE) at once (LRU: a lost exit ages out)

# helpers (include/uapi/linux/bpf.h)
_BPF_MAP_CREATE, _BPF_OBJ_PIN = 0, 6
_PIN = -2  # (all ones but the last bit, in 64 bits) the thread is pinning, not creating
_UNKNOWN_TYPE = -1  # (all ones in 64 bits) the attr could not be read at entry: no type check at exit

# The ring record (little-endian u32s, then the name): all from the kernel's struct bpf_map.
RECORD = struct.Struct("<12I16s")
_FIELDS = ("id", "map_type", "key_size", "value_size", "max_entries", "map_flags",
           "btf_key_type_id", "btf_value_type_id")
_REC_BTF_ID, _REC_TGID, _REC_FD, _REC_STATUS, _REC_NAME = 32, 36, 40, 44, 48
RESOLVED, UNRESOLVED, PINNED = 0, 1, 2

# What the exit program reads, by struct (offsets from BTF at load time).
KERNEL_MEMBERS = {
    "task_struct": ("files",),
    "files_struct": ("fdt",),
    "fdtable": ("fd", "max_fds"),
    "file": ("private_data",),
    "bpf_map": (*_FIELDS, "name", "btf"),
    "btf": ("id",),
}


class Unavailable(OSError):
    """The tracepoints or the programs cannot be used here; the message says why."""


@attrs.frozen
class Tracepoint:
    """A tracefs event: its id and its fields' ``(offset, size)``."""

    id: int
    fields: dict[str, tuple[int, int]]

    def field(self, name: str, size: int) -> int:
        try:
            offset, actual = self.fields[name]
        except KeyError:
            raise Unavailable(f"the tracepoint has no field {name!r}") from None
        if actual != size:
            raise Unavailable(f"tracepoint field {name} is {actual} bytes, not {size}")
        return offset


_FIELD = re.compile(r"field:[^;]*?(\w+)(\[\d*\])?;\s*offset:(\d+);\s*size:(\d+);")


def tracepoint(category: str, name: str, roots: tuple[str, ...] = TRACEFS) -> Tracepoint:
    """Read a tracepoint's id and record layout from tracefs (never hard-coded)."""
    for root in roots:
        base = os.path.join(root, "events", category, name)
        try:
            with open(os.path.join(base, "format")) as f:
                text = f.read()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise Unavailable(e.errno, f"{base}/format: {e.strerror}") from None
        ids = re.search(r"^ID:\s*(\d+)", text, re.M)
        if ids is None:
            raise Unavailable(f"{base}/format has no ID line")
        fields = {m[1]: (int(m[3]), int(m[4])) for m in _FIELD.finditer(text)}
        return Tracepoint(int(ids[1]), fields)
    raise Unavailable(f"no tracepoint {category}:{name} under {' or '.join(roots)} "
                      "(tracefs not mounted?)")


def enter_program(tp: Tracepoint, pending_fd: int, own_tgids: tuple[int, ...]) -> bytes:
    """``sys_enter_bpf``: remember a thread entering ``BPF_MAP_CREATE`` or ``BPF_OBJ_PIN``
    (not pymap's own: the daemon and its objects broker); for a creation, with the map
    type asked for."""
    cmd, uattr = tp.field("cmd", 8), tp.field("uattr", 8)
    a = Asm()
    a.mov(R6, R1)
    a.ldx(8, R7, R6, cmd)
    a.jmp(JEQ, R7, _BPF_MAP_CREATE, "watched")
    a.jmp(JNE, R7, _BPF_OBJ_PIN, "out")
    a.label("watched")
    a.call(Helper.GET_CURRENT_PID_TGID)
    a.stx(8, R10, -8, R0)
    a.alu64(RSH, R0, 32)
    for tgid in own_tgids:
        a.jmp(JEQ, R0, tgid, "out")
    a.st(8, R10, -16, _PIN)
    a.jmp(JEQ, R7, _BPF_OBJ_PIN, "store")
    # the requested map type (union bpf_attr starts with it), checked again at exit
    a.st(8, R10, -16, 0)
    a.mov(R1, R10)
    a.alu64(ADD, R1, -16)
    a.movi(R2, 4)
    a.ldx(8, R3, R6, uattr)
    a.call(Helper.PROBE_READ_USER)
    a.jmp(JEQ, R0, 0, "store")
    a.st(8, R10, -16, _UNKNOWN_TYPE)
    a.label("store")
    a.ld_map_fd(R1, pending_fd)
    a.mov(R2, R10)
    a.alu64(ADD, R2, -8)
    a.mov(R3, R10)
    a.alu64(ADD, R3, -16)
    a.movi(R4, 0)
    a.call(Helper.MAP_UPDATE_ELEM)
    a.label("out")
    a.movi(R0, 0)
    a.exit()
    return a.assemble()


def exit_program(  # size: an emitter; one straight run of instructions reads best whole
        tp: Tracepoint, off: dict[str, int], pending_fd: int, ring_fd: int,
        lost_fd: int) -> bytes:
    """``sys_exit_bpf``: for a remembered thread's new map fd, one :data:`RECORD`.

    Registers: R6 the tracepoint context, then the pointer being followed;
    R7 pid_tgid; R8 the map type asked for at entry (or ``_PIN``); R9 the returned fd.
    A pin that succeeded is a record with status :data:`PINNED` and nothing to resolve.
    """
    ret = tp.field("ret", 8)
    rec = -8 - 8 - RECORD.size  # the record on the stack, below the key and a scratch slot
    scratch = -16
    a = Asm()
    a.mov(R6, R1)
    a.call(Helper.GET_CURRENT_PID_TGID)
    a.mov(R7, R0)
    a.stx(8, R10, -8, R7)
    a.ld_map_fd(R1, pending_fd)
    a.mov(R2, R10)
    a.alu64(ADD, R2, -8)
    a.call(Helper.MAP_LOOKUP_ELEM)
    a.jmp(JEQ, R0, 0, "out")
    a.ldx(8, R8, R0, 0)
    a.ld_map_fd(R1, pending_fd)
    a.mov(R2, R10)
    a.alu64(ADD, R2, -8)
    a.call(Helper.MAP_DELETE_ELEM)
    a.ldx(8, R9, R6, ret)
    a.jmp(JSLT, R9, 0, "out")  # the creation failed
    for pos in range(0, RECORD.size, 8):
        a.st(8, R10, rec + pos, 0)
    a.mov(R1, R7)
    a.alu64(RSH, R1, 32)
    a.stx(4, R10, rec + _REC_TGID, R1)
    a.stx(4, R10, rec + _REC_FD, R9)
    a.jmp(JNE, R8, _PIN, "created")
    a.st(4, R10, rec + _REC_STATUS, PINNED)  # something was pinned: no map to resolve
    a.ja("emit")
    a.label("created")

    def read_at(offset: int, dst: int, size: int) -> None:
        """``size`` bytes at R6 + ``offset`` onto the stack at ``dst``; a fault: unresolved."""
        a.mov(R1, R10)
        a.alu64(ADD, R1, dst)
        a.movi(R2, size)
        a.mov(R3, R6)
        a.alu64(ADD, R3, offset)
        a.call(Helper.PROBE_READ_KERNEL)
        a.jmp(JNE, R0, 0, "unresolved")

    def follow(offset: int) -> None:
        """R6 = the pointer at R6 + ``offset``; NULL: unresolved."""
        read_at(offset, scratch, 8)
        a.ldx(8, R6, R10, scratch)
        a.jmp(JEQ, R6, 0, "unresolved")

    a.call(Helper.GET_CURRENT_TASK)
    a.mov(R6, R0)
    follow(off["task_struct.files"])
    follow(off["files_struct.fdt"])
    read_at(off["fdtable.max_fds"], scratch, 4)  # the table's bound, before indexing it
    a.ldx(4, R1, R10, scratch)
    a.jmp(JGE, R9, R1, "unresolved", reg=True)
    follow(off["fdtable.fd"])
    a.mov(R1, R9)
    a.alu64(LSH, R1, 3)
    a.alu64(ADD, R6, R1, reg=True)  # &fd[ret]
    follow(0)  # struct file *
    follow(off["file.private_data"])  # struct bpf_map *
    for i, field in enumerate(_FIELDS):
        read_at(off[f"bpf_map.{field}"], rec + 4 * i, 4)
    read_at(off["bpf_map.name"], rec + _REC_NAME, 16)
    # The fd must hold the map just asked for: a type that differs means another thread
    # of the creator closed it and something else took the number.
    a.jmp(JEQ, R8, _UNKNOWN_TYPE, "typed")
    a.ldx(4, R1, R10, rec + 4)
    a.jmp(JNE, R1, R8, "unresolved", reg=True)
    a.label("typed")
    # BTF: the map's btf pointer, then its id (no BTF: 0)
    read_at(off["bpf_map.btf"], scratch, 8)
    a.ldx(8, R6, R10, scratch)
    a.jmp(JEQ, R6, 0, "emit")
    read_at(off["btf.id"], rec + _REC_BTF_ID, 4)
    a.ja("emit")
    a.label("unresolved")  # the reader asks /proc/TGID/fdinfo/FD
    a.st(4, R10, rec + _REC_STATUS, UNRESOLVED)
    a.label("emit")
    a.ld_map_fd(R1, ring_fd)
    a.mov(R2, R10)
    a.alu64(ADD, R2, rec)
    a.movi(R3, RECORD.size)
    a.movi(R4, 0)
    a.call(Helper.RINGBUF_OUTPUT)
    a.jmp(JEQ, R0, 0, "out")
    a.ld_map_value(R1, lost_fd)  # the ring was full: count it, the reader reports it
    a.movi(R2, 1)
    a.atomic_add(8, R1, 0, R2)
    a.label("out")
    a.movi(R0, 0)
    a.exit()
    return a.assemble()


@attrs.frozen
class Created:
    """One map creation the kernel reported (``record`` None: not resolved in the kernel;
    ``fdinfo_id``: the id ``/proc/TGID/fdinfo/FD`` gave then, if any).

    ``pinned``: not a creation but a ``BPF_OBJ_PIN`` of some object by ``tgid``: a
    pin gives a map its display name, so the maps' pins must be read again.
    """

    tgid: int
    fd: int
    record: MapRecord | None
    fdinfo_id: int | None = None
    pinned: bool = False

    @property
    def map_id(self) -> int | None:
        return self.record.id if self.record is not None else self.fdinfo_id


def parse_record(data: bytes) -> Created:
    """One ring record into a :class:`Created` (with a :class:`MapRecord` when resolved)."""
    values = RECORD.unpack(data[:RECORD.size])
    map_id, map_type, key_size, value_size, max_entries, flags, key_tid, value_tid, \
        btf_id, tgid, fd, status, raw_name = values
    if status == PINNED:
        return Created(tgid, 0, None, pinned=True)
    if status != RESOLVED or not map_id:
        return Created(tgid, fd, None)
    name = raw_name.split(b"\0", 1)[0].decode(errors="replace")
    return Created(tgid, fd, MapRecord(
        id=map_id, name=name, kernel_name=name, type=type_name(map_type), type_id=map_type,
        key_size=key_size, value_size=value_size, max_entries=max_entries, flags=flags,
        btf_id=btf_id, btf_key_type_id=key_tid, btf_value_type_id=value_tid, memlock=None,
        frozen=False))


def fdinfo_map_id(tgid: int, fd: int) -> int | None:
    """``map_id`` of ``/proc/TGID/fdinfo/FD``: None if the fd is closed or not a map."""
    map_id = fdinfo(fd, tgid).get("map_id", "")
    return int(map_id) if map_id.isdigit() else None


def _close_all(fds: list[int], ring: list[RingBufReader]) -> None:
    for reader in ring:
        reader.close()
    ring.clear()
    while fds:  # events (which hold the programs) first: they were appended last
        try:
            os.close(fds.pop())
        except OSError:
            pass


class MapWatch:
    """The tracepoint programs, their maps and attachments: map creations as they happen.

    ``fileno()`` is readable while records wait; :meth:`read` returns them.
    Raises :class:`Unavailable` (or ``OSError`` from the kernel) when this host
    cannot do it: the caller falls back to polling.
    """

    def __init__(self, own_tgids: tuple[int, ...] | None = None,
                 tracefs: tuple[str, ...] = TRACEFS):
        self._fds: list[int] = []
        self._ring: list[RingBufReader] = []
        self._finalizer = weakref.finalize(self, _close_all, self._fds, self._ring)
        try:
            self._open((os.getpid(),) if own_tgids is None else own_tgids, tracefs)
        except BaseException:
            self.close()
            raise

    def _open(self, own_tgids: tuple[int, ...], tracefs: tuple[str, ...]) -> None:
        enter = tracepoint("syscalls", "sys_enter_bpf", tracefs)
        leave = tracepoint("syscalls", "sys_exit_bpf", tracefs)
        try:
            offsets = member_offsets(KERNEL_MEMBERS)
        except (OSError, ValueError) as e:
            raise Unavailable(f"kernel BTF: {e}") from None
        self.pending_fd = self._own(progload.create_map(
            TYPE_IDS["lru_hash"], 8, 8, PENDING_THREADS, "pymap_mw_pend"))
        self.lost_fd = self._own(progload.create_map(TYPE_IDS["array"], 4, 8, 1,
                                                     "pymap_mw_lost"))
        ring_fd = self._own(progload.create_map(TYPE_IDS["ringbuf"], 0, 0, RING_BYTES,
                                                "pymap_mw_ring"))
        self._ring.append(RingBufReader(ring_fd, RING_BYTES))
        enter_fd = self._own(progload.load_program(
            enter_program(enter, self.pending_fd, own_tgids), "pymap_mw_enter",
            progload.BPF_PROG_TYPE_TRACEPOINT))
        exit_fd = self._own(progload.load_program(
            exit_program(leave, offsets, self.pending_fd, ring_fd, self.lost_fd),
            "pymap_mw_exit", progload.BPF_PROG_TYPE_TRACEPOINT))
        # exit first: an entry seen without its exit would sit in the LRU until aged out
        self._own(perfevent.open_tracepoint(leave.id, exit_fd))
        self._own(perfevent.open_tracepoint(enter.id, enter_fd))
        self.records = 0
        self.unresolved = 0

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    @property
    def closed(self) -> bool:
        return not self._fds

    def fileno(self) -> int:
        """The ring buffer's fd: wait for it to be readable, then :meth:`read`."""
        return self._ring[0].fileno()

    def read(self, limit: int = 4096) -> list[Created]:
        """The creations waiting in the ring (consumed), each resolved if it can be."""
        chunk = self._ring[0].read(limit)
        found = []
        for pos in range(0, chunk.count * RECORD.size, RECORD.size):
            created = parse_record(chunk.data[pos:pos + RECORD.size])
            if created.record is None and not created.pinned:
                self.unresolved += 1
            found.append(created)
        self.records += len(found)
        return found

    def lost(self) -> int:
        """Records the programs could not write because the ring was full (ever)."""
        raw = syscall.map_lookup_elem(self.lost_fd, bytes(4), 8)
        return struct.unpack("<Q", raw)[0] if raw else 0

    def close(self) -> None:
        """Detach the programs and free every object; idempotent."""
        self._finalizer()
