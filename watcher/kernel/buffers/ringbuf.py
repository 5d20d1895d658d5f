"""Reading a BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``) by mapping it ourselves.

Why not libbcc's ``bpf_poll_ringbuf``: it calls a C callback per record, and a
ctypes callback into Python per record is the ~1M records/s ceiling.  The
ring's layout is stable kernel ABI (``kernel/bpf/ringbuf.c``, the same one
libbpf's ``ring_buffer__consume`` relies on):

- page 0 at offset 0: the consumer position (u64).  Mapped read-write: the
  reader publishes how far it has consumed there, and the producer uses it to
  know which space is free.  The kernel refuses a writable mapping of this
  page through a read-only fd, so a ring buffer can only be *consumed* through
  a read-write fd; a read-only reader could look but never free space, and
  the producer would start failing as soon as the ring filled once.
- page 1: the producer position (u64), read-only.
- then the data pages, mapped **twice** back to back, so a record that wraps
  past the end is still contiguous in memory: no copy to reassemble it.
- each record: an 8-byte header (u32 length with a BUSY bit while being
  written and a DISCARD bit for ``bpf_ringbuf_discard``, u32 page offset),
  then the data, padded to 8 bytes.

The map fd itself is pollable (readable while ``consumer != producer``), so
the daemon waits on it with ``trio.lowlevel.wait_readable`` and there is no
busy polling.  The kernel wakes a waiting reader when a record is committed
while the reader has caught up, so after a read, data that arrived meanwhile
is seen by the level-triggered check that registering the wait performs.

Consumers compete: with two readers of one ring, each record goes to one of
them.  And the kernel reports no loss: a full ring makes
``bpf_ringbuf_output``/``reserve`` fail inside the program, which must count
that itself (see examples/execsnoop-ringbuf).

Memory ordering: positions are read and written as aligned 8-byte loads and
stores, which is acquire/release on x86-64 (the kernel's
``smp_load_acquire``/``smp_store_release`` pair).  Weaker architectures would
need explicit barriers; pymap targets x86-64 first.
"""

from __future__ import annotations

import numpy as np

from watcher.kernel.buffers.chunk import EMPTY, RecordChunk
from watcher.kernel.sys.mapping import PAGE_SIZE, PROT_READ, PROT_WRITE, Mapping

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
LEN_MASK = ~(BUSY_BIT | DISCARD_BIT) & 0xFFFF_FFFF
HDR_SIZE = 8


class RingBufReader:
    """Consumes one ring buffer through ``fd`` (read-write), ``size`` data bytes."""

    def __init__(self, fd: int, size: int):
        if size <= 0 or size & (size - 1) or size % PAGE_SIZE:
            raise ValueError(f"ring buffer size {size} is not a power-of-2 number of pages")
        self.fd = fd
        self.size = size
        self._mask = size - 1
        self._cons_map = Mapping(fd, PAGE_SIZE, PROT_READ | PROT_WRITE, 0,
                                 "ring buffer consumer page (needs a read-write fd)")
        try:
            self._prod_map = Mapping(fd, PAGE_SIZE + 2 * size, PROT_READ, PAGE_SIZE,
                                     "ring buffer data pages")
        except BaseException:
            self._cons_map.close()
            raise
        self._cons = self._cons_map.u64(0)
        self._prod = self._prod_map.u64(0)
        data = np.ctypeslib.as_array(self._prod_map.bytes_view(PAGE_SIZE, 2 * size))
        data.flags.writeable = False
        self._data = data
        self._words = data.view(np.uint32)
        self._wordmv = self._words.data  # a memoryview of the words
        self.records = 0
        self.bytes = 0

    def fileno(self) -> int:
        """The fd to wait on: the map fd, readable while records are waiting."""
        return self.fd

    def clear_wakeups(self) -> None:
        """Nothing to clear: the map fd's readiness is level-triggered on pending data."""

    def pending(self) -> int:
        """Bytes between the consumer and producer positions (records, headers, padding)."""
        return self._prod.value - self._cons.value

    def read(self, limit: int, max_bytes: int = 1 << 24) -> RecordChunk:
        """Up to ``limit`` committed records (and about ``max_bytes`` of data), consumed.

        Stops early at a record still being written (BUSY): records are
        consumed strictly in order, as the kernel requires.  Runs of records
        of one length (the common case: one C struct per record) are found
        and copied with numpy, without a Python step per record.
        """
        cons = self._cons.value
        avail = self._prod.value - cons
        if avail <= 0:
            return EMPTY
        base = cons & self._mask
        words = self._wordmv
        wbase = base >> 2
        pos = n = nbytes = 0
        pieces: list[bytes] = []
        runs: list[tuple[int, int]] = []  # (record count, length) in order
        while pos < avail and n < limit and nbytes < max_bytes:
            hdr = words[wbase + (pos >> 2)]
            if hdr & BUSY_BIT:
                break
            length = hdr & LEN_MASK
            step = (length + HDR_SIZE + 7) & ~7
            if hdr & DISCARD_BIT:
                pos += step
                continue
            start = base + pos
            k = 1
            room = min(limit - n, (avail - pos) // step)
            if room > 1 and words[wbase + ((pos + step) >> 2)] == hdr:
                stride = step >> 2
                first = wbase + (pos >> 2)
                hdrs = self._words[first:first + room * stride:stride]
                bad = np.flatnonzero(hdrs != hdr)
                k = int(bad[0]) if bad.size else room
            if k == 1:
                pieces.append(self._data[start + HDR_SIZE:start + HDR_SIZE + length].tobytes())
            else:
                block = self._data[start:start + k * step].reshape(k, step)
                pieces.append(block[:, HDR_SIZE:HDR_SIZE + length].tobytes())
            runs.append((k, length))
            n += k
            pos += k * step
            nbytes += k * length
        # The data is copied out: only now may the producer reuse the space.
        self._cons.value = cons + pos
        if not n:
            return EMPTY
        if len(runs) == 1:
            lengths = np.full(n, runs[0][1], dtype=np.uint32)
        else:
            counts, lens = zip(*runs)
            lengths = np.repeat(np.array(lens, dtype=np.uint32), counts)
        self.records += n
        self.bytes += nbytes
        return RecordChunk(n, lengths.tobytes(), b"".join(pieces),
                           more=pos < avail)

    def close(self) -> None:
        self._wordmv.release()
        self._prod_map.close()
        self._cons_map.close()
