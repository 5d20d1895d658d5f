"""A kernel map's BTF, parsed and cached: the formatters for its key and value.

Why in the decode layer: reading the blob is the kernel layer's
(:func:`watcher.kernel.btf.cache.standalone_blob`), turning it into types and
formatters is :mod:`.btf`'s; this joins the two for a map on this host, so the
kernel layer never imports the parser above it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from watcher.kernel.btf.cache import standalone_blob

from .btf import Btf, Formatter, parse_btf

if TYPE_CHECKING:
    from watcher.kernel.maps.find import MapRecord


@functools.lru_cache(maxsize=64)
def load_btf(btf_id: int) -> Btf:
    """:func:`~watcher.kernel.btf.cache.standalone_blob`, parsed; cached (ids are not
    reused soon)."""
    return parse_btf(standalone_blob(btf_id))


def map_formatters(record: MapRecord) -> tuple[Formatter | None, Formatter] | None:
    """``(key_formatter, value_formatter)`` for a :class:`~watcher.kernel.maps.find.MapRecord`,
    None without BTF.

    The key formatter is None when the map has a value type but no key type:
    bpftool then leaves ``key`` out of ``formatted``.  For per-CPU maps the
    value formatter formats ONE CPU's slot: the caller applies it to each
    ``round_up(value_size, 8)``-byte slot and builds bpftool's
    ``{"cpu": i, "value": ...}`` list.  Raises :class:`~.btf.BtfError` when the
    BTF cannot be read or the types cannot be formatted.
    """
    if not record.btf_id or not record.btf_value_type_id:
        return None
    btf = load_btf(record.btf_id)
    key = btf.formatter(record.btf_key_type_id) if record.btf_key_type_id else None
    return key, btf.formatter(record.btf_value_type_id)


__all__ = ["load_btf", "map_formatters"]
