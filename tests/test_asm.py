"""The instruction decoder against the assembler and against programs the kernel accepted.

The read-only check and the objects broker trust :func:`decode` to see every
instruction as the kernel will, so it is checked both ways: what the assembler
writes decodes to the fields it was given, and a program the kernel loaded
(its verifier the judge of what the bytes mean) re-encodes to the same bytes.
"""

from __future__ import annotations

import os

import pytest

from watcher.kernel.asm.assembler import ADD, JEQ, R0, R1, R2, R3, R10, Asm
from watcher.kernel.asm.helpers import Helper
from watcher.kernel.asm.instruction import (
    CALL,
    EXIT,
    LD_IMM64,
    MOV64_IMM,
    CallSource,
    Class,
    LoadSource,
    decode,
    decode_ld_imm64,
    encode,
)
from watcher.kernel.kdelta.objects import LocalObjects
from watcher.kernel.kdelta.programs import EACH_CALLBACK, each_func_info, each_main, walk_program
from watcher.kernel.kdelta.writers import delete_asm
from watcher.kernel.maps.kinds import TYPE_IDS
from watcher.kernel.sys import create as progload
from watcher.kernel.sys import syscall


def test_decode_known_bytes():
    # BPF_MOV64_IMM(BPF_REG_0, 0); BPF_EXIT_INSN(), as the kernel's own samples spell them
    raw = bytes.fromhex("b700000000000000" "9500000000000000")
    first, second = decode(raw)
    assert (first.code, first.cls, first.dst, first.imm) == (MOV64_IMM, Class.ALU64, R0, 0)
    assert (second.code, second.slot) == (EXIT, 1)


def test_round_trip_with_the_assembler():
    a = Asm()
    a.ld_map_fd(R1, 7)
    a.ld_map_value(R2, 9, offset=24)
    a.mov(R3, R10)
    a.alu64(ADD, R3, -16)
    a.jmp(JEQ, R0, 0, "out")
    a.call(Helper.MAP_LOOKUP_ELEM)
    a.label("out")
    a.movi(R0, 0)
    a.exit()
    raw = a.assemble()
    insns = decode(raw)
    assert b"".join(insn.encode() for insn in insns) == raw
    assert [insn.slot for insn in insns] == [0, 2, 4, 5, 6, 7, 8, 9]
    fd, value = insns[0], insns[1]
    assert fd.is_ld_imm64 and fd.src == LoadSource.MAP_FD and fd.imm == 7
    assert value.src == LoadSource.MAP_VALUE and (value.imm, value.imm2) == (9, 24)
    assert fd.imm_at == 4 and value.imm_at == 20
    jump = insns[4]
    assert jump.cls == Class.JMP and jump.off == 1  # over the call, to "out"
    assert insns[5].is_call and insns[5].helper is Helper.MAP_LOOKUP_ELEM
    assert insns[5].src == CallSource.HELPER
    assert [insn.dst for insn in insns if insn.writes_dst] == [R1, R2, R3, R3, R0]


def test_decode_refuses_partial_instructions():
    with pytest.raises(ValueError):
        decode(bytes(12))
    with pytest.raises(ValueError):  # an ld_imm64 without its second half
        decode(encode(0xB7) + encode(LD_IMM64, R1, LoadSource.MAP_FD, 0, 3))


def test_unknown_helper_decodes_to_its_number():
    (insn,) = decode(encode(CALL, imm=9999))
    assert insn.helper == 9999 and not isinstance(insn.helper, Helper)


def test_callback_labels_give_the_func_info():
    a = Asm()
    each_main(a, 3)
    assert a.functions == [EACH_CALLBACK]
    blob, info = each_func_info()
    _, info_from_labels = a.func_info("pymap_kd_each")
    assert info == info_from_labels
    # func_info: (instruction, type id) per function; the callback's where its label is
    assert int.from_bytes(info[8:12], "little") == a.labels[EACH_CALLBACK]
    assert blob.startswith(b"\x9f\xeb")


def test_programs_the_kernel_accepted_decode_and_reencode():
    objects = LocalObjects()
    fds: list[int] = []
    try:
        state = objects.create_map(TYPE_IDS["array"], 4, 96, 1, "pymap_t_state")
        shadow = objects.create_map(TYPE_IDS["hash"], 8, 24, 64, "pymap_t_shadow")
        fds += [state, shadow]
        delete = delete_asm(8, shadow, state)
        blob, info = delete.func_info("pymap_kd_delete")
        btf = objects.load_btf(blob)
        fds.append(btf)
        raw = delete.assemble()
        fds.append(objects.load_program(raw, "pymap_t_delete",
                                        progload.BPF_PROG_TYPE_SOCKET_FILTER, btf_fd=btf,
                                        func_info=info))
        insns = decode(raw)
        assert b"".join(insn.encode() for insn in insns) == raw
        helpers = [insn.helper for insn in insns if insn.is_call]
        assert helpers == [Helper.LOOP, Helper.SKB_LOAD_BYTES, Helper.MAP_DELETE_ELEM]
        starts = {insn.slot for insn in insns}
        for insn in insns:  # every jump lands on an instruction, never inside an ld_imm64
            if insn.cls == Class.JMP and not insn.is_call and insn.code != EXIT:
                assert insn.slot + 1 + insn.off in starts
        maps = {insn.imm for insn in insns
                if insn.is_ld_imm64 and insn.src in (LoadSource.MAP_FD, LoadSource.MAP_VALUE)}
        assert maps == {shadow, state}
        walk = walk_program(8, 16, shadow, state, array=False)  # checked, not loaded
        assert b"".join(insn.encode() for insn in decode(walk)) == walk
        for program in (raw, walk):  # the broker's scan for map references sees the same
            assert decode_ld_imm64(program) == [i for i in decode(program) if i.is_ld_imm64]
        assert syscall.map_info(shadow).key_size == 8
    finally:
        for fd in fds:
            os.close(fd)
        objects.release()
