"""pymap's writes to its own maps, done by programs: no ``bpf()`` write command.

Why programs: under the daemon's seccomp filter ``bpf()`` has no update or
delete command at all (docs/operations.md).  The engine's own writes, resetting
its state map and clearing removed keys from its shadow map, are done by these
two programs, run with ``BPF_PROG_TEST_RUN`` on a packet that carries the data;
each names only pymap's own maps, embedded when it is loaded.
"""

from __future__ import annotations

from watcher.kernel.asm.assembler import ADD, DIV, JNE, MUL, R0, R1, R2, R3, R4, R5, R6, R10, Asm
from watcher.kernel.asm.helpers import Helper
from watcher.kernel.kdelta.programs import STATE_OFFSETS, STATE_SIZE, bump_state, callback_end

DELETE_MAIN, DELETE_CALLBACK = "pymap_kd_delete", "pymap_kd_del_key"
ETH_HLEN = 14  # a socket filter's test run pulls an Ethernet header off the packet
_SKB_LEN = 0  # struct __sk_buff: len
# A test run's packet fits in one page with the skb's head and tail room (bpf_test_init).
RUN_BYTES = 3072


def state_program(state_fd: int) -> bytes:
    """Copy the packet's payload over the state map's value (returns 0, or the error)."""
    a = Asm()
    a.movi(R2, 0)
    a.ld_map_value(R3, state_fd)
    a.movi(R4, STATE_SIZE)
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
    a.st(8, R5, STATE_OFFSETS["deleted"], 0)
    a.ldx(4, R1, R6, _SKB_LEN)
    a.alu64(DIV, R1, key_size)
    a.ld_func(R2, DELETE_CALLBACK)
    a.mov(R3, R10)
    a.alu64(ADD, R3, -8)
    a.movi(R4, 0)
    a.call(Helper.LOOP)
    a.ld_map_value(R5, state_fd)
    a.ldx(8, R0, R5, STATE_OFFSETS["deleted"])
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
    bump_state(a, state_fd, "deleted")
    callback_end(a, "next", "stop")
    return a

