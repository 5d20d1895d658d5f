"""Which decoder turns a map's entries into readable data, and the formatter it makes.

The order, first that applies wins:

1. a **declared layout** (the config's ``[[layouts]]``, shipped by the daemon
   in ``get_begin.layout``, or given to the CLI with ``--layout``);
2. a **built-in Cilium decoder**, chosen by map name and key/value size;
3. the map's **BTF**, formatted as ``bpftool -j map dump`` does;
4. **hex**: no formatter, raw bytes only.

A decoder that cannot apply (a layout whose sizes do not fit the map, a
Cilium-named map of unknown sizes, BTF that does not parse) is skipped with a
note saying why, and the next one is tried.  Whatever is chosen, one entry that
fails to decode gives ``{"error": ...}`` and the others are unaffected.

The map is any object with MapInfo's attributes (name, kernel_name, pinned,
key_size, value_size, percpu, ncpus, btf_key_type_id, btf_value_type_id), so
this module stays free of the wire schema.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from watcher.kernel.sys.abi import percpu_slot

from .btf import BtfError, parse_btf

if TYPE_CHECKING:
    from .cilium import CiliumLayout
    from .layout import Layout

__all__ = ["Decoding", "EntryFormatter", "choose"]

EntryFormatter = Callable[[bytes, bytes], dict]
SideFormatter = Callable[[bytes], Any]


class Decoding(NamedTuple):
    """The chosen formatter (None: hex), what it is, and notes on what was passed over.

    ``source`` is ``"layout"``, ``"cilium:<map>"``, ``"btf"``, or None for hex.
    """

    formatter: EntryFormatter | None
    source: str | None
    notes: tuple[str, ...] = ()
    layout: str = ""  # built-in decoders: which structs, e.g. "lb4_key -> lb4_service"

    def describe(self) -> str:
        """One line for a table caption: ``decoded by btf``, or ``shown as hex; <why>``."""
        head = f"decoded by {self.source}" if self.source else "shown as hex"
        if self.layout:
            head += f" ({self.layout})"
        return "; ".join([head, *self.notes])

    def as_json(self) -> dict:
        out: dict = {"source": self.source, "notes": list(self.notes)}
        if self.layout:
            out["layout"] = self.layout
        return out


def _error(e: Exception) -> dict:
    return {"error": str(e) or type(e).__name__}


def _hex(b: bytes) -> str:
    return b.hex()


def _slot(m) -> int:
    return percpu_slot(m.value_size)


def _per_entry(m, fmt_key: SideFormatter, fmt_value: Callable[[bytes, Any], Any],
               text: Callable[[Any, Any], str] | None = None,
               total: Callable[[list], Any] | None = None) -> EntryFormatter:
    """An entry formatter from side formatters; the value formatter also gets the decoded key."""
    if m.percpu:
        slot, size, cpus = _slot(m), m.value_size, range(m.ncpus)

        def decode(key: bytes, value: bytes) -> dict:
            try:
                k = fmt_key(key)
                per_cpu = [fmt_value(value[c * slot:c * slot + size], k) for c in cpus]
                out = {"key": k, "values": [{"cpu": c, "value": v} for c, v in zip(cpus, per_cpu)]}
                if total is not None:
                    out["total"] = total(per_cpu)
                    if text is not None:
                        out["text"] = text(k, out["total"])
                return out
            except Exception as e:  # noqa: BLE001 -- one bad entry never stops the others
                return _error(e)
    else:
        def decode(key: bytes, value: bytes) -> dict:
            try:
                k = fmt_key(key)
                v = fmt_value(value, k)
                out = {"key": k, "value": v}
                if text is not None:
                    out["text"] = text(k, v)
                return out
            except Exception as e:  # noqa: BLE001 -- one bad entry never stops the others
                return _error(e)
    return decode


def _plain_entry(m, fmt_key: SideFormatter, fmt_value: SideFormatter) -> EntryFormatter:
    """Like :func:`_per_entry` for value formatters that need no key (BTF): one call less."""
    if m.percpu:
        slot, size, cpus = _slot(m), m.value_size, range(m.ncpus)

        def decode(key: bytes, value: bytes) -> dict:
            try:
                return {"key": fmt_key(key), "values": [
                    {"cpu": c, "value": fmt_value(value[c * slot:c * slot + size])} for c in cpus]}
            except Exception as e:  # noqa: BLE001 -- one bad entry never stops the others
                return _error(e)
    else:
        def decode(key: bytes, value: bytes) -> dict:
            try:
                return {"key": fmt_key(key), "value": fmt_value(value)}
            except Exception as e:  # noqa: BLE001 -- one bad entry never stops the others
                return _error(e)
    return decode


def _add_flat_layouts(decode: EntryFormatter, key_flat, value_flat) -> None:
    """Give ``decode`` a ``flat_layouts``: the (key, value) flat layouts (Btf.flat_layout)
    when each side reads as one ``struct`` unpack, so a whole dump chunk can be rendered
    at once (watcher/decode/dumptext.py); nothing otherwise, and callers go entry by entry.
    """
    if key_flat is not None and value_flat is not None:
        decode.flat_layouts = (key_flat, value_flat)  # type: ignore[attr-defined]


def _btf_sides(m, btf_blob: bytes | None, notes: list[str]
               ) -> tuple[SideFormatter | None, SideFormatter | None, tuple | None]:
    """Key and value formatters from BTF (None where BTF does not say), and the
    (key, value) flat layouts when both sides are flat (see Btf.flat_layout)."""
    if not btf_blob or not m.btf_value_type_id:
        return None, None, None
    try:
        btf = parse_btf(btf_blob)
        fmt_value = btf.formatter(m.btf_value_type_id)
        fmt_key = (btf.formatter(m.btf_key_type_id) if m.btf_key_type_id
                   else lambda key: int.from_bytes(key, "little"))  # arrays: a u32 index
        flats = None
        if not m.percpu:
            key_flat = (btf.flat_layout(m.btf_key_type_id, m.key_size) if m.btf_key_type_id
                        else _index_layout(m.key_size))
            flats = (key_flat, btf.flat_layout(m.btf_value_type_id, m.value_stride))
    except (BtfError, ValueError) as e:
        notes.append(f"BTF not usable: {e}")
        return None, None, None
    return fmt_key, fmt_value, flats


def _index_layout(key_size: int):
    """An array's key (no BTF key type): the little-endian index, as one unpack."""
    code = {1: "B", 2: "H", 4: "I", 8: "Q"}.get(key_size)
    return (struct.Struct("<" + code), None) if code else None


