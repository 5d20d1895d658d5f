"""Built-in decoders for Cilium's maps, chosen by map name **and** key/value size.

Cilium pins its maps under ``/sys/fs/bpf/tc/globals`` with stable names, and
changes a layout by renaming the map (``_v2``, ``_v3``).  Old and new layouts
still coexist across releases, so a decoder is picked by name and by the
sizes the kernel reports; a Cilium-named map whose sizes match no layout known
here is left to the next decoder (BTF, then hex) with a note, never an error.

Rendering follows what Cilium itself prints (``cilium bpf ... list``, the Go
``String()`` methods in ``pkg/maps``): addresses as text, prefixes as CIDR,
ports in host order, identities as numbers, flags by name.  Each entry also
gets a one-line ``text`` of the form ``KEY -> VALUE``.

Layouts were read from Cilium's public sources (``bpf/lib/eps.h``,
``bpf/lib/common.h``, ``pkg/maps/*``); docs/decoding.md lists them.  Two
details those sources settle that are easy to get wrong: the reverse-NAT index
(the key of ``cilium_lb4_reverse_nat`` and ``rev_nat_index`` in a service
value) and the policy key's ``dport`` are stored in network byte order.

Pure code: no syscalls, nothing but bytes in and JSON-able data out.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple

from watcher.kernel.sys.abi import KERNEL_NAME_MAX

__all__ = ["KNOWN", "CiliumLayout", "find"]


# --- shared renderings ------------------------------------------------------------

PROTOCOLS = {0: "ANY", 1: "ICMP", 2: "IGMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 112: "VRRP",
             132: "SCTP"}
FAMILIES = {1: "IPv4", 2: "IPv6"}  # ENDPOINT_KEY_IPV4 / _IPV6


def _proto(n: int) -> str:
    return PROTOCOLS.get(n, str(n))


def _ip4(b: bytes) -> str:
    return str(ipaddress.IPv4Address(b[:4]))


def _ip6(b: bytes) -> str:
    return str(ipaddress.IPv6Address(b[:16]))


def _family_ip(family: int, b: bytes) -> str:
    """An address stored as a 16-byte union: IPv4 in the first 4 bytes, or IPv6."""
    if family == 1:
        return _ip4(b)
    if family == 2:
        return _ip6(b)
    raise ValueError(f"unknown address family {family}")


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b[:6])


def _bits(value: int, names: Iterable[tuple[int, str]]) -> list[str]:
    return [name for bit, name in names if value & bit]


def _u16be(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 2], "big")


# --- cilium_lxc: endpoint_key -> endpoint_info ------------------------------------

_LXC_KEY = struct.Struct("<16sBBH")
_LXC_VALUE = struct.Struct("<IHHI4x8s8sII8x")
ENDPOINT_FLAGS = ((1, "HOST"), (2, "ATHOSTNS"), (4, "NO_SNAT_V4"), (8, "NO_SNAT_V6"))


def _lxc_key(b: bytes) -> dict:
    ip, family, key, cluster_id = _LXC_KEY.unpack(b)
    return {"ip": _family_ip(family, ip), "family": FAMILIES.get(family, family),
            "key": key, "cluster_id": cluster_id}


def _lxc_value(b: bytes, _key: dict) -> dict:
    ifindex, _unused, lxc_id, flags, mac, node_mac, sec_id, parent = _LXC_VALUE.unpack(b)
    return {"id": lxc_id, "sec_id": sec_id, "flags": _bits(flags, ENDPOINT_FLAGS),
            "ifindex": ifindex, "mac": _mac(mac), "node_mac": _mac(node_mac),
            "parent_ifindex": parent}


def _lxc_text(k: dict, v: dict) -> str:
    key = f"[{k['ip']}]:{k['key']}" if k["family"] == "IPv6" else f"{k['ip']}:{k['key']}"
    return (f"{key} -> id={v['id']} sec_id={v['sec_id']} "
            f"flags={','.join(v['flags']) or '<none>'} ifindex={v['ifindex']} "
            f"mac={v['mac']} nodemac={v['node_mac']} parent_ifindex={v['parent_ifindex']}")


# --- cilium_ipcache(_v2): ipcache_key -> remote_endpoint_info ---------------------

_IPCACHE_KEY = struct.Struct("<IHxB16s")
IPCACHE_STATIC_PREFIX = 32  # bits of cluster_id, pad and family before the address
IPCACHE_FLAGS = ((1, "skiptunnel"), (2, "hastunnel"), (4, "ipv6tunnel"), (8, "remotecluster"),
                 (16, "unroutable"))


def _lpm_prefix(prefixlen: int, static: int, family: int, ip: str) -> tuple[int, str]:
    bits = prefixlen - static
    width = 32 if family == 1 else 128
    if not 0 <= bits <= width:
        raise ValueError(f"prefix length {prefixlen} is outside {static}..{static + width}")
    return bits, f"{ip}/{bits}"


def _ipcache_key(b: bytes) -> dict:
    prefixlen, cluster_id, family, ip = _IPCACHE_KEY.unpack(b)
    addr = _family_ip(family, ip)
    bits, cidr = _lpm_prefix(prefixlen, IPCACHE_STATIC_PREFIX, family, addr)
    return {"prefix": cidr, "ip": addr, "prefixlen": bits,
            "family": FAMILIES[family], "cluster_id": cluster_id}


_REMOTE_V2 = struct.Struct("<I16s2xBB")
_REMOTE_V1 = struct.Struct("<I4sHBB")


def _ipcache_value_v2(b: bytes, _key: dict) -> dict:
    identity, tunnel, key, flags = _REMOTE_V2.unpack(b)
    return {"identity": identity,
            "tunnel_endpoint": _ip6(tunnel) if flags & 4 else _ip4(tunnel),
            "encrypt_key": key, "flags": _bits(flags, IPCACHE_FLAGS)}


def _ipcache_value_v1(b: bytes, _key: dict) -> dict:
    # node_id at 8 in releases up to ~1.14; later v1 values keep that u16 as padding.
    identity, tunnel, node_id, key, flags = _REMOTE_V1.unpack(b)
    out = {"identity": identity, "tunnel_endpoint": _ip4(tunnel), "encrypt_key": key,
           "flags": _bits(flags, IPCACHE_FLAGS)}
    if node_id:
        out["node_id"] = node_id
    return out


def _ipcache_key_text(k: dict) -> str:
    return k["prefix"] + (f"@{k['cluster_id']}" if k["cluster_id"] else "")


def _ipcache_text(k: dict, v: dict) -> str:
    text = (f"{_ipcache_key_text(k)} -> identity={v['identity']} encryptkey={v['encrypt_key']} "
            f"tunnelendpoint={v['tunnel_endpoint']}")
    if "node_id" in v:
        text += f" nodeid={v['node_id']}"
    return text + f" flags={','.join(v['flags']) or '<none>'}"


# --- cilium_lb4_services_v2: lb4_key -> lb4_service -------------------------------

_LB4_KEY = struct.Struct("<4s2sHBB2x")
_LB4_SERVICE = struct.Struct("<IH2sBBH")
LB_ALGORITHMS = {1: "random", 2: "maglev"}


def service_flags(flags: int, flags2: int) -> list[str]:
    """Cilium's ServiceFlags.String(): the service type, then modifiers, in its order."""
    f = flags | flags2 << 8
    if f & 0x1:
        kind = "ExternalIPs"
    elif f & 0x2:
        kind = "NodePort"
    elif f & 0x20:
        kind = "LoadBalancer"
    elif f & 0x8:
        kind = "HostPort"
    elif f & 0x100:
        kind = "LocalRedirect"
    else:
        kind = "ClusterIP"
    out = [kind]
    for bit, name in ((0x4, "Local"), (0x1000, "InternalLocal"), (0x2000, "two-scopes"),
                      (0x10, "sessionAffinity")):
        if f & bit:
            out.append(name)
    if not f & 0x40:
        out.append("non-routable")
    deny = False
    if f & 0x80:
        out.append("check source-range")
        if f & 0x4000:
            deny = True
            out.append("deny")
    if f & 0x200:
        out.append("46x64")
    if f & 0x400:
        out.append("l7-load-balancer")
    if f & 0x800:
        out.append("loopback" if kind == "HostPort" else "delegate-if-local")
    if not deny and f & 0x4000:
        out.append("quarantined")
    if f & 0x8000:
        out.append("dsr")
    return out


