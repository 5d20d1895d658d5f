"""Facts of the kernel's BPF ABI that the daemon and consumers both need, defined once.

Pure constants and arithmetic (no kernel access), so ``watcher/kernel`` and
``consumers`` can share them without one importing the other.
"""

from __future__ import annotations

KERNEL_NAME_MAX = 15  # BPF_OBJ_NAME_LEN - 1: the kernel keeps this much of a map's name


def percpu_slot(value_size: int) -> int:
    """Bytes per CPU in a per-CPU map's value: the value rounded up to 8 (kernel ABI)."""
    return (value_size + 7) & ~7
