"""The BTF blob's kernel ABI: its header, its kinds, and split against standalone BTF.

Why here: the kernel layer reads blobs (by id, vmlinux's) and must tell a kernel
module's split BTF from standalone BTF and merge it onto vmlinux's before anyone
parses it; it must not import the decoder above it to do so.  The format's
constants (``include/uapi/linux/btf.h``) therefore live here, and
:mod:`watcher.decode.btf`, which parses blobs into types and formats values,
imports them from here.
"""

from __future__ import annotations

import enum
import struct

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"  # the running kernel's own BTF
BTF_MAGIC = 0xEB9F
# magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
HEADER = struct.Struct("<HBBIIIII")


class BtfError(ValueError):
    """Malformed BTF, a type that cannot be formatted, or too few bytes for a value."""


# BTF_KIND_*, in kernel order.
Kind = enum.IntEnum("Kind", "UNKN INT PTR ARRAY STRUCT UNION ENUM FWD TYPEDEF VOLATILE CONST "
                    "RESTRICT FUNC FUNC_PROTO VAR DATASEC FLOAT DECL_TAG TYPE_TAG ENUM64", start=0)


def sections(raw: bytes) -> tuple[tuple, bytes, bytes]:
    """The header fields, the type section and the string section of a raw blob."""
    if len(raw) < HEADER.size:
        raise BtfError(f"BTF blob of {len(raw)} bytes is shorter than its header")
    head = HEADER.unpack_from(raw)
    _magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = head
    return (head, raw[hdr_len + type_off:hdr_len + type_off + type_len],
            raw[hdr_len + str_off:hdr_len + str_off + str_len])


def needs_base(raw: bytes) -> bool:
    """Is ``raw`` split BTF (a kernel module's, on top of vmlinux)?

    Standalone BTF's string section starts with a NUL (the kernel insists);
    split BTF's continues its base's, so it need not.
    """
    _head, _types, strings = sections(raw)
    return not strings.startswith(b"\0")


def merge_split(base_raw: bytes, split_raw: bytes) -> bytes:
    """One blob that parses alone: ``base_raw``'s types and strings, then ``split_raw``'s.

    Split BTF numbers its types after its base's and offsets its strings after
    the base's string section, so the concatenated sections keep every type id
    and string offset valid.  That is how a split blob reaches a consumer, who
    has no vmlinux of the daemon's host to parse it against.
    """
    (magic, version, flags, *_), base_types, base_strings = sections(base_raw)
    _head, split_types, split_strings = sections(split_raw)
    types, strings = base_types + split_types, base_strings + split_strings
    return HEADER.pack(magic, version, flags, HEADER.size, 0, len(types), len(types),
                       len(strings)) + types + strings


__all__ = ["BTF_MAGIC", "HEADER", "VMLINUX_BTF", "BtfError", "Kind", "merge_split", "needs_base", "sections"]