def _lb4_key(b: bytes) -> dict:
    addr, dport, slot, proto, scope = _LB4_KEY.unpack(b)
    return {"address": _ip4(addr), "port": int.from_bytes(dport, "big"), "backend_slot": slot,
            "proto": _proto(proto), "scope": "internal" if scope == 1 else "external"}


def _lb4_service(b: bytes, key: dict) -> dict:
    union, count, revnat, flags, flags2, qcount = _LB4_SERVICE.unpack(b)
    out: dict = {}
    if key.get("backend_slot", 1) == 0:  # the service itself: union is affinity / L7 port
        out["count"] = count
        out["qcount"] = qcount
        if flags2 & 0x4:
            out["l7_proxy_port"] = int.from_bytes(union.to_bytes(4, "little")[:2], "big")
        else:
            if union & 0xFFFFFF:
                out["affinity_timeout"] = union & 0xFFFFFF
            if union >> 24:
                out["lb_algorithm"] = LB_ALGORITHMS.get(union >> 24, str(union >> 24))
    else:
        out["backend_id"] = union
    out["rev_nat_index"] = int.from_bytes(revnat, "big")
    out["flags"] = service_flags(flags, flags2)
    return out


def _lb4_key_text(k: dict) -> str:
    scope = "/i" if k["scope"] == "internal" else ""
    return f"{k['address']}:{k['port']}/{k['proto']}{scope} ({k['backend_slot']})"


