"""Change detection inside the kernel: a generated BPF program walks a watched map
and emits only the entries whose value changed since its last walk.

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

The walk, per entry: fingerprint the value (all CPUs' slots of a per-CPU map),
look the key up in the shadow map; absent (or never written, for arrays) ->
write the entry ``key, value`` out and insert it; present with other
fingerprint words -> write the entry, then store the new words; either way
stamp the current generation.  Only changed entries cross to user space.
``seen`` counts shadow keys stamped this walk (each once); when it equals the
shadow's size before the walk, no key can be missing, so a sweep for removed
keys runs only when something was removed.  Hash maps first try the last
walk's record (:func:`_positional`, :func:`check_program`), which avoids the
shadow lookups for entries whose place in the walk did not change.

The fingerprint: values up to :data:`EXACT_MAX` bytes (the whole per-CPU row)
are kept whole, so comparing is exact.  Longer values keep one 64-bit word of
a multiply-rotate chain over the value's words; each step is a bijection of
the running word, so a change confined to one 64-bit word always changes the
fingerprint, and other changes collide with probability about 2^-64.  A
collision costs one missed ``updated`` event: the next change of that entry
is delivered (with the then-current value and the last delivered old value).

Idempotent output: the kernel re-runs an iterator program for the element
whose output overflowed the seq_file buffer (8 pages per read()), and a full
ring drops a for_each record; so each element first writes its output and only
then commits its shadow entry.

Read only: the watched map is opened ``BPF_F_RDONLY``, but the kernel does not
check an fd's mode when attaching an iterator or loading a program that names
the map: the element's value pointer is writable to the verifier, and
``bpf_map_update_elem``/``delete_elem`` on it run.  What keeps the watched map
unwritten is the generated code: every store and every writing helper targets
the stack or pymap's own maps, which :func:`.progcheck.check_read_only` asserts
before every load, in the objects broker when the daemon runs the engine (see
docs/architecture.md).

pymap's own writes, the state reset before each walk and removing swept keys
from the shadow map, are programs too (:func:`state_program`,
:func:`delete_program`, run with ``BPF_PROG_TEST_RUN``): the daemon's process
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

import watcher.kernel.asm.readonly as progcheck
import watcher.kernel.features.probe as features_mod
import watcher.kernel.sys.create as progload
from watcher.kernel.asm.assembler import (
    ADD,
    DIV,
    JEQ,
    JGE,
    JNE,
    LSH,
    MUL,
    OR,
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    R9,
    R10,
    RSH,
    XOR,
    Asm,
)
from watcher.kernel.asm.helpers import Helper
from watcher.kernel.buffers.ringbuf import RingBufReader
from watcher.kernel.features.probe import Features
from watcher.kernel.kdelta.objects import EngineObjects, LocalObjects
from watcher.kernel.maps.find import MapRecord, fdinfo
from watcher.kernel.maps.kinds import TYPE_IDS

log = logging.getLogger("pymap.kernel.iterdelta")

SUPPORTED_TYPES = frozenset({"hash", "lru_hash", "percpu_hash", "lru_percpu_hash", "array",
                             "percpu_array"})
EXACT_MAX = 32  # value rows up to this many bytes are kept whole in the shadow map
MAX_STRIDE = 8192  # longer rows: the unrolled fingerprint would be too long a program
MAX_KEY = 256  # keys are copied to the 512-byte stack
LOOKAHEAD = 4  # old record entries a hash walk looks at before the shadow map
RING_BYTES = 4 << 20  # for_each output per run; more goes through the iterator

_BPF_NOEXIST, _BPF_RB_NO_WAKEUP = 1, 1
EACH_MAIN, EACH_CALLBACK = "pymap_kd_each", "pymap_kd_element"  # a for_each program's functions
DELETE_MAIN, DELETE_CALLBACK = "pymap_kd_delete", "pymap_kd_del_key"
# struct bpf_iter__bpf_map_elem: meta, map, key, value (8-byte pointers)
_CTX_META, _CTX_KEY, _CTX_VALUE = 0, 16, 24
# state value: generation, then counters the walk and sweep add to
STATE_FIELDS = ("gen", "seen", "added", "changed", "full", "overflow", "ord", "dirty", "j",
                "old_count", "hits", "deleted")
_STATE = {name: 8 * i for i, name in enumerate(STATE_FIELDS)}
_STATE_SIZE = 8 * len(STATE_FIELDS)
_PRIME = 0x9E3779B97F4A7C15
# Kernel per-element overhead of a preallocated hash map (struct htab_elem) and a bucket.
_HTAB_ELEM, _HTAB_BUCKET = 48, 16


class ShadowFull(OSError):
    """The shadow map could not hold the watched map's keys (the engine falls back)."""


