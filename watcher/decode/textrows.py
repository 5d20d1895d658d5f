"""Many lines of one template at once: a byte matrix, a row per line, built column-wise.

Why: rendering a million dump entries, or the thousands of events of one
exporter message, one line at a time costs Python work per line.  When the
lines differ only in fixed-width hex and in integers, numpy builds them all
at once:

* the template's constant text is broadcast into every row;
* hex parts are columns of one ``bytes.hex()`` of the whole buffer;
* an integer column takes as many cells as its largest magnitude needs
  (:class:`Decimal`: a divide by 100 and a table look-up per digit pair),
  with NUL in the cells of leading zeros and of the sign of a non-negative
  number;
* the matrix is written out row-major, and one C-level ``bytes.replace``
  deletes the NULs.

Used by watcher/decode/dumptext.py (``pymap get -o json``) and by the
exporter's batch templates (consumers/export/formats/batch.py).  The constant
text must hold no NUL (callers check).
"""

from __future__ import annotations

import binascii

import numpy as np

__all__ = ["Decimal", "Part", "RowMatrix", "hex_column", "render_rows"]


def _pair_table() -> np.ndarray:
    """Two digit characters per uint16 (tens first in memory), indexed by ``r + 100 * k``:
    k=0 a pair with digits above it (``07``), k=1 the leading pair (``\\0 7``, ``\\0\\0``
    for 0), k=2 the leading pair that is also the units pair (``\\0 0`` for 0)."""
    cells = []
    for k in range(3):
        for r in range(100):
            tens, units = divmod(r, 10)
            text = bytes([48 + tens, 48 + units])
            if k and r < 10:
                text = b"\0" + (text[1:] if r or k == 2 else b"\0")
            cells.append(text)
    return np.frombuffer(b"".join(cells), "<u2")


_PAIRS = _pair_table()


class Decimal:
    """A column of integers as decimal text in fixed-width cells: a sign character (signed
    types) and as many digit cells as the column's largest magnitude needs.  Unused
    cells (leading zeros, the sign of a non-negative number) are NUL, deleted from the
    text afterwards in one C-level ``bytes.replace`` (none when every number of the
    column has as many digits: a batch's sequence numbers).  Digits go two at a time
    (a divide by 100 and a look-up per pair): half the passes over the column; an odd
    count's leading digit alone."""

    def __init__(self, column: np.ndarray):
        self.negative = None
        if column.dtype.kind == "i":
            wide = column.astype(np.int64)
            self.negative = wide < 0
            magnitude = np.where(self.negative, -wide, wide).view(np.uint64)  # -(-2**63) wraps
        else:
            magnitude = column.astype(np.uint64)
        digits = len(str(int(magnitude.max())))
        self.pairs, self.single = divmod(digits, 2)
        if digits <= 9:
            magnitude = magnitude.astype(np.uint32)  # a 32-bit divide is the cheaper one
        self.magnitude = magnitude
        self.width = digits + (self.negative is not None)

    def write(self, cells: np.ndarray) -> None:
        if self.negative is not None:
            cells[:, 0] = self.negative * np.uint8(ord("-"))
            cells = cells[:, 1:]
        pairs = cells[:, self.single:].view("<u2")  # unaligned is fine: last axis contiguous
        q = self.magnitude
        word = q.dtype.type
        for p in range(self.pairs - 1, -1, -1):
            # floor_divide by a scalar has numpy's fast path and divmod has not, and take
            # beats fancy indexing: together 0.67 ms a 16K chunk of 5 columns instead of
            # 1.06 (best of 15 runs); writing all pairs at once was slower.
            above = q // word(100)
            index = q - above * word(100)  # this pair, 0-99
            index += (above == 0) * word(200 if p == self.pairs - 1 else 100)  # units: table 2
            pairs[:, p] = np.take(_PAIRS, index, mode="clip")
            q = above
        if self.single:  # what is left: one digit, shown unless a leading zero
            cells[:, 0] = q + ord("0") if not self.pairs else (q + ord("0")) * (q > 0)