def _lb4_text(k: dict, v: dict) -> str:
    if "backend_id" in v:
        head = f"backend_id={v['backend_id']}"
    else:
        head = f"count={v['count']}"
        for extra in ("qcount", "affinity_timeout", "lb_algorithm", "l7_proxy_port"):
            if v.get(extra):
                head += f" {extra}={v[extra]}"
    return (f"{_lb4_key_text(k)} -> {head} revnat={v['rev_nat_index']} "
            f"[{', '.join(v['flags'])}]")


# --- cilium_lb4_backends(_v2/_v3): backend id -> lb4_backend ----------------------

BACKEND_STATES = {0: "active", 1: "terminating", 2: "quarantined", 3: "maintenance"}
_BACKEND_V2 = struct.Struct("<4s2sBB")
_BACKEND_V3 = struct.Struct("<4s2sBBHBx")


def _backend_id(b: bytes) -> dict:
    return {"id": int.from_bytes(b, "little")}


def _backend_common(addr: bytes, port: bytes, proto: int, flags: int) -> dict:
    return {"address": _ip4(addr), "port": int.from_bytes(port, "big"), "proto": _proto(proto),
            "state": BACKEND_STATES.get(flags, str(flags))}


def _backend_v2(b: bytes, _key: dict) -> dict:
    return _backend_common(*_BACKEND_V2.unpack(b))


def _backend_v3(b: bytes, _key: dict) -> dict:
    addr, port, proto, flags, cluster_id, zone = _BACKEND_V3.unpack(b)
    out = _backend_common(addr, port, proto, flags)
    out["cluster_id"] = cluster_id
    out["zone"] = zone
    return out


def _backend_text(k: dict, v: dict) -> str:
    addr = v["address"] + (f"@{v['cluster_id']}" if v.get("cluster_id") else "")
    text = f"{k['id']} -> {v['proto']}://{addr}:{v['port']}"
    if v.get("zone"):
        text += f" zone={v['zone']}"
    if v["state"] != "active":
        text += f" [{v['state']}]"
    return text


# --- cilium_lb4_reverse_nat: rev_nat_index (network order) -> address, port --------


def _revnat_key(b: bytes) -> dict:
    return {"rev_nat_index": int.from_bytes(b, "big")}


def _revnat_value(b: bytes, _key: dict) -> dict:
    return {"address": _ip4(b[:4]), "port": _u16be(b, 4)}


def _revnat_text(k: dict, v: dict) -> str:
    return f"{k['rev_nat_index']} -> {v['address']}:{v['port']}"


# --- cilium_policy_*: policy_key -> policy_entry ----------------------------------

