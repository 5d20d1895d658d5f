"""The in-kernel engine's walker: ONE watched map's kernel objects and its polls.

Per watched map pymap owns these kernel objects (made in :meth:`IterDelta._create_objects`
through :mod:`.objects`: in the daemon by the objects broker, a process of its own):

* a **shadow map** with the watched map's keys: ``{fingerprint words, generation}``
  per key (a hash map; an array for arrays, where keys are indices);
* a one-entry **state** array: the generation, the walk's counters and cursors;
* for maps that are not per-CPU: a **ring buffer**, a BTF blob (callback
  ``func_info``), two **walk records** for hash-like maps, and a sweep program;
* per walk, a **walk program**: ``bpf_for_each_map_elem`` run once by
  ``BPF_PROG_TEST_RUN`` (the default), or a ``bpf_map_elem`` iterator (the first
  walk, per-CPU maps, and output beyond the ring).

What the programs do is :mod:`.programs`' docstring; what a map may cost and
which maps qualify, :mod:`.sizing`'s.

Read only: the watched map is opened ``BPF_F_RDONLY``, but the kernel does not
check an fd's mode when attaching an iterator or loading a program that names
the map: the element's value pointer is writable to the verifier, and
``bpf_map_update_elem``/``delete_elem`` on it run.  What keeps the watched map
unwritten is the generated code, checked by :func:`..asm.readonly.check_read_only`
before every load, in the objects broker when the daemon runs the engine (see
docs/architecture.md).

pymap's own writes, the state reset before each walk and removing swept keys
from the shadow map, are programs too (:mod:`.writers`): the daemon's process
issues no map update or delete command, so its seccomp filter allows none, and
no create or load command either: the broker makes every object
(docs/operations.md).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
import weakref

import attrs

import watcher.kernel.sys.create as progload
from watcher.kernel.buffers.ringbuf import RingBufReader
from watcher.kernel.kdelta import sizing
from watcher.kernel.kdelta.objects import EngineObjects, LocalObjects
from watcher.kernel.kdelta.programs import (
    EACH_MAIN,
    STATE_FIELDS,
    STATE_OFFSETS,
    STATE_SIZE,
    check_program,
    each_func_info,
    record_sweep_program,
    sweep_program,
    walk_program,
)
from watcher.kernel.kdelta.writers import (
    DELETE_MAIN,
    ETH_HLEN,
    RUN_BYTES,
    delete_asm,
    state_program,
)
from watcher.kernel.maps.find import MapRecord, fdinfo
from watcher.kernel.maps.kinds import TYPE_IDS

log = logging.getLogger("pymap.kernel.iterdelta")


class ShadowFull(OSError):
    """The shadow map could not hold the watched map's keys (the engine falls back)."""


@attrs.frozen
class WalkResult:
    """One walk: changed entries (``key|value`` rows) and removed keys, back to back."""

    changed: bytes
    nchanged: int
    removed: bytes
    nremoved: int
    counters: dict[str, int]
    swept: bool


def _close_all(fds: list[int], objects: EngineObjects,
               ring: RingBufReader | None = None) -> None:
    if ring is not None:
        ring.close()
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    objects.release()


