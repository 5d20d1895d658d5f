"""Buffer records on the consumer side: splitting a batch, decoding a record.

A ``records`` message carries a batch as two frames (u32 lengths, then the
records back to back) and, in its header, the record layout in the declared
layout vocabulary (watcher/decode/layout.py).  Decoding happens here, in the
subscriber, so the daemon does no per-record work for anyone; a subscriber
that only counts or forwards records can use :class:`RecordSet` and never
touch a record individually.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from itertools import islice

import numpy as np
import orjson

from watcher.decode.layout import Field, LayoutError, Side, parse_layout
from watcher.wire import schema

RecordFormatter = Callable[[bytes], dict]


class MalformedRecords(ValueError):
    """A records message whose frames do not match its header."""


class ShortRecords(ValueError):
    """Records shorter than their layout: no fixed-layout array; decode them one by one."""


def _column_format(f: Field) -> str | tuple[str, tuple[int]]:
    """The numpy type of a field's column: the raw value, no names or text."""
    kind = f.type.split("[", 1)[0]
    if kind in ("u8", "u16", "u32", "u64"):
        return f"<u{f.size}"
    if kind in ("s8", "s16", "s32", "s64"):
        return f"<i{f.size}"
    if kind in ("be16", "be32", "be64", "ipv4"):
        return f">u{f.size}"
    if kind == "bool":
        return "u1"
    if kind == "char":
        return f"S{f.size}"
    return ("u1", (f.size,))  # bytes[N], ipv6, mac


class RecordLayout:
    """A batch header's layout compiled once: a numpy dtype for the columns and
    the per-record decoding behind ``Event.formatted``.

    Why both: a column (``RecordSet.columns``) is what a consumer of millions of
    records a second can afford, a NumPy view of the received bytes; the decoded
    dict (names for enums, text for addresses) is what a person reads.  The rows
    are decoded per *field* for the whole batch (one ``tolist`` per column), not per
    record, so even the dicts cost a fraction of decoding each record alone.
    """

    def __init__(self, side: Side):
        self.side = side
        self.size = side.size
        self.fields = tuple(f for f in side.fields if f.decode is not None)
        self.names = tuple(f.name for f in self.fields)
        self._columns = [_column_format(f) for f in self.fields]
        # Rows: plain integers straight from NumPy; everything else as the field's
        # bytes (a void column) through the field's own decoder.
        self._plain = [f.type in _PLAIN_INTS and not f.values for f in self.fields]
        self._row_formats = [c if plain else f"V{f.size}"
                             for c, f, plain in zip(self._columns, self.fields, self._plain)]
        self._dtypes: dict[tuple[bool, int], np.dtype] = {}

    def dtype(self, itemsize: int | None = None, rows: bool = False) -> np.dtype:
        """The records' structured dtype; ``itemsize``: the records' length (perf pads)."""
        key = (rows, itemsize or self.size)
        if key not in self._dtypes:
            self._dtypes[key] = np.dtype({
                "names": list(self.names),
                "formats": self._row_formats if rows else self._columns,
                "offsets": [f.offset for f in self.fields], "itemsize": key[1]})
        return self._dtypes[key]

    def format(self, record: bytes) -> dict:
        """One record's fields; a short record gets those that fit and ``_truncated``."""
        if len(record) >= self.size:
            return {f.name: f.decode(record, f.offset) for f in self.fields}  # type: ignore[misc]
        out = {f.name: f.decode(record, f.offset) for f in self.fields  # type: ignore[misc]
               if f.offset + f.size <= len(record)}
        out["_truncated"] = True
        return out

    def rows(self, array: np.ndarray) -> list[tuple]:
        """Each record's decoded fields in layout order, from a ``rows=True`` array."""
        if all(self._plain):
            return array.tolist()
        return list(zip(*self._decoded_columns(array)))

    def dict_chunks(self, array: np.ndarray, size: int) -> Iterator[list[dict]]:
        """Each record's ``Event.formatted`` dict, from a ``rows=True`` array, ``size``
        records at a time (the last chunk may be shorter): each field decoded once for the
        whole array, each chunk's dicts made when asked.

        Built from the decoded columns by one comprehension with a dict display per
        record: no tuple per record (``zip`` reuses its result tuple), a third of
        ``dict(zip(names, row))``'s time, which matters at millions of records a second.
        """
        if not self.fields:
            for start in range(0, len(array), size):
                yield [{} for _ in range(min(size, len(array) - start))]
            return
        rows = zip(*self._decoded_columns(array))
        build = _dict_builder(len(self.fields))(*self.names)
        for _ in range(0, len(array), size):
            yield build(islice(rows, size))

    def _decoded_columns(self, array: np.ndarray) -> list[list]:
        columns = []
        for f, plain in zip(self.fields, self._plain):
            values = array[f.name].tolist()
            if not plain:
                decode = f.decode
                values = [decode(v, 0) for v in values]  # type: ignore[misc]
            columns.append(values)
        return columns


