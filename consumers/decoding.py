"""Turning raw entries into readable ones, on the client side.

The daemon ships a map's raw BTF blob once per ``get``; decoding happens
here, in the consumer, so the daemon does no per-entry work for anyone and
a million-entry dump stays two flat buffers on the wire.
"""

from __future__ import annotations

from collections.abc import Callable

from watcher.decode.btf import BtfError, parse_btf
from watcher.wire.schema import MapInfo

EntryFormatter = Callable[[bytes, bytes], dict]


def entry_formatter(m: MapInfo, btf_blob: bytes | None) -> EntryFormatter | None:
    """A function (key bytes, value bytes) -> ``{"key": ..., "value": ...}``, or None.

    Per-CPU maps give ``{"key": ..., "values": [{"cpu": N, "value": ...}]}``,
    as bpftool does.  An entry that fails to decode gets ``{"error": ...}``
    instead; the others are unaffected.
    """
    if not btf_blob or not m.btf_value_type_id:
        return None
    try:
        btf = parse_btf(btf_blob)
        fmt_value = btf.formatter(m.btf_value_type_id)
        fmt_key = btf.formatter(m.btf_key_type_id) if m.btf_key_type_id else _index_key(m)
    except BtfError:
        return None

    if m.percpu:
        slot, size, cpus = (m.value_size + 7) & ~7, m.value_size, range(m.ncpus)

        def decode(key: bytes, value: bytes) -> dict:
            try:
                return {"key": fmt_key(key), "values": [
                    {"cpu": c, "value": fmt_value(value[c * slot:c * slot + size])} for c in cpus]}
            except BtfError as e:
                return {"error": str(e)}
    else:
        def decode(key: bytes, value: bytes) -> dict:
            try:
                return {"key": fmt_key(key), "value": fmt_value(value)}
            except BtfError as e:
                return {"error": str(e)}

    return decode


def _index_key(m: MapInfo) -> Callable[[bytes], int]:
    """Arrays created without a key type: the key is a u32 index, as bpftool shows it."""
    return lambda key: int.from_bytes(key, "little")
