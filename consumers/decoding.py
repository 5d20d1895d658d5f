"""Turning raw entries into readable ones, on the client side.

The daemon ships a map's metadata, its raw BTF blob and the config's declared
layout for it (if any) once per ``get``; decoding happens here, in the
consumer, so the daemon does no per-entry work for anyone and a
million-entry dump stays two flat buffers on the wire.

The choice of decoder (declared layout, built-in Cilium decoder, BTF, hex)
lives in :mod:`watcher.decode.choose`; see docs/decoding.md.
"""

from __future__ import annotations

from collections.abc import Mapping

from watcher.decode.choose import Decoding, EntryFormatter, choose
from watcher.wire.schema import MapInfo

__all__ = ["Decoding", "EntryFormatter", "choose_decoding", "entry_formatter"]


def choose_decoding(m: MapInfo, btf_blob: bytes | None,
                    layout: Mapping | None = None) -> Decoding:
    """The decoder for ``m``: ``.formatter`` (None: hex), ``.source`` and ``.notes``."""
    return choose(m, btf_blob, layout)


def entry_formatter(m: MapInfo, btf_blob: bytes | None,
                    layout: Mapping | None = None) -> EntryFormatter | None:
    """A function (key bytes, value bytes) -> ``{"key": ..., "value": ...}``, or None (hex).

    Per-CPU maps give ``{"key": ..., "values": [{"cpu": N, "value": ...}]}``,
    as bpftool does (Cilium's metrics add ``"total"``, summed over CPUs).
    Built-in Cilium decoders add ``"text"``: ``"KEY -> VALUE"`` as Cilium
    prints it.  An entry that fails to decode gets ``{"error": ...}`` instead;
    the others are unaffected.
    """
    return choose(m, btf_blob, layout).formatter
