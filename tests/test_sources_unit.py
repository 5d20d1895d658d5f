"""Event sources without the kernel: config parsing, bcc field types, record batches."""

from __future__ import annotations

import struct

import pytest

from consumers.events import events_of
from consumers.recordsets import FormatterCache, MalformedRecords, RecordSet, record_formatter
from watcher.daemon.config import ConfigError, load_config
from watcher.daemon.sourceconf import SourceError, parse_cli_source, parse_source
from watcher.decode.layout import parse_layout
from watcher.kernel.prog.bccload import layout_from_bcc_fields
from watcher.wire import schema


def test_cli_source_specs():
    assert parse_cli_source("x.c") == {"program": "x.c"}
    assert parse_cli_source("dir/x.c:a,b") == {"program": "dir/x.c", "buffers": ["a", "b"]}
    assert parse_cli_source("x.c:events,drops=dropped,read_slice=64") == {
        "program": "x.c", "buffers": ["events"], "drops_map": "dropped", "read_slice": 64}
    assert parse_cli_source("/sys/fs/bpf/tc/rb") == {"pin": "/sys/fs/bpf/tc/rb"}
    assert parse_cli_source("/sys/fs/bpf/rb:kind=perf,page_cnt=8,name=x") == {
        "pin": "/sys/fs/bpf/rb", "kind": "perf", "page_cnt": 8, "name": "x"}
    with pytest.raises(SourceError, match="unknown option 'bogus'"):
        parse_cli_source("x.c:bogus=1")
    with pytest.raises(SourceError, match="a pin is one buffer"):
        parse_cli_source("/sys/fs/bpf/rb:events")


@pytest.mark.parametrize("raw, message", [
    ({}, "exactly one of"),
    ({"pin": "relative"}, "absolute path"),
    ({"pin": "/p", "kind": "queue"}, "kind must be"),
    ({"pin": "/p", "buffers": ["a"]}, "buffers is for programs"),
    ({"pin": "/p", "page_cnt": 6}, "power of two"),
    ({"pin": "/p", "read_slice": 0}, "read_slice must be an integer"),
    ({"pin": "/p", "wakeup_events": True}, "wakeup_events: expected an integer, got True"),
    ({"pin": "/p", "flush_interval": 0}, "flush_interval"),
    ({"pin": "/p", "drops_map": "relative"}, "pin path"),
    ({"pin": "/p", "layout": [{"name": "a", "type": "char[0]"}]}, "layout"),
    ({"pin": "/p", "extra": 1}, "unknown key 'extra'"),
])
def test_bad_source_tables(raw, message):
    with pytest.raises(SourceError, match=message) as e:
        parse_source(raw, "config: sources[0]")
    assert "\n" not in str(e.value)


def test_program_sources(tmp_path):
    prog = tmp_path / "p.c"
    prog.write_text("")
    src = parse_source({"program": "p.c", "buffers": ["events"], "drops_map": "dropped"},
                       "s", str(tmp_path))
    assert src.program == str(prog) and src.buffers == ["events"] and src.drops_map == "dropped"
    with pytest.raises(SourceError, match="is for pinned buffers"):
        parse_source({"program": str(prog), "kind": "perf"}, "s")
    with pytest.raises(SourceError, match="not a C table name"):
        parse_source({"program": str(prog), "buffers": ["a-b"]}, "s")
    conf = tmp_path / "pymap.toml"
    conf.write_text('[[sources]]\nprogram = "p.c"\nbuffers = ["x"]\n')
    with pytest.raises(ConfigError, match="also published by"):
        load_config(str(conf), sources=["/sys/fs/bpf/a/x"])


def test_pin_source_defaults_and_layout():
    src = parse_source({"pin": "/sys/fs/bpf/a/rb", "layout": [
        {"name": "pid", "type": "u32"}, {"name": "", "type": "pad[4]"},
        {"name": "addr", "type": "ipv4"}]}, "s")
    assert src.name == "rb" and src.kind is None and src.read_slice == 8192
    assert src.layout is not None
    assert src.layout["value_size"] == 12


def test_bcc_fields_become_a_layout_with_c_alignment():
    fields = ["ts#u64", "pid#u32", "flag#char", "port#__be16", "comm#char[16]",
              "v6#unsigned char[16]", "addr#pymap_ipv4", "big#unsigned long long",
              "e#enum foo", "last#u8"]
    layout = layout_from_bcc_fields(fields)
    spec = parse_layout({"match": "t", "value": layout})
    assert spec.value is not None
    offsets = {f.name: f.offset for f in spec.value.fields if f.name}
    # What a C compiler does with the same struct.
    assert offsets == {"ts": 0, "pid": 8, "flag": 12, "port": 14, "comm": 16, "v6": 32,
                       "addr": 48, "big": 56, "e": 64, "last": 68}
    assert spec.value.size == 72
    assert layout_from_bcc_fields(["x#struct inner"]) is None


