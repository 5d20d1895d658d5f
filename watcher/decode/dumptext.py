"""The JSON lines of a dump chunk, rendered for the whole chunk at once with numpy.

Why: a million-entry ``pymap get -o json`` spent most of its time in Python
doing the same thing per entry -- slice the hex, unpack the integers, fill a
template.  For the common shape of a map (not per-CPU; key and value each a
plain integer or a struct of byte-aligned plain integers, see
:meth:`watcher.decode.btf.Btf.flat_layout`) every line is the same template
with different hex and different numbers, so the chunk is rendered as one
byte matrix, a row per entry (watcher/decode/textrows.py): the template's
constant text, the key and value hex as columns of ``bytes.hex()`` of the whole
buffers, and each integer member as digit columns.  Lines are exactly what the per-entry path
in ``consumers/cli/render.py`` writes (tests/test_decode_chunks.py compares
them); anything else (per-CPU values, strings, enums, bools, floats, nesting)
takes that path.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any, NamedTuple

import numpy as np

from .textrows import Decimal, Part, RowMatrix, hex_column

__all__ = ["SEP", "Columns", "DumpLines", "columns", "dump_lines"]

_NP_INTS = {"b": "i1", "B": "u1", "h": "<i2", "H": "<u2", "i": "<i4", "I": "<u4",
            "l": "<i4", "L": "<u4", "q": "<i8", "Q": "<u8"}
_TOKEN = re.compile(r"(\d*)([a-zA-Z?])")
SEP = b",\n"  # before every line of a chunk; the writer drops the dump's first


class Columns(NamedTuple):
    """A flat side as numpy sees it: a structured dtype (one field per integer member,
    at its offset, itemsize the stride) and the members' JSON names (None: a scalar)."""

    dtype: np.dtype
    names: list[str] | None


def columns(flat: tuple[struct.Struct, list[str] | None] | None) -> Columns | None:
    """The :class:`Columns` of a flat layout (``Btf.flat_layout``), or None when a
    member is not an integer (bools and floats print differently from C's numbers)."""
    if flat is None:
        return None
    rows, names = flat
    fields: list[tuple[str, int]] = []
    at = 0
    for count, code in _TOKEN.findall(rows.format.lstrip("<")):
        n = int(count) if count else 1
        if code == "x":
            at += n
            continue
        if code not in _NP_INTS or n != 1:
            return None
        fields.append((_NP_INTS[code], at))
        at += struct.calcsize("<" + code)
    labels = names if names is not None else ["v"]
    if len(labels) != len(fields):
        return None
    dtype = np.dtype({"names": [f"f{i}" for i in range(len(fields))],
                      "formats": [f for f, _ in fields],
                      "offsets": [o for _, o in fields], "itemsize": rows.size})
    return Columns(dtype, names)


class _Plan:
    """One row under construction: text pieces and where each number goes."""

    def __init__(self) -> None:
        self.pieces: list[tuple[str, Any]] = []  # ("text", b"..."), ("key"|"value", None),
        # ("int", (side, field))

    def text(self, s: str | bytes) -> None:
        self.pieces.append(("text", s.encode() if isinstance(s, str) else s))

    def side(self, which: str, cols: Columns) -> None:
        if cols.names is None:
            self.pieces.append(("int", (which, "f0")))
            return
        for i, name in enumerate(cols.names):
            self.text(("{" if i == 0 else ",") + json.dumps(name) + ":")
            self.pieces.append(("int", (which, f"f{i}")))
        self.text("}")


class DumpLines:
    """Renders a chunk's JSON lines: ``{"key":"HEX","value":"HEX"}``, and with ``key_cols``
    and ``value_cols`` also ``"formatted":{"key":...,"value":...}`` from the integers."""

    def __init__(self, key_size: int, value_stride: int, key_cols: Columns | None = None,
                 value_cols: Columns | None = None):
        self.key_size, self.value_stride = key_size, value_stride
        self.key_cols, self.value_cols = key_cols, value_cols
        plan = _Plan()
        plan.text(SEP + b'{"key":"')
        plan.pieces.append(("key", None))
        plan.text('","value":"')
        plan.pieces.append(("value", None))
        if key_cols is not None and value_cols is not None:
            plan.text('","formatted":{"key":')
            plan.side("key", key_cols)
            plan.text(',"value":')
            plan.side("value", value_cols)
            plan.text("}}")
        else:
            plan.text('"}')
        self.pieces = _merge(plan.pieces)
        self._matrix = RowMatrix()  # one per dump: its chunks share the constant text

    @property
    def decoded(self) -> bool:
        return self.key_cols is not None

    def render(self, keys: bytes, values: bytes, count: int) -> str:
        """The chunk's lines, joined by ``,\\n`` (no separator before the first)."""
        return bytes(self.chunk(keys, values, count)[len(SEP):]).decode("ascii")

    def chunk(self, keys: bytes, values: bytes, count: int) -> bytes | bytearray | memoryview:
        """The chunk's lines as bytes, each after a ``,\\n`` (the first one's too); hex
        lines are a view of this renderer's matrix, valid until its next chunk.

        Bytes, not text, so that a writer hands them to the binary stdout as they are:
        decoding a million lines to str and the text layer encoding them back, with the
        joins around them, cost more than rendering them (measured, issue 20).  The
        separator comes with every line so that chunks follow each other as they are;
        the writer drops the very first one.
        """
        if count == 0:
            return b""
        sides = {"key": (keys, self.key_size, self.key_cols),
                 "value": (values, self.value_stride, self.value_cols)}
        parts: list[Part] = []
        for kind, arg in self.pieces:
            if kind == "text":
                parts.append(arg)
            elif kind in sides:
                buf, size, _ = sides[kind]
                parts.append(hex_column(buf, size, count))
            else:
                which, field = arg
                buf, _, cols = sides[which]
                assert cols is not None
                parts.append(Decimal(np.frombuffer(buf, cols.dtype, count)[field]))
        return self._matrix.render(parts, count)


def _merge(pieces: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Adjacent text pieces as one."""
    out: list[tuple[str, Any]] = []
    for kind, arg in pieces:
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + arg)
        else:
            out.append((kind, arg))
    return out


def dump_lines(percpu: bool, key_size: int, value_stride: int, formatter: Any
               ) -> DumpLines | None:
    """The whole-chunk renderer for a map's dump, or None when the per-entry path must
    render it (per-CPU values, or a decoder whose output is not flat integers).

    ``formatter`` is the chosen entry formatter (None: hex only); it offers
    ``flat_layouts`` (key, value) when both sides read as one unpack (choose.py).
    """
    if percpu:
        return None
    if formatter is None:
        return DumpLines(key_size, value_stride)
    flats = getattr(formatter, "flat_layouts", None)
    if flats is None:
        return None
    key_cols, value_cols = columns(flats[0]), columns(flats[1])
    if key_cols is None or value_cols is None:
        return None
    return DumpLines(key_size, value_stride, key_cols, value_cols)
