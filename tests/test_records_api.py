"""The columnar record API (RecordSet.array / columns / rows / formatted), issue 20.

Without the kernel: every layout type decodes batch-wise exactly as record by record.
With it: a ring buffer a BPF program writes, read through ``record_batches=True``, gives
back field by field what the program wrote, and the per-record events agree.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
import subprocess
import sys

import msgspec
import numpy as np
import pytest
import trio
from conftest import REPO, need_bcc
from support.events import LibFollower, status, topic_key, wait_until
from support.kernel import token
from support.sources import REC, REC_LAYOUT_TOML, Producer, source_config

from consumers.events import Event, RecordEvents, events_from_records, in_parts, record_events
from consumers.recordsets import (
    FormatterCache,
    RecordSet,
    ShortRecords,
    record_formatter,
    record_layout,
)
from watcher.wire import schema
from watcher.wire.schema import MapRef

# Every type of the layout vocabulary, enum names, padding, and an odd size (45 bytes).
EVERY_TYPE = {"match": "x", "value": [
    {"name": "u8", "type": "u8"},
    {"name": "s16", "type": "s16"},
    {"name": "state", "type": "be32", "values": {"1": "open", "2": "closed"}},
    {"name": "flag", "type": "bool"},
    {"type": "pad[1]"},
    {"name": "ip4", "type": "ipv4"},
    {"name": "ip6", "type": "ipv6"},
    {"name": "mac", "type": "mac"},
    {"name": "comm", "type": "char[8]"},
    {"name": "blob", "type": "bytes[3]"},
    {"name": "s64", "type": "s64"},
]}
EVERY = struct.Struct("<Bh4s?x4s16s6s8s3sq")  # be32 packed by hand


def every_record(rng: random.Random) -> bytes:
    comm = rng.choice([b"bash\0\0\0\0", b"12345678", b"a\0b\0\0\0\0\0", b"caf\xc3\xa9\xff\0\0"])
    return EVERY.pack(rng.randrange(256), rng.randrange(-2**15, 2**15),
                      rng.choice([1, 2, 7]).to_bytes(4, "big"), rng.random() < 0.5,
                      rng.randbytes(4), rng.randbytes(16), rng.randbytes(6), comm,
                      rng.randbytes(3), rng.randrange(-2**63, 2**63))


def record_set(records: list[bytes], layout: dict | None = EVERY_TYPE) -> RecordSet:
    lengths = struct.pack(f"<{len(records)}I", *map(len, records))
    return RecordSet(len(records), lengths, b"".join(records), record_layout(layout))


def one_by_one(records: list[bytes], layout: dict = EVERY_TYPE) -> list[dict]:
    fmt = record_formatter(layout)
    assert fmt is not None
    return [fmt(r) for r in records]


def test_every_type_batch_decoding_equals_record_by_record():
    rng = random.Random(20)
    records = [every_record(rng) for _ in range(500)]
    rs = record_set(records)
    expected = one_by_one(records)
    assert rs.formatted() == expected
    assert rs.rows() == [tuple(d.values()) for d in expected]
    assert rs.names == tuple(expected[0])
    assert expected[0]["state"] in ("open", "closed", 7)
    assert isinstance(expected[0]["ip4"], str) and isinstance(expected[0]["flag"], bool)


def test_columns_are_raw_values_viewing_the_received_bytes():
    rng = random.Random(21)
    records = [every_record(rng) for _ in range(100)]
    rs = record_set(records)
    arr = rs.array()
    assert np.shares_memory(arr, np.frombuffer(rs.data, np.uint8))  # no copy
    assert not arr.flags.writeable
    cols = rs.columns()
    for i, raw in enumerate(records):
        u8, s16, state, flag, ip4, ip6, mac, comm, blob, s64 = EVERY.unpack(raw)
        assert int(cols["u8"][i]) == u8 and int(cols["s16"][i]) == s16
        assert int(cols["state"][i]) == int.from_bytes(state, "big")
        assert int(cols["flag"][i]) == flag
        assert ipaddress.IPv4Address(int(cols["ip4"][i])) == ipaddress.IPv4Address(ip4)
        assert cols["ip6"][i].tobytes() == ip6 and cols["mac"][i].tobytes() == mac
        assert cols["comm"][i] == comm.rstrip(b"\0")
        assert cols["blob"][i].tobytes() == blob and int(cols["s64"][i]) == s64


def test_padded_and_mixed_lengths_and_short_records():
    rng = random.Random(22)
    records = [every_record(rng) for _ in range(50)]
    padded = [r + b"\xee" * 3 for r in records]  # perf pads records to 8 bytes
    rs = record_set(padded)
    assert np.shares_memory(rs.array(), np.frombuffer(rs.data, np.uint8))
    assert rs.formatted() == one_by_one(records)
    mixed = [r + b"\xee" * (i % 5) for i, r in enumerate(records)]
    rs = record_set(mixed)
    assert rs.formatted() == one_by_one(records)  # a copy of each prefix, same values
    assert rs.rows() == [tuple(d.values()) for d in one_by_one(records)]
    short = [*records[:3], records[3][:20]]
    rs = record_set(short)
    with pytest.raises(ShortRecords):
        rs.array()
    got = rs.formatted()
    assert got == one_by_one(short) and got is not None and got[3]["_truncated"] is True


def test_no_layout_and_empty_batches():
    rs = record_set([b"abc", b"de"], layout=None)
    assert rs.formatted() is None and rs.names == ()
    with pytest.raises(ValueError, match="no layout"):
        rs.columns()
    empty = record_set([])
    assert empty.formatted() == [] and empty.rows() == [] and len(empty.array()) == 0


def test_record_events_unchanged():
    """The per-record events carry the same values and formatted dicts as before."""
    rng = random.Random(23)
    records = [every_record(rng) for _ in range(64)] + [every_record(rng)[:10]]
    header = schema.RecordBatch("e", 100, len(records), 7, 1.5, MapRef(3, "x"), EVERY_TYPE)
    frames = [struct.pack(f"<{len(records)}I", *map(len, records)), b"".join(records)]
    events = events_from_records(header, frames, FormatterCache())
    assert [e.value for e in events] == records
    assert [e.formatted for e in events] == one_by_one(records)
    assert [(e.action, e.seq, e.topic_seq, e.time, e.map) for e in events] == [
        ("record", 100 + i, 7 + i, 1.5, MapRef(3, "x")) for i in range(len(records))]
    (batch,) = events_from_records(header, frames, FormatterCache(), as_batch=True)
    assert batch.records is not None and batch.records.formatted() == one_by_one(records)



def test_record_events_come_in_parts_of_the_same_events():
    """RecordEvents (the stream's per-record path): CHUNK records to a part, made when
    asked, the same events as the list; from ``start`` on; short records; no layout."""
    rng = random.Random(24)
    full = [every_record(rng) for _ in range(600)]  # one length: decoded a column at a time
    short = [*full[:400], full[400][:10], *full[401:]]  # a short record: one by one
    for records, layout in ((full, EVERY_TYPE), (short, EVERY_TYPE), (full, None)):
        lengths = struct.pack(f"<{len(records)}I", *map(len, records))
        frames = [lengths, b"".join(records)]
        header = schema.RecordBatch("e", 100, len(records), 7, 1.5, MapRef(3, "x"), layout)
        expected = events_from_records(header, frames, FormatterCache())
        assert [e.value for e in expected] == records
        assert [e.formatted for e in expected] == (
            one_by_one(records) if layout else [None] * len(records))
        events = record_events(header, frames, FormatterCache())
        parts = list(events.parts())
        assert [len(p) for p in parts] == [RecordEvents.CHUNK, RecordEvents.CHUNK, 88]
        assert [e for p in parts for e in p] == expected == list(events)
        later = record_events(header, frames, FormatterCache(), start=300)
        assert len(later) == 300 and list(later) == expected[300:]
        assert [len(p) for p in later.parts()] == [RecordEvents.CHUNK, 44]
    lost = Event("lost", MapRef(3, "x"), missed=2)
    got = list(in_parts([lost, record_events(header, frames, FormatterCache(), start=500)]))
    assert got == [[lost, *expected[500:]]]  # the first part with the events before it
    assert list(in_parts([lost])) == [[lost]] and list(in_parts([])) == []
    assert list(in_parts([record_events(header, frames, FormatterCache(), start=600)])) == []


def test_event_surface_is_that_of_the_frozen_attrs_class():
    """Event is a msgspec Struct now (built in C); users see what the attrs class gave."""
    ev = Event("record", MapRef(3, "x"), 5, value=b"\x01", formatted={"a": 1})
    assert ev == Event("record", MapRef(3, "x"), 5, 0, 0.0, None, b"\x01", None, None, 0, "",
                       False, {"a": 1}, None)
    assert ev != msgspec.structs.replace(ev, seq=6)
    assert repr(ev) == (
        "Event(action='record', map=MapRef(id=3, name='x'), seq=5, topic_seq=0, time=0.0, "
        "key=None, value=b'\\x01', old_value=None, info=None, missed=0, reason='', "
        "snapshot=False, formatted={'a': 1}, records=None)")
    with pytest.raises(AttributeError):
        ev.seq = 6  # type: ignore[misc]
    assert msgspec.structs.replace(ev, time=2.0).time == 2.0 and ev.time == 0.0
    assert Event.__match_args__[:3] == ("action", "map", "seq")
    lost = Event("lost", "ring", missed=3)  # type: ignore[arg-type]  # hashable fields
    assert hash(lost) == hash(Event("lost", "ring", missed=3))  # type: ignore[arg-type]


def test_formatted_dicts_take_any_field_names():
    """The dicts are built by generated code: names are its arguments, never its source."""
    layout = {"match": "x", "value": [
        {"name": "a", "type": "u8"}, {"name": "b'}; x = {'", "type": "u8"}]}
    if record_layout(layout) is None:  # the vocabulary refuses such names: nothing to build
        return
    rs = record_set([b"\x01\x02", b"\x03\x04"], layout=layout)
    assert rs.formatted() == [{"a": 1, "b'}; x = {'": 2}, {"a": 3, "b'}; x = {'": 4}]


def test_iterating_records_gives_each_records_bytes():
    """One length (cut by NumPy) or mixed (sliced): the same bytes, trailing NULs kept."""
    for records in ([b"ab\x00", b"\x00\x00\x00", b"xyz"], [b"a", b"bc\x00", b""], [b"", b""],
                    [b"\x01"], []):
        got = list(record_set(records, layout=None))
        assert got == records and all(type(r) is bytes for r in got)

# --- a real ring buffer ----------------------------------------------------------------


def serve_ring(prod: Producer, daemon_factory, bpffs_dir, tmp_path):
    """Pin the producer's ring buffer and start a daemon publishing it with the records'
    layout: (the topic's name, the daemon)."""
    name = f"rb_{token()}"
    pin = prod.pin("rb", bpffs_dir / name)
    conf = source_config(tmp_path / "pymap.toml", [
        f'pin = "{pin}"\nkind = "ringbuf"\nlayout = {REC_LAYOUT_TOML}'])
    return name, daemon_factory("--config", conf)


async def subscribed(daemon, name: str, count: int) -> None:
    """Wait until the daemon counts ``count`` subscribers of ``name``."""
    await trio.to_thread.run_sync(
        wait_until, lambda: status(daemon)["subscriptions"].get(topic_key(name), 0) >= count,
        f"{count} subscribers of {name}")


async def produce(prod: Producer) -> int:
    """2,000 records, 100 at a time with pauses between, none dropped; their count."""
    for _ in range(20):
        prod.run_rb(100)
        await trio.sleep(0.02)
    assert prod.dropped() == 0
    return prod.produced_rb()


async def test_ringbuf_columns_field_by_field(daemon_factory, bpffs_dir, tmp_path):
    need_bcc()
    tag = int(token(), 16)
    prod = Producer(tag, rb_pages=64)
    try:
        name, d = serve_ring(prod, daemon_factory, bpffs_dir, tmp_path)
        lib = LibFollower(d.endpoint, [name], record_batches=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(lib.run)
            await subscribed(d, name, 1)
            produced = await produce(prod)

            def delivered(evs):
                return sum(len(e.records) for e in evs if e.action == "records") >= produced

            evs = await lib.await_count(0, "every record", pred=delivered)
            nursery.cancel_scope.cancel()
        batches = [e.records for e in evs if e.action == "records"]
        assert not [e for e in evs if e.action == "lost"]
        assert sum(map(len, batches)) == produced == 2000
        cols = {n: np.concatenate([b.columns()[n] for b in batches])
                for n in ("seq", "ts", "cpu", "tag")}
        assert cols["seq"].tolist() == list(range(produced))  # what the program numbered
        assert set(cols["tag"].tolist()) == {tag}
        assert (np.diff(cols["ts"].astype(np.int64)) >= 0).all()  # bpf_ktime_get_ns order
        raw = [REC.unpack(r) for b in batches for r in b]
        assert list(zip(*(cols[n].tolist() for n in ("seq", "ts", "cpu", "tag")))) == raw
        assert [row for b in batches for row in b.rows()] == raw
        assert [f for b in batches for f in (b.formatted() or [])] == [
            {"seq": s, "ts": t, "cpu": c, "tag": g} for s, t, c, g in raw]
    finally:
        prod.close()


async def test_batches_are_the_per_record_events_a_message_at_a_time(
        daemon_factory, bpffs_dir, tmp_path):
    """``stream.batches()`` gives exactly the events ``async for event in stream`` gives,
    grouped: non-empty lists, in stream order, several records to a message."""
    need_bcc()
    tag = int(token(), 16)
    prod = Producer(tag, rb_pages=64)
    try:
        name, d = serve_ring(prod, daemon_factory, bpffs_dir, tmp_path)
        each = LibFollower(d.endpoint, [name])
        grouped = LibFollower(d.endpoint, [name], by_batch=True)
        async with trio.open_nursery() as nursery:
            for follower in (each, grouped):
                await nursery.start(follower.run)
            await subscribed(d, name, 2)
            produced = await produce(prod)

            def delivered(evs):
                return sum(e.action == "record" for e in evs) >= produced

            for follower in (each, grouped):
                await follower.await_count(0, "every record", pred=delivered)
            nursery.cancel_scope.cancel()
        assert all(type(batch) is list and batch for batch in grouped.batches)
        assert max(map(len, grouped.batches)) <= RecordEvents.CHUNK  # a read, in parts
        assert [e for batch in grouped.batches for e in batch] == grouped.events
        assert not [e for e in each.events + grouped.events if e.action == "lost"]
        records = [e for e in grouped.events if e.action == "record"]
        assert records == [e for e in each.events if e.action == "record"]
        assert len(records) == produced == 2000
        assert [e.topic_seq - records[0].topic_seq for e in records] == list(range(produced))
        assert [REC.unpack(e.value) for e in records] == [
            tuple(e.formatted.values()) for e in records]
        assert {e.formatted["tag"] for e in records} == {tag}
        assert len(grouped.batches) < produced  # a message's records come as one batch
    finally:
        prod.close()


async def test_example_prints_each_record_and_summaries(daemon_factory, bpffs_dir, tmp_path):
    """examples/record_columns.py against a real ring buffer: --rows, the columns, then
    per-record Events (--events: the same summary)."""
    need_bcc()
    tag = int(token(), 16)
    prod = Producer(tag, rb_pages=16)
    try:
        name, d = serve_ring(prod, daemon_factory, bpffs_dir, tmp_path)
        for how in ("--rows", "", "--events"):
            rows = how == "--rows"
            args = [sys.executable, str(REPO / "examples" / "record_columns.py"),
                    "-e", d.endpoint, *([how] if how else []), name]
            with subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                                  stderr=subprocess.DEVNULL, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}) as proc:
                try:
                    await trio.to_thread.run_sync(
                        wait_until,
                        lambda: status(d)["subscriptions"].get(topic_key(name), 0) >= 1,
                        "the example's subscription")
                    before = prod.produced_rb()
                    for _ in range(3):  # a second apart: the summary is printed each second
                        prod.run_rb(5)
                        await trio.sleep(0.6)
                    assert proc.stdout is not None
                    line = await trio.to_thread.run_sync(proc.stdout.readline)
                    if rows:
                        fields = dict(part.split("=") for part in line.split())
                        assert list(fields) == ["seq", "ts", "cpu", "tag"]
                        assert (fields["seq"], fields["tag"]) == (str(before), str(tag))
                    else:
                        assert "records/s, 0 lost" in line and f"tag {tag}..{tag}" in line
                finally:
                    proc.terminate()
                    proc.wait(10)
            await trio.to_thread.run_sync(
                wait_until, lambda: status(d)["subscriptions"].get(topic_key(name), 0) == 0,
                "the example gone")
    finally:
        prod.close()
