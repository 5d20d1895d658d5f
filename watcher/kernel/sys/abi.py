"""Facts of the kernel's BPF ABI that every layer needs, defined once.

Why here: they are the kernel's (``include/uapi/linux/bpf.h`` and how the kernel
lays out per-CPU values), so their home is the kernel layer; the decode layer and
consumers import them from here.  Pure constants and arithmetic: no syscall, so
a consumer on a machine without BPF imports this freely.
"""

from __future__ import annotations

KERNEL_NAME_MAX = 15  # BPF_OBJ_NAME_LEN - 1: the kernel keeps this much of a map's name


def percpu_slot(value_size: int) -> int:
    """Bytes per CPU in a per-CPU map's value: the value rounded up to 8 (kernel ABI)."""
    return (value_size + 7) & ~7


__all__ = ["KERNEL_NAME_MAX", "percpu_slot"]
