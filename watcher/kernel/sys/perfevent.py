"""``perf_event_open(2)`` for BPF output rings and tracepoints, through ctypes.

A perf event array (``BPF_MAP_TYPE_PERF_EVENT_ARRAY``) holds, per CPU, the
fd of a ``PERF_COUNT_SW_BPF_OUTPUT`` software event; ``bpf_perf_event_output``
writes ``PERF_RECORD_SAMPLE`` records with the program's bytes as
``PERF_SAMPLE_RAW`` into that CPU's event ring.  This module opens such
events the way bcc and libbpf do; :mod:`..buffers.perfbuf` maps and reads them.

A tracepoint event (:func:`open_tracepoint`) is how a BPF program is attached
to a tracepoint without a link: ``PERF_EVENT_IOC_SET_BPF`` gives the event the
program, and closing the event's fd detaches it (:mod:`..discovery.mapwatch`).
"""

from __future__ import annotations

import ctypes
import fcntl
import os

from watcher.kernel.sys.syscall import syscall_number

PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)

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
    attr = PerfEventAttr(type=PERF_TYPE_SOFTWARE, size=ctypes.sizeof(PerfEventAttr),
                         config=PERF_COUNT_SW_BPF_OUTPUT, sample_period=1,
                         sample_type=PERF_SAMPLE_RAW, wakeup_events=max(wakeup_events, 1))
    fd = _perf_event_open(attr, cpu, f"BPF output, cpu {cpu}")
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def disable(fd: int) -> None:
    fcntl.ioctl(fd, PERF_EVENT_IOC_DISABLE, 0)


def _perf_event_open(attr: PerfEventAttr, cpu: int, what: str) -> int:
    fd = _syscall(syscall_number("perf_event_open"), ctypes.byref(attr), -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open({what}): {os.strerror(err)}")
    return fd


def open_tracepoint(tracepoint_id: int, prog_fd: int) -> int:
    """Attach BPF program ``prog_fd`` to tracepoint ``tracepoint_id`` (tracefs ``id``).

    One event (pid -1, cpu 0) is enough: the kernel runs a tracepoint's
    programs on every CPU, whichever CPU the event that carries them is bound
    to (libbpf does the same).  The program stays attached while the
    returned fd is open.
    """
    attr = PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=ctypes.sizeof(PerfEventAttr),
                         config=tracepoint_id, sample_period=1, wakeup_events=1)
    fd = _perf_event_open(attr, 0, f"tracepoint {tracepoint_id}")
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return fd
