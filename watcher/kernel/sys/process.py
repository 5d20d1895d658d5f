"""The calling process's own attributes, through ``prctl(2)``.

Only the name for now: ``PR_SET_NAME`` sets the process's ``comm``, the name
``ps``, ``top``, ``pgrep`` and ``/proc/PID/comm`` show (15 bytes at most).
"""

from __future__ import annotations

import ctypes
import os

PR_SET_NAME = 15
COMM_MAX = 15  # TASK_COMM_LEN - 1

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong,
                   ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def set_name(name: str) -> None:
    """Name the calling thread (the main thread: the process) ``name``."""
    raw = name.encode()
    if not raw or len(raw) > COMM_MAX:
        raise ValueError(f"a process name is 1 to {COMM_MAX} bytes: {name!r}")
    if _prctl(PR_SET_NAME, raw, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NAME): {os.strerror(err)}")