def _names(m) -> list[str]:
    import os

    return [m.name, m.kernel_name, *(os.path.basename(p) for p in (m.pinned or ()))]


def _from_layout(m, layout: Layout, btf_blob: bytes | None, notes: list[str]
                 ) -> EntryFormatter:
    btf_key = btf_value = None
    if layout.key is None or layout.value is None:
        btf_key, btf_value, _ = _btf_sides(m, btf_blob, notes)
    fmt_key = layout.key.decode if layout.key is not None else (btf_key or _hex)
    fmt_value = layout.value.decode if layout.value is not None else (btf_value or _hex)
    decode = _plain_entry(m, fmt_key, fmt_value)
    if layout.value is not None and not m.percpu:
        _add_value_rows(decode, layout.value.flat())
    return decode


def _add_value_rows(decode: EntryFormatter, value_flat) -> None:
    """Give ``decode`` a ``value_rows``: (a Struct, its members' names, None for a plain
    number) reading a value as one unpack gives what ``decode(...)["value"]`` holds, for
    readers of many values' numbers (``pymap top``); nothing when there is none."""
    if value_flat is not None:
        decode.value_rows = value_flat  # type: ignore[attr-defined]


def _cilium(names: list[str], key_size: int, value_size: int
            ) -> tuple[CiliumLayout | None, str | None]:
    """:func:`watcher.decode.cilium.find`, imported only for a name that can be Cilium's.

    Every name Cilium's decoders know starts with ``cilium`` (kernel names cut to 15
    characters too), and their module is the largest of the decoders: a dump of
    another map, a million-entry ``get`` decoded from BTF, need not import it.
    """
    if not any(n.startswith("cilium") for n in names if n):
        return None, None
    from .cilium import find

    return find(names, key_size, value_size)


def choose(m, btf_blob: bytes | None = None,
           layout: Layout | Mapping | None = None) -> Decoding:
    """Pick a decoder for map ``m`` (see the module docstring for the order)."""
    notes: list[str] = []

    if layout is not None:
        from .layout import Layout, LayoutError, fit_note, parse_layout

        try:
            parsed = layout if isinstance(layout, Layout) else parse_layout(layout)
        except LayoutError as e:
            notes.append(f"declared layout not usable: {e}")
        else:
            why = fit_note(parsed, m.key_size, m.value_size)
            if why is None:
                return Decoding(_from_layout(m, parsed, btf_blob, notes), "layout", tuple(notes))
            notes.append(why)

    known, note = _cilium(_names(m), m.key_size, m.value_size)
    if known is not None:
        return Decoding(_per_entry(m, known.key, known.value, known.text, known.total),
                        known.source, tuple(notes), known.what)
    if note:
        notes.append(note)

    fmt_key, fmt_value, flats = _btf_sides(m, btf_blob, notes)
    if fmt_value is not None:
        assert fmt_key is not None  # _btf_sides gives both or neither
        decode = _plain_entry(m, fmt_key, fmt_value)
        if flats is not None:
            _add_flat_layouts(decode, *flats)
            _add_value_rows(decode, flats[1])
        return Decoding(decode, "btf", tuple(notes))

    if not notes:
        notes.append("no declared layout, no built-in decoder and no BTF")
    return Decoding(None, None, tuple(notes))
