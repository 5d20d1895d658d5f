"""Declared layouts: decoding maps that carry no BTF from a description in the config.

A layout names the fields of a map's key and/or value in order, each with a
type from a small vocabulary, with explicit padding and optional value maps
(``values``) that turn enum numbers into names, like ebpf_exporter's
``static_map``::

    [[layouts]]
    match = "xdp_stats*"            # name glob, or a pin path (glob) starting with /
    key_size = 8                    # optional: checked against the fields at load
    key = [
      { name = "proto", type = "u8", values = { "6" = "TCP", "17" = "UDP" } },
      { name = "_", type = "pad[1]" },
      { name = "port", type = "be16" },
      { name = "addr", type = "ipv4" },
    ]
    value = [ { name = "packets", type = "u64" }, { name = "bytes", type = "u64" } ]

Types: ``u8 u16 u32 u64 s8 s16 s32 s64`` (host order, little-endian),
``be16 be32 be64`` (network order), ``bool`` (1 byte), ``ipv4`` (4 bytes),
``ipv6`` (16), ``mac`` (6), ``char[N]`` (text up to the first NUL),
``bytes[N]`` (hex), ``pad[N]`` (skipped, not shown).  Sizes are packed: no
implicit alignment, so every padding byte is written down.

:func:`parse_layout` validates a layout once (at config load, and again in the
client that receives it); a problem is a :class:`LayoutError` whose message
names the layout and the field.  :func:`load_layouts` is the one loader of a
``[[layouts]]`` array, for the CLI's ``--layout`` files; the daemon's config
structures its ``[[layouts]]`` with :func:`validate_layout` in its converter,
which words errors the same way (watcher/wire/tables.py).  Decoding an entry never raises for a well
formed layout except on a wrong-sized buffer.

Pure code: used by the daemon's config validation and by consumers.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["TYPES", "Field", "Layout", "LayoutError", "Side", "load_layouts", "parse_layout",
           "validate_layout"]


class LayoutError(ValueError):
    """A declared layout that cannot be used; the message names the layout and field."""


_INT_CODES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q",
              "s8": "b", "s16": "h", "s32": "i", "s64": "q"}
_BE_CODES = {"be16": "H", "be32": "I", "be64": "Q"}
_FIXED = {"bool": 1, "ipv4": 4, "ipv6": 16, "mac": 6}
_SIZED = re.compile(r"^(char|bytes|pad)\[(\d+)\]$")
TYPES = (*_INT_CODES, *_BE_CODES, *_FIXED, "char[N]", "bytes[N]", "pad[N]")
MAX_FIELD_BYTES = 1 << 16


class Field(NamedTuple):
    name: str
    type: str
    size: int
    offset: int
    values: dict[int, str] | None  # enum names for integer fields
    decode: Callable[[bytes, int], Any] | None  # (buffer, offset) -> value; None for padding


class Side(NamedTuple):
    """The fields of a key or a value."""

    fields: tuple[Field, ...]
    size: int

    def decode(self, data: bytes) -> dict:
        if len(data) != self.size:
            raise ValueError(f"{len(data)} bytes, the layout describes {self.size}")
        return {f.name: f.decode(data, f.offset) for f in self.fields if f.decode is not None}

    def flat(self) -> tuple[struct.Struct, list[str]] | None:
        """One little-endian ``struct`` unpack giving what :meth:`decode` gives, for a side of
        host-order integers and padding only: the Struct and the fields' names; None
        otherwise (network order, enum names, text, addresses, bools)."""
        fmt, names = "<", []
        for f in self.fields:
            if f.decode is None:
                fmt += f"{f.size}x"
            elif f.type in _INT_CODES and not f.values:
                fmt += _INT_CODES[f.type]
                names.append(f.name)
            else:
                return None
        rows = struct.Struct(fmt)
        return (rows, names) if rows.size == self.size else None


class Layout(NamedTuple):
    match: str
    key: Side | None
    value: Side | None
    spec: dict  # the validated, normalised form: what the daemon ships to clients

    @property
    def label(self) -> str:
        return f"layout {self.match!r}"

    def matches(self, names: list[str], pins: list[str]) -> bool:
        return layout_matches(self.match, names, pins)


def layout_matches(pattern: str, names: list[str], pins: list[str]) -> bool:
    """``pattern`` is a pin path glob when it starts with /, else a name glob."""
    if pattern.startswith("/"):
        return any(fnmatch.fnmatchcase(p, pattern) for p in pins)
    candidates = [*names, *(os.path.basename(p) for p in pins)]
    return any(fnmatch.fnmatchcase(n, pattern) for n in candidates if n)


# --- field decoders ----------------------------------------------------------------


def _int_decoder(fmt: str, values: dict[int, str] | None) -> Callable[[bytes, int], Any]:
    unpack = struct.Struct(fmt).unpack_from
    if values:
        def named(b: bytes, o: int) -> Any:
            n = unpack(b, o)[0]
            return values.get(n, n)
        return named
    return lambda b, o: unpack(b, o)[0]


def _decoder(kind: str, size: int, values: dict[int, str] | None
             ) -> Callable[[bytes, int], Any] | None:
    if kind in _INT_CODES:
        return _int_decoder("<" + _INT_CODES[kind], values)
    if kind in _BE_CODES:
        return _int_decoder(">" + _BE_CODES[kind], values)
    if kind == "bool":
        return lambda b, o: b[o] != 0
    if kind == "ipv4":
        return lambda b, o: str(ipaddress.IPv4Address(b[o:o + 4]))
    if kind == "ipv6":
        return lambda b, o: str(ipaddress.IPv6Address(b[o:o + 16]))
    if kind == "mac":
        return lambda b, o: ":".join(f"{x:02x}" for x in b[o:o + 6])
    if kind == "char":
        return lambda b, o: b[o:o + size].split(b"\0", 1)[0].decode("utf-8", "replace")
    if kind == "bytes":
        return lambda b, o: b[o:o + size].hex()
    return None  # pad


def _type_size(where: str, type_: Any) -> tuple[str, int]:
    if not isinstance(type_, str) or not type_:
        raise LayoutError(f"{where}: type must be a string, one of {', '.join(TYPES)}")
    t = type_.strip()
    if t in _INT_CODES:
        return t, struct.calcsize(_INT_CODES[t])
    if t in _BE_CODES:
        return t, struct.calcsize(_BE_CODES[t])
    if t in _FIXED:
        return t, _FIXED[t]
    m = _SIZED.match(t)
    if m:
        n = int(m.group(2))
        if not 0 < n <= MAX_FIELD_BYTES:
            raise LayoutError(f"{where}: {t}: N must be 1..{MAX_FIELD_BYTES}")
        return m.group(1), n
    raise LayoutError(f"{where}: unknown type {type_!r} (types: {', '.join(TYPES)})")


def _parse_values(where: str, kind: str, values: Any) -> dict[int, str] | None:
    if values is None:
        return None
    if kind not in _INT_CODES and kind not in _BE_CODES:
        raise LayoutError(f"{where}: values (enum names) need an integer type, not {kind}")
    if not isinstance(values, Mapping) or not values:
        raise LayoutError(f"{where}: values must be a table of number = \"name\"")
    out: dict[int, str] = {}
    for k, v in values.items():
        try:
            n = int(str(k), 0)
        except ValueError:
            raise LayoutError(f"{where}: values key {k!r} is not a number") from None
        if not isinstance(v, str):
            raise LayoutError(f"{where}: values[{k!r}] must be a string")
        out[n] = v
    return out


def _parse_side(side: str, raw: Any, declared: Any) -> tuple[Side, list[dict]]:
    if not isinstance(raw, list) or not raw:
        raise LayoutError(f"{side} must be a non-empty list of fields "
                          "({ name = ..., type = ... })")
    fields: list[Field] = []
    spec: list[dict] = []
    seen: set[str] = set()
    offset = 0
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise LayoutError(f"{side}[{i}] must be a table {{ name = ..., type = ... }}")
        name = item.get("name")
        where = f"{side} field {name!r}" if name else f"{side}[{i}]"
        extra = set(item) - {"name", "type", "values"}
        if extra:
            raise LayoutError(f"{where}: unknown keys {', '.join(sorted(extra))} "
                              "(a field has name, type and optional values)")
        kind, size = _type_size(where, item.get("type"))
        if kind != "pad":
            if not isinstance(name, str) or not name:
                raise LayoutError(f"{where}: a field needs a name")
            if name in seen:
                raise LayoutError(f"{where}: the name is used twice in the {side}")
            seen.add(name)
        values = _parse_values(where, kind, item.get("values"))
        fields.append(Field(name or "", item["type"].strip(), size, offset, values,
                            _decoder(kind, size, values)))
        entry = {"name": name or "", "type": item["type"].strip()}
        if values:
            entry["values"] = {str(k): v for k, v in values.items()}
        spec.append(entry)
        offset += size
    if declared is not None:
        if isinstance(declared, bool) or not isinstance(declared, int) or declared <= 0:
            raise LayoutError(f"{side}_size must be a positive integer")
        if declared != offset:
            detail = " + ".join(f"{f.size} ({f.name or f.type})" for f in fields)
            raise LayoutError(f"{side} fields add up to {offset} bytes, but "
                              f"{side}_size is {declared}: {detail}")
    return Side(tuple(fields), offset), spec


def parse_layout(raw: Any, index: int | None = None) -> Layout:
    """Validate one layout table (from the config, or shipped by the daemon); errors
    start with the layout's place, ``layouts[0] (flows_*): ...``."""
    try:
        return validate_layout(raw)
    except LayoutError as e:
        at = f"layouts[{index}]" if index is not None else "layout"
        match = raw.get("match") if isinstance(raw, Mapping) else None
        label = f" ({match})" if isinstance(match, str) and match else ""
        raise LayoutError(f"{at}{label}: {e}") from None


