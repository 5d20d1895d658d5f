"""One eBPF instruction, its encoding and the one decoder of raw programs.

Why one home: the assembler encodes instructions, and the read-only check,
the objects broker (map references to relocate) and the objects made for the
broker (map fds to index) read them back.  Each used to pick the bytes apart
with its own magic numbers (``code == 0x18``, ``regs >> 4``); now they share
:func:`decode` and the named fields of :class:`Instruction`.

Encoding (``include/uapi/linux/bpf.h``, ``struct bpf_insn``): 8 bytes,
``code`` (class in bits 0-2; for loads and stores size in 3-4 and mode in 5-7;
for ALU and jumps source in bit 3 and operation in 4-7), ``dst_reg`` and
``src_reg`` in one byte's low and high nibble, a signed 16-bit offset and a
signed 32-bit immediate.  ``ld_imm64`` is the one instruction of two slots: the
second holds the upper 32 bits (or, for map values, the offset) in its imm.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

from watcher.kernel.asm.helpers import Helper

SLOT = 8  # bytes per instruction slot
_LAYOUT = struct.Struct("<BBhi")


class Class(IntEnum):
    """The instruction class (``code & 0x07``)."""

    LD = 0
    LDX = 1
    ST = 2
    STX = 3
    ALU = 4
    JMP = 5
    JMP32 = 6
    ALU64 = 7


class Size(IntEnum):
    """Operand size of a load or store (``code & 0x18``)."""

    W = 0x00
    H = 0x08
    B = 0x10
    DW = 0x18


class Mode(IntEnum):
    """Addressing mode of a load or store (``code & 0xE0``)."""

    IMM = 0x00
    ABS = 0x20
    IND = 0x40
    MEM = 0x60
    ATOMIC = 0xC0


class Source(IntEnum):
    """Second operand of an ALU or jump instruction (``code & 0x08``)."""

    K = 0x00  # the immediate
    X = 0x08  # src_reg


class AluOp(IntEnum):
    """ALU operation (``code & 0xF0``)."""

    ADD = 0x00
    SUB = 0x10
    MUL = 0x20
    DIV = 0x30
    OR = 0x40
    AND = 0x50
    LSH = 0x60
    RSH = 0x70
    NEG = 0x80
    MOD = 0x90
    XOR = 0xA0
    MOV = 0xB0
    ARSH = 0xC0


class JumpOp(IntEnum):
    """Jump operation (``code & 0xF0``)."""

    JA = 0x00
    JEQ = 0x10
    JGT = 0x20
    JGE = 0x30
    JSET = 0x40
    JNE = 0x50
    JSGT = 0x60
    JSGE = 0x70
    CALL = 0x80
    EXIT = 0x90
    JLT = 0xA0
    JLE = 0xB0
    JSLT = 0xC0
    JSLE = 0xD0


class LoadSource(IntEnum):
    """What an ``ld_imm64``'s src_reg says its imm is (``BPF_PSEUDO_*``)."""

    VALUE = 0  # a plain 64-bit constant
    MAP_FD = 1  # a map fd; the kernel puts the map's address
    MAP_VALUE = 2  # a map fd, the second imm an offset into its value 0
    FUNC = 4  # the relative target of a callback


class CallSource(IntEnum):
    """What a ``call``'s src_reg says its imm is."""

    HELPER = 0  # a helper id (:class:`.helpers.Helper`)
    PSEUDO_CALL = 1  # a bpf-to-bpf call, imm the relative target
    KFUNC = 2  # a kernel function's BTF id


# Whole opcodes the checks look for.
LD_IMM64 = Class.LD | Size.DW | Mode.IMM
CALL = Class.JMP | JumpOp.CALL
EXIT = Class.JMP | JumpOp.EXIT
MOV64_REG = Class.ALU64 | AluOp.MOV | Source.X
MOV64_IMM = Class.ALU64 | AluOp.MOV | Source.K
ADD64_IMM = Class.ALU64 | AluOp.ADD | Source.K


_STORES = frozenset({Class.ST, Class.STX})
_NO_DST_WRITE = frozenset({Class.ST, Class.STX, Class.JMP, Class.JMP32})


