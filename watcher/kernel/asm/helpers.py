"""BPF helper function ids, named: the ``imm`` of a helper ``call`` instruction.

Why an enum: the ids are the kernel's ABI (``enum bpf_func_id`` in
``include/uapi/linux/bpf.h``, numbered in the order ``___BPF_FUNC_MAPPER`` lists
them), and a loose ``1`` or ``164`` in a generated program or an allow-list says
nothing to a reader.  Only the helpers pymap's programs call, or refuse, are here.
"""

from __future__ import annotations

from enum import IntEnum


class Helper(IntEnum):
    """``enum bpf_func_id`` values (``BPF_FUNC_<name>``)."""

    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    GET_CURRENT_PID_TGID = 14
    SKB_LOAD_BYTES = 26
    GET_CURRENT_TASK = 35
    PROBE_READ_USER = 112
    PROBE_READ_KERNEL = 113
    SEQ_WRITE = 127
    RINGBUF_OUTPUT = 130
    RINGBUF_RESERVE = 131
    RINGBUF_SUBMIT = 132
    FOR_EACH_MAP_ELEM = 164
    SYS_BPF = 166  # issues bpf() commands from inside the kernel: never allowed
    LOOP = 181


__all__ = ["Helper"]
