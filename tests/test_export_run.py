"""A message's records carried as one RecordRun: the same records, bytes and accounting.

Why: the exporter's fast path no longer makes an ExportRecord per event; these tests
hold the guarantees the per-record path gave: every record delivered in order (a run
larger than a batch is split, a run that does not fit the buffer is dropped record by
record and counted), the buffer's byte count back to zero, the checkpoint at the last
delivered event, and a file written byte for byte as from records.
"""

from __future__ import annotations

import pytest
import trio

from consumers.export.checkpoint import Checkpoint
from consumers.export.delivery import Delivery, Gap
from consumers.export.outputs.file import FileOutput
from consumers.export.record import RECORD_OVERHEAD, ExportRecord, RecordRun


def make_run(first: int, n: int, width: int = 100, vary: int = 7) -> RecordRun:
    seqs = list(range(first, first + n))
    actions = ["updated" if s % 3 else "added" for s in seqs]
    payloads = [b'{"seq":%08d,"pad":"%s"}' % (s, b"x" * (width + s % vary)) for s in seqs]
    return RecordRun.of_payloads("node", "ep", "m", 1.5, seqs, actions, payloads)


def gap_record(gap: Gap) -> ExportRecord:
    return ExportRecord("node", "ep", 0, "", "dropped", 1.5, b'{"dropped":%d}' % gap.count,
                        f"dropped.{gap.first_seq}-{gap.last_seq}")


@pytest.mark.parametrize("vary", [7, 1])  # lines of several lengths, or all one
def test_a_run_is_its_records(vary):
    run = make_run(10, 50, vary=vary)
    assert run.width == (0 if vary > 1 else len(run.payloads[0]) + 1)
    records = run.records()
    assert [r.seq for r in records] == run.seqs and [r.payload for r in records] == run.payloads
    assert all(r.epoch == "ep" and r.map == "m" and r.time == 1.5 for r in records)
    assert run.size == sum(r.size for r in records)
    assert run.size == sum(map(len, run.payloads)) + 50 * RECORD_OVERHEAD
    assert run.text == b"".join(r.payload + b"\n" for r in records)
    for first, size in ((run.size // 3, run.size // 4), (0, 1), (1, run.size),
                        (run.size, run.size), (10 * run.size, 1), (1000, 1500)):
        parts = run.chunks(first, size)
        assert all(len(p) >= 1 for p in parts)
        assert [r for p in parts for r in p.records()] == records
        assert sum(p.size for p in parts) == run.size
        assert all(p.size == sum(r.size for r in p.records()) for p in parts)
    assert len(run.chunks(0, 1)) == len(run) and len(run.chunks(run.size, 1)) == 1


def test_runs_and_records_through_delivery_to_a_file(tmp_path):
    path = tmp_path / "out.json"
    runs = [make_run(1, 3000), make_run(3001, 1), make_run(3002, 500)]
    single = ExportRecord("node", "ep", 0, "", "resync", 1.5, b'{"resync":1}', "resync")
    expected = b"".join(r.text for r in runs[:2]) + single.payload + b"\n" + runs[2].text
    checkpoint = Checkpoint(str(tmp_path / "state"))

    async def main() -> Delivery:
        d = Delivery(FileOutput(f"file://{path}?max_bytes=0"), gap_record, checkpoint,
                     batch_bytes=64 * 1024)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.run)
            d.put_run(runs[0])
            d.put_run(runs[1])
            d.put(single)
            d.put_run(runs[2])
            await d.close()
        return d

    d = trio.run(main)
    assert path.read_bytes() == expected
    assert d.stats.delivered == 3502 and d.stats.dropped == 0
    assert d.buffered_bytes == 0 and d.in_flight_bytes == 0
    assert checkpoint.position is not None and checkpoint.position.seq == 3501


def test_a_run_too_big_for_the_buffer_is_dropped_record_by_record(tmp_path):
    path = tmp_path / "out.json"
    run = make_run(1, 1200, width=200)  # about 340 KB: more than the buffer holds

    async def main() -> Delivery:
        d = Delivery(FileOutput(f"file://{path}?max_bytes=0"), gap_record,
                     max_bytes=64 * 1024)
        d.put_run(run)  # the sender is not running yet: the buffer fills
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.run)
            await d.close()
        return d

    d = trio.run(main)
    lines = path.read_bytes().splitlines()
    kept = len(lines) - 1
    assert kept + d.stats.dropped == len(run) and d.stats.dropped > 0
    assert lines[:kept] == run.payloads[:kept]
    assert lines[-1] == b'{"dropped":%d}' % d.stats.dropped
    assert d.buffered_bytes == 0
