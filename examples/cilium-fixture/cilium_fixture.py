#!/usr/bin/env python3
"""Create and pin Cilium-shaped BPF maps with realistic content, without Cilium.

    sudo .venv/bin/python examples/cilium-fixture/cilium_fixture.py            # create
    sudo .venv/bin/python examples/cilium-fixture/cilium_fixture.py --mutate 2 # + change every 2 s
    sudo .venv/bin/python examples/cilium-fixture/cilium_fixture.py --clean    # unpin

The maps have Cilium's names, types, flags and byte layouts (see
docs/decoding.md), pinned under --bpffs (default /sys/fs/bpf/tc/globals, where
Cilium pins them), so ``pymap get cilium_ipcache_v2`` and
``pymap events cilium_lxc -f`` have something real to show.  The scenario is
one node (192.168.1.10, pods 10.0.1.0/24) of a three-node cluster.

Existing pins of the same names are replaced only with --replace.  Run as root.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from watcher.kernel.maps.kinds import TYPE_IDS
from watcher.kernel.sys import syscall
from watcher.kernel.sys.cpus import possible_cpus

DEFAULT_BPFFS = "/sys/fs/bpf/tc/globals"
BPF_F_NO_PREALLOC = 1
TCP, UDP = 6, 17
HASTUNNEL = 2

# name: (type, key size, value size, max entries, flags); names are the pin names.
MAPS = {
    "cilium_lxc": ("hash", 20, 48, 65535, BPF_F_NO_PREALLOC),
    "cilium_ipcache_v2": ("lpm_trie", 24, 24, 512000, BPF_F_NO_PREALLOC),
    "cilium_lb4_services_v2": ("hash", 12, 12, 65536, 0),
    "cilium_lb4_backends_v3": ("hash", 4, 12, 65536, 0),
    "cilium_lb4_reverse_nat": ("hash", 2, 6, 65536, 0),
    "cilium_policy_00123": ("lpm_trie", 12, 24, 16384, BPF_F_NO_PREALLOC),
    "cilium_metrics": ("percpu_hash", 8, 16, 1024, 0),
    "cilium_node_map_v2": ("hash", 20, 4, 16384, BPF_F_NO_PREALLOC),
    "cilium_world_cidrs4": ("lpm_trie", 8, 1, 16384, BPF_F_NO_PREALLOC),
}
# --legacy: the layouts of older releases, as a node mid-upgrade still has them.
LEGACY_MAPS = {
    "cilium_ipcache": ("lpm_trie", 24, 12, 512000, BPF_F_NO_PREALLOC),
    "cilium_lb4_backends_v2": ("hash", 4, 8, 65536, 0),
    "cilium_policy_00456": ("hash", 8, 24, 16384, 0),
    "cilium_node_map": ("hash", 20, 2, 16384, BPF_F_NO_PREALLOC),
}


def ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def ip_any(text: str) -> tuple[int, bytes]:
    """(family 1/2, 16-byte union) for an endpoint/ipcache/node key."""
    addr = ipaddress.ip_address(text)
    return (1, addr.packed.ljust(16, b"\0")) if addr.version == 4 else (2, addr.packed)


def be16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", "")).ljust(8, b"\0")


# --- keys and values, laid out as Cilium's C structs -------------------------------


def lxc_key(ip: str) -> bytes:
    family, addr = ip_any(ip)
    return struct.pack("<16sBBH", addr, family, 0, 0)


def lxc_value(ep_id: int, sec_id: int, ifindex: int, flags: int = 0, mac_: str = "",
              node_mac: str = "") -> bytes:
    return struct.pack("<IHHI4x8s8sII8x", ifindex, 0, ep_id, flags, mac(mac_ or "00" * 6),
                       mac(node_mac or "00" * 6), sec_id, 0)


def ipcache_key(cidr: str) -> bytes:
    net = ipaddress.ip_network(cidr)
    family, addr = ip_any(str(net.network_address))
    return struct.pack("<IHxB16s", 32 + net.prefixlen, 0, family, addr)


def ipcache_value(identity: int, tunnel: str = "", key: int = 0) -> bytes:
    return struct.pack("<I16s2xBB", identity, ip4(tunnel).ljust(16, b"\0") if tunnel else b"",
                       key, HASTUNNEL if tunnel else 0)


def ipcache_value_v1(identity: int, tunnel: str = "", key: int = 0, node_id: int = 0) -> bytes:
    return struct.pack("<I4sHBB", identity, ip4(tunnel) if tunnel else bytes(4), node_id, key, 0)


def svc_key(addr: str, port: int, proto: int, slot: int = 0, internal: bool = False) -> bytes:
    return struct.pack("<4s2sHBB2x", ip4(addr), be16(port), slot, proto, 1 if internal else 0)


def svc_value(backend_or_affinity: int, count: int, revnat: int, flags: int,
              flags2: int = 0) -> bytes:
    return struct.pack("<IH2sBBH", backend_or_affinity, count, be16(revnat), flags, flags2, 0)


def backend_v3(addr: str, port: int, proto: int, state: int = 0, cluster_id: int = 0,
               zone: int = 0) -> bytes:
    return struct.pack("<4s2sBBHBx", ip4(addr), be16(port), proto, state, cluster_id, zone)


def backend_v2(addr: str, port: int, proto: int, state: int = 0) -> bytes:
    return struct.pack("<4s2sBB", ip4(addr), be16(port), proto, state)


def policy_key(identity: int, egress: bool = False, proto: int = 0, port: int = 0,
               port_bits: int | None = None) -> bytes:
    """An LPM policy key; port_bits < 16 makes a port range (proto must be given)."""
    bits = 0
    if proto:
        bits = 8 + ((16 if port_bits is None else port_bits) if port else 0)
    return struct.pack("<IIBB2s", 40 + bits, identity, 1 if egress else 0, proto, be16(port))


def policy_key_hash(identity: int, egress: bool = False, proto: int = 0, port: int = 0) -> bytes:
    return struct.pack("<I2sBB", identity, be16(port), proto, 1 if egress else 0)


def policy_entry(packets: int = 0, nbytes: int = 0, deny: bool = False, proxy_port: int = 0,
                 wildcard: int = 0) -> bytes:
    return struct.pack("<2sBB4xQQ", be16(proxy_port), (1 if deny else 0) | wildcard, 0,
                       packets, nbytes)


METRICS_INGRESS, METRICS_EGRESS = 1, 2


def metrics_key(reason: int, direction: int, line: int = 0, file: int = 0) -> bytes:
    return struct.pack("<BBHB3x", reason, direction, line, file)


def metrics_values(ncpus: int, per_cpu: list[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack("<QQ", *per_cpu[c]) for c in range(ncpus))


def node_key(ip: str) -> bytes:
    family, addr = ip_any(ip)
    return struct.pack("<3xB16s", family, addr)


def world_key(cidr: str) -> bytes:
    net = ipaddress.ip_network(cidr)
    return struct.pack("<I4s", net.prefixlen, net.network_address.packed)


# --- the scenario ---------------------------------------------------------------------

# Endpoints on this node: ip, endpoint id, identity, ifindex, flags (1 HOST).
ENDPOINTS = [
    ("10.0.1.7", 123, 4321, 12, 0, "be:ef:00:01:07:00"),  # coredns
    ("fd00::1:7", 123, 4321, 12, 0, "be:ef:00:01:07:00"),
    ("10.0.1.23", 456, 5678, 14, 0, "be:ef:00:01:17:00"),  # frontend
    ("10.0.1.51", 789, 9876, 16, 0, "be:ef:00:01:33:00"),  # backend
    ("10.0.1.1", 1877, 1, 3, 1, "ce:9d:3a:00:00:01"),  # cilium_host
]
NODE_MAC = "52:54:00:12:34:56"
# ipcache: prefix, identity, tunnel endpoint.
IPCACHE = [
    ("10.0.1.7/32", 4321, ""), ("10.0.1.23/32", 5678, ""), ("10.0.1.51/32", 9876, ""),
    ("fd00::1:7/128", 4321, ""), ("10.0.1.1/32", 1, ""), ("192.168.1.10/32", 1, ""),
    ("10.0.2.15/32", 4321, "192.168.1.11"), ("10.0.3.9/32", 9876, "192.168.1.12"),
    ("10.0.2.0/24", 2, "192.168.1.11"), ("10.0.3.0/24", 2, "192.168.1.12"),
    ("192.168.1.11/32", 6, ""), ("192.168.1.12/32", 6, ""),
    ("203.0.113.0/24", 16777217, ""), ("0.0.0.0/0", 2, ""),
]
ROUTABLE, NODEPORT = 0x40, 0x02
# Services: (vip, port, proto, rev_nat id, flags, backend ids).
SERVICES = [
    ("10.96.0.10", 53, UDP, 1, ROUTABLE, [1, 2]),  # kube-dns
    ("10.96.0.10", 53, TCP, 2, ROUTABLE, [3, 4]),
    ("10.96.0.1", 443, TCP, 3, ROUTABLE, [5]),  # kubernetes
    ("0.0.0.0", 30080, TCP, 4, NODEPORT, [6, 7]),  # NodePort surrogate
    ("192.168.1.10", 30080, TCP, 5, NODEPORT | ROUTABLE, [6, 7]),
]
# Backends: id -> (address, port, proto, state: 0 active, 1 terminating).
BACKENDS = {
    1: ("10.0.1.7", 53, UDP, 0), 2: ("10.0.2.15", 53, UDP, 0),
    3: ("10.0.1.7", 53, TCP, 0), 4: ("10.0.2.15", 53, TCP, 0),
    5: ("192.168.1.10", 6443, TCP, 0), 6: ("10.0.1.51", 8080, TCP, 0),
    7: ("10.0.3.9", 8080, TCP, 1),
}
NODES = [("192.168.1.11", 1), ("192.168.1.12", 2)]


class Fixture:
    def __init__(self, bpffs: str, legacy: bool):
        self.dir = Path(bpffs)
        self.specs = {**MAPS, **(LEGACY_MAPS if legacy else {})}
        self.fds: dict[str, int] = {}
        self.ncpus = possible_cpus()

    def pin(self, name: str) -> Path:
        return self.dir / name

    def clean(self) -> list[str]:
        removed = []
        for name in {**MAPS, **LEGACY_MAPS}:
            try:
                os.unlink(self.pin(name))
                removed.append(name)
            except FileNotFoundError:
                pass
        return removed

    def existing(self) -> list[str]:
        return [name for name in {**MAPS, **LEGACY_MAPS} if self.pin(name).exists()]

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clean()
        for name, (kind, ks, vs, max_entries, flags) in self.specs.items():
            fd = syscall.map_create(TYPE_IDS[kind], ks, vs, max_entries, name=name, flags=flags)
            syscall.obj_pin(fd, str(self.pin(name)))
            self.fds[name] = fd
        self.populate()

    def open(self) -> None:
        """Reopen existing pins read-write (for --mutate without creating)."""
        for name in self.specs:
            if self.pin(name).exists():
                self.fds[name] = syscall.obj_get(str(self.pin(name)), flags=0)

    def put(self, name: str, key: bytes, value: bytes) -> None:
        if name in self.fds:
            syscall.map_update_elem(self.fds[name], key, value)

    def delete(self, name: str, key: bytes) -> None:
        if name in self.fds:
            try:
                syscall.map_delete_elem(self.fds[name], key)
            except OSError:
                pass

    def populate(self) -> None:
        for ip, ep_id, identity, ifindex, flags, mac_ in ENDPOINTS:
            self.put("cilium_lxc", lxc_key(ip), lxc_value(ep_id, identity, ifindex, flags, mac_,
                                                          NODE_MAC))
        self.put("cilium_lxc", lxc_key("192.168.1.10"), lxc_value(0, 1, 0, 1))  # the host
        for cidr, identity, tunnel in IPCACHE:
            self.put("cilium_ipcache_v2", ipcache_key(cidr), ipcache_value(identity, tunnel))
            if ":" not in cidr:
                self.put("cilium_ipcache", ipcache_key(cidr), ipcache_value_v1(identity, tunnel))
        for vip, port, proto, revnat, flags, backends in SERVICES:
            self.put("cilium_lb4_services_v2", svc_key(vip, port, proto),
                     svc_value(0, len(backends), revnat, flags))
            for slot, backend in enumerate(backends, 1):
                self.put("cilium_lb4_services_v2", svc_key(vip, port, proto, slot),
                         svc_value(backend, 0, revnat, flags))
            self.put("cilium_lb4_reverse_nat", be16(revnat), ip4(vip) + be16(port))
        for backend_id, (addr, port, proto, state) in BACKENDS.items():
            key = backend_id.to_bytes(4, "little")
            self.put("cilium_lb4_backends_v3", key, backend_v3(addr, port, proto, state))
            self.put("cilium_lb4_backends_v2", key, backend_v2(addr, port, proto, state))
        policy = "cilium_policy_00123"
        self.put(policy, policy_key(0, egress=True), policy_entry(1520, 210_443, wildcard=6))
        self.put(policy, policy_key(1), policy_entry(88, 5_280, wildcard=6))
        self.put(policy, policy_key(5678, proto=UDP, port=53), policy_entry(4211, 301_992))
        self.put(policy, policy_key(5678, proto=TCP, port=53), policy_entry(12, 1_480))
        self.put(policy, policy_key(9876, proto=TCP, port=8080, port_bits=13),
                 policy_entry(77, 9_120))
        self.put(policy, policy_key(16777217, proto=TCP, port=443), policy_entry(3, 180, deny=True))
        legacy = "cilium_policy_00456"
        self.put(legacy, policy_key_hash(102, True, TCP, 53), policy_entry(9, 612))
        self.put(legacy, policy_key_hash(0, False), policy_entry(41, 2_870))
        for reason, direction in ((0, METRICS_INGRESS), (0, METRICS_EGRESS),
                                  (133, METRICS_INGRESS), (181, METRICS_EGRESS),
                                  (158, METRICS_EGRESS)):
            packets, nbytes = (2, 120) if reason else (1000, 98_000)
            per_cpu = [(packets * (c + 1), nbytes * (c + 1)) for c in range(self.ncpus)]
            self.put("cilium_metrics", metrics_key(reason, direction),
                     metrics_values(self.ncpus, per_cpu))
        for ip, node_id in NODES:
            self.put("cilium_node_map_v2", node_key(ip), struct.pack("<HBx", node_id, 3))
            self.put("cilium_node_map", node_key(ip), struct.pack("<H", node_id))
        for cidr in ("0.0.0.0/0", "203.0.113.0/24"):
            self.put("cilium_world_cidrs4", world_key(cidr), b"\x01")

    def mutate(self, round_: int, rng: random.Random) -> str:
        """One round of changes, as a busy node would make them."""
        changes = []
        ip, ep_id, identity = "10.0.1.99", 900 + round_ % 50, 5678
        if round_ % 2 == 0:  # a pod starts...
            self.put("cilium_lxc", lxc_key(ip), lxc_value(ep_id, identity, 40 + round_ % 20, 0,
                                                          "be:ef:00:01:63:00", NODE_MAC))
            self.put("cilium_ipcache_v2", ipcache_key(f"{ip}/32"), ipcache_value(identity))
            changes.append(f"+endpoint {ip} id {ep_id}")
        else:  # ...and goes away
            self.delete("cilium_lxc", lxc_key(ip))
            self.delete("cilium_ipcache_v2", ipcache_key(f"{ip}/32"))
            changes.append(f"-endpoint {ip}")
        reason, direction = rng.choice([(0, METRICS_INGRESS), (0, METRICS_EGRESS),
                                        (133, METRICS_INGRESS)])
        per_cpu = [(rng.randrange(10_000), rng.randrange(10_000_000)) for _ in range(self.ncpus)]
        self.put("cilium_metrics", metrics_key(reason, direction),
                 metrics_values(self.ncpus, per_cpu))
        changes.append(f"metrics reason {reason}")
        self.put("cilium_policy_00123", policy_key(5678, proto=UDP, port=53),
                 policy_entry(4211 + 7 * round_, 301_992 + 504 * round_))
        state = round_ % 3 == 2  # a backend flaps between active and terminating
        addr, port, proto, _ = BACKENDS[6]
        self.put("cilium_lb4_backends_v3", (6).to_bytes(4, "little"),
                 backend_v3(addr, port, proto, 1 if state else 0))
        return ", ".join(changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bpffs", default=DEFAULT_BPFFS,
                        help=f"directory under a bpffs mount to pin in (default {DEFAULT_BPFFS})")
    parser.add_argument("--legacy", action="store_true",
                        help="also create older-release layouts: cilium_ipcache, "
                        "cilium_lb4_backends_v2, cilium_policy_00456 (hash key), cilium_node_map")
    parser.add_argument("--mutate", type=float, metavar="SECONDS",
                        help="after creating, keep changing the maps every SECONDS")
    parser.add_argument("--rounds", type=int, default=0,
                        help="with --mutate: stop after this many rounds (0: until Ctrl-C)")
    parser.add_argument("--no-create", action="store_true",
                        help="with --mutate: change maps pinned earlier instead of recreating them")
    parser.add_argument("--replace", action="store_true",
                        help="replace existing pins of the same names (never on a real Cilium node)")
    parser.add_argument("--clean", action="store_true", help="unpin the fixture's maps and exit")
    args = parser.parse_args(argv)

    fixture = Fixture(args.bpffs, args.legacy)
    if args.clean:
        removed = fixture.clean()
        print(f"unpinned {len(removed)} maps from {args.bpffs}")
        return 0
    try:
        if args.no_create:
            fixture.open()
        else:
            if fixture.existing() and not args.replace:
                print(f"cilium_fixture: {args.bpffs} already has {', '.join(fixture.existing())}; "
                      "pass --replace to replace them (never where a real Cilium runs), or "
                      "--no-create --mutate to change them", file=sys.stderr)
                return 1
            fixture.create()
            print(f"pinned {len(fixture.fds)} Cilium-shaped maps in {args.bpffs}:")
            for name in fixture.fds:
                print(f"  {fixture.pin(name)}")
    except OSError as e:
        print(f"cilium_fixture: {e} (run as root, with bpffs mounted)", file=sys.stderr)
        return 1
    if args.mutate:
        rng = random.Random(42)
        round_ = 0
        try:
            while not args.rounds or round_ < args.rounds:
                time.sleep(args.mutate)
                print(f"round {round_}: {fixture.mutate(round_, rng)}", flush=True)
                round_ += 1
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
