"""What a buffer reader hands the daemon per read: records as two flat buffers.

One Python object per read, not per record: ``lengths`` holds a native u32
per record, ``data`` the records back to back.  Both go on the wire as they
are (a lengths frame and a data frame), so a burst of 10,000 records costs
the daemon a few allocations instead of 10,000 callbacks and objects, which
is what caps bcc's Python readers at about a million records a second.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class RecordChunk:
    count: int  # records in this chunk
    lengths: bytes  # count little-endian (native) u32 lengths
    data: bytes  # the records, back to back, sum(lengths) bytes
    lost: int = 0  # records the kernel reported dropped (perf PERF_RECORD_LOST)
    more: bool = False  # the read stopped at its limit: data may be waiting already


EMPTY = RecordChunk(0, b"", b"")
