"""The read-only check every program pymap loads passes first.

The kernel does not check it (tests/test_seccomp.py measures it): a program
may write every map it names, whatever the mode of the fd it was named
through.  So pymap's generated programs are checked before every load, where
they are loaded: in the objects broker (:mod:`.broker`), outside the daemon's
process, when the daemon runs the in-kernel engine; in the calling process
otherwise (tests, benchmarks: :class:`.objects.LocalObjects`).

Kept small (``struct`` and the assembler's opcode table): the broker imports it.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

from watcher.kernel.asm.assembler import (
    JMP,
    JMP32,
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R9,
    R10,
    ST,
    STX,
    store_targets,
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


# helpers (enum bpf_func_id)
LOOKUP, UPDATE, DELETE, SKB_LOAD_BYTES, SEQ_WRITE = 1, 2, 3, 26, 127
RINGBUF_RESERVE, RINGBUF_SUBMIT, FOR_EACH, LOOP = 131, 132, 164, 181

# The helpers generated programs may call; every other one (bpf_sys_bpf, ...) is refused.
HELPERS = frozenset({LOOKUP, UPDATE, DELETE, SKB_LOAD_BYTES, SEQ_WRITE, RINGBUF_RESERVE,
                      RINGBUF_SUBMIT, FOR_EACH, LOOP})


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
    targets = store_targets(program)
    if not targets <= {R4, R5, R9, R10}:
        raise AssertionError(f"generated program stores through r{sorted(targets)}")
    last_call = -1
    lookup_own = False  # the last lookup was in one of pymap's own maps
    maps: dict[int, int | None] = {}  # register -> map fd it holds (ld_map_fd), or None
    values: dict[int, int | None] = {}  # register -> map fd whose value address it holds
    stack = {R10}  # registers holding R10 plus a constant
    for pos in range(0, len(program), 8):
        code, regs, imm_src = program[pos], program[pos + 1], program[pos + 1] >> 4
        dst = regs & 0xF
        imm = struct.unpack_from("<i", program, pos + 4)[0]
        if pos and program[pos - 8] == 0x18:  # second half of an ld_imm64
            continue
        if code == 0x85:
            if imm_src == 0 and imm not in HELPERS:
                raise AssertionError(f"generated program calls helper {imm}")
            if imm in (UPDATE, DELETE) and maps.get(R1) not in own:
                raise AssertionError(f"helper {imm} on a map that is not pymap's own")
            if imm == SKB_LOAD_BYTES and R3 not in stack and values.get(R3) not in own:
                raise AssertionError("bpf_skb_load_bytes into memory that is not pymap's own")
            last_call = imm
            lookup_own = imm == LOOKUP and maps.get(R1) in own
            for reg in (R0, R1, R2, R3, R4, R5):  # a call clobbers these
                maps.pop(reg, None)
                values.pop(reg, None)
                stack.discard(reg)
            continue
        if code & 0x07 in (ST, STX, JMP, JMP32):
            continue  # these do not write their dst register
        from_r0 = code == 0xBF and imm_src == R0
        if dst == R5 and not (code == 0x18 and imm_src == 2 and imm in own):
            raise AssertionError("R5 is loaded with something other than the state value")
        if dst == R9 and not (from_r0 and last_call == LOOKUP and lookup_own):
            raise AssertionError("R9 is loaded with something other than an own map's entry")
        if dst == R4 and not ((from_r0 and last_call == RINGBUF_RESERVE) or code == 0xB7
                              or (code == 0x18 and imm_src == 0)):
            raise AssertionError("R4 is loaded with something other than a reservation")
        is_stack = (code == 0xBF and imm_src == R10) or (code == 0x07 and dst in stack)
        maps[dst] = imm if code == 0x18 and imm_src == 1 else None
        values[dst] = imm if code == 0x18 and imm_src == 2 else None
        if is_stack:
            stack.add(dst)
        elif dst != R10:
            stack.discard(dst)


