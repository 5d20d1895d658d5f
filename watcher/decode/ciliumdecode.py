"""Decoders for Cilium's maps: bytes of each known key and value layout to JSON-able
data, and the one-line ``KEY -> VALUE`` text.

Why apart from :mod:`watcher.decode.cilium`: that module owns *which* layout a map
has (the table of map names and sizes, and the lookup); this one owns *how* each
layout reads, so a new Cilium release adds a decoder here and one row there.

Rendering follows what Cilium itself prints (``cilium bpf ... list``, the Go
``String()`` methods in ``pkg/maps``): addresses as text, prefixes as CIDR,
ports in host order, identities as numbers, flags by name.

Layouts were read from Cilium's public sources (``bpf/lib/eps.h``,
``bpf/lib/common.h``, ``pkg/maps/*``); docs/decoding.md lists them.  Two
details those sources settle that are easy to get wrong: the reverse-NAT index
(the key of ``cilium_lb4_reverse_nat`` and ``rev_nat_index`` in a service
value) and the policy key's ``dport`` are stored in network byte order.

Pure code: no syscalls, nothing but bytes in and JSON-able data out.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

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


def lxc_key(b: bytes) -> dict:
    ip, family, key, cluster_id = _LXC_KEY.unpack(b)
    return {"ip": _family_ip(family, ip), "family": FAMILIES.get(family, family),
            "key": key, "cluster_id": cluster_id}


def lxc_value(b: bytes, _key: dict) -> dict:
    ifindex, _unused, lxc_id, flags, mac, node_mac, sec_id, parent = _LXC_VALUE.unpack(b)
    return {"id": lxc_id, "sec_id": sec_id, "flags": _bits(flags, ENDPOINT_FLAGS),
            "ifindex": ifindex, "mac": _mac(mac), "node_mac": _mac(node_mac),
            "parent_ifindex": parent}


def lxc_text(k: dict, v: dict) -> str:
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


def ipcache_key(b: bytes) -> dict:
    prefixlen, cluster_id, family, ip = _IPCACHE_KEY.unpack(b)
    addr = _family_ip(family, ip)
    bits, cidr = _lpm_prefix(prefixlen, IPCACHE_STATIC_PREFIX, family, addr)
    return {"prefix": cidr, "ip": addr, "prefixlen": bits,
            "family": FAMILIES[family], "cluster_id": cluster_id}


_REMOTE_V2 = struct.Struct("<I16s2xBB")
_REMOTE_V1 = struct.Struct("<I4sHBB")


def ipcache_value_v2(b: bytes, _key: dict) -> dict:
    identity, tunnel, key, flags = _REMOTE_V2.unpack(b)
    return {"identity": identity,
            "tunnel_endpoint": _ip6(tunnel) if flags & 4 else _ip4(tunnel),
            "encrypt_key": key, "flags": _bits(flags, IPCACHE_FLAGS)}


def ipcache_value_v1(b: bytes, _key: dict) -> dict:
    # node_id at 8 in releases up to ~1.14; later v1 values keep that u16 as padding.
    identity, tunnel, node_id, key, flags = _REMOTE_V1.unpack(b)
    out = {"identity": identity, "tunnel_endpoint": _ip4(tunnel), "encrypt_key": key,
           "flags": _bits(flags, IPCACHE_FLAGS)}
    if node_id:
        out["node_id"] = node_id
    return out


def _ipcache_key_text(k: dict) -> str:
    return k["prefix"] + (f"@{k['cluster_id']}" if k["cluster_id"] else "")


def ipcache_text(k: dict, v: dict) -> str:
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


def lb4_key(b: bytes) -> dict:
    addr, dport, slot, proto, scope = _LB4_KEY.unpack(b)
    return {"address": _ip4(addr), "port": int.from_bytes(dport, "big"), "backend_slot": slot,
            "proto": _proto(proto), "scope": "internal" if scope == 1 else "external"}


def lb4_service(b: bytes, key: dict) -> dict:
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


def lb4_text(k: dict, v: dict) -> str:
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


def backend_id(b: bytes) -> dict:
    return {"id": int.from_bytes(b, "little")}


def _backend_common(addr: bytes, port: bytes, proto: int, flags: int) -> dict:
    return {"address": _ip4(addr), "port": int.from_bytes(port, "big"), "proto": _proto(proto),
            "state": BACKEND_STATES.get(flags, str(flags))}


def backend_v2(b: bytes, _key: dict) -> dict:
    return _backend_common(*_BACKEND_V2.unpack(b))


def backend_v3(b: bytes, _key: dict) -> dict:
    addr, port, proto, flags, cluster_id, zone = _BACKEND_V3.unpack(b)
    out = _backend_common(addr, port, proto, flags)
    out["cluster_id"] = cluster_id
    out["zone"] = zone
    return out


def backend_text(k: dict, v: dict) -> str:
    addr = v["address"] + (f"@{v['cluster_id']}" if v.get("cluster_id") else "")
    text = f"{k['id']} -> {v['proto']}://{addr}:{v['port']}"
    if v.get("zone"):
        text += f" zone={v['zone']}"
    if v["state"] != "active":
        text += f" [{v['state']}]"
    return text


# --- cilium_lb4_reverse_nat: rev_nat_index (network order) -> address, port --------


def revnat_key(b: bytes) -> dict:
    return {"rev_nat_index": int.from_bytes(b, "big")}


def revnat_value(b: bytes, _key: dict) -> dict:
    return {"address": _ip4(b[:4]), "port": _u16be(b, 4)}


def revnat_text(k: dict, v: dict) -> str:
    return f"{k['rev_nat_index']} -> {v['address']}:{v['port']}"


# --- cilium_policy_*: policy_key -> policy_entry ----------------------------------

POLICY_STATIC_PREFIX = 40  # sec_label (32) + direction byte (8)
POLICY_FULL_PREFIX = 64  # + protocol (8) + dport (16)
_POLICY_KEY_LPM = struct.Struct("<IIBB2s")
_POLICY_KEY_HASH = struct.Struct("<I2sBB")
_POLICY_ENTRY = struct.Struct("<2sBB4xQQ")
POLICY_ENTRY_FLAGS = ((1, "deny"), (2, "wildcard_protocol"), (4, "wildcard_dport"))
AUTH_TYPES = {0: "disabled", 1: "spire", 2: "always-fail"}


def policy_key_lpm(b: bytes) -> dict:
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


def policy_key_hash(b: bytes) -> dict:
    identity, dport, proto, direction = _POLICY_KEY_HASH.unpack(b)
    port = int.from_bytes(dport, "big")
    return {"identity": identity, "direction": "Egress" if direction & 1 else "Ingress",
            "proto": _proto(proto), "port": port,
            "ports": f"{port}/{_proto(proto)}" if port else _proto(proto)}


def policy_entry(b: bytes, _key: dict) -> dict:
    proxy_port, flags, auth, packets, nbytes = _POLICY_ENTRY.unpack(b)
    return {"action": "deny" if flags & 1 else "allow",
            "proxy_port": int.from_bytes(proxy_port, "big"),
            "flags": _bits(flags, POLICY_ENTRY_FLAGS), "auth_type": AUTH_TYPES.get(auth, auth),
            "packets": packets, "bytes": nbytes}


def policy_text(k: dict, v: dict) -> str:
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


def metrics_key(b: bytes) -> dict:
    reason, dir_, line, file = _METRICS_KEY.unpack(b)
    out = {"reason": reason, "reason_desc": REASONS.get(reason, str(reason)),
           "direction": METRIC_DIRECTIONS.get(dir_ & 3, "UNKNOWN"),
           "drop": reason >= 130 or reason == 2}  # DropMin, DropInvalid in drop.go
    if line or file:  # newer releases say where in the datapath the drop happened
        out["line"] = line
        out["file"] = SOURCE_FILES.get(file, str(file))
    return out


def metrics_value(b: bytes, _key: dict) -> dict:
    packets, nbytes = _METRICS_VALUE.unpack(b)
    return {"packets": packets, "bytes": nbytes}


def metrics_total(values: list[dict]) -> dict:
    return {"packets": sum(v["packets"] for v in values), "bytes": sum(v["bytes"] for v in values)}


def metrics_text(k: dict, v: dict) -> str:
    where = f" ({k['file']}:{k['line']})" if "line" in k else ""
    return (f"{k['direction']} {k['reason_desc']}{where} -> "
            f"packets={v['packets']} bytes={v['bytes']}")


# --- cilium_node_map(_v2): node_key -> node id (, spi) ----------------------------

_NODE_KEY = struct.Struct("<3xB16s")


def node_key(b: bytes) -> dict:
    family, ip = _NODE_KEY.unpack(b)
    return {"ip": _family_ip(family, ip), "family": FAMILIES[family]}


def node_value_v1(b: bytes, _key: dict) -> dict:
    return {"node_id": int.from_bytes(b, "little")}


def node_value_v2(b: bytes, _key: dict) -> dict:
    return {"node_id": int.from_bytes(b[:2], "little"), "spi": b[2]}


def node_text(k: dict, v: dict) -> str:
    text = f"{k['ip']} -> id={v['node_id']}"
    return text + (f" spi={v['spi']}" if "spi" in v else "")


# --- cilium_world_cidrs4: lpm (prefixlen, IPv4) -> exists --------------------------


def world_key(b: bytes) -> dict:
    prefixlen = int.from_bytes(b[:4], "little")
    addr = _ip4(b[4:8])
    bits, cidr = _lpm_prefix(prefixlen, 0, 1, addr)
    return {"prefix": cidr, "ip": addr, "prefixlen": bits}


def world_value(b: bytes, _key: dict) -> dict:
    return {"exists": bool(b[0])}


def world_text(k: dict, v: dict) -> str:
    return f"{k['prefix']} -> {'exists' if v['exists'] else 'absent'}"


# --- the table ----------------------------------------------------------------------