class Instruction(NamedTuple):
    """One decoded instruction; ``slot`` is where it starts in the program (in slots).

    A named tuple, not a dataclass: the read-only check decodes every program
    before each load (several per poll), and tuples are made several times faster.
    """

    slot: int
    code: int
    dst: int
    src: int
    off: int
    imm: int
    imm2: int = 0  # ld_imm64 only: the second slot's imm

    @property
    def cls(self) -> Class:
        return Class(self.code & 0x07)

    @property
    def is_ld_imm64(self) -> bool:
        return self.code == LD_IMM64

    @property
    def is_call(self) -> bool:
        return self.code == CALL

    @property
    def helper(self) -> Helper | int | None:
        """The helper a helper call calls (an int if pymap has no name for it), else None."""
        if not self.is_call or self.src != CallSource.HELPER:
            return None
        try:
            return Helper(self.imm)
        except ValueError:
            return self.imm

    @property
    def is_store(self) -> bool:
        return self.code & 0x07 in _STORES

    @property
    def writes_dst(self) -> bool:
        """Does it assign its dst register (stores and jumps do not)?"""
        return self.code & 0x07 not in _NO_DST_WRITE

    @property
    def width(self) -> int:
        """Slots it takes: 2 for ``ld_imm64``, else 1."""
        return 2 if self.is_ld_imm64 else 1

    @property
    def imm_at(self) -> int:
        """Byte offset of the imm field in the program (what the broker relocates)."""
        return SLOT * self.slot + 4

    def encode(self) -> bytes:
        first = encode(self.code, self.dst, self.src, self.off, self.imm)
        return first + encode(0, 0, 0, 0, self.imm2) if self.is_ld_imm64 else first


def encode(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One slot's 8 bytes."""
    return _LAYOUT.pack(code, (dst & 0xF) | ((src & 0xF) << 4), off, imm)


def decode(program: bytes) -> list[Instruction]:
    """Every instruction of ``program``, an ``ld_imm64`` as one with both halves.

    Raises ValueError for bytes that are not whole slots or end inside an
    ``ld_imm64`` (the broker decodes what a request carries).
    """
    if len(program) % SLOT:
        raise ValueError(f"{len(program)} bytes is not a whole number of instructions")
    slots = list(_LAYOUT.iter_unpack(program))
    out: list[Instruction] = []
    append, make = out.append, tuple.__new__  # per instruction: no __new__ wrapper
    second = False
    for index, (code, regs, off, imm) in enumerate(slots):
        if second:
            second = False
        elif code == LD_IMM64:
            if index + 1 >= len(slots):
                raise ValueError(f"ld_imm64 at instruction {index} has no second half")
            append(make(Instruction, (index, code, regs & 0xF, regs >> 4, off, imm,
                                      slots[index + 1][3])))
            second = True
        else:
            append(make(Instruction, (index, code, regs & 0xF, regs >> 4, off, imm, 0)))
    return out


def decode_ld_imm64(program: bytes) -> list[Instruction]:
    """The ``ld_imm64`` instructions of ``program`` alone, as :func:`decode` gives them.

    Why a second entry: map references are ``ld_imm64`` instructions, and a
    program the broker loads is scanned for them twice (indexed here, relocated
    there) before it is checked; skipping the rest by opcode is several times
    cheaper than decoding every instruction.
    """
    if len(program) % SLOT:
        raise ValueError(f"{len(program)} bytes is not a whole number of instructions")
    codes = program[::SLOT]
    out = []
    index = codes.find(LD_IMM64)
    while index >= 0:
        if index + 1 >= len(codes):
            raise ValueError(f"ld_imm64 at instruction {index} has no second half")
        code, regs, off, imm = _LAYOUT.unpack_from(program, SLOT * index)
        imm2 = _LAYOUT.unpack_from(program, SLOT * (index + 1))[3]
        out.append(Instruction(index, code, regs & 0xF, regs >> 4, off, imm, imm2))
        index = codes.find(LD_IMM64, index + 2)
    return out


__all__ = ["ADD64_IMM", "CALL", "EXIT", "LD_IMM64", "MOV64_IMM", "MOV64_REG", "SLOT", "AluOp",
           "CallSource", "Class", "Instruction", "JumpOp", "LoadSource", "Mode", "Size",
           "Source", "decode", "decode_ld_imm64", "encode"]
