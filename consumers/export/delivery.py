"""Between the stream and an output: a bounded buffer that never blocks the stream.

The stream task ``put``s records and never waits.  One sender task takes
batches from the buffer and gives them to the output; when the output is down
it closes it, reopens with exponential backoff and resends the batch.  When
the buffer (bounded in bytes) is full, new records are dropped and counted
in a :class:`Gap` kept at their place in the queue; the sender turns it into
a ``dropped`` record (its count, the first and last sequence lost) when the
output takes data again, so the receiver sees exactly where and how much it
missed.  The rate limiter drops the same way.

An output that packs records into messages (``output.grouping``, see
grouping.py) gets only whole messages: a batch ends where a message ends, and
a trailing message that may still grow waits in the buffer for more records,
``linger`` seconds at most; then it is cut where it stands and the cut is
written to the checkpoint before it is sent.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Sequence
from typing import cast

import attrs
import trio

from .checkpoint import Checkpoint
from .grouping import Grouping
from .outputs import Output, OutputUnavailable
from .record import ExportRecord, RecordRun

GAP_BYTES = 256  # what a gap marker counts for in the buffer
Item = ExportRecord | RecordRun  # what a batch holds: a record, or a message's records


def count(batch: Sequence[Item]) -> int:
    """Records in ``batch``, a run counting for its records."""
    return sum(len(r) if isinstance(r, RecordRun) else 1 for r in batch)


@attrs.define
class Gap:
    """Records dropped at this point of the queue."""

    count: int
    first_seq: int
    last_seq: int
    reason: str
    first_id: str = ""  # the event id of the first record dropped here


@attrs.define
class DeliveryStats:
    delivered: int = 0
    dropped: int = 0
    rate_limited: int = 0
    reconnects: int = 0
    buffered_bytes: int = 0
    last_error: str = ""


class RateLimit:
    """A token bucket: ``rate`` records per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self._tokens = self.burst
        self._at = time.monotonic()

    def admit(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Delivery:
    """The buffer and the sender task for one output."""

    def __init__(self, output: Output, gap_record: Callable[[Gap], ExportRecord],
                 checkpoint: Checkpoint | None = None, max_bytes: int = 64 * 1024 * 1024,
                 batch_bytes: int = 1024 * 1024, rate: float | None = None,
                 backoff: tuple[float, float] = (0.2, 10.0),
                 on_status: Callable[[str], None] | None = None):
        self.output = output
        self.gap_record = gap_record
        self.checkpoint = checkpoint
        self.max_bytes = max_bytes
        self.batch_bytes = batch_bytes
        self.limit = RateLimit(rate) if rate else None
        self.backoff = backoff
        self.on_status = on_status or (lambda message: None)
        self.stats = DeliveryStats()
        self._queue: collections.deque[Item | Gap] = collections.deque()
        self._bytes = 0
        self.in_flight_bytes = 0  # the batch being sent (or retried): out of _bytes
        self._wakeup = trio.Event()
        self._closing = False
        self._idle = trio.Event()
        self.grouping: Grouping | None = output.grouping
        if self.grouping is not None and checkpoint is not None:
            self.grouping.cuts = checkpoint.cuts  # cuts persist with the checkpoint
        self._held: tuple[ExportRecord, float] | None = None  # open message, since when

    # --- the stream side: never waits ---

    def put(self, record: ExportRecord) -> None:
        if self.limit is not None and not self.limit.admit():
            self.stats.rate_limited += 1
            self._drop(record, "rate limit")
            return
        size = record.size
        if self._bytes + size > self.max_bytes:
            self.stats.dropped += 1
            self._drop(record, "export buffer full")
            return
        self._queue.append(record)
        self._bytes += size
        self._wakeup.set()

    def put_many(self, records: list[ExportRecord]) -> None:
        """``put`` each record, in order (one wakeup for the lot)."""
        if self.limit is not None:
            for record in records:
                self.put(record)
            return
        queue, limit = self._queue, self.max_bytes
        for record in records:
            size = record.size
            if self._bytes + size > limit:
                self.stats.dropped += 1
                self._drop(record, "export buffer full")
                continue
            queue.append(record)
            self._bytes += size
        self._wakeup.set()

    def put_run(self, run: RecordRun) -> None:
        """A message's records as one item, with no object per record.  Record by
        record (``put_many``) where each record needs a decision of its own: a rate
        limit, a buffer too full for the whole run, or an output that groups records
        into messages of its own (grouping.py works on records)."""
        if (self.limit is not None or self.grouping is not None
                or self._bytes + run.size > self.max_bytes):
            self.put_many(run.records())
            return
        self._queue.append(run)
        self._bytes += run.size
        self._wakeup.set()

    def _drop(self, record: ExportRecord, reason: str) -> None:
        tail = self._queue[-1] if self._queue else None
        if isinstance(tail, Gap) and tail.reason == reason:
            tail.count += 1
            tail.last_seq = record.seq or tail.last_seq
        else:
            self._queue.append(Gap(1, record.seq, record.seq, reason, record.id))
            self._bytes += GAP_BYTES  # may pass max_bytes by a marker: bounded all the same
        self._wakeup.set()

    # --- the sender task ---

    def _take(self) -> list[Item]:
        """The next batch, about ``batch_bytes`` (twice that at most, and a record): a run
        larger than that is cut in runs of ``batch_bytes``, first in the queue."""
        batch: list[Item] = []
        size = 0
        q = self._queue
        while q and size < self.batch_bytes:
            item = q.popleft()
            if isinstance(item, Gap):
                self._bytes -= GAP_BYTES
                taken: Item = self.gap_record(item)
                size += taken.size
            else:
                if (isinstance(item, RecordRun) and len(item) > 1
                        and size + item.size > 2 * self.batch_bytes):
                    item, *rest = item.chunks(self.batch_bytes - size, self.batch_bytes)
                    q.extendleft(reversed(rest))
                n = item.size
                self._bytes -= n
                size += n
                taken = item
            batch.append(taken)
        if self.grouping is not None:  # put_run gave such an output records only
            self._whole_messages(cast("list[ExportRecord]", batch))
        return batch

    def _whole_messages(self, batch: list[ExportRecord]) -> None:
        """End ``batch`` where a message ends: take the rest of a message the byte
        limit cut, and give back a trailing message that may still grow, unless it
        waited ``linger`` seconds (then cut it, noting the cut first)."""
        g, q = self.grouping, self._queue
        assert g is not None
        while batch and q:
            record = q[0]
            if not isinstance(record, ExportRecord) or not g.continues(batch[-1], record):
                break
            q.popleft()
            self._bytes -= record.size
            batch.append(record)
        tail = 0 if q or self._closing else g.open_tail(batch)
        if not tail:
            self._held = None
            return
        first, now = batch[-tail], time.monotonic()
        if self._held is None or self._held[0] is not first:
            self._held = (first, now)
        if now - self._held[1] >= g.linger:
            last = batch[-1]
            if self.checkpoint is not None:
                self.checkpoint.cut(last.epoch, last.seq)
            else:
                g.cuts[(last.epoch, last.seq)] = None
            self._held = None
            return
        for record in reversed(batch[-tail:]):
            q.appendleft(record)
            self._bytes += record.size
        del batch[-tail:]

    def _linger_deadline(self) -> float:
        held = self._held
        assert self.grouping is not None and held is not None
        return held[1] + self.grouping.linger

    async def run(self) -> None:
        """Deliver until :meth:`close` and the buffer is empty (or cancelled)."""
        is_open = False
        delay = self.backoff[0]
        batch: list[Item] = []
        try:
            while True:
                if not batch:
                    if not self._queue:
                        if self._closing:
                            return
                        self._idle.set()
                        self._wakeup = trio.Event()
                        await self._wakeup.wait()
                        self._idle = trio.Event()
                        continue
                    batch = self._take()
                    self.in_flight_bytes = sum(r.size for r in batch)
                    if not batch:  # one message that may still grow: wait for more, or cut it
                        self._wakeup = trio.Event()
                        with trio.move_on_at(self._linger_deadline() - time.monotonic()
                                             + trio.current_time()):
                            await self._wakeup.wait()
                        continue
                try:
                    if not is_open:
                        await self.output.open()
                        is_open = True
                        if self.stats.last_error:
                            self.on_status(f"{self.output.describe()}: connected again")
                    await self.output.send_batch(batch)
                except OutputUnavailable as e:
                    if is_open:
                        await self.output.aclose()
                        is_open = False
                    if str(e) != self.stats.last_error:
                        self.on_status(f"{e}; retrying")
                    self.stats.last_error = str(e)
                    self.stats.reconnects += 1
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.backoff[1])
                    continue
                delay = self.backoff[0]
                self.stats.last_error = ""
                self.stats.delivered += count(batch)
                self.in_flight_bytes = 0
                self._advance(batch)
                if self.grouping is not None and self.checkpoint is None:
                    self.grouping.cuts.clear()  # sent: no restart will re-send these
                batch = []
        finally:
            self._idle.set()  # wakes a close() still waiting for the buffer to drain
            if is_open:
                await self.output.aclose()
            if self.checkpoint is not None:
                self.checkpoint.save()

    def _advance(self, batch: list[Item]) -> None:
        """Once per batch: the checkpoint moves to its last daemon event (seq > 0)."""
        if self.checkpoint is None:
            return
        for r in reversed(batch):
            seq = r.last_seq if isinstance(r, RecordRun) else r.seq
            if seq > 0:
                self.checkpoint.advance(r.epoch, seq)
                return

    async def close(self, timeout: float = math.inf) -> None:
        """Let the sender flush what is buffered (up to ``timeout``), then stop it."""
        self._closing = True
        self._wakeup.set()
        with trio.move_on_after(timeout):
            while self._queue:
                await self._idle.wait()

    @property
    def buffered_bytes(self) -> int:
        return self._bytes
