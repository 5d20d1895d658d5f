"""BTF objects from the kernel: read by id, parsed (see watcher.decode.btf), cached."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from ..decode.btf import Btf, BtfError, BtfType, Formatter, Kind, Member, parse_btf  # noqa: F401  (re-exported: the kernel-facing BTF API)
from . import syscall

if TYPE_CHECKING:
    from .maps import MapRecord

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"


@functools.lru_cache(maxsize=64)
def load_btf(btf_id: int) -> Btf:
    """The kernel's BTF object ``btf_id``, parsed; cached (ids are not reused soon).

    A blob that does not stand alone is retried as split BTF on top of
    vmlinux (kernel modules' BTF is split); if that fails too, the first error
    is raised.  A vanished id raises :class:`~.syscall.BpfError`.
    """
    fd = syscall.btf_get_fd_by_id(btf_id)
    try:
        raw = syscall.btf_raw_data(fd)
    finally:
        os.close(fd)
    try:
        return parse_btf(raw)
    except BtfError as standalone_error:
        try:
            return parse_btf(raw, base=_vmlinux())
        except (BtfError, OSError):
            raise standalone_error from None


@functools.lru_cache(maxsize=1)
def _vmlinux() -> Btf:
    with open(VMLINUX_BTF, "rb") as f:
        return parse_btf(f.read())


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
