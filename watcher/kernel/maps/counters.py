"""Reading a counter map: the sum of every value (every CPU's slot for per-CPU maps).

Why: the kernel reports no loss for ring buffers, so a producing program
counts its failed reserves itself, in an array or hash of u64 (or u32)
counters (see examples/execsnoop-ringbuf).  pymap reads that map beside the
buffer and reports the total as the buffer's loss.
"""

from __future__ import annotations

import numpy as np

from watcher.kernel.maps.dump import dump, value_stride
from watcher.kernel.maps.find import record_from_fd
from watcher.kernel.sys.abi import percpu_slot


def counter_total(fd: int) -> int:
    """Sum of all values of the counter map behind ``fd`` (u64 or u32 values)."""
    record = record_from_fd(fd)
    if record.value_size not in (4, 8):
        raise ValueError(f"{record.name}: a counter map needs u32 or u64 values, "
                         f"not {record.value_size} bytes")
    dtype = np.uint64 if record.value_size == 8 else np.uint32
    stride = value_stride(record)
    total = 0
    for chunk in dump(fd, record):
        rows = np.frombuffer(chunk.values, dtype=np.uint8).reshape(chunk.count, stride)
        if record.percpu:
            slot = percpu_slot(record.value_size)
            rows = rows.reshape(-1, slot)[:, :record.value_size]
        else:
            rows = rows[:, :record.value_size]
        total += int(np.ascontiguousarray(rows).view(dtype).astype(np.uint64).sum())
    return total
