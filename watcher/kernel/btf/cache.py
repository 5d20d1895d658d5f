"""BTF objects from the kernel: read by id, made standalone, and offsets in kernel structs.

Why only bytes here: parsing a blob into types and formatting values is the
decode layer's (:mod:`watcher.decode.btf`, cached per id by
:mod:`watcher.decode.mapbtf`); the kernel layer hands blobs up and imports
nothing from above.  What it needs of the format is :mod:`.blob`.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterator

import watcher.kernel.sys.syscall as syscall
from watcher.kernel.btf.blob import VMLINUX_BTF, BtfError, Kind, merge_split, needs_base


def standalone_blob(btf_id: int) -> bytes:
    """The kernel's BTF object ``btf_id`` as one blob that parses on its own.

    Split BTF (kernel modules' maps) is merged onto vmlinux's (``merge_split``):
    this is what the daemon ships to consumers, who cannot read the host's vmlinux.
    A vanished id raises :class:`~..sys.syscall.BpfError`.
    """
    fd = syscall.btf_get_fd_by_id(btf_id)
    try:
        raw = syscall.btf_raw_data(fd)
    finally:
        os.close(fd)
    return merge_split(_vmlinux_raw(), raw) if needs_base(raw) else raw


@functools.lru_cache(maxsize=1)
def _vmlinux_raw() -> bytes:
    with open(VMLINUX_BTF, "rb") as f:
        return f.read()


# --- offsets in kernel structures (for programs that read kernel memory) ---

# Bytes after a type's 12-byte record: fixed per kind, and per vlen item (btf.h).
_FIXED = {Kind.INT: 4, Kind.ARRAY: 12, Kind.VAR: 4, Kind.DECL_TAG: 4}
_PER_VLEN = {Kind.STRUCT: 12, Kind.UNION: 12, Kind.ENUM: 8, Kind.FUNC_PROTO: 8,
             Kind.DATASEC: 12, Kind.ENUM64: 12}


def scan_types(raw: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """``(type id, position, kind, vlen, name offset)`` of every type in a BTF blob.

    A scan, not a parse: ~10x faster than :func:`parse_btf` over vmlinux's
    126,000 types, and nothing kept but what the caller keeps.
    """
    _magic, _ver, _flags, hdr_len, type_off, type_len, _str_off, _str_len = struct.unpack_from(
        "<HBBIIIII", raw)
    pos = hdr_len + type_off
    end, type_id = pos + type_len, 0
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", raw, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        type_id += 1
        yield type_id, pos, kind, vlen, name_off
        pos += 12 + _FIXED.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen


def _name(raw: bytes, name_off: int) -> bytes:
    strings = struct.unpack_from("<I", raw, 16)[0] + struct.unpack_from("<I", raw, 4)[0]
    start = strings + name_off
    return raw[start:raw.index(b"\0", start)]


def find_func(raw: bytes, name: bytes) -> int | None:
    """The id of FUNC ``name`` in a BTF blob, None if there is none."""
    for type_id, _pos, kind, _vlen, name_off in scan_types(raw):
        if kind == Kind.FUNC and _name(raw, name_off) == name:
            return type_id
    return None


def member_offsets(wanted: dict[str, tuple[str, ...]], raw: bytes | None = None
                   ) -> dict[str, int]:
    """Byte offsets of ``struct.member`` in the running kernel (vmlinux BTF by default).

    ``wanted``: struct name -> member names; members of anonymous structs and
    unions inside are found too (``struct file``'s fields move between kernels,
    and some sit in anonymous unions).  Raises :class:`BtfError` naming what
    this kernel's BTF lacks: a program reading kernel memory must not guess.
    """
    if raw is None:
        with open(VMLINUX_BTF, "rb") as f:  # not the cached copy: read once, then freed
            raw = f.read()
    where: dict[int, tuple[int, int]] = {}  # type id -> (position, vlen): structs and unions
    named: dict[str, int] = {}
    names = {n.encode(): n for n in wanted}
    for type_id, pos, kind, vlen, name_off in scan_types(raw):
        if kind in (Kind.STRUCT, Kind.UNION):
            where[type_id] = (pos, vlen)
            if kind == Kind.STRUCT and name_off:
                name = names.get(_name(raw, name_off))
                if name is not None and name not in named:
                    named[name] = type_id

    def members(type_id: int, base: int) -> Iterator[tuple[str, int]]:
        pos, vlen = where[type_id]
        kflag = struct.unpack_from("<I", raw, pos + 4)[0] >> 31
        for i in range(vlen):
            name_off, member_type, off = struct.unpack_from("<III", raw, pos + 12 + 12 * i)
            bits = base + (off & 0xFFFFFF if kflag else off)
            if name_off:
                yield _name(raw, name_off).decode(), bits
            elif member_type in where:  # an anonymous struct or union: its members are ours
                yield from members(member_type, bits)

    found: dict[str, int] = {}
    for struct_name, fields in wanted.items():
        if struct_name not in named:
            raise BtfError(f"the kernel's BTF has no struct {struct_name}")
        offsets = dict(members(named[struct_name], 0))
        for field in fields:
            if field not in offsets:
                raise BtfError(f"the kernel's struct {struct_name} has no member {field}")
            if offsets[field] % 8:
                raise BtfError(f"{struct_name}.{field} is a bitfield")
            found[f"{struct_name}.{field}"] = offsets[field] // 8
    return found
