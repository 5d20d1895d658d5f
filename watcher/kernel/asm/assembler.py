"""A small eBPF assembler: instructions built in Python, no compiler at run time.

Why: pymap's in-kernel delta programs depend on the watched map's key and
value sizes, so they are generated per map.  bcc would compile C at run time
(seconds of CPU, an LLVM in the daemon that replaces its signal handlers,
kernel headers), and cannot relocate callback addresses for
``bpf_for_each_map_elem``.  Like cilium/ebpf's ``asm`` package, this builds
the 8-byte instructions directly, with symbolic jump labels resolved at the
end.  Only what pymap's programs use is here.
"""

from __future__ import annotations

import struct

from watcher.kernel.asm.helpers import Helper
from watcher.kernel.asm.instruction import (
    AluOp,
    CallSource,
    Class,
    JumpOp,
    LoadSource,
    Mode,
    Size,
    Source,
    encode,
)

# Short spellings of the encoding's enums (:mod:`.instruction`), as programs are written.
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = Class
W, H, B, DW = Size.W, Size.H, Size.B, Size.DW
IMM, MEM, ATOMIC = Mode.IMM, Mode.MEM, Mode.ATOMIC
K, X = Source.K, Source.X
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, XOR, MOV = (
    AluOp.ADD, AluOp.SUB, AluOp.MUL, AluOp.DIV, AluOp.OR, AluOp.AND, AluOp.LSH, AluOp.RSH,
    AluOp.XOR, AluOp.MOV)
JA, JEQ, JGT, JGE, JNE, JSLT = (JumpOp.JA, JumpOp.JEQ, JumpOp.JGT, JumpOp.JGE, JumpOp.JNE,
                                JumpOp.JSLT)
SIZES = {1: B, 2: H, 4: W, 8: DW}

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)


