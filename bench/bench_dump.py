"""Benchmark: a poll's dump of a small map of large values, buffers sized to the map.

Run as root: ``.venv/bin/python bench/bench_dump.py``.  A 512-entry hash map with
1 KiB values (the abuse test's map) is dumped with ``watcher.kernel.maps.dump.dump``:

(a) as the daemon does now: batch buffers of at most ``max_entries`` entries and
    ``BATCH_BUFFER_BYTES`` of values;
(b) the baseline, in the same run: buffers for 65,536 entries whatever the map
    holds (what every poll did before), zeroed by ctypes when made.

Prints the median time per dump of each and their ratio, and the peak of Python
allocations during one dump of each (tracemalloc).  Target: (a) allocates under
4 MiB.  The map is removed on the way out, errors included.
"""

from __future__ import annotations

import os
import statistics
import struct
import time
import tracemalloc

from _common import BenchError, check_root, run_main

from watcher.kernel.maps import dump as kdump
from watcher.kernel.maps.find import record_from_fd
from watcher.kernel.maps.kinds import TYPE_IDS
from watcher.kernel.sys import syscall

ENTRIES, VALUE_SIZE, OLD_CHUNK = 512, 1024, 65536
MiB = 1 << 20


def measure(fd: int, repeats: int) -> tuple[float, int]:
    """Median seconds per dump, and the allocation peak of one dump."""
    record = record_from_fd(fd)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = sum(chunk.count for chunk in kdump.dump(fd, record))
        times.append(time.perf_counter() - t0)
        if count != ENTRIES:
            raise BenchError(f"a dump returned {count} entries, not {ENTRIES}")
    tracemalloc.start()
    try:
        for _ in kdump.dump(fd, record):
            pass
        return statistics.median(times), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> int:
    check_root()
    fd = syscall.map_create(TYPE_IDS["hash"], 4, VALUE_SIZE, ENTRIES, name="pymap_bdump")
    try:
        keys = b"".join(struct.pack("<I", i) for i in range(ENTRIES))
        syscall.map_update_batch(fd, keys, os.urandom(ENTRIES * VALUE_SIZE), ENTRIES)
        sized, sized_peak = measure(fd, 200)
        sized_entries = kdump.batch_entries
        kdump.batch_entries = lambda chunk, max_entries, stride: OLD_CHUNK  # the baseline
        try:
            old, old_peak = measure(fd, 50)
        finally:
            kdump.batch_entries = sized_entries
    finally:
        os.close(fd)
    print(f"dump of a {ENTRIES}-entry hash map of {VALUE_SIZE}-byte values, median per dump:")
    print(f"  (a) buffers sized to the map:   {sized * 1e3:8.2f} ms, "
          f"peak {sized_peak / MiB:.1f} MiB allocated")
    print(f"  (b) buffers for {OLD_CHUNK:,} entries: {old * 1e3:8.2f} ms, "
          f"peak {old_peak / MiB:.1f} MiB allocated")
    print(f"  (b) / (a) = {old / sized:.0f}x   target (a) under 4 MiB: "
          f"{'met' if sized_peak < 4 * MiB else 'MISSED'}")
    return 0


if __name__ == "__main__":
    run_main(main)