POLICY_STATIC_PREFIX = 40  # sec_label (32) + direction byte (8)
POLICY_FULL_PREFIX = 64  # + protocol (8) + dport (16)
_POLICY_KEY_LPM = struct.Struct("<IIBB2s")
_POLICY_KEY_HASH = struct.Struct("<I2sBB")
_POLICY_ENTRY = struct.Struct("<2sBB4xQQ")
POLICY_ENTRY_FLAGS = ((1, "deny"), (2, "wildcard_protocol"), (4, "wildcard_dport"))
AUTH_TYPES = {0: "disabled", 1: "spire", 2: "always-fail"}


def _policy_key_lpm(b: bytes) -> dict:
    prefixlen, identity, egress, proto, dport = _POLICY_KEY_LPM.unpack(b)
    bits = prefixlen - POLICY_STATIC_PREFIX
    if not 0 <= bits <= POLICY_FULL_PREFIX - POLICY_STATIC_PREFIX:
        raise ValueError(f"policy key prefix length {prefixlen} is outside 40..64")
    port = int.from_bytes(dport, "big")
    if bits <= 8:  # protocol wildcarded or given, port wildcarded
        ports = _proto(proto)
    elif bits < 24:  # port range: dport with (bits - 8) significant bits
        span = 1 << (24 - bits)
        ports = f"{port}-{port + span - 1}/{_proto(proto)}"
    else:
        ports = f"{port}/{_proto(proto)}"
    return {"identity": identity, "direction": "Egress" if egress & 1 else "Ingress",
            "proto": _proto(proto), "port": port, "prefixlen": bits, "ports": ports}


def _policy_key_hash(b: bytes) -> dict:
    identity, dport, proto, direction = _POLICY_KEY_HASH.unpack(b)
    port = int.from_bytes(dport, "big")
    return {"identity": identity, "direction": "Egress" if direction & 1 else "Ingress",
            "proto": _proto(proto), "port": port,
            "ports": f"{port}/{_proto(proto)}" if port else _proto(proto)}


def _policy_entry(b: bytes, _key: dict) -> dict:
    proxy_port, flags, auth, packets, nbytes = _POLICY_ENTRY.unpack(b)
    return {"action": "deny" if flags & 1 else "allow",
            "proxy_port": int.from_bytes(proxy_port, "big"),
            "flags": _bits(flags, POLICY_ENTRY_FLAGS), "auth_type": AUTH_TYPES.get(auth, auth),
            "packets": packets, "bytes": nbytes}


def _policy_text(k: dict, v: dict) -> str:
    text = f"{k['direction']}: {k['identity']} {k['ports']} -> {v['action']}"
    if v["proxy_port"]:
        text += f" proxy_port={v['proxy_port']}"
    if v["auth_type"] not in ("disabled", 0):
        text += f" auth={v['auth_type']}"
    return text + f" packets={v['packets']} bytes={v['bytes']}"


# --- cilium_metrics (per-CPU): metrics_key -> metrics_value -----------------------