Unsupported = progload.Unsupported
_check_read_only = progcheck.check_read_only
_map_elem_iter_btf_id = progload.map_elem_iter_btf_id


def unsupported_reason(record: MapRecord, stride: int) -> str | None:
    """Why this map cannot be watched in the kernel, or None if it can."""
    if record.type not in SUPPORTED_TYPES:
        return f"{record.type} maps have no bpf_map_elem iterator"
    if record.key_size > MAX_KEY:
        return f"keys of {record.key_size} bytes exceed {MAX_KEY} (copied to the BPF stack)"
    if stride > MAX_STRIDE:
        return f"values of {stride} bytes exceed {MAX_STRIDE} (program too long)"
    return None


def routes(features: Features) -> tuple[bool, bool, str]:
    """What the host lets the in-kernel engine walk with: (for_each, iterators, why not).

    Every route resets its state with ``BPF_PROG_TEST_RUN``; the for_each route also
    needs ``bpf_for_each_map_elem`` and a ring buffer; the other, ``bpf_map_elem``
    iterators.  ``why not`` names what was refused, "" when nothing was.
    """
    f = features_mod
    refused = [features.why_not(name) for name in (f.PROG_TEST_RUN, f.FOR_EACH, f.RINGBUF,
                                                    f.MAP_ITER) if not features.allows(name)]
    run = features.allows(f.PROG_TEST_RUN)
    each = run and features.allows(f.FOR_EACH) and features.allows(f.RINGBUF)
    return each, run and features.allows(f.MAP_ITER), "; ".join(refused)


def iterator_needed(record: MapRecord) -> str:
    """Why ``record`` cannot be walked without a ``bpf_map_elem`` iterator."""
    if record.percpu:
        return ("per-CPU maps need a bpf_map_elem iterator (a for_each callback sees one "
                "CPU's slot)")
    return "the iterator route was asked for"


def fingerprint_words(stride: int) -> int:
    return (stride + 7) // 8 if stride <= EXACT_MAX else 1


def shadow_bytes_estimate(record: MapRecord, stride: int) -> int:
    """Kernel memory the shadow map of ``record`` will cost (to check the cap before creating)."""
    value = 8 * (fingerprint_words(stride) + 1)
    ring = ring_bytes(record, stride) if uses_for_each(record) else 0
    if record.type in ("array", "percpu_array"):
        return record.max_entries * value + ring
    n = shadow_entries(record)
    buckets = 1 << max(n - 1, 1).bit_length()
    order = 2 * n * (((record.key_size + 7) & ~7) + value) if uses_for_each(record) else 0
    return (n * (_HTAB_ELEM + ((record.key_size + 7) & ~7) + value) + buckets * _HTAB_BUCKET
            + ring + order)


def ring_bytes(record: MapRecord, stride: int) -> int:
    """The for_each output ring: room for a quarter of the entries changing at once, within
    [64 KiB, RING_BYTES]; a walk with more output finishes through the iterator."""
    want = record.max_entries * ((record.key_size + stride + 15) & ~7) // 4
    return min(max(1 << max(want - 1, 1).bit_length(), 64 << 10), RING_BYTES)


def uses_for_each(record: MapRecord) -> bool:
    """for_each callbacks see one CPU's slot of a per-CPU value: those maps use the iterator."""
    return not record.percpu


def shadow_entries(record: MapRecord) -> int:
    """A hash shadow's capacity: room for new keys while removed ones still occupy it."""
    return record.max_entries + record.max_entries // 8 + 64


@attrs.frozen
class WalkResult:
    """One walk: changed entries (``key|value`` rows) and removed keys, back to back."""

    changed: bytes
    nchanged: int
    removed: bytes
    nremoved: int
    counters: dict[str, int]
    swept: bool


def _load_word(a: Asm, src: int, size: int, i: int, dst: int) -> None:
    """Bytes [8i, 8i+8) at ``src``, zero-padded past ``size``, into ``dst`` (uses R3)."""
    base = 8 * i
    if base + 8 <= size:
        a.ldx(8, dst, src, base)
        return
    a.movi(dst, 0)
    pos = base
    for width in (4, 2, 1):
        if pos + width <= size and pos - base + width <= 8:
            a.ldx(width, R3, src, pos)
            if pos != base:
                a.alu64(LSH, R3, 8 * (pos - base))
            a.alu64(OR, dst, R3, reg=True)
            pos += width


