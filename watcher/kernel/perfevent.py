"""``perf_event_open(2)`` for BPF output rings, through ctypes.

A perf event array (``BPF_MAP_TYPE_PERF_EVENT_ARRAY``) holds, per CPU, the
fd of a ``PERF_COUNT_SW_BPF_OUTPUT`` software event; ``bpf_perf_event_output``
writes ``PERF_RECORD_SAMPLE`` records with the program's bytes as
``PERF_SAMPLE_RAW`` into that CPU's event ring.  This module opens such
events the way bcc and libbpf do; :mod:`.perfbuf` maps and reads them.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import platform

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401

_NR = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "armv7l": 364, "ppc64le": 319}
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class PerfEventAttr(ctypes.Structure):
    """``struct perf_event_attr`` up to PERF_ATTR_SIZE_VER5 (112 bytes)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),  # union with wakeup_watermark
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
    ]


def open_bpf_output(cpu: int, wakeup_events: int = 1) -> int:
    """A ``PERF_COUNT_SW_BPF_OUTPUT`` event on ``cpu``, enabled; returns its fd.

    ``wakeup_events``: wake a waiting reader every N samples.  1 means every
    record wakes the reader (lowest latency, one wakeup per record); larger
    values batch wakeups, and the reader must also drain on a timer so a
    quiet CPU's last records are not held back forever.
    """
    try:
        nr = _NR[platform.machine()]
    except KeyError:  # pragma: no cover - depends on the host
        raise OSError(f"pymap does not know perf_event_open on {platform.machine()}") from None
    attr = PerfEventAttr(type=PERF_TYPE_SOFTWARE, size=ctypes.sizeof(PerfEventAttr),
                         config=PERF_COUNT_SW_BPF_OUTPUT, sample_period=1,
                         sample_type=PERF_SAMPLE_RAW, wakeup_events=max(wakeup_events, 1))
    fd = _syscall(nr, ctypes.byref(attr), -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open(BPF output, cpu {cpu}): {os.strerror(err)}")
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def disable(fd: int) -> None:
    fcntl.ioctl(fd, PERF_EVENT_IOC_DISABLE, 0)