METRIC_DIRECTIONS = {0: "UNKNOWN", 1: "INGRESS", 2: "EGRESS", 3: "SERVICE"}
# pkg/monitor/api/drop.go: reasons below 130 are not drops (0: forwarded).
REASONS = {
    0: "Success", 2: "Invalid packet", 3: "Plain Text", 4: "Interface Decrypted",
    5: "LB: No backend slot entry found", 6: "LB: No backend entry found",
    7: "LB: Reverse entry update failed", 8: "LB: Reverse entry stale",
    9: "Fragmented packet", 10: "Fragmented packet entry update failed",
    11: "Missed tail call to custom program",
    130: "Invalid source mac", 131: "Invalid destination mac", 132: "Invalid source ip",
    133: "Policy denied", 134: "Invalid packet", 135: "CT: Truncated or invalid header",
    136: "Fragmentation needed", 137: "CT: Unknown L4 protocol", 139: "Unsupported L3 protocol",
    140: "Missed tail call", 141: "Error writing to packet", 142: "Unknown L4 protocol",
    143: "Unknown ICMPv4 code", 144: "Unknown ICMPv4 type", 145: "Unknown ICMPv6 code",
    146: "Unknown ICMPv6 type", 147: "Error retrieving tunnel key",
    150: "Unknown L3 target address", 151: "Stale or unroutable IP",
    153: "Error while correcting L3 checksum", 154: "Error while correcting L4 checksum",
    155: "CT: Map insertion failed", 156: "Invalid IPv6 extension header",
    157: "IP fragmentation not supported", 158: "Service backend not found",
    160: "No tunnel/encapsulation endpoint (datapath BUG!)",
    162: "Reached EDT rate-limiting drop horizon", 163: "Unknown connection tracking state",
    164: "Local host is unreachable", 165: "No configuration available to perform policy decision",
    166: "Unsupported L2 protocol", 167: "No mapping for NAT masquerade",
    168: "Unsupported protocol for NAT masquerade", 169: "FIB lookup failed",
    170: "Encapsulation traffic is prohibited", 171: "Invalid identity", 172: "Unknown sender",
    173: "NAT not needed", 174: "Is a ClusterIP", 175: "First logical datagram fragment not found",
    176: "Forbidden ICMPv6 message", 177: "Denied by LB src range check",
    178: "Socket lookup failed", 179: "Socket assign failed",
    180: "Proxy redirection not supported for protocol", 181: "Policy denied by denylist",
    182: "VLAN traffic disallowed by VLAN filter", 183: "Incorrect VNI from VTEP",
    184: "Failed to update or lookup TC buffer", 185: "No SID was found for the IP address",
    186: "SRv6 state was removed during tail call", 187: "L3 translation from IPv4 to IPv6 failed",
    188: "L3 translation from IPv6 to IPv4 failed", 189: "Authentication required",
    190: "No conntrack map found", 191: "No nat map found", 192: "Invalid ClusterID",
    193: "Unsupported packet protocol for DSR encapsulation", 194: "No egress gateway found",
}
SOURCE_FILES = {1: "bpf_host.c", 2: "bpf_lxc.c", 3: "bpf_overlay.c", 4: "bpf_xdp.c",
                5: "bpf_sock.c", 6: "bpf_network.c", 101: "arp.h", 102: "drop.h", 103: "srv6.h",
                104: "icmp6.h", 105: "nodeport.h", 106: "lb.h", 107: "mcast.h", 108: "ipv4.h",
                109: "conntrack.h", 110: "l3.h", 111: "trace.h", 112: "encap.h", 113: "encrypt.h"}
_METRICS_KEY = struct.Struct("<BBHB3x")
_METRICS_VALUE = struct.Struct("<QQ")


def _metrics_key(b: bytes) -> dict:
    reason, dir_, line, file = _METRICS_KEY.unpack(b)
    out = {"reason": reason, "reason_desc": REASONS.get(reason, str(reason)),
           "direction": METRIC_DIRECTIONS.get(dir_ & 3, "UNKNOWN"),
           "drop": reason >= 130 or reason == 2}  # DropMin, DropInvalid in drop.go
    if line or file:  # newer releases say where in the datapath the drop happened
        out["line"] = line
        out["file"] = SOURCE_FILES.get(file, str(file))
    return out


def _metrics_value(b: bytes, _key: dict) -> dict:
    packets, nbytes = _METRICS_VALUE.unpack(b)
    return {"packets": packets, "bytes": nbytes}


def _metrics_total(values: list[dict]) -> dict:
    return {"packets": sum(v["packets"] for v in values), "bytes": sum(v["bytes"] for v in values)}


def _metrics_text(k: dict, v: dict) -> str:
    where = f" ({k['file']}:{k['line']})" if "line" in k else ""
    return (f"{k['direction']} {k['reason_desc']}{where} -> "
            f"packets={v['packets']} bytes={v['bytes']}")


# --- cilium_node_map(_v2): node_key -> node id (, spi) ----------------------------

_NODE_KEY = struct.Struct("<3xB16s")


def _node_key(b: bytes) -> dict:
    family, ip = _NODE_KEY.unpack(b)
    return {"ip": _family_ip(family, ip), "family": FAMILIES[family]}


def _node_value_v1(b: bytes, _key: dict) -> dict:
    return {"node_id": int.from_bytes(b, "little")}


def _node_value_v2(b: bytes, _key: dict) -> dict:
    return {"node_id": int.from_bytes(b[:2], "little"), "spi": b[2]}