def _fingerprint(a: Asm, stride: int, out: int) -> None:
    """Fingerprint words of the value at R8 into the stack at R10+out (uses R1-R4)."""
    def word(i: int, dst: int) -> None:
        _load_word(a, R8, stride, i, dst)
    nwords = (stride + 7) // 8
    if stride <= EXACT_MAX:
        for i in range(nwords):
            word(i, R1)
            a.stx(8, R10, out + 8 * i, R1)
        return
    a.ld_imm64(R1, _PRIME)  # running word
    a.ld_imm64(R4, _PRIME)
    for i in range(nwords):
        word(i, R2)
        a.alu64(XOR, R1, R2, reg=True)
        a.alu64(MUL, R1, R4, reg=True)
        a.mov(R2, R1)
        a.alu64(LSH, R1, 31)
        a.alu64(RSH, R2, 33)
        a.alu64(OR, R1, R2, reg=True)
    a.stx(8, R10, out, R1)


def _count(a: Asm, state_fd: int, field: str) -> None:
    a.ld_map_value(R5, state_fd)  # R5: only ever the state map's value (_check_read_only)
    a.ldx(8, R2, R5, _STATE[field])
    a.alu64(ADD, R2, 1)
    a.stx(8, R5, _STATE[field], R2)


def _seq_write(a: Asm, src: int, size: int, fail: str) -> None:
    a.ldx(8, R1, R6, _CTX_META)
    a.ldx(8, R1, R1, 0)  # meta->seq
    a.mov(R2, src)
    a.movi(R3, size)
    a.call(Helper.SEQ_WRITE)
    a.jmp(JNE, R0, 0, fail)


def _copy(a: Asm, src: int, src_off: int, dst: int, dst_off: int, size: int) -> None:
    """Copy ``size`` bytes in the widest loads that fit (uses R1)."""
    pos = 0
    while pos < size:
        step = next(w for w in (8, 4, 2, 1) if pos + w <= size)
        a.ldx(step, R1, src, src_off + pos)
        a.stx(step, dst, dst_off + pos, R1)
        pos += step


def _emit_row(a: Asm, key_size: int, stride: int, ring_fd: int | None, state_fd: int,
              fail: str) -> None:
    """Write ``key | value`` (R7, R8) to the output; on no room, jump to ``fail``.

    Iterator: two ``bpf_seq_write`` calls.  for_each: one ring buffer record,
    submitted without a wakeup (the reader drains the ring after the run).
    """
    if ring_fd is None:
        _seq_write(a, R7, key_size, fail)
        _seq_write(a, R8, stride, fail)
        return
    _ring_write(a, ring_fd, state_fd, [(R7, key_size), (R8, stride)], fail)


def _ring_write(a: Asm, ring_fd: int, state_fd: int, parts: list[tuple[int, int]],
                fail: str) -> None:
    """One ring record of ``parts`` ((pointer register, size) each, back to back).

    R4 holds the reservation: its only use as a store base (see
    :func:`_check_read_only`).  No room: count ``overflow``, jump to ``fail``.
    """
    a.ld_map_fd(R1, ring_fd)
    a.movi(R2, sum(size for _, size in parts))
    a.movi(R3, 0)
    a.call(Helper.RINGBUF_RESERVE)
    a.jmp(JNE, R0, 0, f"{fail}_room")
    _count(a, state_fd, "overflow")
    a.ja(fail)
    a.label(f"{fail}_room")
    a.mov(R4, R0)
    offset = 0
    for src, size in parts:
        _copy(a, src, 0, R4, offset, size)
        offset += size
    a.mov(R1, R4)
    a.movi(R2, _BPF_RB_NO_WAKEUP)
    a.call(Helper.RINGBUF_SUBMIT)


