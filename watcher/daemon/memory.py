"""Giving freed memory back to the system (glibc), so abuse does not leave RSS behind.

Two tunings: allocations of 1 MiB and more come from mmap (freeing them
unmaps at once), and after a burst of small allocations is freed (a flooding
client's requests, a cut subscriber's subscription trie in libzmq) the heap
is trimmed, at most once a second so a client that keeps coming back cannot
make the daemon spend its time in ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import time

_M_MMAP_THRESHOLD = -3  # mallopt(3)
TRIM_INTERVAL = 1.0

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:
    _libc = None  # not glibc: nothing to tune
_last_trim = 0.0
_pending = False


def release_big_buffers_promptly() -> None:
    """Serve allocations of 1 MiB and more from mmap, so freeing them returns memory.

    Every poll of a big map allocates and frees dumps of tens of MB; with
    glibc's default heap they stay in the process after free and resident
    memory drifts up to twice the watched state.
    """
    if _libc is not None and hasattr(_libc, "mallopt"):
        _libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def trim_soon() -> None:
    """Ask for free heap pages to be returned to the system at the next :func:`trim_pending`.

    Deferred, so a trim asked for in the middle of a flood still happens after its end.
    """
    global _pending
    _pending = True


def trim_pending() -> None:
    """Trim the heap if asked since the last trim; called once a second (heartbeats)."""
    global _pending, _last_trim
    now = time.monotonic()
    if not _pending or _libc is None or not hasattr(_libc, "malloc_trim") or (
            now - _last_trim < TRIM_INTERVAL):
        return
    _pending = False
    _last_trim = now
    _libc.malloc_trim(0)
