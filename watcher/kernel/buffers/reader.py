"""Opening a buffer to read: a reader for a ring buffer or perf event array fd or pin.

The one place that decides how a buffer is read from its map type, so the
daemon's sources deal with "a reader" (``fileno``, ``clear_wakeups``,
``read``, ``close``) and never with map types or mmap details.

Pins are opened **read-write**, unlike everywhere else in pymap: consuming a
ring buffer means writing its consumer position, and reading a perf event
array means installing pymap's rings in it (see :mod:`.perfbuf`).  Only
buffers explicitly configured as sources are opened this way.
"""

from __future__ import annotations

import watcher.kernel.sys.syscall as syscall
from watcher.kernel.buffers.perfbuf import PerfBufReader
from watcher.kernel.buffers.ringbuf import RingBufReader
from watcher.kernel.maps.find import MapHandle

BUFFER_TYPES = {"ringbuf": "ringbuf", "perf_event_array": "perf"}


def reader_for(fd: int, map_type: str, max_entries: int, page_cnt: int = 64,
               wakeup_events: int = 1) -> RingBufReader | PerfBufReader:
    """A reader for the buffer behind ``fd`` (which stays owned by the caller)."""
    if map_type == "ringbuf":
        return RingBufReader(fd, max_entries)
    if map_type == "perf_event_array":
        return PerfBufReader(fd, page_cnt=page_cnt, wakeup_events=wakeup_events)
    raise ValueError(f"a {map_type} map is not a buffer pymap can read "
                     "(ring buffers and perf event arrays are)")


def open_pinned(path: str) -> MapHandle:
    """The map pinned at ``path``, opened read-write (a reader consumes the buffer)."""
    return MapHandle.adopt(syscall.obj_get(path, flags=0), (path,))