@functools.cache
def _dict_builder(n: int) -> Callable[..., Callable[[Iterator[tuple]], list[dict]]]:
    """names -> (rows -> one dict per row) for ``n`` fields, compiled once per ``n``.

    Why generated: a dict display needs its keys written out, and ``n`` varies.
    The source depends on ``n`` alone; the names (from the daemon's layout) are
    arguments, never part of the source.
    """
    keys = ", ".join(f"k{i}" for i in range(n))
    values = ", ".join(f"v{i}" for i in range(n))
    pairs = ", ".join(f"k{i}: v{i}" for i in range(n))
    source = f"lambda {keys}: lambda rows: [{{{pairs}}} for {values}, in rows]"
    return eval(source)  # noqa: S307  # source built from n only, see above


_PLAIN_INTS = ("u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "be16", "be32", "be64")


class RecordSet:
    """The records of one batch, without a Python object per record until asked.

    ``layout``: the batch's compiled layout (None: no layout, raw bytes only).
    ``array``/``columns`` are NumPy views of the received data (no copy when the
    records have one length, as a fixed struct's do); ``rows`` and ``formatted``
    decode a whole batch field by field.
    """

    def __init__(self, count: int, lengths: bytes, data: bytes,
                 layout: RecordLayout | None = None):
        if len(lengths) != 4 * count:
            raise MalformedRecords(f"{count} records but {len(lengths)} bytes of lengths")
        self.count = count
        self.lengths = np.frombuffer(lengths, dtype="<u4")
        self.data = data
        self.layout = layout
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
        """Each record's bytes (:meth:`raw`)."""
        return iter(self.raw())

    def raw(self, start: int = 0) -> list[bytes]:
        """Each record's bytes, from record ``start`` on.  Records of one length (a fixed
        struct: the usual case) are cut by NumPy in C, a void item per record, ~6x faster
        than a Python slice each: the per-record events' ``value`` comes from here."""
        if self.count and int(self.lengths.min()) == int(self.lengths.max()) > 0:
            size = int(self.lengths[0])
            return np.frombuffer(self.data, f"V{size}", self.count)[start:].tolist()
        data = self.data
        return [data[at:at + length] for at, length in zip(self.offsets[start:].tolist(),
                                                            self.lengths[start:].tolist())]

    @property
    def names(self) -> tuple[str, ...]:
        """The layout's field names, in order (the order of :meth:`rows`)."""
        return self.layout.names if self.layout is not None else ()

    def array(self, rows: bool = False) -> np.ndarray:
        """The records as a NumPy structured array, one element per record.

        A read-only view of the message's data when every record has the same
        length (a fixed struct: ring buffers, perf's padded records); a copy of
        each record's layout-sized prefix otherwise.  Raises ValueError without a
        layout, ShortRecords when a record is shorter than the layout.
        """
        layout = self.layout
        if layout is None:
            raise ValueError("these records have no layout: raw bytes only")
        if not self.count:
            return np.zeros(0, layout.dtype(rows=rows))
        shortest, longest = int(self.lengths.min()), int(self.lengths.max())
        if shortest < layout.size:
            raise ShortRecords(f"a record of {shortest} bytes, the layout has {layout.size}")
        if shortest == longest:
            return np.frombuffer(self.data, layout.dtype(shortest, rows), self.count)
        raw = np.frombuffer(self.data, np.uint8)
        prefixes = raw[self.offsets[:, None] + np.arange(layout.size)]
        return prefixes.view(layout.dtype(rows=rows)).reshape(self.count)

    def columns(self) -> dict[str, np.ndarray]:
        """Field name -> that field's values as a NumPy array (see :meth:`array`).

        Raw values: integers (network-order fields and IPv4 addresses already
        converted), bool as its byte (0: false), char[N] as bytes, bytes[N]/IPv6/MAC as N uint8s;
        enum names and address text are what :meth:`rows` adds.
        """
        arr = self.array()
        return {name: arr[name] for name in self.names}

    def rows(self) -> list[tuple]:
        """Each record's fields as a tuple in :attr:`names` order, decoded exactly as
        ``Event.formatted`` decodes them (enum names, text), a batch at a time."""
        assert self.layout is not None  # array() raises first
        return self.layout.rows(self.array(rows=True))

    def formatted(self) -> list[dict] | None:
        """Each record's ``Event.formatted`` dict (None without a layout)."""
        chunks = self.formatted_chunks(max(len(self), 1))  # the whole batch: one chunk
        return None if chunks is None else next(chunks, [])

    def formatted_chunks(self, size: int, start: int = 0) -> Iterator[list[dict]] | None:
        """:meth:`formatted` from record ``start`` on, ``size`` records at a time (None
        without a layout), each chunk made when asked: RecordEvents' parts."""
        layout = self.layout
        if layout is None:
            return None
        try:
            array = self.array(rows=True)
        except ShortRecords:
            dicts = [layout.format(r) for r in self.raw(start)]
            return (dicts[at:at + size] for at in range(0, len(dicts), size))
        return layout.dict_chunks(array[start:], size)


def record_layout(layout: dict | None) -> RecordLayout | None:
    """A batch header's layout compiled, or None: no value layout (or one this
    client cannot read), so records stay raw bytes."""
    if not layout or not layout.get("value"):
        return None
    try:
        side = parse_layout(layout).value
    except LayoutError:
        return None
    return RecordLayout(side) if side is not None else None


def record_formatter(layout: dict | None) -> RecordFormatter | None:
    """A function record bytes -> {field: value}, from a batch's layout; None: hex only.

    A record shorter than the layout gets the fields that fit and
    ``"_truncated": true``; longer records (perf pads records to 8 bytes)
    decode their first bytes.
    """
    compiled = record_layout(layout)
    return compiled.format if compiled is not None else None


class FormatterCache:
    """One compiled layout per (buffer, layout): layouts repeat in every batch header."""

    def __init__(self):
        self._cache: dict[tuple[str, bytes], RecordLayout | None] = {}

    def layout(self, name: str, layout: dict | None) -> RecordLayout | None:
        if not layout:
            return None
        key = (name, orjson.dumps(layout, option=orjson.OPT_SORT_KEYS))
        if key not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = record_layout(layout)
        return self._cache[key]

    def get(self, name: str, layout: dict | None) -> RecordFormatter | None:
        compiled = self.layout(name, layout)
        return compiled.format if compiled is not None else None


def record_set(batch: schema.RecordBatch, frames: list[bytes],
               layout: RecordLayout | None = None) -> RecordSet:
    if len(frames) != 2:
        raise MalformedRecords(f"a records message has 2 frames after its header, not {len(frames)}")
    return RecordSet(batch.count, frames[0], frames[1], layout)