def _order_step(a: Asm, key_size: int, stride: int, row: int, state_fd: int, order_fd: int,
                check: bool) -> None:
    """The walk-order record: element number ``ord`` of this walk is (key, fingerprint).

    ``check=False`` (a full walk) writes it; ``check=True`` (the unchanged
    check) compares with what the last full walk wrote there and, on the first
    difference, sets ``dirty`` and stops the for_each walk (callback returns 1).
    """
    kw, nw = (key_size + 7) // 8, fingerprint_words(stride)
    slot = row - ((key_size + 7) & ~7) - 8  # u32 index on the stack, below the key copy area
    a.ld_map_value(R5, state_fd)
    a.ldx(8, R1, R5, _STATE["ord"])
    a.alu64(ADD, R1, 1)
    a.stx(8, R5, _STATE["ord"], R1)
    a.alu64(ADD, R1, -1)
    a.stx(4, R10, slot, R1)
    a.ld_map_fd(R1, order_fd)
    a.mov(R2, R10)
    a.alu64(ADD, R2, slot)
    a.call(Helper.MAP_LOOKUP_ELEM)
    if not check:
        a.jmp(JEQ, R0, 0, "order_done")  # past the array's end: the check will not match
        a.mov(R9, R0)
        for i in range(kw):
            _load_word(a, R7, key_size, i, R1)
            a.stx(8, R9, 8 * i, R1)
        for i in range(nw):
            a.ldx(8, R1, R10, row + 8 * i)
            a.stx(8, R9, 8 * (kw + i), R1)
        a.st(8, R9, 8 * (kw + nw), 0)  # the next walk stamps it when it finds this entry
        a.label("order_done")
        return
    a.jmp(JEQ, R0, 0, "dirty")
    a.mov(R9, R0)
    for i in range(kw):
        _load_word(a, R7, key_size, i, R1)
        a.ldx(8, R2, R9, 8 * i)
        a.jmp(JNE, R1, R2, "dirty", reg=True)
    for i in range(nw):
        if stride <= EXACT_MAX:  # the words are the value's own: compare in place
            _load_word(a, R8, stride, i, R1)
        else:
            a.ldx(8, R1, R10, row + 8 * i)
        a.ldx(8, R2, R9, 8 * (kw + i))
        a.jmp(JNE, R1, R2, "dirty", reg=True)
    a.movi(R0, 0)
    a.exit()
    a.label("dirty")
    a.ld_map_value(R5, state_fd)
    a.st(8, R5, _STATE["dirty"], 1)
    a.movi(R0, 1)
    a.exit()


def _positional(a: Asm, key_size: int, stride: int, row: int, state_fd: int, old_fd: int,
                shadow_fd: int, ring_fd: int) -> None:
    """Try the last complete walk's record before the shadow map (no hashing).

    The element is compared with old records ``j`` .. ``j + LOOKAHEAD - 1``
    (entries removed or moved away are skipped); a key match is a *hit*: the record entry is stamped
    with this generation (the removal sweep reads those stamps), ``j`` moves on,
    and only a changed fingerprint costs a shadow lookup (to store it).  No
    match: the shadow path below, as without a record.
    """
    kw, nw = (key_size + 7) // 8, fingerprint_words(stride)
    slot = row - ((key_size + 7) & ~7) - 16
    for step in range(LOOKAHEAD):
        a.ld_map_value(R5, state_fd)
        a.ldx(8, R1, R5, _STATE["j"])
        if step:
            a.alu64(ADD, R1, step)
        a.ldx(8, R2, R5, _STATE["old_count"])
        a.jmp(JGE, R1, R2, "pos_slow", reg=True)
        a.stx(4, R10, slot, R1)
        a.ld_map_fd(R1, old_fd)
        a.mov(R2, R10)
        a.alu64(ADD, R2, slot)
        a.call(Helper.MAP_LOOKUP_ELEM)
        a.jmp(JEQ, R0, 0, "pos_slow")
        a.mov(R9, R0)
        miss = f"pos_next{step}" if step + 1 < LOOKAHEAD else "pos_slow"
        for i in range(kw):
            _load_word(a, R7, key_size, i, R1)
            a.ldx(8, R2, R9, 8 * i)
            a.jmp(JNE, R1, R2, miss, reg=True)
        a.ld_map_value(R5, state_fd)  # a hit: j moves past it
        a.ldx(4, R1, R10, slot)
        a.alu64(ADD, R1, 1)
        a.stx(8, R5, _STATE["j"], R1)
        a.ja("pos_hit")
        if step + 1 < LOOKAHEAD:
            a.label(f"pos_next{step}")
    a.label("pos_hit")
    a.ld_map_value(R5, state_fd)
    a.ldx(8, R1, R5, _STATE["gen"])
    a.stx(8, R9, 8 * (kw + nw), R1)
    _count(a, state_fd, "hits")
    for i in range(nw):
        a.ldx(8, R1, R9, 8 * (kw + i))
        a.ldx(8, R2, R10, row + 8 * i)
        a.jmp(JNE, R1, R2, "pos_changed", reg=True)
    a.ja("out")
    a.label("pos_changed")
    _emit_row(a, key_size, stride, ring_fd, state_fd, "out4")
    a.ld_map_fd(R1, shadow_fd)
    a.mov(R2, R7)
    a.call(Helper.MAP_LOOKUP_ELEM)
    a.jmp(JEQ, R0, 0, "out")
    a.mov(R9, R0)
    for i in range(nw + 1):  # new fingerprint, and this generation
        a.ldx(8, R1, R10, row + 8 * i)
        a.stx(8, R9, 8 * i, R1)
    _count(a, state_fd, "changed")
    a.ja("out")
    a.label("pos_slow")