def _node_text(k: dict, v: dict) -> str:
    text = f"{k['ip']} -> id={v['node_id']}"
    return text + (f" spi={v['spi']}" if "spi" in v else "")


# --- cilium_world_cidrs4: lpm (prefixlen, IPv4) -> exists --------------------------


def _world_key(b: bytes) -> dict:
    prefixlen = int.from_bytes(b[:4], "little")
    addr = _ip4(b[4:8])
    bits, cidr = _lpm_prefix(prefixlen, 0, 1, addr)
    return {"prefix": cidr, "ip": addr, "prefixlen": bits}


def _world_value(b: bytes, _key: dict) -> dict:
    return {"exists": bool(b[0])}


def _world_text(k: dict, v: dict) -> str:
    return f"{k['prefix']} -> {'exists' if v['exists'] else 'absent'}"


# --- the table ----------------------------------------------------------------------


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
                           _ipcache_key, _ipcache_value_v2, _ipcache_text)
_IPCACHE_V1 = CiliumLayout("cilium_ipcache", 24, 12, "ipcache_key -> remote_endpoint_info (v1)",
                           _ipcache_key, _ipcache_value_v1, _ipcache_text)
_BACKENDS_V1 = CiliumLayout("cilium_lb4_backends", 2, 8, "u16 backend id -> lb4_backend (v1)",
                            _backend_id, _backend_v2, _backend_text)
_BACKENDS_V2 = CiliumLayout("cilium_lb4_backends_v2", 4, 8, "u32 backend id -> lb4_backend (v2)",
                            _backend_id, _backend_v2, _backend_text)
_BACKENDS_V3 = CiliumLayout("cilium_lb4_backends_v3", 4, 12, "u32 backend id -> lb4_backend",
                            _backend_id, _backend_v3, _backend_text)
_NODE_V1 = CiliumLayout("cilium_node_map", 20, 2, "node_key -> u16 node id",
                        _node_key, _node_value_v1, _node_text)
_NODE_V2 = CiliumLayout("cilium_node_map_v2", 20, 4, "node_key -> node_value (id, spi)",
                        _node_key, _node_value_v2, _node_text)

KNOWN: tuple[Family, ...] = (
    Family(("cilium_lxc",), (CiliumLayout(
        "cilium_lxc", 20, 48, "endpoint_key -> endpoint_info", _lxc_key, _lxc_value, _lxc_text),)),
    Family(("cilium_ipcache_v2", "cilium_ipcache"), (_IPCACHE_V2, _IPCACHE_V1)),
    Family(("cilium_lb4_services_v2",), (CiliumLayout(
        "cilium_lb4_services_v2", 12, 12, "lb4_key -> lb4_service", _lb4_key, _lb4_service,
        _lb4_text),)),
    Family(("cilium_lb4_backends_v3", "cilium_lb4_backends_v2", "cilium_lb4_backends"),
           (_BACKENDS_V3, _BACKENDS_V2, _BACKENDS_V1)),
    Family(("cilium_lb4_reverse_nat",), (CiliumLayout(
        "cilium_lb4_reverse_nat", 2, 6, "be16 rev_nat_index -> lb4_reverse_nat", _revnat_key,
        _revnat_value, _revnat_text),)),
    Family(("cilium_policy_*", "cilium_policy"), (
        CiliumLayout("cilium_policy", 12, 24, "policy_key (LPM) -> policy_entry",
                     _policy_key_lpm, _policy_entry, _policy_text),
        CiliumLayout("cilium_policy", 8, 24, "policy_key (hash, older releases) -> policy_entry",
                     _policy_key_hash, _policy_entry, _policy_text))),
    Family(("cilium_metrics",), (CiliumLayout(
        "cilium_metrics", 8, 16, "metrics_key -> metrics_value (per CPU)", _metrics_key,
        _metrics_value, _metrics_text, _metrics_total),)),
    Family(("cilium_node_map_v2", "cilium_node_map"), (_NODE_V2, _NODE_V1)),
    Family(("cilium_world_cidrs4",), (CiliumLayout(
        "cilium_world_cidrs4", 8, 1, "lpm (prefixlen, IPv4) -> u8 exists", _world_key,
        _world_value, _world_text),)),
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
