"""The programs of the in-kernel engine, generated per watched map with :mod:`..asm`.

Why generated: each depends on the map's key and value sizes and names the engine's maps.

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

The fingerprint: values up to :data:`.sizing.EXACT_MAX` bytes (the whole
per-CPU row) are kept whole, so comparing is exact.  Longer values keep one
64-bit word of a multiply-rotate chain over the value's words; each step is a
bijection of the running word, so a change confined to one 64-bit word always
changes the fingerprint, and other changes collide with probability about
2^-64.  A collision costs one missed ``updated`` event: the next change of that
entry is delivered (with the then-current value and the last delivered old value).

Idempotent output: the kernel re-runs an iterator program for the element
whose output overflowed the seq_file buffer (8 pages per read()), and a full
ring drops a for_each record; so each element first writes its output and only
then commits its shadow entry.  Every store and writing helper targets the
stack or pymap's own maps (:func:`..asm.readonly.check_read_only`, :mod:`.walker`).
"""

from __future__ import annotations

from watcher.kernel.asm.assembler import (
    ADD,
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
from watcher.kernel.kdelta.sizing import EXACT_MAX, fingerprint_words

LOOKAHEAD = 4  # old record entries a hash walk looks at before the shadow map
_BPF_NOEXIST, _BPF_RB_NO_WAKEUP = 1, 1
EACH_MAIN, EACH_CALLBACK = "pymap_kd_each", "pymap_kd_element"  # a for_each program's functions
# struct bpf_iter__bpf_map_elem: meta, map, key, value (8-byte pointers)
_CTX_META, _CTX_KEY, _CTX_VALUE = 0, 16, 24
# state value: generation, then counters the walk and sweep add to
STATE_FIELDS = ("gen", "seen", "added", "changed", "full", "overflow", "ord", "dirty", "j",
                "old_count", "hits", "deleted")
STATE_OFFSETS = {name: 8 * i for i, name in enumerate(STATE_FIELDS)}
STATE_SIZE = 8 * len(STATE_FIELDS)
_PRIME = 0x9E3779B97F4A7C15


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


def bump_state(a: Asm, state_fd: int, field: str) -> None:
    a.ld_map_value(R5, state_fd)  # R5: only ever the state map's value (check_read_only)
    a.ldx(8, R2, R5, STATE_OFFSETS[field])
    a.alu64(ADD, R2, 1)
    a.stx(8, R5, STATE_OFFSETS[field], R2)


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
    :func:`check_read_only`).  No room: count ``overflow``, jump to ``fail``.
    """
    a.ld_map_fd(R1, ring_fd)
    a.movi(R2, sum(size for _, size in parts))
    a.movi(R3, 0)
    a.call(Helper.RINGBUF_RESERVE)
    a.jmp(JNE, R0, 0, f"{fail}_room")
    bump_state(a, state_fd, "overflow")
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
    a.ldx(8, R1, R5, STATE_OFFSETS["ord"])
    a.alu64(ADD, R1, 1)
    a.stx(8, R5, STATE_OFFSETS["ord"], R1)
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
    a.st(8, R5, STATE_OFFSETS["dirty"], 1)
    a.movi(R0, 1)
    a.exit()


def _positional(  # size: an emitter; one straight run of instructions reads best whole
        a: Asm, key_size: int, stride: int, row: int, state_fd: int, old_fd: int,
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
        a.ldx(8, R1, R5, STATE_OFFSETS["j"])
        if step:
            a.alu64(ADD, R1, step)
        a.ldx(8, R2, R5, STATE_OFFSETS["old_count"])
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
        a.stx(8, R5, STATE_OFFSETS["j"], R1)
        a.ja("pos_hit")
        if step + 1 < LOOKAHEAD:
            a.label(f"pos_next{step}")
    a.label("pos_hit")
    a.ld_map_value(R5, state_fd)
    a.ldx(8, R1, R5, STATE_OFFSETS["gen"])
    a.stx(8, R9, 8 * (kw + nw), R1)
    bump_state(a, state_fd, "hits")
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
    bump_state(a, state_fd, "changed")
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
    a.ldx(8, R2, R5, STATE_OFFSETS["old_count"])
    a.jmp(JGE, R1, R2, "stop", reg=True)
    a.ldx(8, R1, R8, 8 * (kw + nw))
    a.ldx(8, R2, R5, STATE_OFFSETS["gen"])
    a.jmp(JEQ, R1, R2, "out", reg=True)
    a.ld_map_fd(R1, shadow_fd)
    a.mov(R2, R8)  # the entry starts with the key
    a.call(Helper.MAP_LOOKUP_ELEM)
    a.jmp(JEQ, R0, 0, "out")
    a.ldx(8, R1, R0, 8 * nw)
    a.ld_map_value(R5, state_fd)
    a.ldx(8, R2, R5, STATE_OFFSETS["gen"])
    a.jmp(JEQ, R1, R2, "out", reg=True)
    _ring_write(a, ring_fd, state_fd, [(R8, key_size)], "out")
    callback_end(a, "out", "stop")
    return a.assemble()


def callback_end(a: Asm, next_: str, stop: str) -> None:
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


def each_main(a: Asm, map_fd: int) -> None:
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
    start with :func:`each_main`, so its callback label says where the callback is."""
    a = Asm()
    each_main(a, 0)
    return a.func_info(EACH_MAIN)


def _element(a: Asm, each_map_fd: int | None) -> None:
    """Start of the per-element code: key pointer in R7, value pointer in R8.

    With ``each_map_fd``: a for_each main program over that map, then its
    callback, whose arguments are the element.  Without: an iterator program,
    whose context holds them (R6 keeps the context; "out" ends the element).
    """
    if each_map_fd is not None:
        each_main(a, each_map_fd)
        a.mov(R7, R2)
        a.mov(R8, R3)
        return
    a.mov(R6, R1)
    a.ldx(8, R7, R6, _CTX_KEY)
    a.jmp(JEQ, R7, 0, "out")  # the end-of-walk call has no element
    a.ldx(8, R8, R6, _CTX_VALUE)
    a.jmp(JEQ, R8, 0, "out")


def walk_program(  # size: an emitter; the per-element walk is one program, its labels local
        key_size: int, stride: int, shadow_fd: int, state_fd: int,
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
    a.ldx(8, R1, R1, STATE_OFFSETS["gen"])
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
    bump_state(a, state_fd, "seen")
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
    bump_state(a, state_fd, "changed")
    a.ja("out")

    if array:
        a.label("fresh")
        _emit_row(a, key_size, stride, ring_fd, state_fd, "out2")
        for i in range(nw + 1):
            a.ldx(8, R1, R10, row + 8 * i)
            a.stx(8, R9, 8 * i, R1)
        bump_state(a, state_fd, "added")
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
    bump_state(a, state_fd, "added")
    a.ja("out")
    a.label("full")  # emitted but not recorded: emitted again next walk, counted here
    bump_state(a, state_fd, "full")

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
    a.ldx(8, R2, R2, STATE_OFFSETS["gen"])
    a.jmp(JEQ, R1, R2, "out", reg=True)
    if ring_fd is None:
        _seq_write(a, R7, key_size, "out")
    else:
        _ring_write(a, ring_fd, state_fd, [(R7, key_size)], "out")
    a.label("out")
    a.movi(R0, 0)
    a.exit()
    return a.assemble()