def record_sweep_program(key_size: int, stride: int, state_fd: int, old_fd: int,
                         shadow_fd: int, ring_fd: int) -> bytes:
    """for_each over the old walk record: keys neither hit nor found by the shadow path
    this walk (their shadow generation is stale) were removed: write them to the ring."""
    kw, nw = (key_size + 7) // 8, fingerprint_words(stride)
    a = Asm()
    _element(a, old_fd)  # R7: &index, R8: the record entry
    a.ldx(4, R1, R7, 0)
    a.ld_map_value(R5, state_fd)
    a.ldx(8, R2, R5, _STATE["old_count"])
    a.jmp(JGE, R1, R2, "stop", reg=True)
    a.ldx(8, R1, R8, 8 * (kw + nw))
    a.ldx(8, R2, R5, _STATE["gen"])
    a.jmp(JEQ, R1, R2, "out", reg=True)
    a.ld_map_fd(R1, shadow_fd)
    a.mov(R2, R8)  # the entry starts with the key
    a.call(Helper.MAP_LOOKUP_ELEM)
    a.jmp(JEQ, R0, 0, "out")
    a.ldx(8, R1, R0, 8 * nw)
    a.ld_map_value(R5, state_fd)
    a.ldx(8, R2, R5, _STATE["gen"])
    a.jmp(JEQ, R1, R2, "out", reg=True)
    _ring_write(a, ring_fd, state_fd, [(R8, key_size)], "out")
    _callback_end(a, "out", "stop")
    return a.assemble()


def _callback_end(a: Asm, next_: str, stop: str) -> None:
    """A loop callback's two ends: ``next_`` goes on to the next element, ``stop`` stops."""
    a.label(next_)
    a.movi(R0, 0)
    a.exit()
    a.label(stop)
    a.movi(R0, 1)
    a.exit()


def check_program(key_size: int, stride: int, state_fd: int, order_fd: int, map_fd: int
                  ) -> bytes:
    """for_each over the watched map: does it still match the last full walk's order record?"""
    nw = fingerprint_words(stride)
    row = -8 * (nw + 1)
    a = Asm()
    _element(a, map_fd)
    if stride > EXACT_MAX:
        _fingerprint(a, stride, row)
    _order_step(a, key_size, stride, row, state_fd, order_fd, check=True)
    return a.assemble()


def _each_main(a: Asm, map_fd: int) -> None:
    """Main program of a for_each walk: call the callback (which follows) for every element."""
    a.ld_map_fd(R1, map_fd)
    a.ld_func(R2, EACH_CALLBACK)
    a.movi(R3, 0)
    a.movi(R4, 0)
    a.call(Helper.FOR_EACH_MAP_ELEM)
    a.movi(R0, 0)
    a.exit()
    a.function(EACH_CALLBACK)  # (map, key, value, ctx): key and value are map memory


def each_func_info() -> tuple[bytes, bytes]:
    """BTF and ``func_info`` of every for_each program, loaded once per engine: all
    start with :func:`_each_main`, so its callback label says where the callback is."""
    a = Asm()
    _each_main(a, 0)
    return a.func_info(EACH_MAIN)


def _element(a: Asm, each_map_fd: int | None) -> None:
    """Start of the per-element code: key pointer in R7, value pointer in R8.

    With ``each_map_fd``: a for_each main program over that map, then its
    callback, whose arguments are the element.  Without: an iterator program,
    whose context holds them (R6 keeps the context; "out" ends the element).
    """
    if each_map_fd is not None:
        _each_main(a, each_map_fd)
        a.mov(R7, R2)
        a.mov(R8, R3)
        return
    a.mov(R6, R1)
    a.ldx(8, R7, R6, _CTX_KEY)
    a.jmp(JEQ, R7, 0, "out")  # the end-of-walk call has no element
    a.ldx(8, R8, R6, _CTX_VALUE)
    a.jmp(JEQ, R8, 0, "out")


