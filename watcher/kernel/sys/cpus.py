"""The host's CPUs as the kernel lists them (``/sys/devices/system/cpu``).

Possible CPUs size per-CPU map values; online CPUs get a perf ring each.
"""

from __future__ import annotations

CPU_DIR = "/sys/devices/system/cpu"


def parse_cpu_list(text: str) -> list[int]:
    """CPU numbers from a kernel cpu list such as ``0-3,6``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _read_list(path: str) -> list[int]:
    with open(path) as f:
        return parse_cpu_list(f.read())


def possible_cpus(path: str = f"{CPU_DIR}/possible") -> int:
    """Number of possible CPUs: the stride of per-CPU values."""
    return len(_read_list(path))


def online_cpus(path: str = f"{CPU_DIR}/online") -> list[int]:
    """The CPUs online now."""
    return _read_list(path)
