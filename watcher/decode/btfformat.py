"""BTF value formatters: map bytes formatted as bpftool does, compiled once per type.

Why compiled: a dump may hold a million entries, so formatting has to be built once
per type -- one ``struct.Struct`` unpack plus a generated expression per value --
rather than a walk over the type graph for every value.  Parsing the blob is
:mod:`watcher.decode.btf`'s job; this module only reads the parsed type graph.

The output is what ``bpftool -j map dump`` prints in ``formatted`` (rules from
bpftool's ``btf_dumper.c``), so pymap's JSON and bpftool's agree:

* 8/16/32/64-bit ints are numbers, signed or not as encoded; plain ``char``
  is a signed int, so a number too.  ``bool`` is true/false; a BTF ``CHAR``
  int (clang never emits one) is a one-character string.
* 128-bit ints, bitfields and ints of any other width are hex strings
  (``"0x1f"``), always unsigned -- even a signed bitfield.
* Enums give the enumerator's name, else the number.  As in bpftool the bytes
  are read signed and compared with the 32-bit enumerator values whatever
  the enum's signedness, so an unnamed 0xffffffff in an unsigned enum is -1.
* Pointers are unsigned numbers.
* Structs and unions are objects with every member in order; an anonymous
  member's name is ``""`` (a second one replaces the first, exactly what
  ``json.loads`` does to bpftool's output).
* Arrays are lists, except an array of ``char`` (through const/volatile,
  not through a typedef) holding printable ASCII up to a NUL: a string.
* ``VAR`` is ``{name: value}``, ``DATASEC`` ``{section: [values]}``
  (global-data maps).

Known differences: bpftool's JSON writer prints a backslash inside a string
as ``\\n``; here it stays a backslash.

Where bpftool gives up (it prints ``(unsupported-kind)`` and its JSON breaks):
``FLOAT`` becomes a Python float (wider floats a hex string); void, ``FWD``
and functions raise :class:`BtfError` when the formatter is built.
Little-endian hosts only, like every architecture pymap knows the syscall
number of.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import Any

from watcher.kernel.btf.blob import BtfError, Kind

from .btftypes import (
    INT_BOOL,
    INT_CHAR,
    INT_SIGNED,
    MAX_DEPTH,
    MODIFIERS,
    PTR_CODE,
    BtfType,
    Formatter,
    TypeGraph,
    signed,
)


def compile_formatter(btf: TypeGraph, type_id: int) -> Formatter:
    """``f(data, offset=0)`` -> the value of ``type_id`` at ``data[offset:]``, as bpftool
    formats it; raises :class:`BtfError` when the type cannot be formatted."""
    return _Compiler(btf).function(type_id, check=True)


def flat_layout(btf: TypeGraph, type_id: int, stride: int
                ) -> tuple[struct.Struct, list[str] | None] | None:
    """How to read values of the type with one ``struct`` unpack, or None.

    Returns the ``Struct`` (one value per ``stride`` bytes) and the member
    names (None for a plain scalar).  Offered only where a single unpack
    gives exactly what :func:`compile_formatter` gives: a plain scalar, or a struct
    of byte-aligned plain scalar members (no bitfields, enums, arrays or
    nesting) -- the shape of most counters and flow tables.
    """
    comp = _Compiler(btf)
    try:
        size = btf.size_of(type_id)
    except BtfError:
        return None
    if stride < size:
        return None
    tail = f"{stride - size}x" if stride > size else ""
    code = comp.scalar_code(type_id)
    if code is not None:
        return struct.Struct(f"<{code}{tail}"), None
    t = btf.type(btf.resolve(type_id))
    if t.kind != Kind.STRUCT or not t.detail:
        return None
    fmt, names, pos = "<", [], 0
    for m in t.detail:
        code = comp.scalar_code(m.type)
        if code is None or m.bitfield_size or m.bit_offset % 8 or m.bit_offset // 8 < pos:
            return None
        off = m.bit_offset // 8
        fmt += (f"{off - pos}x" if off > pos else "") + code
        names.append(m.name)
        pos = off + struct.calcsize(f"<{code}")
    fmt += (f"{t.size - pos}x" if t.size > pos else "") + tail
    rows = struct.Struct(fmt)
    return (rows, names) if rows.size == stride else None


class _Leaf:
    """One fixed-width read: ``count`` items of struct ``code`` at ``offset``.

    Code ``s`` is one item, ``count`` raw bytes (a char array, judged per value).
    """

    __slots__ = ("offset", "code", "count", "items", "end", "ref")

    def __init__(self, offset: int, code: str, count: int):
        self.offset, self.code, self.count = offset, code, count
        self.items = 1 if code == "s" else count
        self.end = offset + struct.calcsize(f"<{count}{code}")
        self.ref = ""


_INT_CODES = {(8, False): "B", (16, False): "H", (32, False): "I", (64, False): "Q",
              (8, True): "b", (16, True): "h", (32, True): "i", (64, True): "q"}
_UNSIGNED_BY_SIZE = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SIGNED_BY_SIZE = {1: "b", 2: "h", 4: "i", 8: "q"}
_FLOAT_CODES = {2: "e", 4: "f", 8: "d"}
_PRINTABLE = bytes(range(0x20, 0x7F))
_MAX_SIZE = 1 << 26  # bytes (and elements) of one value; the kernel caps values far lower
_UNROLL = 64  # leaves an array may unroll into before it becomes a loop over a sub-function


def _short(data, offset: int, need: int) -> None:
    raise BtfError(f"value needs {need} bytes, got {len(data) - offset}")


class _Compiler:
    """Turns a type into Python source: unpack every fixed field at once, build the value.

    A node is a zero-argument callable rendering its expression; it is called
    once the leaves are laid out into ``struct.Struct`` layers (overlapping
    leaves -- union members, bitfield units -- go to separate layers).  Arrays
    too big to unroll become a comprehension over ``iter_unpack`` or, when an
    element needs more than one struct, calls to a sub-function per element.
    Char arrays are unpacked as raw bytes and judged string-or-list per value.
    """

    def __init__(self, btf: TypeGraph):
        self.btf = btf
        self.ns: dict[str, Any] = {"_short": _short, "_ifb": int.from_bytes}
        self.names = itertools.count()
        self.subs: dict[Any, tuple[str, int]] = {}  # compiled helpers: name, bytes read
        self.leaves: dict[tuple[int, str, int], _Leaf] = {}
        self.need = self.top_size = 0
        self.dynamic = False  # the expression reads `d` itself, not only unpacked fields

    def const(self, value: Any) -> str:
        name = f"_c{next(self.names)}"
        self.ns[name] = value
        return name

    def function(self, type_id: int, check: bool) -> Callable:
        size = self.btf.size_of(type_id)
        if size > _MAX_SIZE:
            raise BtfError(f"type {type_id} is {size} bytes: too big for a map value")
        return self.build(lambda: self.node(type_id, 0, 0, 0), size, check, f"type {type_id}")[0]

    def build(self, make_node: Callable[[], Callable[[], str]], size: int, check: bool,
              label: str) -> tuple[Callable, int]:
        """Compile ``make_node()`` into ``f(d, o=0)``; returns it and the bytes it reads."""
        saved = self.leaves, self.need, self.top_size, self.dynamic
        self.leaves, self.need, self.top_size, self.dynamic = {}, size, size, False
        try:
            node = make_node()
            lines = ["def _f(d, o=0):"]
            if check:
                lines.append(f"    if len(d) < o + {self.need}: _short(d, o, {self.need})")
            for j, (fmt, start) in enumerate(self.layout()):
                unpack = self.const(struct.Struct(fmt).unpack_from)
                lines.append(f"    v{j} = {unpack}(d, o + {start})" if start
                             else f"    v{j} = {unpack}(d, o)")
            lines.append(f"    return {node()}")
            exec(compile("\n".join(lines), f"<btf {label}>", "exec"), self.ns)
            return self.ns.pop("_f"), self.need
        finally:
            self.leaves, self.need, self.top_size, self.dynamic = saved

    def rows(self, elem: int, size: int, depth: int) -> tuple[str, str] | None:
        """``(iter_unpack, row expression over v0)`` when one struct reads a whole element.

        Then an array of them is a comprehension over ``iter_unpack``: no call per element.
        """
        saved = self.leaves, self.need, self.top_size, self.dynamic
        self.leaves, self.need, self.top_size, self.dynamic = {}, size, size, False
        try:
            node = self.node(elem, 0, 0, depth + 1)
            layers = self.layout()
            if self.dynamic or len(layers) != 1 or self.need > size or size == 0:
                return None
            fmt, start = layers[0]
            fmt = f"<{start}x{fmt[1:]}{size - struct.calcsize(fmt) - start}x"
            return self.const(struct.Struct(fmt).iter_unpack), node()
        finally:
            self.leaves, self.need, self.top_size, self.dynamic = saved

    def layout(self) -> list[tuple[str, int]]:
        """Lay the leaves out in non-overlapping layers; set their refs; (format, offset) each."""
        layers: list[list[_Leaf]] = []
        for leaf in sorted(self.leaves.values(), key=lambda leaf: (leaf.offset, -leaf.end)):
            layer = next((la for la in layers if la[-1].end <= leaf.offset), None)
            if layer is None:
                layers.append(layer := [])
            layer.append(leaf)
        formats = []
        for j, layer in enumerate(layers):
            fmt, at, items = "<", layer[0].offset, 0
            for leaf in layer:
                fmt += f"{leaf.offset - at}x" if leaf.offset > at else ""
                fmt += f"{leaf.count if leaf.count > 1 or leaf.code == 's' else ''}{leaf.code}"
                leaf.ref = (f"v{j}[{items}]" if leaf.items == 1
                            else f"list(v{j}[{items}:{items + leaf.items}])")
                at, items = leaf.end, items + leaf.items
            formats.append((fmt, layer[0].offset))
        return formats

    def leaf(self, offset: int, code: str, count: int = 1) -> _Leaf:
        leaf = self.leaves.get((offset, code, count))
        if leaf is None:
            leaf = self.leaves[offset, code, count] = _Leaf(offset, code, count)
            self.need = max(self.need, leaf.end)
        return leaf

    def node(self, type_id: int, off: int, bit: int, depth: int) -> Callable[[], str]:
        """The expression for the value of ``type_id`` at byte ``off`` (+ ``bit`` bits)."""
        if depth > MAX_DEPTH:
            raise BtfError(f"type {type_id}: nested too deep (a loop?)")
        t = self.btf.type(type_id)
        k = t.kind
        if k in MODIFIERS or k == Kind.TYPEDEF:
            return self.node(t.type, off, bit, depth + 1)
        if k == Kind.INT:
            return self.int_node(type_id, t, off, bit)
        if k == Kind.PTR:
            leaf = self.leaf(off, PTR_CODE)
            return lambda: leaf.ref
        if k in (Kind.ENUM, Kind.ENUM64):
            code = "q" if k == Kind.ENUM64 else _SIGNED_BY_SIZE.get(t.size)
            if code is None:
                raise BtfError(f"type {type_id}: enum of {t.size} bytes")
            names: dict[int, str] = {}
            for name, value in t.detail:  # compared as bpftool does: signed, first match wins
                bits = 64 if k == Kind.ENUM64 else 32
                names.setdefault(signed(value & ((1 << bits) - 1), bits), name)
            leaf = self.leaf(off, code)
            if not names:
                return lambda: leaf.ref
            table = self.const(names)
            return lambda: f"{table}.get({leaf.ref}, {leaf.ref})"
        if k == Kind.FLOAT:
            code = _FLOAT_CODES.get(t.size)
            if code is None:  # long double: no Python type holds it
                return self.bitfield(off, 0, t.size * 8, 0)
            leaf = self.leaf(off, code)
            return lambda: leaf.ref
        if k in (Kind.STRUCT, Kind.UNION):
            parts = []
            for m in t.detail:
                at = off + m.bit_offset // 8
                if m.bitfield_size:  # bpftool prints these raw, whatever the member's type
                    unit = self.btf.type(self.btf.resolve(m.type)).size
                    sub = self.bitfield(at, m.bit_offset % 8, m.bitfield_size, unit)
                else:
                    sub = self.node(m.type, at, m.bit_offset % 8, depth + 1)
                parts.append((repr(m.name), sub))
            return lambda: "{" + ", ".join(f"{n}: {sub()}" for n, sub in parts) + "}"
        if k == Kind.ARRAY:
            return self.array_node(t, off, depth)
        if k == Kind.VAR:
            sub = self.node(t.type, off, bit, depth + 1)
            return lambda: f"{{{t.name!r}: {sub()}}}"
        if k == Kind.DATASEC:
            subs = [self.node(vt, off + vo, 0, depth + 1) for vt, vo, _size in t.detail]
            return lambda: f"{{{t.name!r}: [{', '.join(s() for s in subs)}]}}"
        raise BtfError(f"type {type_id} is {k.name}: no value to format "
                       f"(bpftool cannot format it either)")

    def int_node(self, type_id: int, t: BtfType, off: int, bit: int) -> Callable[[], str]:
        enc, int_off, bits = t.detail
        if bit or int_off or bits % 8:
            return self.bitfield(off, bit + int_off, bits, t.size)
        if bits == 128:
            lo, hi = self.leaf(off, "Q"), self.leaf(off + 8, "Q")
            return lambda: f"hex({lo.ref} | {hi.ref} << 64)"
        if enc in (0, INT_SIGNED):
            code = _INT_CODES.get((bits, enc == INT_SIGNED))
            if code is None:  # 24, 40, 48, 56 bits: bpftool's bitfield path
                return self.bitfield(off, 0, bits, t.size)
            leaf = self.leaf(off, code)
            return lambda: leaf.ref
        if enc == INT_CHAR:
            leaf = self.leaf(off, "B")
            return lambda: f"chr({leaf.ref})"
        if enc == INT_BOOL:
            leaf = self.leaf(off, "?")
            return lambda: leaf.ref
        raise BtfError(f"type {type_id}: unknown int encoding {enc}")

    def bitfield(self, off: int, bit: int, bits: int, unit: int) -> Callable[[], str]:
        """``bits`` bits from bit ``bit`` of the bytes at ``off``: bpftool's unsigned hex.

        Read through the member's storage unit when it lies within the value,
        so the bitfields sharing a unit share one unpacked field.
        """
        absolute = off * 8 + bit
        start = absolute // (unit * 8) * unit if unit in _UNSIGNED_BY_SIZE else -1
        if not (0 <= start and absolute + bits <= (start + unit) * 8 <= self.top_size * 8):
            start = absolute // 8
            unit = (absolute % 8 + bits + 7) // 8
        shift, mask = absolute - start * 8, (1 << bits) - 1
        if unit in _UNSIGNED_BY_SIZE:
            leaf = self.leaf(start, _UNSIGNED_BY_SIZE[unit])
            value = lambda: leaf.ref  # noqa: E731
        else:
            self.need, self.dynamic = max(self.need, start + unit), True
            value = lambda: f"_ifb(d[o + {start}:o + {start + unit}], 'little')"  # noqa: E731
        shifted = (lambda: f"{value()} >> {shift}") if shift else value
        if shift + bits == unit * 8:
            return lambda: f"hex({shifted()})"
        return lambda: f"hex({shifted()} & {mask:#x})"

    def array_node(self, t: BtfType, off: int, depth: int) -> Callable[[], str]:
        elem, _index, n = t.detail
        if n == 0:
            return lambda: "[]"
        if n > _MAX_SIZE:
            raise BtfError(f"array of {n} elements: too big for a map value")
        size = self.btf.size_of(elem)
        scalar = self.btf.type(elem)
        while scalar.kind in MODIFIERS:  # not typedefs: bpftool sees no char through those
            scalar = self.btf.type(scalar.type)
        if not (scalar.kind == Kind.INT and scalar.size == 1
                and (scalar.detail[0] == INT_CHAR or scalar.name == "char")):
            return self.list_node(elem, off, n, size, depth)
        # String or list is decided per value, on the raw bytes; the list form is a fallback.
        if (elem, n) not in self.subs:
            fallback, need = self.build(lambda: self.list_node(elem, 0, n, 1, depth), n, False,
                                        "char array")
            if need > n:  # only malformed BTF: a 1-byte int that reads more
                raise BtfError(f"type {elem}: char array elements read past the array")
            self.subs[elem, n] = self.const(_string_or(fallback)), n
        leaf, helper = self.leaf(off, "s", n), self.subs[elem, n][0]
        return lambda: f"{helper}({leaf.ref})"

    def list_node(self, elem: int, off: int, n: int, size: int, depth: int) -> Callable[[], str]:
        code = self.scalar_code(elem)
        if code is not None:
            leaf = self.leaf(off, code, n)
            return lambda: leaf.ref if n > 1 else f"[{leaf.ref}]"
        if n * self.weight(elem, depth) <= _UNROLL:
            subs = [self.node(elem, off + i * size, 0, depth + 1) for i in range(n)]
            return lambda: "[" + ", ".join(s() for s in subs) + "]"
        self.dynamic = True  # reads d itself, below
        rows = self.rows(elem, size, depth)
        self.need = max(self.need, off + n * size)
        if rows is not None:
            it, row = rows
            return lambda: f"[{row} for v0 in {it}(d[o + {off}:o + {off + n * size}])]"
        if elem not in self.subs:
            sub, need = self.build(lambda: self.node(elem, 0, 0, depth + 1), size, False,
                                   f"type {elem}")
            self.subs[elem] = self.const(sub), need
        name, need = self.subs[elem]
        self.need = max(self.need, off + (n - 1) * size + need)
        return lambda: f"[{name}(d, o + {off} + _i * {size}) for _i in range({n})]"

    def scalar_code(self, type_id: int) -> str | None:
        """The struct code of a type whose unpacked value is its formatted value, if any."""
        t = self.btf.type(self.btf.resolve(type_id))
        if t.kind == Kind.PTR:
            return PTR_CODE
        if t.kind == Kind.INT:
            enc, int_off, bits = t.detail
            if enc == INT_BOOL and bits == 8:
                return "?"
            if enc in (0, INT_SIGNED) and not int_off:
                return _INT_CODES.get((bits, enc == INT_SIGNED))
        if t.kind == Kind.FLOAT:
            return _FLOAT_CODES.get(t.size)
        return None

    def weight(self, type_id: int, depth: int) -> int:
        """About how many leaves a value of the type unrolls into."""
        if depth > MAX_DEPTH:
            raise BtfError(f"type {type_id}: nested too deep (a loop?)")
        t = self.btf.type(self.btf.resolve(type_id))
        if t.kind in (Kind.STRUCT, Kind.UNION):
            return sum(self.weight(m.type, depth + 1) for m in t.detail) or 1
        if t.kind == Kind.ARRAY and not self.scalar_code(t.detail[0]):
            return t.detail[2] * self.weight(t.detail[0], depth + 1)
        return 1


def _string_or(as_list: Callable) -> Callable:
    """bpftool's is_str_array, per value: printable ASCII up to a NUL is a string."""

    def string_or_list(raw: bytes):
        end = raw.find(0)
        if end >= 0 and not raw[:end].translate(None, _PRINTABLE):
            return raw[:end].decode("ascii")
        return as_list(raw)

    return string_or_list