class Asm:
    """Instructions in order; jumps and callbacks name labels, fixed up by :meth:`assemble`.

    A callback (a static subprogram whose address :meth:`ld_func` takes) starts
    at a :meth:`function` label, so the BTF ``func_info`` the kernel wants for it
    comes from the labels too (:meth:`func_info`), never from a counted offset.
    """

    def __init__(self) -> None:
        self.insns: list[list[int]] = []  # [code, dst, src, off, imm], one per slot
        self.labels: dict[str, int] = {}
        self.functions: list[str] = []  # labels that start a static subprogram
        self._fixups: list[tuple[int, str, str]] = []  # (index, label, field)

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self.insns.append([code, dst, src, off, imm])

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = len(self.insns)

    def function(self, name: str) -> None:
        """Start the static subprogram ``name`` here (a callback; its BTF name too)."""
        self.label(name)
        self.functions.append(name)

    def func_info(self, main: str) -> tuple[bytes, bytes]:
        """BTF and ``func_info`` for this program: ``main`` (global) at instruction 0,
        then each :meth:`function` where its label is (see :func:`func_btf`)."""
        return func_btf([(main, 0, True)]
                        + [(name, self.labels[name], False) for name in self.functions])

    # --- ALU ---
    def alu64(self, op: int, dst: int, src_or_imm: int, reg: bool = False) -> None:
        if reg:
            self._emit(ALU64 | op | X, dst, src_or_imm)
        else:
            self._emit(ALU64 | op | K, dst, 0, 0, src_or_imm)

    def mov(self, dst: int, src: int) -> None:
        self.alu64(MOV, dst, src, reg=True)

    def movi(self, dst: int, imm: int) -> None:
        self.alu64(MOV, dst, imm)

    def ld_imm64(self, dst: int, value: int, src: int = LoadSource.VALUE,
                 imm2: int | None = None) -> None:
        lo, hi = value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF
        self._emit(LD | DW | IMM, dst, src, 0, _s32(lo))
        self._emit(0, 0, 0, 0, _s32(hi if imm2 is None else imm2))

    def ld_map_fd(self, dst: int, fd: int) -> None:
        self.ld_imm64(dst, fd, src=LoadSource.MAP_FD)

    def ld_map_value(self, dst: int, fd: int, offset: int = 0) -> None:
        """``dst`` = address of value 0 of array map ``fd`` + offset (no helper call)."""
        self.ld_imm64(dst, fd, src=LoadSource.MAP_VALUE, imm2=offset)

    def ld_func(self, dst: int, label: str) -> None:
        """``dst`` = address of the subprogram at ``label`` (a callback)."""
        self._fixups.append((len(self.insns), label, "imm"))
        self.ld_imm64(dst, 0, src=LoadSource.FUNC)

    # --- memory ---
    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        self._emit(LDX | SIZES[size] | MEM, dst, src, off)

    def stx(self, size: int, dst: int, off: int, src: int) -> None:
        self._emit(STX | SIZES[size] | MEM, dst, src, off)

    def st(self, size: int, dst: int, off: int, imm: int) -> None:
        self._emit(ST | SIZES[size] | MEM, dst, 0, off, imm)

    def atomic_add(self, size: int, dst: int, off: int, src: int) -> None:
        """``*(dst + off) += src`` atomically (a counter bumped on several CPUs at once)."""
        self._emit(STX | SIZES[size] | ATOMIC, dst, src, off, ADD)

    # --- jumps ---
    def jmp(self, op: int, dst: int, src_or_imm: int, label: str, reg: bool = False) -> None:
        self._fixups.append((len(self.insns), label, "off"))
        if reg:
            self._emit(JMP | op | X, dst, src_or_imm)
        else:
            self._emit(JMP | op | K, dst, 0, 0, src_or_imm)

    def ja(self, label: str) -> None:
        self._fixups.append((len(self.insns), label, "off"))
        self._emit(JMP | JA)

    def call(self, helper: Helper | int) -> None:
        self._emit(JMP | JumpOp.CALL, 0, CallSource.HELPER, 0, helper)

    def exit(self) -> None:
        self._emit(JMP | JumpOp.EXIT)

    def assemble(self) -> bytes:
        for index, label, field in self._fixups:
            if label not in self.labels:
                raise ValueError(f"undefined label {label}")
            rel = self.labels[label] - index - 1
            self.insns[index][3 if field == "off" else 4] = rel
        return b"".join(encode(c, d, s, o, i) for c, d, s, o, i in self.insns)


def _s32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def func_btf(funcs: list[tuple[str, int, bool]]) -> tuple[bytes, bytes]:
    """A minimal BTF blob and ``func_info`` for a program with subprograms.

    ``funcs``: (name, first instruction, global?) per function, in order.  The
    kernel wants BTF ``func_info`` for any program that takes a callback's
    address (``BPF_PSEUDO_FUNC``), and the callback must be static.  Every
    function gets the same prototype, ``long f(long, long, long, long)``: the
    verifier sets a callback's argument types itself.
    """
    head = b"\0long\0a\0b\0c\0d\0"  # the type's name, then the parameters' names
    strings = head + b"".join(name.encode() + b"\0" for name, _, _ in funcs)
    name_off = {}
    pos = len(head)
    for name, _, _ in funcs:
        name_off[name] = pos
        pos += len(name) + 1
    kind_int, kind_func, kind_proto = 1, 12, 13
    types = struct.pack("<III", 1, kind_int << 24, 8) + struct.pack("<I", (1 << 24) | 64)  # id 1
    types += struct.pack("<III", 0, (kind_proto << 24) | 4, 1) + b"".join(
        struct.pack("<II", 6 + 2 * i, 1) for i in range(4))  # id 2: long (long a, ..., long d)
    info = b""
    for i, (name, insn, is_global) in enumerate(funcs):
        types += struct.pack("<III", name_off[name], (kind_func << 24) | int(is_global), 2)
        info += struct.pack("<II", insn, 3 + i)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings, info
