"""BTF objects from the kernel: read by id, parsed (see watcher.decode.btf), cached."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from ..decode.btf import (  # noqa: F401  (re-exported: the kernel-facing BTF API)
    Btf,
    BtfError,
    BtfType,
    Formatter,
    Kind,
    Member,
    merge_split,
    needs_base,
    parse_btf,
)
from . import syscall
from .progload import VMLINUX_BTF

if TYPE_CHECKING:
    from .maps import MapRecord


def standalone_blob(btf_id: int) -> bytes:
    """The kernel's BTF object ``btf_id`` as one blob that parses on its own.

    Split BTF (kernel modules' maps) is merged onto vmlinux's (``merge_split``):
    this is what the daemon ships to consumers, who cannot read the host's vmlinux.
    A vanished id raises :class:`~.syscall.BpfError`.
    """
    fd = syscall.btf_get_fd_by_id(btf_id)
    try:
        raw = syscall.btf_raw_data(fd)
    finally:
        os.close(fd)
    return merge_split(_vmlinux_raw(), raw) if needs_base(raw) else raw


@functools.lru_cache(maxsize=64)
def load_btf(btf_id: int) -> Btf:
    """:func:`standalone_blob`, parsed; cached (ids are not reused soon)."""
    return parse_btf(standalone_blob(btf_id))


@functools.lru_cache(maxsize=1)
def _vmlinux_raw() -> bytes:
    with open(VMLINUX_BTF, "rb") as f:
        return f.read()


def map_formatters(record: MapRecord) -> tuple[Formatter | None, Formatter] | None:
    """``(key_formatter, value_formatter)`` for a :class:`~.maps.MapRecord`, None without BTF.

    The key formatter is None when the map has a value type but no key type:
    bpftool then leaves ``key`` out of ``formatted``.  For per-CPU maps the
    value formatter formats ONE CPU's slot: the caller applies it to each
    ``round_up(value_size, 8)``-byte slot and builds bpftool's
    ``{"cpu": i, "value": ...}`` list.  Raises :class:`BtfError` when the
    BTF cannot be read or the types cannot be formatted.
    """
    if not record.btf_id or not record.btf_value_type_id:
        return None
    btf = load_btf(record.btf_id)
    key = btf.formatter(record.btf_key_type_id) if record.btf_key_type_id else None
    return key, btf.formatter(record.btf_value_type_id)