def walk_program(key_size: int, stride: int, shadow_fd: int, state_fd: int,
                 array: bool, ring_fd: int | None = None, map_fd: int | None = None,
                 order_fd: int | None = None, old_fd: int | None = None) -> bytes:
    """The per-element walk (see the module docstring).

    Without ``ring_fd``: a ``bpf_map_elem`` iterator program writing to its
    seq_file.  With ``ring_fd`` and ``map_fd``: a program that calls
    ``bpf_for_each_map_elem`` on ``map_fd`` once, with the same walk as its
    callback writing to the ring buffer (run with ``BPF_PROG_TEST_RUN``).
    """
    nw = fingerprint_words(stride)
    row = -8 * (nw + 1)  # stack: fingerprint words, then generation (a shadow value)
    gen = row + 8 * nw
    a = Asm()
    each = ring_fd is not None
    assert map_fd is not None or not each
    _element(a, map_fd if each else None)
    if not each:
        # Map helpers refuse the iterator's read-only key buffer: work on a stack copy.
        kcopy = row - ((key_size + 7) & ~7)
        _copy(a, R7, 0, R10, kcopy, key_size)
        a.mov(R7, R10)
        a.alu64(ADD, R7, kcopy)
    _fingerprint(a, stride, row)
    if order_fd is not None:
        _order_step(a, key_size, stride, row, state_fd, order_fd, check=False)
    if old_fd is not None:
        assert ring_fd is not None
        _positional(a, key_size, stride, row, state_fd, old_fd, shadow_fd, ring_fd)
    a.ld_map_value(R1, state_fd)
    a.ldx(8, R1, R1, _STATE["gen"])
    a.stx(8, R10, gen, R1)
    a.ld_map_fd(R1, shadow_fd)
    a.mov(R2, R7)
    a.call(Helper.MAP_LOOKUP_ELEM)
    a.jmp(JEQ, R0, 0, "insert")
    a.mov(R9, R0)
    a.ldx(8, R1, R9, 8 * nw)
    if array:
        a.jmp(JEQ, R1, 0, "fresh")  # generation 0: this index was never walked
    # each shadow key counts once in `seen`, even if a changing map shows it twice
    a.ldx(8, R2, R10, gen)
    a.jmp(JEQ, R1, R2, "compare", reg=True)
    _count(a, state_fd, "seen")
    a.ldx(8, R1, R10, gen)
    a.stx(8, R9, 8 * nw, R1)
    a.label("compare")
    for i in range(nw):
        a.ldx(8, R1, R9, 8 * i)
        a.ldx(8, R2, R10, row + 8 * i)
        a.jmp(JNE, R1, R2, "changed", reg=True)
    a.ja("out")

    a.label("changed")
    _emit_row(a, key_size, stride, ring_fd, state_fd, "out")
    for i in range(nw):
        a.ldx(8, R1, R10, row + 8 * i)
        a.stx(8, R9, 8 * i, R1)
    _count(a, state_fd, "changed")
    a.ja("out")

    if array:
        a.label("fresh")
        _emit_row(a, key_size, stride, ring_fd, state_fd, "out2")
        for i in range(nw + 1):
            a.ldx(8, R1, R10, row + 8 * i)
            a.stx(8, R9, 8 * i, R1)
        _count(a, state_fd, "added")
        a.ja("out")

    a.label("insert")
    _emit_row(a, key_size, stride, ring_fd, state_fd, "out3")
    a.ld_map_fd(R1, shadow_fd)
    a.mov(R2, R7)
    a.mov(R3, R10)
    a.alu64(ADD, R3, row)
    a.movi(R4, _BPF_NOEXIST)
    a.call(Helper.MAP_UPDATE_ELEM)
    a.jmp(JNE, R0, 0, "full")
    _count(a, state_fd, "added")
    a.ja("out")
    a.label("full")  # emitted but not recorded: emitted again next walk, counted here
    _count(a, state_fd, "full")

    for name in ("out2", "out3", "out4"):
        if name not in a.labels:
            a.label(name)
    a.label("out")
    a.movi(R0, 0)
    a.exit()
    return a.assemble()


def sweep_program(key_size: int, nw: int, state_fd: int, ring_fd: int | None = None,
                  shadow_fd: int | None = None) -> bytes:
    """Over the shadow map: emit keys whose generation is not the current one.

    An iterator program, or with ``ring_fd`` a for_each program over
    ``shadow_fd`` (pymap's own map, so it is loaded once) writing to the ring;
    if the ring fills, ``overflow`` counts it and the iterator sweeps instead.
    """
    a = Asm()
    assert shadow_fd is not None or ring_fd is None
    _element(a, shadow_fd if ring_fd is not None else None)
    a.ldx(8, R1, R8, 8 * nw)
    a.ld_map_value(R2, state_fd)
    a.ldx(8, R2, R2, _STATE["gen"])
    a.jmp(JEQ, R1, R2, "out", reg=True)
    if ring_fd is None:
        _seq_write(a, R7, key_size, "out")
    else:
        _ring_write(a, ring_fd, state_fd, [(R7, key_size)], "out")
    a.label("out")
    a.movi(R0, 0)
    a.exit()
    return a.assemble()


# --- pymap's writes to its own maps, done by programs (no bpf() write command) ---
#
# Under the daemon's seccomp filter bpf() has no update or delete command at all
# (docs/operations.md).  The engine's own writes, resetting its state map and
# clearing removed keys from its shadow map, are done by these two programs, run
# with BPF_PROG_TEST_RUN on a packet that carries the data; each names only
# pymap's own maps, embedded when it is loaded.