def load_layouts(raw: Any) -> list[Layout]:
    """The one loader of ``[[layouts]]`` arrays (a config's, a ``--layout`` file's)."""
    if not isinstance(raw, list):
        raise LayoutError("layouts must be an array of tables ([[layouts]])")
    return [parse_layout(item, i) for i, item in enumerate(raw)]


def validate_layout(raw: Any) -> Layout:
    """One layout table as a :class:`Layout`; a :class:`LayoutError` names the key or
    field but not the layout, which its caller places (``parse_layout``, the config's
    converter)."""
    if not isinstance(raw, Mapping):
        raise LayoutError("must be a table with match, key and/or value")
    match = raw.get("match")
    if not isinstance(match, str) or not match:
        raise LayoutError("needs match = \"name glob or pin path\"")
    extra = set(raw) - {"match", "key", "value", "key_size", "value_size"}
    if extra:
        raise LayoutError(f"unknown keys {', '.join(sorted(extra))} "
                          "(a layout has match, key, value, key_size, value_size)")
    if raw.get("key") is None and raw.get("value") is None:
        raise LayoutError("declares neither key nor value")
    spec: dict = {"match": match}
    sides: dict[str, Side | None] = {"key": None, "value": None}
    for side in ("key", "value"):
        declared = raw.get(f"{side}_size")
        if raw.get(side) is None:
            if declared is not None:
                raise LayoutError(f"{side}_size without {side} fields")
            continue
        parsed, spec[side] = _parse_side(side, raw[side], declared)
        sides[side] = parsed
        spec[f"{side}_size"] = parsed.size
    return Layout(match, sides["key"], sides["value"], spec)


def fit_note(layout: Layout, key_size: int, value_size: int) -> str | None:
    """Why ``layout`` cannot decode a map of these sizes, or None when it fits."""
    problems = []
    if layout.key is not None and layout.key.size != key_size:
        problems.append(f"key is {layout.key.size} bytes, the map's {key_size}")
    if layout.value is not None and layout.value.size != value_size:
        problems.append(f"value is {layout.value.size} bytes, the map's {value_size}")
    if not problems:
        return None
    return f"{layout.label} does not fit: {'; '.join(problems)}"
