"""Buffer records on the consumer side: splitting a batch, decoding a record.

A ``records`` message carries a batch as two frames (u32 lengths, then the
records back to back) and, in its header, the record layout in the declared
layout vocabulary (watcher/decode/layout.py).  Decoding happens here, in the
subscriber, so the daemon does no per-record work for anyone; a subscriber
that only counts or forwards records can use :class:`RecordSet` and never
touch a record individually.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import orjson

from watcher.decode.layout import LayoutError, parse_layout
from watcher.wire import schema

RecordFormatter = Callable[[bytes], dict]


class MalformedRecords(ValueError):
    """A records message whose frames do not match its header."""


class RecordSet:
    """The records of one batch, without a Python object per record until asked."""

    def __init__(self, count: int, lengths: bytes, data: bytes):
        if len(lengths) != 4 * count:
            raise MalformedRecords(f"{count} records but {len(lengths)} bytes of lengths")
        self.count = count
        self.lengths = np.frombuffer(lengths, dtype="<u4")
        self.data = data
        ends = np.cumsum(self.lengths, dtype=np.int64)
        if count and int(ends[-1]) != len(data):
            raise MalformedRecords(f"lengths add up to {int(ends[-1])} bytes, data has {len(data)}")
        self.offsets = ends - self.lengths

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> bytes:
        start = int(self.offsets[i])
        return self.data[start:start + int(self.lengths[i])]

    def __iter__(self) -> Iterator[bytes]:
        data = self.data
        for start, length in zip(self.offsets.tolist(), self.lengths.tolist()):
            yield data[start:start + length]


def record_formatter(layout: dict | None) -> RecordFormatter | None:
    """A function record bytes -> {field: value}, from a batch's layout; None: hex only.

    A record shorter than the layout gets the fields that fit and
    ``"_truncated": true``; longer records (perf pads records to 8 bytes)
    decode their first bytes.
    """
    if not layout or not layout.get("value"):
        return None
    try:
        side = parse_layout(layout).value
    except LayoutError:
        return None
    if side is None:
        return None
    fields = [(f.name, f.decode, f.offset, f.offset + f.size) for f in side.fields
              if f.decode is not None]
    size = side.size

    def decode(record: bytes) -> dict:
        if len(record) >= size:
            return {name: fn(record, off) for name, fn, off, _ in fields}
        out = {name: fn(record, off) for name, fn, off, end in fields if end <= len(record)}
        out["_truncated"] = True
        return out

    return decode


class FormatterCache:
    """One formatter per (buffer, layout): layouts repeat in every batch header."""

    def __init__(self):
        self._cache: dict[tuple[str, bytes], RecordFormatter | None] = {}

    def get(self, name: str, layout: dict | None) -> RecordFormatter | None:
        if not layout:
            return None
        key = (name, orjson.dumps(layout, option=orjson.OPT_SORT_KEYS))
        if key not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = record_formatter(layout)
        return self._cache[key]


def record_set(batch: schema.RecordBatch, frames: list[bytes]) -> RecordSet:
    if len(frames) != 2:
        raise MalformedRecords(f"a records message has 2 frames after its header, not {len(frames)}")
    return RecordSet(batch.count, frames[0], frames[1])
