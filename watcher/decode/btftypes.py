"""BTF's type model: the records a parsed blob holds, and the facts about kinds that
both the parser and the formatter compiler rely on.

Why its own module: parsing (:mod:`watcher.decode.btf`) and compiling formatters
(:mod:`watcher.decode.btfformat`) both speak in these records; keeping them here lets
each of the two import them without importing the other.  Pure data, no kernel access.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from watcher.kernel.btf.blob import Kind

# A formatter takes the bytes of one value (optionally an offset into a larger
# buffer, e.g. a whole dump chunk, to spare a slice) and returns JSON-able data.
Formatter = Callable[..., Any]

PTR_CODE = "Q" if struct.calcsize("P") == 8 else "I"  # bpftool reads an `unsigned long`

INT_SIGNED, INT_CHAR, INT_BOOL = 1, 2, 4
# Kinds that name another type and add nothing to its layout (libbpf's btf_is_mod, + typedef).
MODIFIERS = frozenset({Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
SIZED = frozenset({Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.DATASEC, Kind.FLOAT,
                   Kind.ENUM64})
MAX_DEPTH = 64  # modifier chains and nesting deeper than this are taken for a loop


class Member(NamedTuple):
    name: str
    type: int
    bit_offset: int
    bitfield_size: int  # 0: not a bitfield (or, without kind_flag, the int type says)


class BtfType(NamedTuple):
    """One type record.  ``detail`` depends on the kind:

    INT ``(encoding, bit_offset, bits)``; ARRAY ``(elem_type, index_type, nelems)``;
    STRUCT/UNION ``tuple[Member]``; ENUM/ENUM64 ``((name, value), ...)``, values signed
    when kind_flag is set; FUNC_PROTO ``((param_name, type), ...)``;
    DATASEC ``((var_type, offset, size), ...)``; FUNC and VAR the linkage;
    DECL_TAG ``component_idx``.  FWD is a union when kind_flag is set.
    """

    kind: Kind
    name: str
    kind_flag: bool
    size: int  # bytes, for the sized kinds; 0 otherwise
    type: int  # the referenced type, for the other kinds; 0 otherwise
    detail: Any = None




VOID = BtfType(Kind.UNKN, "void", False, 0, 0)


class TypeGraph(Protocol):
    """What the formatter compiler reads of a parsed BTF (:class:`watcher.decode.btf.Btf`)."""

    def type(self, type_id: int) -> BtfType: ...

    def resolve(self, type_id: int) -> int: ...

    def size_of(self, type_id: int) -> int: ...


def signed(value: int, bits: int, unsigned: bool = False) -> int:
    """``value`` read as a ``bits``-bit two's-complement number, unless ``unsigned``."""
    if not unsigned and value >= 1 << (bits - 1):
        return value - (1 << bits)
    return value
