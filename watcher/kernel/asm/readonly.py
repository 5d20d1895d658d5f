"""The read-only check every program pymap loads passes first.

The kernel does not check it (tests/test_seccomp.py measures it): a program
may write every map it names, whatever the mode of the fd it was named
through.  So pymap's generated programs are checked before every load, where
they are loaded: in the objects broker (:mod:`..kdelta.broker`), outside the daemon's
process, when the daemon runs the in-kernel engine; in the calling process
otherwise (tests, benchmarks: :class:`..kdelta.objects.LocalObjects`).

Kept small (the instruction decoder and the helper ids): the broker imports it.
"""

from __future__ import annotations

from collections.abc import Collection

from watcher.kernel.asm.assembler import R0, R1, R2, R3, R4, R5, R9, R10
from watcher.kernel.asm.helpers import Helper
from watcher.kernel.asm.instruction import (
    ADD64_IMM,
    CALL,
    LD_IMM64,
    MOV64_IMM,
    MOV64_REG,
    CallSource,
    Class,
    Instruction,
    LoadSource,
    decode,
)

# What the engine loads at run time: socket filters (its for_each walks and writers, run
# by BPF_PROG_TEST_RUN) and map element iterators.  Never a syscall program (its
# bpf_sys_bpf issues bpf() commands from inside the kernel), nor anything that attaches
# to kernel events.
SOCKET_FILTER, TRACING, TRACE_ITER = 1, 26, 28


def check_type(prog_type: int, attach_type: int, name: str) -> None:
    """Refuse a program type the in-kernel engine never loads."""
    if prog_type != SOCKET_FILTER and (prog_type, attach_type) != (TRACING, TRACE_ITER):
        raise AssertionError(f"{name}: the in-kernel engine loads only socket filters and map "
                             f"element iterators, not program type {prog_type}")


# The helpers generated programs may call; every other one (bpf_sys_bpf, ...) is refused.
HELPERS = frozenset({Helper.MAP_LOOKUP_ELEM, Helper.MAP_UPDATE_ELEM, Helper.MAP_DELETE_ELEM,
                     Helper.SKB_LOAD_BYTES, Helper.SEQ_WRITE, Helper.RINGBUF_RESERVE,
                     Helper.RINGBUF_SUBMIT, Helper.FOR_EACH_MAP_ELEM, Helper.LOOP})
# Helpers that write a map named by their R1.
_MAP_WRITERS = (Helper.MAP_UPDATE_ELEM, Helper.MAP_DELETE_ELEM)


# Classes whose dst is a store's base, and classes that do not assign their dst register.
_STORES = frozenset({Class.ST, Class.STX})
_NO_DST_WRITE = frozenset({Class.ST, Class.STX, Class.JMP, Class.JMP32})


def check_read_only(program: bytes, own_maps: Collection[int]) -> None:
    """Refuse a generated program that could write anything but pymap's own memory.

    The kernel does not (tests/test_seccomp.py measures it): a program may write
    every map it names, whatever the mode of the fd it was named through.  So:

    * Stores may target only R10 (stack), R4, R5 and R9.  R5 may only be loaded
      with the value address of a map in ``own_maps`` (the state map); R9 only
      from R0 after a lookup in one of ``own_maps``; R4 only from R0 after a ring
      buffer reservation, or with a constant.  The watched map's key and value
      pointers (R7, R8, or R2, R3 as a callback's arguments) can then never be a
      store's base.
    * Helpers only from :data:`HELPERS`.  Those that write a map
      (``bpf_map_update_elem``, ``bpf_map_delete_elem``) must get R1 from
      ``ld_map_fd`` of one of ``own_maps``; ``bpf_skb_load_bytes`` writes to
      R3, which must be the stack or one of ``own_maps``' value.

    Registers are followed by their last assignment in program order: enough
    for code pymap generates (each helper's arguments are set right before the
    call), which is what this guards.
    """
    own = frozenset(own_maps)
    insns = decode(program)
    # (opcode arithmetic, not Instruction's properties: this runs before every load)
    targets = {insn.dst for insn in insns if insn.code & 0x07 in _STORES}
    if not targets <= {R4, R5, R9, R10}:
        raise AssertionError(f"generated program stores through r{sorted(targets)}")
    _Registers(own).follow(insns)


class _Registers:
    """What each register holds, followed in program order (see :func:`check_read_only`)."""

    def __init__(self, own: frozenset[int]):
        self.own = own
        self.last_call = -1
        self.lookup_own = False  # the last lookup was in one of pymap's own maps
        self.maps: dict[int, int | None] = {}  # register -> map fd it holds (ld_map_fd)
        self.values: dict[int, int | None] = {}  # register -> map fd whose value address
        self.stack = {R10}  # registers holding R10 plus a constant

    def follow(self, insns: list[Instruction]) -> None:
        for insn in insns:
            if insn.code == CALL:
                self.call(insn)
            elif insn.code & 0x07 not in _NO_DST_WRITE:
                self.assign(insn)

    def call(self, insn: Instruction) -> None:
        helper, own = insn.imm, self.own
        if insn.src == CallSource.HELPER and helper not in HELPERS:
            raise AssertionError(f"generated program calls helper {helper}")
        if helper in _MAP_WRITERS and self.maps.get(R1) not in own:
            raise AssertionError(f"helper {helper} on a map that is not pymap's own")
        if helper == Helper.SKB_LOAD_BYTES and R3 not in self.stack \
                and self.values.get(R3) not in own:
            raise AssertionError("bpf_skb_load_bytes into memory that is not pymap's own")
        self.last_call = helper
        self.lookup_own = helper == Helper.MAP_LOOKUP_ELEM and self.maps.get(R1) in own
        for reg in (R0, R1, R2, R3, R4, R5):  # a call clobbers these
            self.maps.pop(reg, None)
            self.values.pop(reg, None)
            self.stack.discard(reg)

    def assign(self, insn: Instruction) -> None:
        dst, src, imm, code = insn.dst, insn.src, insn.imm, insn.code
        from_r0 = code == MOV64_REG and src == R0
        ld_imm64 = code == LD_IMM64
        map_fd = imm if ld_imm64 and src == LoadSource.MAP_FD else None
        value_of = imm if ld_imm64 and src == LoadSource.MAP_VALUE else None
        if dst == R5 and value_of not in self.own:
            raise AssertionError("R5 is loaded with something other than the state value")
        if dst == R9 and not (from_r0 and self.last_call == Helper.MAP_LOOKUP_ELEM
                              and self.lookup_own):
            raise AssertionError("R9 is loaded with something other than an own map's entry")
        if dst == R4 and not ((from_r0 and self.last_call == Helper.RINGBUF_RESERVE)
                              or code == MOV64_IMM
                              or (ld_imm64 and src == LoadSource.VALUE)):
            raise AssertionError("R4 is loaded with something other than a reservation")
        is_stack = (code == MOV64_REG and src == R10) or (code == ADD64_IMM and dst in self.stack)
        self.maps[dst] = map_fd
        self.values[dst] = value_of
        if is_stack:
            self.stack.add(dst)
        elif dst != R10:
            self.stack.discard(dst)
