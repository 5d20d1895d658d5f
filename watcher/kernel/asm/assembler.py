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

# Instruction classes, sizes, modes, operations (linux/bpf_common.h, linux/bpf.h).
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM, ATOMIC = 0x00, 0x60, 0xC0
K, X = 0x00, 0x08
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, XOR, MOV = (0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70,
                                                  0xA0, 0xB0)
JA, JEQ, JGT, JGE, JNE, CALL, EXIT = 0x00, 0x10, 0x20, 0x30, 0x50, 0x80, 0x90
JSLT = 0xC0  # signed <
SIZES = {1: B, 2: H, 4: W, 8: DW}

PSEUDO_MAP_FD = 1  # ld_imm64 src_reg: imm is a map fd, the kernel puts the map's address
PSEUDO_MAP_VALUE = 2  # ld_imm64 src_reg: imm is a map fd, imm2 an offset into value 0
PSEUDO_CALL = 1  # call src_reg: a bpf-to-bpf call, imm is the relative target
PSEUDO_FUNC = 4  # ld_imm64 src_reg: imm is the relative target of a callback

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)


class Asm:
    """Instructions in order; jumps to labels are fixed up by :meth:`assemble`."""

    def __init__(self) -> None:
        self.insns: list[list[int]] = []  # [code, dst, src, off, imm]
        self.labels: dict[str, int] = {}
        self._fixups: list[tuple[int, str, str]] = []  # (index, label, field)

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self.insns.append([code, dst, src, off, imm])

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = len(self.insns)

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

    def ld_imm64(self, dst: int, value: int, src: int = 0, imm2: int | None = None) -> None:
        lo, hi = value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF
        self._emit(LD | DW | IMM, dst, src, 0, _s32(lo))
        self._emit(0, 0, 0, 0, _s32(hi if imm2 is None else imm2))

    def ld_map_fd(self, dst: int, fd: int) -> None:
        self.ld_imm64(dst, fd, src=PSEUDO_MAP_FD)

    def ld_map_value(self, dst: int, fd: int, offset: int = 0) -> None:
        """``dst`` = address of value 0 of array map ``fd`` + offset (no helper call)."""
        self.ld_imm64(dst, fd, src=PSEUDO_MAP_VALUE, imm2=offset)

    def ld_func(self, dst: int, label: str) -> None:
        """``dst`` = address of the subprogram at ``label`` (a callback)."""
        self._fixups.append((len(self.insns), label, "imm"))
        self.ld_imm64(dst, 0, src=PSEUDO_FUNC)

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

    def call(self, helper: int) -> None:
        self._emit(JMP | CALL, 0, 0, 0, helper)

    def exit(self) -> None:
        self._emit(JMP | EXIT)

    def assemble(self) -> bytes:
        for index, label, field in self._fixups:
            if label not in self.labels:
                raise ValueError(f"undefined label {label}")
            rel = self.labels[label] - index - 1
            self.insns[index][3 if field == "off" else 4] = rel
        return b"".join(struct.pack("<BBhi", c, (d & 0xF) | ((s & 0xF) << 4), o, i)
                        for c, d, s, o, i in self.insns)


def _s32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def store_targets(program: bytes) -> set[int]:
    """Base registers of every store in ``program`` (for read-only checks)."""
    targets = set()
    for pos in range(0, len(program), 8):
        code, regs = program[pos], program[pos + 1]
        if code & 0x07 in (ST, STX):
            targets.add(regs & 0xF)
    return targets


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
