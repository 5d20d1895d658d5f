"""Built-in decoders for Cilium's maps, chosen by map name **and** key/value size.

Cilium pins its maps under ``/sys/fs/bpf/tc/globals`` with stable names, and
changes a layout by renaming the map (``_v2``, ``_v3``).  Old and new layouts
still coexist across releases, so a decoder is picked by name and by the
sizes the kernel reports; a Cilium-named map whose sizes match no layout known
here is left to the next decoder (BTF, then hex) with a note, never an error.

This module owns the table of known layouts and the lookup by name and sizes;
the decoders themselves (how each layout's bytes read, what Cilium prints) are
:mod:`watcher.decode.ciliumdecode`'s.  Each entry also gets a one-line ``text``
of the form ``KEY -> VALUE``.

Pure code: no syscalls, nothing but bytes in and JSON-able data out.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import NamedTuple

from watcher.kernel.sys.abi import KERNEL_NAME_MAX

from .ciliumdecode import (
    backend_id,
    backend_text,
    backend_v2,
    backend_v3,
    ipcache_key,
    ipcache_text,
    ipcache_value_v1,
    ipcache_value_v2,
    lb4_key,
    lb4_service,
    lb4_text,
    lxc_key,
    lxc_text,
    lxc_value,
    metrics_key,
    metrics_text,
    metrics_total,
    metrics_value,
    node_key,
    node_text,
    node_value_v1,
    node_value_v2,
    policy_entry,
    policy_key_hash,
    policy_key_lpm,
    policy_text,
    revnat_key,
    revnat_text,
    revnat_value,
    world_key,
    world_text,
    world_value,
)

__all__ = ["KNOWN", "CiliumLayout", "find"]


class CiliumLayout(NamedTuple):
    """One known layout of one Cilium map family."""

    map: str  # the name this layout was introduced with, e.g. cilium_ipcache_v2
    key_size: int
    value_size: int
    what: str  # C structs, for notes and docs
    key: Callable[[bytes], dict]
    value: Callable[[bytes, dict], dict]  # value bytes, decoded key (for context)
    text: Callable[[dict, dict], str]
    total: Callable[[list[dict]], dict] | None = None  # per-CPU maps: how CPUs add up

    @property
    def source(self) -> str:
        return f"cilium:{self.map}"


class Family(NamedTuple):
    globs: tuple[str, ...]
    layouts: tuple[CiliumLayout, ...]


_IPCACHE_V2 = CiliumLayout("cilium_ipcache_v2", 24, 24, "ipcache_key -> remote_endpoint_info",
                           ipcache_key, ipcache_value_v2, ipcache_text)
_IPCACHE_V1 = CiliumLayout("cilium_ipcache", 24, 12, "ipcache_key -> remote_endpoint_info (v1)",
                           ipcache_key, ipcache_value_v1, ipcache_text)
_BACKENDS_V1 = CiliumLayout("cilium_lb4_backends", 2, 8, "u16 backend id -> lb4_backend (v1)",
                            backend_id, backend_v2, backend_text)
_BACKENDS_V2 = CiliumLayout("cilium_lb4_backends_v2", 4, 8, "u32 backend id -> lb4_backend (v2)",
                            backend_id, backend_v2, backend_text)
_BACKENDS_V3 = CiliumLayout("cilium_lb4_backends_v3", 4, 12, "u32 backend id -> lb4_backend",
                            backend_id, backend_v3, backend_text)
_NODE_V1 = CiliumLayout("cilium_node_map", 20, 2, "node_key -> u16 node id",
                        node_key, node_value_v1, node_text)
_NODE_V2 = CiliumLayout("cilium_node_map_v2", 20, 4, "node_key -> node_value (id, spi)",
                        node_key, node_value_v2, node_text)

KNOWN: tuple[Family, ...] = (
    Family(("cilium_lxc",), (CiliumLayout(
        "cilium_lxc", 20, 48, "endpoint_key -> endpoint_info", lxc_key, lxc_value, lxc_text),)),
    Family(("cilium_ipcache_v2", "cilium_ipcache"), (_IPCACHE_V2, _IPCACHE_V1)),
    Family(("cilium_lb4_services_v2",), (CiliumLayout(
        "cilium_lb4_services_v2", 12, 12, "lb4_key -> lb4_service", lb4_key, lb4_service,
        lb4_text),)),
    Family(("cilium_lb4_backends_v3", "cilium_lb4_backends_v2", "cilium_lb4_backends"),
           (_BACKENDS_V3, _BACKENDS_V2, _BACKENDS_V1)),
    Family(("cilium_lb4_reverse_nat",), (CiliumLayout(
        "cilium_lb4_reverse_nat", 2, 6, "be16 rev_nat_index -> lb4_reverse_nat", revnat_key,
        revnat_value, revnat_text),)),
    Family(("cilium_policy_*", "cilium_policy"), (
        CiliumLayout("cilium_policy", 12, 24, "policy_key (LPM) -> policy_entry",
                     policy_key_lpm, policy_entry, policy_text),
        CiliumLayout("cilium_policy", 8, 24, "policy_key (hash, older releases) -> policy_entry",
                     policy_key_hash, policy_entry, policy_text))),
    Family(("cilium_metrics",), (CiliumLayout(
        "cilium_metrics", 8, 16, "metrics_key -> metrics_value (per CPU)", metrics_key,
        metrics_value, metrics_text, metrics_total),)),
    Family(("cilium_node_map_v2", "cilium_node_map"), (_NODE_V2, _NODE_V1)),
    Family(("cilium_world_cidrs4",), (CiliumLayout(
        "cilium_world_cidrs4", 8, 1, "lpm (prefixlen, IPv4) -> u8 exists", world_key,
        world_value, world_text),)),
)


def _name_matches(name: str, globs: tuple[str, ...]) -> bool:
    if any(fnmatch.fnmatchcase(name, g) for g in globs):
        return True
    # The kernel keeps 15 characters of a name: "cilium_lb4_serv" is cilium_lb4_services_v2.
    return len(name) == KERNEL_NAME_MAX and any(g.rstrip("*").startswith(name) for g in globs)


def find(names: Iterable[str], key_size: int, value_size: int
         ) -> tuple[CiliumLayout | None, str | None]:
    """The layout for a map known by ``names`` (display name, kernel name, pin names).

    Returns ``(layout, None)``; ``(None, note)`` when the name is Cilium's but the
    sizes match no known layout; ``(None, None)`` for maps that are not Cilium's.
    """
    names = [n for n in names if n]
    for family in KNOWN:
        if not any(_name_matches(n, family.globs) for n in names):
            continue
        for layout in family.layouts:
            if (layout.key_size, layout.value_size) == (key_size, value_size):
                return layout, None
        known = ", ".join(f"{x.key_size}/{x.value_size}" for x in family.layouts)
        return None, (f"{family.globs[0]}: key/value sizes {key_size}/{value_size} match no "
                      f"known Cilium layout (known: {known})")
    return None, None