class IterDelta:
    """The kernel side of the in-kernel engine for ONE watched map."""

    def __init__(self, record: MapRecord, stride: int, use_for_each: bool = True,
                 objects: EngineObjects | None = None, iterators: bool = True):
        """``iterators``: whether this host loads ``bpf_map_elem`` iterators
        (:mod:`..features`).  Without them every step runs as a for_each program:
        the first walk and any walk or sweep whose output overflows the ring
        take several passes instead of one iterator read."""
        reason = sizing.unsupported_reason(record, stride)
        if reason:
            raise progload.Unsupported(reason)
        self.key_size = record.key_size
        self.stride = stride
        self.array = record.type in ("array", "percpu_array")
        self.each = sizing.uses_for_each(record) and use_for_each
        if not (self.each or iterators):
            raise progload.Unsupported(sizing.iterator_needed(record))
        self.iterators = iterators
        self.passes = 0  # walks of the map in the last poll (0: settled by the order check;
        # more than 1: the ring overflowed, or the shadow map filled, or a re-sweep)
        self.nw = sizing.fingerprint_words(stride)
        self.shadow_entries = 0  # keys in the shadow map after the last walk
        self.walks = 0
        self.sweep_fallbacks = 0  # sweeps whose output overflowed the ring (then: the
        # iterator, or another for_each pass)
        self.timings: dict[str, float] = {}  # where the last walk's time went (bench_kdelta)
        self._fds: list[int] = []
        # made by the objects broker in the daemon (docs/operations.md), here otherwise
        self.objects = objects if objects is not None else LocalObjects()
        self._finalizer = weakref.finalize(self, _close_all, self._fds, self.objects)
        try:
            self._create_objects(record)
        except BaseException:
            self.close()
            raise

    def _create_objects(self, record: MapRecord) -> None:
        """Every kernel object this engine makes for one map (see :mod:`.objects`)."""
        value = 8 * (self.nw + 1)
        self.ring: RingBufReader | None = None
        self.records: list[int] = []  # the walk record's two buffers (for_each hash walks)
        self.state_fd = self._own(self.objects.create_map(TYPE_IDS["array"], 4, STATE_SIZE, 1,
                                                      "pymap_kd_state"))
        if self.array:
            self.shadow_fd = self._own(self.objects.create_map(
                TYPE_IDS["array"], 4, value, record.max_entries, "pymap_kd_shadow"))
        else:
            self.shadow_fd = self._own(self.objects.create_map(
                TYPE_IDS["hash"], record.key_size, value, sizing.shadow_entries(record),
                "pymap_kd_shadow"))
        self._state_prog = self._load_writer(state_program(self.state_fd), "pymap_kd_state")
        if not self.array:  # an array's shadow keeps every index: nothing to delete
            delete = delete_asm(self.key_size, self.shadow_fd, self.state_fd)
            blob, info = delete.func_info(DELETE_MAIN)
            self._delete_prog = self._load_writer(
                delete.assemble(), DELETE_MAIN, self._own(self.objects.load_btf(blob)), info)
        self.walk_fd = self.sweep_link = -1  # the iterator programs, where the host loads them
        if self.iterators:
            self._load_iterators()
        self.order_fd: int | None = None  # the last complete walk's record (of two buffers)
        self._written: int | None = None  # the record buffer the last for_each walk wrote
        self._record_entries = sizing.shadow_entries(record)
        self.order_count = -1  # elements the last full for_each walk recorded; -1: no record
        self.quick_polls = 0  # polls settled by the walk-order check alone
        self.record_sweeps = 0  # removals found through the walk record
        self.resweeps = 0  # ... that did not add up (the map changed meanwhile): walked again
        if self.each:
            size = sizing.ring_bytes(record, self.stride)
            ring_fd = self._own(self.objects.create_map(TYPE_IDS["ringbuf"], 0, 0, size,
                                                    "pymap_kd_ring"))
            self.ring = RingBufReader(ring_fd, size)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _close_all, self._fds, self.objects,
                                               self.ring)
            blob, self._func_info = each_func_info()
            self._btf_fd = self._own(self.objects.load_btf(blob))
            if not self.array:
                # a hash walk costs a shadow lookup per element: an unchanged map is
                # recognised first by its walk order (sequential memory, no hashing)
                self.records = [self._own(self.objects.create_map(
                    TYPE_IDS["array"], 4, 8 * ((self.key_size + 7) // 8 + self.nw + 1),
                    sizing.shadow_entries(record), "pymap_kd_order")) for _ in range(2)]
                self.order_fd = self.records[0]
                sweep = sweep_program(self.key_size, self.nw, self.state_fd, ring_fd,
                                      self.shadow_fd)
                self._sweep_each_fd = self._own(self.objects.load_program(
                    sweep, "pymap_kd_sweep", progload.BPF_PROG_TYPE_SOCKET_FILTER,
                    btf_fd=self._btf_fd, func_info=self._func_info))
        self.memlock = sum(_fdinfo_memlock(fd) for fd in (self.shadow_fd, self.state_fd)) + (
            _fdinfo_memlock(self.ring.fd) if self.ring else 0) + (
            sum(_fdinfo_memlock(fd) for fd in self.records))

    def _load_iterators(self) -> None:
        """The iterator walk (first walks, per-CPU maps, output beyond the ring) and,
        for hash-like maps, the iterator sweep (unbounded output)."""
        walk = walk_program(self.key_size, self.stride, self.shadow_fd, self.state_fd,
                            self.array)
        self.walk_fd = self._own(self.objects.load_program(
            walk, "pymap_kd_walk", progload.BPF_PROG_TYPE_TRACING, progload.BPF_TRACE_ITER))
        if not self.array:
            sweep = sweep_program(self.key_size, self.nw, self.state_fd)
            sweep_fd = self._own(self.objects.load_program(
                sweep, "pymap_kd_sweep", progload.BPF_PROG_TYPE_TRACING,
                progload.BPF_TRACE_ITER))
            # the sweep walks pymap's own shadow map: its link may hold it for good
            self.sweep_link = self._own(progload.attach_map_iter(sweep_fd, self.shadow_fd))

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _load_writer(self, program: bytes, name: str, btf_fd: int = 0,
                     func_info: bytes = b"") -> int:
        return self._own(self.objects.load_program(program, name,
                                                   progload.BPF_PROG_TYPE_SOCKET_FILTER,
                                                   btf_fd=btf_fd, func_info=func_info))

    def close(self) -> None:
        self._finalizer()

    # --- one walk ---

    def walk(self, map_fd: int) -> WalkResult:
        """Walk the watched map (``map_fd``, read-only); sweep if keys went missing.

        A shadow map that filled up mid-walk (removed keys still in it while new
        ones arrive) left some emitted entries unrecorded, and an unrecorded key
        could vanish unnoticed: so sweep, which frees the removed keys' room, and
        walk once more.  Still full after that: :class:`ShadowFull`.

        A for_each walk whose output overflowed the ring left the entries it
        could not write uncommitted (each element writes first, then commits):
        the iterator finishes the walk where the host loads one; elsewhere the
        for_each walk runs again, and each pass commits at least what the ring
        held, so the passes end.
        """
        # The first walk outputs every entry: the iterator (no limit on its output) does it
        # where it loads; elsewhere for_each passes, as many as the ring needs.
        each = self.each and (self.walks > 0 or not self.iterators)
        self.timings = {}
        self.passes = 0
        if each and self.order_count >= 0 and self._settled_by_order(map_fd):
            return WalkResult(b"", 0, b"", 0, dict.fromkeys(STATE_FIELDS, 0), False)
        outputs, removed, totals = self._passes(map_fd, each)
        row = self.key_size + self.stride
        gone_keys = b"".join(removed)
        if len(outputs) > 1 and gone_keys:
            # a key swept after one walk and shown by a later one is back
            later = b"".join(outputs[1:])
            back = {later[i:i + self.key_size] for i in range(0, len(later), row)}
            gone_keys = b"".join(k for k in _split(gone_keys, self.key_size) if k not in back)
        changed = b"".join(outputs)
        totals["gen"] = self.walks
        return WalkResult(changed, len(changed) // row, gone_keys,
                          len(gone_keys) // self.key_size, totals, bool(removed))

    def _settled_by_order(self, map_fd: int) -> bool:
        """The walk-order check: True if the map is unchanged since the last full walk."""
        t0 = time.perf_counter()
        unchanged = self._unchanged(map_fd)
        self.timings["order check"] = time.perf_counter() - t0
        if unchanged:
            self.quick_polls += 1
        return unchanged

    def _passes(self, map_fd: int, each: bool
                ) -> tuple[list[bytes], list[bytes], dict[str, int]]:
        """Walk passes until one completes: (outputs, removed keys, summed counters)."""
        outputs: list[bytes] = []
        removed: list[bytes] = []
        totals = dict.fromkeys(STATE_FIELDS, 0)
        positional = each and self.order_count >= 0
        stalls = 0  # passes that committed nothing new: the shadow full, or a re-sweep
        while True:
            self.passes += 1
            t0 = time.perf_counter()
            counters, out = self._walk_once(map_fd, each, positional)
            t1 = time.perf_counter()
            route = "for_each walk" if each else "bpf_iter walk"
            self.timings[route] = self.timings.get(route, 0.0) + t1 - t0
            outputs.append(out)
            for name in STATE_FIELDS[1:]:
                totals[name] += counters[name]
            present = counters["seen"] + counters["hits"]
            if not self.array and present < self.shadow_entries:
                gone = self._removed(counters, present, t1)
                if gone is None:  # the map changed under the walk: walk again, stamping all
                    positional = False
                    stalls = self._stalled(stalls, totals)
                    continue
                removed.append(gone)
            self.shadow_entries = present + counters["added"]
            if self._keep_record(counters, each):
                return outputs, removed, totals
            if counters["full"] or not out:  # nothing new committed by this pass
                stalls = self._stalled(stalls, totals)
            if self.iterators:
                each = positional = False  # more output than the ring holds: the iterator
            else:
                positional = False  # another for_each pass for what the ring could not hold

    def _removed(self, counters: dict[str, int], present: int, t1: float) -> bytes | None:
        """Keys gone from the map since the last walk, deleted from the shadow map; None
        when the record sweep did not add up (the map changed under the walk)."""
        if counters["hits"]:
            # hits stamped the record, not the shadow: the record says what is gone
            self._reset_state(self.walks, self.order_count)
            gone, ok = self._record_sweep()
            ok = ok and len(gone) // self.key_size == self.shadow_entries - present
            if not ok:
                self.timings["sweep"] = time.perf_counter() - t1
                self.shadow_entries += counters["added"]  # inserted all the same
                self.order_count = -1
                self.resweeps += 1
                return None
            self.record_sweeps += 1
            self._delete(gone)
        else:
            gone = self._sweep()  # removed from the shadow map as it finds them
        self.timings["sweep"] = self.timings.get("sweep", 0.0) + time.perf_counter() - t1
        return gone

    def _keep_record(self, counters: dict[str, int], each: bool) -> bool:
        """After a pass: keep its walk record if complete; True if the walk is complete."""
        complete = not (counters["full"] or counters["overflow"])
        if each and self._written is not None and complete and \
                counters["ord"] <= self._record_entries:
            self.order_fd, self.order_count = self._written, counters["ord"]
        else:
            self.order_count = -1
        return bool(complete)

    @staticmethod
    def _stalled(stalls: int, totals: dict[str, int]) -> int:
        if stalls + 1 >= 4:
            raise ShadowFull(errno.ENOSPC, f"shadow map full again and again ({totals['full']} "
                             "entries unrecorded): the map churns faster than it is walked")
        return stalls + 1

    def _walk_once(self, map_fd: int, each: bool, positional: bool = False
                   ) -> tuple[dict[str, int], bytes]:
        gen = self.walks + 1
        self._reset_state(gen, self.order_count if positional else 0)
        # The link (or for_each program) is made per walk: it holds the watched map, and
        # pymap must not keep a freed map alive (its disappearance is map_removed).
        if each:
            out = self._run_each(map_fd, positional)
        else:
            link = progload.attach_map_iter(self.walk_fd, map_fd)
            try:
                out = read_iter(link)
            finally:
                os.close(link)
        self.walks = gen
        raw = progload.syscall.map_lookup_elem(self.state_fd, bytes(4), STATE_SIZE)
        counters = dict(zip(STATE_FIELDS, struct.unpack(f"<{len(STATE_FIELDS)}Q", raw or b"")))
        return counters, out


    def _unchanged(self, map_fd: int) -> bool:
        """Is the map element for element what the last full walk recorded (no output)?"""
        assert self.order_fd is not None
        self._reset_state(self.walks)
        program = check_program(self.key_size, self.stride, self.state_fd, self.order_fd,
                                map_fd)
        self._run_each_program(program)
        raw = progload.syscall.map_lookup_elem(self.state_fd, bytes(4), STATE_SIZE)
        state = dict(zip(STATE_FIELDS, struct.unpack(f"<{len(STATE_FIELDS)}Q", raw or b"")))
        return not state["dirty"] and state["ord"] == self.order_count

    def _reset_state(self, gen: int, old_count: int = 0) -> None:
        values = dict.fromkeys(STATE_FIELDS, 0)
        values["gen"], values["old_count"] = gen, old_count
        state = struct.pack(f"<{len(STATE_FIELDS)}Q", *values.values())
        result, _ = progload.syscall.prog_test_run(self._state_prog, bytes(ETH_HLEN) + state)
        if result:
            raise progload.BpfError(errno.EFAULT, "pymap_kd_state",
                                    f"the state was not written ({result:#x})")

    def _delete(self, keys: bytes) -> None:
        """Remove ``keys`` (back to back) from the shadow map, a packet of them per run."""
        per_run = (RUN_BYTES - ETH_HLEN) // self.key_size * self.key_size
        for start in range(0, len(keys), per_run):
            chunk = keys[start:start + per_run]
            deleted, _ = progload.syscall.prog_test_run(self._delete_prog,
                                                        bytes(ETH_HLEN) + chunk)
            if deleted != len(chunk) // self.key_size:
                raise progload.BpfError(errno.ENOENT, "pymap_kd_delete",
                                        f"{len(chunk) // self.key_size - deleted} of "
                                        f"{len(chunk) // self.key_size} removed keys were "
                                        "not in the shadow map")

    def _run_each_program(self, program: bytes) -> None:
        prog = self.objects.load_program(program, EACH_MAIN,
                                         progload.BPF_PROG_TYPE_SOCKET_FILTER,
                                         btf_fd=self._btf_fd, func_info=self._func_info)
        try:
            progload.syscall.prog_test_run(prog, bytes(64))
        finally:
            os.close(prog)

    def _sweep(self) -> bytes:
        """Keys of the shadow map not stamped by the last walk (removed from the watched
        map), deleted from the shadow map too.

        A ring that overflowed: the iterator sweeps again (unbounded output); without
        iterators the keys found are deleted and the for_each sweep runs again,
        finding the rest (each pass deletes at least what the ring held).
        """
        found: list[bytes] = []
        while self.ring is not None:
            self._reset_state(self.walks)  # clear overflow, keep the generation
            progload.syscall.prog_test_run(self._sweep_each_fd, bytes(64))
            gone = self._drain_ring()
            raw = progload.syscall.map_lookup_elem(self.state_fd, bytes(4), STATE_SIZE)
            overflow = struct.unpack_from("<Q", raw or bytes(STATE_SIZE), STATE_OFFSETS["overflow"])[0]
            if overflow:
                self.sweep_fallbacks += 1
                if self.iterators:
                    break
                if not gone:
                    raise ShadowFull(errno.ENOSPC, "the sweep's ring holds no key")
            self._delete(gone)
            found.append(gone)
            if not overflow:
                return b"".join(found)
        gone = read_iter(self.sweep_link)  # unbounded output; finds what the ring did too
        self._delete(gone)
        return gone

    def _drain_ring(self) -> bytes:
        assert self.ring is not None
        parts = []
        while self.ring.pending():
            parts.append(self.ring.read(1 << 30, 1 << 30).data)
        return b"".join(parts)

    def _run_each(self, map_fd: int, positional: bool) -> bytes:
        """One ``bpf_for_each_map_elem`` walk: a program run, its rows from the ring.

        It writes the record buffer the last complete walk did not, and with
        ``positional`` reads that one (:func:`_positional`).
        """
        assert self.ring is not None
        new = old = None
        if self.records:
            old = self.order_fd
            new = self.records[1] if old == self.records[0] else self.records[0]
        program = walk_program(self.key_size, self.stride, self.shadow_fd, self.state_fd,
                               self.array, ring_fd=self.ring.fd, map_fd=map_fd,
                               order_fd=new, old_fd=old if positional else None)
        self._run_each_program(program)
        self._written = new
        return self._drain_ring()

    def _record_sweep(self) -> tuple[bytes, bool]:
        """Removed keys found through the old record; (keys, complete?)."""
        assert self.ring is not None and self.order_fd is not None
        self._run_each_program(record_sweep_program(self.key_size, self.stride, self.state_fd,
                                                    self.order_fd, self.shadow_fd,
                                                    self.ring.fd))
        gone = self._drain_ring()
        raw = progload.syscall.map_lookup_elem(self.state_fd, bytes(4), STATE_SIZE)
        overflow = struct.unpack_from("<Q", raw or bytes(STATE_SIZE), STATE_OFFSETS["overflow"])[0]
        return gone, not overflow


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


_READ = 1 << 20


def read_iter(link_fd: int) -> bytes:
    """Run one walk of ``link_fd`` and return all it wrote."""
    fd = progload.iter_create(link_fd)
    out = bytearray()
    buf = bytearray(_READ)
    view = memoryview(buf)
    try:
        while n := os.readv(fd, [view]):
            out += view[:n]
    finally:
        os.close(fd)
    return bytes(out)


def _fdinfo_memlock(fd: int) -> int:
    memlock = fdinfo(fd).get("memlock", "")
    return int(memlock) if memlock.isdigit() else 0


