"""Reading a BPF perf event array: one perf ring per CPU, mapped and parsed here.

Why not libbcc's ``perf_reader``: it calls a C callback per record, and a
ctypes callback into Python per record is the bottleneck.  Each CPU's ring is
``1 + page_cnt`` pages: a ``perf_event_mmap_page`` header (``data_head`` at
byte 1024, written by the kernel; ``data_tail`` at 1032, written by us to
free space), then ``page_cnt`` data pages that records wrap around.  Records
are ``perf_event_header`` (u32 type, u16 misc, u16 size) then:

- ``PERF_RECORD_SAMPLE`` (9) with ``PERF_SAMPLE_RAW``: u32 size, then the
  program's bytes, padded by the kernel so the record stays 8-byte aligned
  (the padding is part of the size a reader sees, as in bcc's callbacks);
- ``PERF_RECORD_LOST`` (2): u64 id, u64 count of samples dropped because the
  ring was full.  The kernel writes it only once space frees up again, so the
  count of a burst's tail shows with the next record that gets through.

Installing the rings is a **write to the map**: ``map[cpu] = our event fd``.
That replaces whatever reader was installed there (``perf``, a bcc tool,
another agent): from then on the program's records come to pymap only.  Only
sources configured explicitly get this treatment; :meth:`close` removes
pymap's entries, and the previous reader's rings are not restored.

Waiting: a perf event fd's poll is *destructive* (``perf_poll`` swaps the
ring's wakeup flag to zero), so polling it twice per wakeup loses the
wakeup.  trio re-arms fds with ``EPOLL_CTL_MOD`` (``EPOLLONESHOT``), which
polls once at re-arm and once more in ``epoll_wait``; so does an epoll fd
nested in trio's.  A record arriving at the wrong moment then waits for the
next one.  So the per-CPU fds sit in a private epoll instance (registered
once, level-triggered: one poll per wakeup, exactly like libbpf's
``perf_buffer__poll``) that a small thread blocks on, and the thread signals
an eventfd, whose poll is not destructive, for the daemon to wait on.  The
thread only waits and signals; all reading happens in the caller.
"""

from __future__ import annotations

import os
import select
import struct
import threading

import numpy as np

import watcher.kernel.sys.perfevent as perfevent
import watcher.kernel.sys.syscall as syscall
from watcher.kernel.buffers.chunk import EMPTY, RecordChunk
from watcher.kernel.sys.cpus import online_cpus
from watcher.kernel.sys.mapping import PAGE_SIZE, PROT_READ, PROT_WRITE, Mapping

PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
PERF_RECORD_LOST_SAMPLES = 13
_HEADER = struct.Struct("<IHH")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _CpuRing:
    def __init__(self, cpu: int, fd: int, page_cnt: int):
        self.cpu = cpu
        self.fd = fd
        self.map = Mapping(fd, (1 + page_cnt) * PAGE_SIZE, PROT_READ | PROT_WRITE, 0,
                           f"perf ring of cpu {cpu}")
        self.head = self.map.u64(1024)
        self.tail = self.map.u64(1032)
        offset = self.map.u64(1040).value or PAGE_SIZE
        self.size = self.map.u64(1048).value or page_cnt * PAGE_SIZE
        self.mask = self.size - 1
        self.data = np.ctypeslib.as_array(self.map.bytes_view(offset, self.size))

    def read(self, limit: int, lengths: list[int], pieces: list) -> tuple[int, int, bool]:
        """Append up to ``limit`` samples; returns (samples, lost, stopped at the limit)."""
        tail = self.tail.value
        self._pending_tail = tail
        avail = self.head.value - tail
        if avail <= 0:
            return 0, 0, False
        off = tail & self.mask
        if off + avail <= self.size:
            buf = self.data[off:off + avail].data
        else:  # the unread part wraps past the end of the ring: reassemble it
            buf = np.concatenate((self.data[off:], self.data[:off + avail - self.size])).data
        pos = n = lost = 0
        while pos + 8 <= avail and n < limit:
            rtype, _misc, size = _HEADER.unpack_from(buf, pos)
            if size < 8:
                break  # cannot happen with a sane kernel; never loop forever
            if rtype == PERF_RECORD_SAMPLE:
                raw = _U32.unpack_from(buf, pos + 8)[0]
                lengths.append(raw)
                pieces.append(buf[pos + 12:pos + 12 + raw])
                n += 1
            elif rtype == PERF_RECORD_LOST:
                lost += _U64.unpack_from(buf, pos + 16)[0]
            elif rtype == PERF_RECORD_LOST_SAMPLES:
                lost += _U64.unpack_from(buf, pos + 8)[0]
            pos += size
        self._pending_tail = tail + pos
        return n, lost, pos < avail

    def release(self) -> None:
        """Give the space read by the last :meth:`read` back to the kernel (after copying)."""
        self.tail.value = self._pending_tail

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class PerfBufReader:
    """Owns pymap's perf rings in the perf event array ``map_fd`` (read-write).

    ``cpus`` defaults to the online CPUs; a CPU without a slot in the array
    (``max_entries`` too small) is skipped.  ``page_cnt`` (power of two) data
    pages per CPU, ``wakeup_events`` samples per wakeup.
    """

    def __init__(self, map_fd: int, page_cnt: int = 64, wakeup_events: int = 1,
                 cpus: list[int] | None = None):
        if page_cnt <= 0 or page_cnt & (page_cnt - 1):
            raise ValueError(f"page_cnt {page_cnt} must be a power of two")
        self.map_fd = map_fd
        self.wakeup_events = wakeup_events
        max_entries = syscall.map_info(map_fd).max_entries
        wanted = online_cpus() if cpus is None else cpus
        self.skipped = [c for c in wanted if c >= max_entries]
        self._epoll = select.epoll()
        self._notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._epoll.register(self._stop, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._rings: list[_CpuRing] = []
        try:
            for cpu in wanted:
                if cpu >= max_entries:
                    continue
                fd = perfevent.open_bpf_output(cpu, wakeup_events)
                try:
                    ring = _CpuRing(cpu, fd, page_cnt)
                except BaseException:
                    os.close(fd)
                    raise
                self._rings.append(ring)
                self._epoll.register(fd, select.EPOLLIN)
                syscall.map_update_elem(map_fd, _U32.pack(cpu), _U32.pack(fd))
            self._thread = threading.Thread(target=self._wait_loop, daemon=True,
                                            name=f"pymap-perf-wakeups-{map_fd}")
            self._thread.start()
        except BaseException:
            self.close()
            raise
        self._next = 0
        self.records = 0
        self.lost = 0
        self.bytes = 0

    @property
    def cpus(self) -> list[int]:
        return [r.cpu for r in self._rings]

    def _wait_loop(self) -> None:
        """The wakeup thread: block until a ring (or :meth:`close`) signals, pass it on."""
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return  # closed under us
            if any(fd == self._stop for fd, _ in events):
                return
            os.eventfd_write(self._notify, 1)

    def fileno(self) -> int:
        """One fd to wait on: an eventfd readable once any CPU's ring has woken up."""
        return self._notify

    def clear_wakeups(self) -> None:
        """Consume pending wakeups before a drain, so the next wait sleeps until new data."""
        try:
            os.eventfd_read(self._notify)
        except BlockingIOError:
            pass

    def read(self, limit: int, max_bytes: int = 1 << 24) -> RecordChunk:
        """Up to ``limit`` samples from the CPUs' rings, plus lost counts, consumed.

        CPUs are visited round robin from where the last read stopped, so one
        busy CPU cannot starve the others when reads hit the limit.  A ring
        holds ``page_cnt`` pages at most, so ``max_bytes`` is checked between CPUs.
        """
        lengths: list[int] = []
        pieces: list = []
        lost = 0
        more = False
        rings = self._rings
        count = len(rings)
        touched = []
        for i in range(count):
            ring = rings[(self._next + i) % count]
            _, ring_lost, stopped = ring.read(limit - len(lengths), lengths, pieces)
            touched.append(ring)
            lost += ring_lost
            if not stopped and i + 1 < count and sum(map(len, pieces)) >= max_bytes:
                stopped = True
                i += 1
            if stopped:
                more = True
                self._next = (self._next + i) % count
                break
        data = b"".join(pieces)
        pieces.clear()
        for ring in touched:
            ring.release()
        if not lengths and not lost:
            return EMPTY
        self.records += len(lengths)
        self.lost += lost
        self.bytes += len(data)
        return RecordChunk(len(lengths), np.array(lengths, dtype=np.uint32).tobytes(), data,
                           lost=lost, more=more)

    def close(self) -> None:
        """Stop the wakeup thread, remove pymap's rings from the map, free everything."""
        if self._thread is not None:
            os.eventfd_write(self._stop, 1)
            self._thread.join()
            self._thread = None
        for ring in self._rings:
            try:
                syscall.map_delete_elem(self.map_fd, _U32.pack(ring.cpu))
            except OSError:
                pass  # already gone (the map, or an entry someone replaced)
            ring.close()
        self._rings.clear()
        if self._notify >= 0:
            self._epoll.close()
            os.close(self._notify)
            os.close(self._stop)
            self._notify = self._stop = -1