def _batch(records: list[bytes], layout=None, seq=1, tseq=1) -> tuple:
    header = schema.RecordBatch(epoch="e", seq=seq, count=len(records), topic_seq=tseq,
                                time=1.0, map=schema.MapRef(7, "buf"), layout=layout)
    lengths = struct.pack(f"<{len(records)}I", *map(len, records))
    return schema.decode(schema.encode(header)), [lengths, b"".join(records)]


def test_record_batches_decode_per_record():
    layout = parse_layout({"match": "buf", "value": [
        {"name": "pid", "type": "u32"}, {"name": "comm", "type": "char[8]"}]}).spec
    recs = [struct.pack("<I8s", 10, b"bash"), struct.pack("<I8s4x", 11, b"sh"),
            struct.pack("<I", 12)]
    header, frames = _batch(recs, layout, seq=5, tseq=3)
    events = events_of(header, frames, FormatterCache())
    assert [(e.action, e.seq, e.topic_seq, e.value) for e in events] == [
        ("record", 5 + i, 3 + i, r) for i, r in enumerate(recs)]
    assert events[0].formatted == {"pid": 10, "comm": "bash"}
    assert events[1].formatted == {"pid": 11, "comm": "sh"}  # perf padding is ignored
    assert events[2].formatted == {"pid": 12, "_truncated": True}
    (batch,) = events_of(header, frames, record_batches=True)
    assert batch.records is not None
    assert batch.action == "records" and list(batch.records) == recs and batch.records[1] == recs[1]


def test_record_batches_without_layout_and_malformed():
    header, frames = _batch([b"ab", b"", b"cdef"])
    events = events_of(header, frames)
    assert [e.value for e in events] == [b"ab", b"", b"cdef"]
    assert all(e.formatted is None for e in events)
    with pytest.raises(MalformedRecords):
        RecordSet(2, struct.pack("<2I", 1, 1), b"abc")
    with pytest.raises(MalformedRecords):
        RecordSet(2, b"\0" * 4, b"")
    assert record_formatter({"match": "x", "value": [{"name": "a", "type": "u99"}]}) is None


def test_lost_records_message():
    msg = schema.decode(schema.encode(schema.LostRecords(
        epoch="e", seq=9, topic_seq=4, time=2.0, map=schema.MapRef(7, "buf"), lost=123,
        reason="producer")))
    (event,) = events_of(msg, [])
    assert (event.action, event.missed, event.reason, event.seq) == ("lost", 123, "producer", 9)


def test_status_reply_without_sources_still_parses():
    """An older daemon's status has no ``sources``: a newer client reads it as empty."""
    data = schema.converter.unstructure(schema.StatusReply(
        version="0", epoch="e", uptime=1, seq=0, messages_published=0, events_published=0,
        subscriptions={}, drops_reported=0, resyncs=0, poll_errors=0, watched=[]))
    data.pop("sources")
    data["kind"] = "status_reply"
    import orjson

    assert schema.decode(orjson.dumps(data)).sources == []


def test_cli_prints_records_and_losses():
    from consumers.cli.eventsout import event_json, event_line
    from consumers.events import Event

    ref = schema.MapRef(7, "buf")
    rec = Event("record", ref, seq=3, time=0.0, value=b"\x01\x02",
                formatted={"pid": 1, "comm": "sh"})
    assert event_json(rec, None, None) == {
        "seq": 3, "time": "1970-01-01T00:00:00.000000Z", "map": {"id": 7, "name": "buf"},
        "action": "record", "value": "0102", "formatted": {"pid": 1, "comm": "sh"}}
    lost = Event("lost", ref, seq=4, missed=96, reason="perf")
    doc = event_json(lost, None, None)
    assert (doc["action"], doc["missed"], doc["reason"]) == ("lost", 96, "perf")
    assert "pid=1 comm=sh" in event_line(event_json(rec, None, None))
    assert "96 records lost (perf ring full)" in event_line(doc)
    raw = Event("record", ref, seq=5, value=b"\xff")
    assert event_line(event_json(raw, None, None)).endswith(" ff")