_ETH_HLEN = 14  # a socket filter's test run pulls an Ethernet header off the packet
_SKB_LEN = 0  # struct __sk_buff: len
# A test run's packet fits in one page with the skb's head and tail room (bpf_test_init).
RUN_BYTES = 3072


def state_program(state_fd: int) -> bytes:
    """Copy the packet's payload over the state map's value (returns 0, or the error)."""
    a = Asm()
    a.movi(R2, 0)
    a.ld_map_value(R3, state_fd)
    a.movi(R4, _STATE_SIZE)
    a.call(Helper.SKB_LOAD_BYTES)  # R1: the packet (the program's context)
    a.exit()
    return a.assemble()


def delete_program(key_size: int, shadow_fd: int, state_fd: int) -> bytes:
    """:func:`delete_asm`, assembled."""
    return delete_asm(key_size, shadow_fd, state_fd).assemble()


def delete_asm(key_size: int, shadow_fd: int, state_fd: int) -> Asm:
    """Delete the keys in the packet's payload (back to back) from the shadow map.

    ``bpf_loop`` calls the callback once per key (the verifier checks its body
    once, whatever the count); the callback reads its key from the packet with
    ``bpf_skb_load_bytes`` into its stack and deletes it.  Returns how many
    keys were there to delete (``deleted``).
    """
    room = (key_size + 7) & ~7
    a = Asm()
    a.mov(R6, R1)
    a.stx(8, R10, -8, R6)  # the callback's context: the packet, spilled
    a.ld_map_value(R5, state_fd)
    a.st(8, R5, _STATE["deleted"], 0)
    a.ldx(4, R1, R6, _SKB_LEN)
    a.alu64(DIV, R1, key_size)
    a.ld_func(R2, DELETE_CALLBACK)
    a.mov(R3, R10)
    a.alu64(ADD, R3, -8)
    a.movi(R4, 0)
    a.call(Helper.LOOP)
    a.ld_map_value(R5, state_fd)
    a.ldx(8, R0, R5, _STATE["deleted"])
    a.exit()
    a.function(DELETE_CALLBACK)  # (index, &packet)
    a.ldx(8, R6, R2, 0)
    a.alu64(MUL, R1, key_size)
    a.mov(R2, R1)
    a.mov(R1, R6)
    a.mov(R3, R10)
    a.alu64(ADD, R3, -room)
    a.movi(R4, key_size)
    a.call(Helper.SKB_LOAD_BYTES)
    a.jmp(JNE, R0, 0, "stop")
    a.ld_map_fd(R1, shadow_fd)
    a.mov(R2, R10)
    a.alu64(ADD, R2, -room)
    a.call(Helper.MAP_DELETE_ELEM)
    a.jmp(JNE, R0, 0, "next")
    _count(a, state_fd, "deleted")
    _callback_end(a, "next", "stop")
    return a


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
        (:mod:`.features`).  Without them every step runs as a for_each program:
        the first walk and any walk or sweep whose output overflows the ring
        take several passes instead of one iterator read."""
        reason = unsupported_reason(record, stride)
        if reason:
            raise Unsupported(reason)
        self.key_size = record.key_size
        self.stride = stride
        self.array = record.type in ("array", "percpu_array")
        self.each = uses_for_each(record) and use_for_each
        if not (self.each or iterators):
            raise Unsupported(iterator_needed(record))
        self.iterators = iterators
        self.passes = 0  # walks of the map in the last poll (0: settled by the order check;
        # more than 1: the ring overflowed, or the shadow map filled, or a re-sweep)
        self.nw = fingerprint_words(stride)
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
        self.state_fd = self._own(self.objects.create_map(TYPE_IDS["array"], 4, _STATE_SIZE, 1,
                                                      "pymap_kd_state"))
        if self.array:
            self.shadow_fd = self._own(self.objects.create_map(
                TYPE_IDS["array"], 4, value, record.max_entries, "pymap_kd_shadow"))
        else:
            self.shadow_fd = self._own(self.objects.create_map(
                TYPE_IDS["hash"], record.key_size, value, shadow_entries(record),
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
        self._record_entries = shadow_entries(record)
        self.order_count = -1  # elements the last full for_each walk recorded; -1: no record
        self.quick_polls = 0  # polls settled by the walk-order check alone
        self.record_sweeps = 0  # removals found through the walk record
        self.resweeps = 0  # ... that did not add up (the map changed meanwhile): walked again
        if self.each:
            size = ring_bytes(record, self.stride)
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
                    shadow_entries(record), "pymap_kd_order")) for _ in range(2)]
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
        outputs: list[bytes] = []
        removed: list[bytes] = []
        totals = dict.fromkeys(STATE_FIELDS, 0)
        # The first walk outputs every entry: the iterator (no limit on its output) does it
        # where it loads; elsewhere for_each passes, as many as the ring needs.
        each = self.each and (self.walks > 0 or not self.iterators)
        self.timings = {}
        self.passes = 0
        if each and self.order_count >= 0:
            t0 = time.perf_counter()
            unchanged = self._unchanged(map_fd)
            self.timings["order check"] = time.perf_counter() - t0
            if unchanged:
                self.quick_polls += 1
                return WalkResult(b"", 0, b"", 0, dict.fromkeys(STATE_FIELDS, 0), False)
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
                if counters["hits"]:
                    # hits stamped the record, not the shadow: the record says what is gone
                    self._reset_state(self.walks, self.order_count)
                    gone, ok = self._record_sweep()
                    ok = ok and len(gone) // self.key_size == self.shadow_entries - present
                    if not ok:  # the map changed under the walk: walk again, stamping all
                        self.timings["sweep"] = time.perf_counter() - t1
                        self.shadow_entries += counters["added"]  # inserted all the same
                        self.order_count, positional = -1, False
                        self.resweeps += 1
                        stalls = self._stalled(stalls, totals)
                        continue
                    self.record_sweeps += 1
                    self._delete(gone)
                else:
                    gone = self._sweep()  # removed from the shadow map as it finds them
                self.timings["sweep"] = self.timings.get("sweep", 0.0) + time.perf_counter() - t1
                removed.append(gone)
            self.shadow_entries = present + counters["added"]
            complete = not (counters["full"] or counters["overflow"])
            if each and self._written is not None and complete and \
                    counters["ord"] <= self._record_entries:
                self.order_fd, self.order_count = self._written, counters["ord"]
            else:
                self.order_count = -1
            if complete:
                break
            if counters["full"] or not out:  # nothing new committed by this pass
                stalls = self._stalled(stalls, totals)
            if self.iterators:
                each = positional = False  # more output than the ring holds: the iterator
            else:
                positional = False  # another for_each pass for what the ring could not hold
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
                out = _read_iter(link)
            finally:
                os.close(link)
        self.walks = gen
        raw = progload.syscall.map_lookup_elem(self.state_fd, bytes(4), _STATE_SIZE)
        counters = dict(zip(STATE_FIELDS, struct.unpack(f"<{len(STATE_FIELDS)}Q", raw or b"")))
        return counters, out


    def _unchanged(self, map_fd: int) -> bool:
        """Is the map element for element what the last full walk recorded (no output)?"""
        assert self.order_fd is not None
        self._reset_state(self.walks)
        program = check_program(self.key_size, self.stride, self.state_fd, self.order_fd,
                                map_fd)
        self._run_each_program(program)
        raw = progload.syscall.map_lookup_elem(self.state_fd, bytes(4), _STATE_SIZE)
        state = dict(zip(STATE_FIELDS, struct.unpack(f"<{len(STATE_FIELDS)}Q", raw or b"")))
        return not state["dirty"] and state["ord"] == self.order_count

    def _reset_state(self, gen: int, old_count: int = 0) -> None:
        values = dict.fromkeys(STATE_FIELDS, 0)
        values["gen"], values["old_count"] = gen, old_count
        state = struct.pack(f"<{len(STATE_FIELDS)}Q", *values.values())
        result, _ = progload.syscall.prog_test_run(self._state_prog, bytes(_ETH_HLEN) + state)
        if result:
            raise progload.BpfError(errno.EFAULT, "pymap_kd_state",
                                    f"the state was not written ({result:#x})")

    def _delete(self, keys: bytes) -> None:
        """Remove ``keys`` (back to back) from the shadow map, a packet of them per run."""
        per_run = (RUN_BYTES - _ETH_HLEN) // self.key_size * self.key_size
        for start in range(0, len(keys), per_run):
            chunk = keys[start:start + per_run]
            deleted, _ = progload.syscall.prog_test_run(self._delete_prog,
                                                        bytes(_ETH_HLEN) + chunk)
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
            raw = progload.syscall.map_lookup_elem(self.state_fd, bytes(4), _STATE_SIZE)
            overflow = struct.unpack_from("<Q", raw or bytes(_STATE_SIZE), _STATE["overflow"])[0]
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
        gone = _read_iter(self.sweep_link)  # unbounded output; finds what the ring did too
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
        raw = progload.syscall.map_lookup_elem(self.state_fd, bytes(4), _STATE_SIZE)
        overflow = struct.unpack_from("<Q", raw or bytes(_STATE_SIZE), _STATE["overflow"])[0]
        return gone, not overflow


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


_READ = 1 << 20


def _read_iter(link_fd: int) -> bytes:
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