Part = bytes | np.ndarray | Decimal  # constant text, a (rows, width) column, numbers


def hex_column(buf: bytes, size: int, count: int) -> np.ndarray:
    """The hex of ``count`` items of ``size`` bytes each, as a (count, 2*size) column.

    ``binascii.hexlify`` gives the bytes at once: ``bytes.hex()`` and encoding its str
    copy the text once more (half the time of a dump chunk's hex, measured)."""
    hexed = np.frombuffer(binascii.hexlify(memoryview(buf)[:count * size]), np.uint8)
    return hexed.reshape(count, 2 * size)


def _widths(parts: list[Part]) -> list[int]:
    return [len(p) if isinstance(p, bytes) else p.width if isinstance(p, Decimal)
            else p.shape[1] for p in parts]


def _blank(parts: list[Part], widths: list[int]) -> np.ndarray:
    """A row of the constant text (``parts``' bytes), zeros elsewhere."""
    blank = np.zeros(sum(widths), np.uint8)
    at = 0
    for w, part in zip(widths, parts):
        if isinstance(part, bytes):
            blank[at:at + w] = np.frombuffer(part, np.uint8)
        at += w
    return blank


def _fill(rows: np.ndarray, parts: list[Part], widths: list[int]) -> None:
    """The variable columns of ``rows``: hex columns copied, numbers written."""
    at = 0
    for w, part in zip(widths, parts):
        if isinstance(part, Decimal):
            part.write(rows[:, at:at + w])
        elif isinstance(part, np.ndarray):
            rows[:, at:at + w] = part
        at += w


def render_rows(parts: list[Part], count: int) -> bytes:
    """``count`` rows, each the concatenation of ``parts``, back to back."""
    widths = _widths(parts)
    rows = np.empty((count, sum(widths)), np.uint8)
    rows[:] = _blank(parts, widths)  # the constant text, broadcast into every row at once
    _fill(rows, parts, widths)
    text = rows.tobytes()
    if b"\0" in text:  # cells a Decimal left unused (memchr: cheap when there are none)
        text = text.replace(b"\0", b"")
    return text


class RowMatrix:
    """Renders rows of one template again and again into one matrix it keeps.

    Why keep it: a dump renders its chunks one after the other, all with the same
    template, and a fresh matrix each time meant its memory and the constant text
    written again for every chunk.  The matrix is kept while the row layout (each
    part's width and the constant text) stays the same, and grown when a render has
    more rows; the constant text is written only then.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()  # the matrix's memory: rows of text back to back
        self._rows: np.ndarray | None = None
        self._layout: tuple | None = None

    def render(self, parts: list[Part], count: int) -> bytearray | memoryview:
        """``count`` rows, each the concatenation of ``parts``, back to back.

        Unless a :class:`Decimal` left cells unused, this is a view of the kept matrix,
        valid until the next call: write it out or copy it before rendering again.  The
        matrix lies in a bytearray, so that deleting those cells (NUL) reads it in
        place instead of a copy first (``tobytes``).
        """
        widths = _widths(parts)
        layout = tuple((w, p if isinstance(p, bytes) else None) for w, p in zip(widths, parts))
        if self._rows is None or self._layout != layout or len(self._rows) < count:
            self._buffer = bytearray(count * sum(widths))
            self._rows = np.frombuffer(self._buffer, np.uint8).reshape(count, sum(widths))
            self._rows[:] = _blank(parts, widths)
            self._layout = layout
        rows = self._rows[:count]
        _fill(rows, parts, widths)
        size = rows.size
        if any(isinstance(p, Decimal) for p in parts) and self._buffer.find(b"\0", 0, size) >= 0:
            whole = self._buffer if size == len(self._buffer) else self._buffer[:size]
            return whole.replace(b"\0", b"")
        return memoryview(self._buffer)[:size]
