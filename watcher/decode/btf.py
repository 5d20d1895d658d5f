"""BTF: parsing type blobs into the type graph that value formatters are built from.

Pure: no kernel access here (watcher/kernel/btf/cache.py reads blobs from the
kernel, watcher/kernel/btf/blob.py holds the format's ABI), so clients decode
with the blob the daemon ships them.

Why here and not through a library: bcc's Python side cannot read BTF.  This module
owns the parser and :class:`Btf`, the graph of parsed types; how a value is formatted
(bpftool's rules, compiled once per type) is :mod:`watcher.decode.btfformat`'s job,
and the records both share are :mod:`watcher.decode.btftypes`'.
"""

from __future__ import annotations

import struct
from typing import Any

from watcher.kernel.btf.blob import BTF_MAGIC, BtfError, Kind, merge_split, needs_base
from watcher.kernel.btf.blob import HEADER as _HEADER

from .btfformat import compile_formatter, flat_layout
from .btftypes import MAX_DEPTH, MODIFIERS, PTR_CODE, SIZED, VOID, BtfType, Formatter, Member
from .btftypes import signed as _signed

# BtfError, Kind, needs_base and merge_split are the kernel layer's (watcher.kernel.btf.blob):
# the blob format's ABI, re-exported here with the parser that uses them; BtfType, Member
# and Formatter are btftypes', re-exported so callers need one import.
__all__ = ["BtfError", "Btf", "BtfType", "Kind", "Member", "parse_btf", "Formatter",
           "merge_split", "needs_base"]

_TYPE = struct.Struct("<III")  # name_off info size|type
_U32 = struct.Struct("<I")
# Bytes after the 12-byte common record: fixed, and per vlen item.
_EXTRA = {Kind.INT: (4, 0), Kind.ARRAY: (12, 0), Kind.STRUCT: (0, 12), Kind.UNION: (0, 12),
          Kind.ENUM: (0, 8), Kind.FUNC_PROTO: (0, 8), Kind.VAR: (4, 0), Kind.DATASEC: (0, 12),
          Kind.DECL_TAG: (4, 0), Kind.ENUM64: (0, 12)}


class Btf:
    """Parsed BTF: types by id (``0`` is void), on top of ``base`` for split BTF."""

    def __init__(self, types: list[BtfType], base: Btf | None = None,
                 strings: _Strings | None = None):
        self.base = base
        self.strings = strings  # kept for split BTF parsed on top of this one
        self.start_id = len(base) if base is not None else 1
        self._types = types
        self._formatters: dict[int, Formatter] = {}

    def __len__(self) -> int:
        """Number of type ids, void included (so the first id of a split BTF on top)."""
        return self.start_id + len(self._types)

    def type(self, type_id: int) -> BtfType:
        if type_id >= self.start_id and type_id - self.start_id < len(self._types):
            return self._types[type_id - self.start_id]
        if self.base is not None and 0 <= type_id < self.start_id:
            return self.base.type(type_id)
        if type_id == 0:
            return VOID
        raise BtfError(f"type id {type_id} is not in this BTF ({len(self)} ids); "
                       f"split BTF needs its base")

    def resolve(self, type_id: int) -> int:
        """Skip typedefs and modifiers (libbpf's btf__resolve_type)."""
        for _ in range(MAX_DEPTH):
            t = self.type(type_id)
            if t.kind not in MODIFIERS and t.kind != Kind.TYPEDEF:
                return type_id
            type_id = t.type
        raise BtfError(f"type {type_id}: modifier chain too long (a loop?)")

    def size_of(self, type_id: int) -> int:
        """Bytes a value of the type takes (libbpf's btf__resolve_size)."""
        scale = 1
        for _ in range(MAX_DEPTH):
            t = self.type(self.resolve(type_id))
            if t.kind in SIZED:
                return scale * t.size
            if t.kind == Kind.PTR:
                return scale * struct.calcsize(PTR_CODE)
            if t.kind == Kind.ARRAY:
                scale *= t.detail[2]
                type_id = t.detail[0]
            elif t.kind == Kind.VAR:
                type_id = t.type
            else:
                raise BtfError(f"type {type_id} ({t.kind.name}) has no size")
        raise BtfError(f"type {type_id}: nested too deep (a loop?)")

    def formatter(self, type_id: int) -> Formatter:
        """``f(data, offset=0)`` -> the value at ``data[offset:]`` as bpftool formats it.

        Compiled on first use and cached.  Raises :class:`BtfError` when the type
        cannot be formatted, and the formatter raises it when ``data`` is short.
        """
        f = self._formatters.get(type_id)
        if f is None:
            f = self._formatters[type_id] = compile_formatter(self, type_id)
        return f
    def flat_layout(self, type_id: int, stride: int
                    ) -> tuple[struct.Struct, list[str] | None] | None:
        """How to read values of the type with one ``struct`` unpack, or None
        (:func:`watcher.decode.btfformat.flat_layout`)."""
        return flat_layout(self, type_id, stride)



def parse_btf(raw: bytes, base: Btf | None = None) -> Btf:
    """Parse a raw BTF blob (header, type section, string section).

    ``base`` is the BTF a split blob extends (vmlinux, for kernel modules):
    its ids and strings come first.  Type references are not checked here;
    a dangling one fails when a formatter reaches it.
    """
    raw = bytes(raw)
    if len(raw) < _HEADER.size:
        raise BtfError(f"BTF blob of {len(raw)} bytes is shorter than its header")
    magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = \
        _HEADER.unpack_from(raw)
    if magic != BTF_MAGIC:
        if magic == 0x9FEB:
            raise BtfError("BTF blob is big-endian; only native little-endian BTF is supported")
        raise BtfError(f"not BTF: magic {magic:#06x}, expected {BTF_MAGIC:#06x}")
    if version != 1:
        raise BtfError(f"BTF version {version} is not supported")
    if hdr_len < _HEADER.size:
        raise BtfError(f"BTF header length {hdr_len} is too small")
    for what, off, length in (("type", type_off, type_len), ("string", str_off, str_len)):
        if hdr_len + off + length > len(raw):
            raise BtfError(f"BTF {what} section ({length} bytes at {hdr_len + off}) "
                           f"runs past the end of the {len(raw)}-byte blob")
    strings = _Strings(raw[hdr_len + str_off: hdr_len + str_off + str_len], base)
    if base is None and not strings.data.startswith(b"\0"):
        # The kernel insists on this for BTF that stands alone: the blob extends a base.
        raise BtfError("string section does not start with a NUL: split BTF, "
                       "parse it with its base")
    types = _parse_types(raw, hdr_len + type_off, type_len, strings,
                         len(base) if base is not None else 1)
    return Btf(types, base, strings)


class _Strings:
    """Names by offset; offsets past the base's string section are ours (split BTF)."""

    def __init__(self, data: bytes, base: Btf | None):
        self.data = data
        self.base = base.strings if base is not None else None
        self.base_len = len(self.base.data) if self.base is not None else 0
        self.cache: dict[int, str] = {0: ""}

    def __call__(self, off: int) -> str:
        s = self.cache.get(off)
        if s is not None:
            return s
        if off < self.base_len:
            assert self.base is not None  # base_len is 0 without a base
            s = self.base(off)
        else:
            start = off - self.base_len
            end = self.data.find(b"\0", start)
            if start >= len(self.data) or end < 0:
                raise BtfError(f"string offset {off} is outside the string section")
            s = self.data[start:end].decode("utf-8", "replace")
        self.cache[off] = s
        return s


def _parse_types(raw: bytes, pos: int, length: int, name, first_id: int) -> list[BtfType]:
    end = pos + length
    types: list[BtfType] = []
    unpack, u32 = _TYPE.unpack_from, _U32.unpack_from
    while pos < end:
        type_id = first_id + len(types)
        if pos + 12 > end:
            raise BtfError(f"type {type_id} is cut short by the end of the type section")
        name_off, info, size_type = unpack(raw, pos)
        try:
            kind = Kind((info >> 24) & 0x1F)
        except ValueError:
            raise BtfError(f"type {type_id} has unknown kind {(info >> 24) & 0x1F}") from None
        vlen, kflag = info & 0xFFFF, bool(info >> 31)
        fixed, per_item = _EXTRA.get(kind, (0, 0))
        body, pos = pos + 12, pos + 12 + fixed + per_item * vlen
        if pos > end:
            raise BtfError(f"type {type_id} ({kind.name}) is cut short by the end of "
                           f"the type section")
        detail: Any = None
        if kind == Kind.INT:
            (v,) = u32(raw, body)
            detail = ((v >> 24) & 0x0F, (v >> 16) & 0xFF, v & 0xFF)
        elif kind == Kind.ARRAY:
            detail = struct.unpack_from("<III", raw, body)
        elif kind in (Kind.STRUCT, Kind.UNION):
            detail = tuple(Member(name(n), t, off & 0xFFFFFF, off >> 24) if kflag
                           else Member(name(n), t, off, 0)
                           for n, t, off in struct.iter_unpack("<III", raw[body:pos]))
        elif kind == Kind.ENUM:
            detail = tuple((name(n), v) for n, v in
                           struct.iter_unpack("<Ii" if kflag else "<II", raw[body:pos]))
        elif kind == Kind.ENUM64:
            detail = tuple((name(n), _signed(hi << 32 | lo, 64, not kflag)) for n, lo, hi in
                           struct.iter_unpack("<III", raw[body:pos]))
        elif kind == Kind.FUNC_PROTO:
            detail = tuple((name(n), t) for n, t in struct.iter_unpack("<II", raw[body:pos]))
        elif kind == Kind.DATASEC:
            detail = tuple(struct.iter_unpack("<III", raw[body:pos]))
        elif kind == Kind.FUNC:
            detail = vlen  # linkage
        elif kind in (Kind.VAR, Kind.DECL_TAG):
            (detail,) = struct.unpack_from("<I" if kind == Kind.VAR else "<i", raw, body)
        sized = kind in SIZED
        types.append(BtfType(kind, name(name_off), kflag, size_type if sized else 0,
                             0 if sized else size_type, detail))
    return types
