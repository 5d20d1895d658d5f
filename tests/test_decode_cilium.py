"""Built-in Cilium decoders: pure unit tests on hand-built bytes, then the fixture
(examples/cilium-fixture) pinned under a private bpffs directory and read back
through a real daemon with ``pymap get`` and ``pymap events``."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from typing import cast

import pytest
from conftest import REPO
from support.events import FAST, Follower, wait_ready
from support.kernel import NCPUS

from watcher.decode import cilium
from watcher.decode.choose import choose
from watcher.decode.cilium import CiliumLayout
from watcher.kernel.sys.abi import percpu_slot
from watcher.wire.schema import MapInfo

FIXTURE = REPO / "examples" / "cilium-fixture" / "cilium_fixture.py"


def info(name: str, ks: int, vs: int, type_: str = "hash", **kw) -> MapInfo:
    percpu = type_.startswith("percpu")
    ncpus = kw.pop("ncpus", 2 if percpu else 1)
    return MapInfo(id=1, name=name, type=type_, key_size=ks, value_size=vs, max_entries=16,
                   flags=0, kernel_name=name[:15], percpu=percpu, ncpus=ncpus,
                   value_stride=percpu_slot(vs) * ncpus if percpu else vs, **kw)


def decode(name: str, key: bytes, value: bytes, type_: str = "hash", vs: int | None = None,
           **kw) -> dict:
    d = choose(info(name, len(key), vs or len(value), type_, **kw))
    assert d.formatter is not None, d
    assert d.source and d.source.startswith("cilium:"), d
    return d.formatter(key, value)


def ipcache_key(ip: bytes, bits: int, family: int = 1, cluster: int = 0) -> bytes:
    return struct.pack("<IHxB16s", 32 + bits, cluster, family, ip.ljust(16, b"\0"))


# --- pure decoding ---------------------------------------------------------------------


def test_ipcache_v2_prefix_identity_tunnel():
    value = struct.pack("<I16s2xBB", 4321, bytes([192, 168, 1, 11]), 3, 2)
    out = decode("cilium_ipcache_v2", ipcache_key(bytes([10, 0, 1, 7]), 32), value)
    assert out["key"]["prefix"] == "10.0.1.7/32"
    assert out["value"] == {"identity": 4321, "tunnel_endpoint": "192.168.1.11",
                            "encrypt_key": 3, "flags": ["hastunnel"]}
    assert out["text"] == ("10.0.1.7/32 -> identity=4321 encryptkey=3 "
                           "tunnelendpoint=192.168.1.11 flags=hastunnel")
    out = decode("cilium_ipcache_v2", ipcache_key(bytes([10, 0, 2, 0]), 24, cluster=7),
                 struct.pack("<I16s2xBB", 2, b"", 0, 0))
    assert out["key"]["prefix"] == "10.0.2.0/24" and out["key"]["cluster_id"] == 7
    assert out["text"].startswith("10.0.2.0/24@7 -> identity=2 ")


def test_ipcache_ipv6_key_and_ipv6_tunnel():
    import ipaddress

    v6 = ipaddress.IPv6Address("fd00::1:7").packed
    tunnel = ipaddress.IPv6Address("2001:db8::11").packed
    out = decode("cilium_ipcache_v2", ipcache_key(v6, 128, family=2),
                 struct.pack("<I16s2xBB", 9, tunnel, 0, 2 | 4))
    assert out["key"]["prefix"] == "fd00::1:7/128"
    assert out["value"]["tunnel_endpoint"] == "2001:db8::11"
    assert out["value"]["flags"] == ["hastunnel", "ipv6tunnel"]


def test_ipcache_v1_12_byte_value():
    value = struct.pack("<I4sHBB", 5678, bytes([192, 168, 1, 12]), 2, 1, 0)
    out = decode("cilium_ipcache", ipcache_key(bytes([10, 0, 3, 9]), 32), value)
    assert out["value"] == {"identity": 5678, "tunnel_endpoint": "192.168.1.12",
                            "encrypt_key": 1, "flags": [], "node_id": 2}


def test_lxc_endpoint():
    key = struct.pack("<16sBBH", bytes([10, 0, 1, 7]), 1, 0, 0)
    value = struct.pack("<IHHI4x8s8sII8x", 12, 0, 123, 1, bytes.fromhex("beef00010700"),
                        bytes.fromhex("525400123456"), 4321, 0)
    out = decode("cilium_lxc", key, value)
    assert out["key"] == {"ip": "10.0.1.7", "family": "IPv4", "key": 0, "cluster_id": 0}
    assert out["value"]["id"] == 123 and out["value"]["sec_id"] == 4321
    assert out["value"]["flags"] == ["HOST"]
    assert out["value"]["mac"] == "be:ef:00:01:07:00"
    assert out["value"]["node_mac"] == "52:54:00:12:34:56"


def test_services_frontend_and_backend_slot():
    key0 = struct.pack("<4s2sHBB2x", bytes([10, 96, 0, 10]), (53).to_bytes(2, "big"), 0, 17, 0)
    # rev_nat_index is stored in network byte order, like the reverse-NAT map's key.
    front = struct.pack("<IH2sBBH", 0, 2, (1).to_bytes(2, "big"), 0x40, 0, 0)
    out = decode("cilium_lb4_services_v2", key0, front)
    assert out["key"] == {"address": "10.96.0.10", "port": 53, "backend_slot": 0,
                          "proto": "UDP", "scope": "external"}
    assert out["value"] == {"count": 2, "qcount": 0, "rev_nat_index": 1, "flags": ["ClusterIP"]}
    assert out["text"] == "10.96.0.10:53/UDP (0) -> count=2 revnat=1 [ClusterIP]"
    key1 = struct.pack("<4s2sHBB2x", bytes(4), (30080).to_bytes(2, "big"), 1, 6, 1)
    slot = struct.pack("<IH2sBBH", 7, 0, (4).to_bytes(2, "big"), 0x02 | 0x04, 0x10, 0)
    out = decode("cilium_lb4_services_v2", key1, slot)
    assert out["value"]["backend_id"] == 7
    assert out["value"]["flags"] == ["NodePort", "Local", "InternalLocal", "non-routable"]
    assert out["text"].startswith("0.0.0.0:30080/TCP/i (1) -> backend_id=7 revnat=4 ")


def test_backends_v3_v2_and_reverse_nat():
    out = decode("cilium_lb4_backends_v3", (6).to_bytes(4, "little"),
                 struct.pack("<4s2sBBHBx", bytes([10, 0, 1, 51]), (8080).to_bytes(2, "big"), 6, 1,
                             3, 0))
    assert out["value"] == {"address": "10.0.1.51", "port": 8080, "proto": "TCP",
                            "state": "terminating", "cluster_id": 3, "zone": 0}
    assert out["text"] == "6 -> TCP://10.0.1.51@3:8080 [terminating]"
    out = decode("cilium_lb4_backends_v2", (2).to_bytes(4, "little"),
                 struct.pack("<4s2sBB", bytes([10, 0, 2, 15]), (53).to_bytes(2, "big"), 17, 0))
    assert out["text"] == "2 -> UDP://10.0.2.15:53"
    out = decode("cilium_lb4_reverse_nat", (3).to_bytes(2, "big"),
                 bytes([10, 96, 0, 1]) + (443).to_bytes(2, "big"))
    assert out["key"] == {"rev_nat_index": 3}
    assert out["text"] == "3 -> 10.96.0.1:443"


def test_policy_lpm_key_and_older_hash_key():
    entry = struct.pack("<2sBB4xQQ", (15001).to_bytes(2, "big"), 0, 0, 10, 1000)
    key = struct.pack("<IIBB2s", 64, 5678, 0, 17, (53).to_bytes(2, "big"))
    out = decode("cilium_policy_00123", key, entry)
    assert out["key"]["ports"] == "53/UDP" and out["key"]["direction"] == "Ingress"
    assert out["value"]["proxy_port"] == 15001 and out["value"]["action"] == "allow"
    assert out["text"] == "Ingress: 5678 53/UDP -> allow proxy_port=15001 packets=10 bytes=1000"
    wildcard = decode("cilium_policy_00123", struct.pack("<IIBB2s", 40, 0, 1, 0, b"\0\0"),
                      struct.pack("<2sBB4xQQ", b"\0\0", 1, 0, 0, 0))
    assert wildcard["text"].startswith("Egress: 0 ANY -> deny")
    ranged = decode("cilium_policy_00123",
                    struct.pack("<IIBB2s", 40 + 8 + 13, 9, 0, 6, (8080).to_bytes(2, "big")), entry)
    assert ranged["key"]["ports"] == "8080-8087/TCP"
    # The older 8-byte hash key, example from the layout notes: identity 102, 53/TCP, egress.
    old = decode("cilium_policy_00456", bytes.fromhex("6600000000350601"), entry)
    assert old["key"] == {"identity": 102, "direction": "Egress", "proto": "TCP", "port": 53,
                          "ports": "53/TCP"}


def test_metrics_per_cpu_summed():
    key = struct.pack("<BBHB3x", 133, 1, 0, 0)
    values = struct.pack("<QQ", 2, 120) + struct.pack("<QQ", 5, 300) + struct.pack("<QQ", 1, 60)
    out = decode("cilium_metrics", key, values, "percpu_hash", vs=16, ncpus=3)
    assert out["key"]["reason_desc"] == "Policy denied" and out["key"]["direction"] == "INGRESS"
    assert [v["value"]["packets"] for v in out["values"]] == [2, 5, 1]
    assert out["total"] == {"packets": 8, "bytes": 480}
    assert out["text"] == "INGRESS Policy denied -> packets=8 bytes=480"


def test_node_maps_and_world_cidrs():
    key = struct.pack("<3xB16s", 1, bytes([192, 168, 1, 11]))
    assert decode("cilium_node_map_v2", key, struct.pack("<HBx", 1, 3))["text"] == \
        "192.168.1.11 -> id=1 spi=3"
    assert decode("cilium_node_map", key, struct.pack("<H", 2))["value"] == {"node_id": 2}
    out = decode("cilium_world_cidrs4", struct.pack("<I4s", 24, bytes([203, 0, 113, 0])), b"\1")
    assert out["text"] == "203.0.113.0/24 -> exists"


def test_chosen_by_name_and_size_and_cut_kernel_names():
    # The kernel keeps 15 characters; pins give the full name, sizes pick the layout.
    assert cast(CiliumLayout, cilium.find(["cilium_lb4_back"], 4, 12)[0]).map == (
        "cilium_lb4_backends_v3")
    assert cast(CiliumLayout, cilium.find(["cilium_lb4_back"], 4, 8)[0]).map == (
        "cilium_lb4_backends_v2")
    assert cast(CiliumLayout, cilium.find(["cilium_ipcache_"], 24, 12)[0]).map == "cilium_ipcache"
    assert cast(CiliumLayout, cilium.find(["cilium_policy_0"], 8, 24)[0]).key_size == 8
    assert cilium.find(["my_map"], 24, 24) == (None, None)
    layout, note = cilium.find(["cilium_lxc"], 20, 40)
    assert layout is None and note is not None and "20/40" in note and "20/48" in note


def test_unknown_sizes_fall_back_to_btf_then_hex_with_a_note():
    # A tiny BTF blob: type 1 is a 4-byte unsigned int.
    strings = b"\0u32\0"
    types = struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", 32)
    btf = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                      len(strings)) + types + strings
    m = info("cilium_lxc", 4, 4, btf_id=9, btf_key_type_id=1, btf_value_type_id=1)
    d = choose(m, btf)
    assert d.source == "btf"
    assert any("no known Cilium layout" in n for n in d.notes), d.notes
    assert d.formatter is not None
    assert d.formatter(b"\1\0\0\0", b"\2\0\0\0") == {"key": 1, "value": 2}
    d = choose(info("cilium_lxc", 4, 4))
    assert d.formatter is None and d.source is None
    assert "no known Cilium layout" in d.describe()


def test_one_bad_entry_gets_an_error_the_others_decode():
    d = choose(info("cilium_ipcache_v2", 24, 24))
    assert d.formatter is not None
    good = d.formatter(ipcache_key(bytes([10, 0, 0, 1]), 32), bytes(24))
    bad = d.formatter(struct.pack("<IHxB16s", 20, 0, 1, bytes(16)), bytes(24))  # prefix < 32
    worse = d.formatter(struct.pack("<IHxB16s", 64, 0, 9, bytes(16)), bytes(24))  # family 9
    assert good["key"]["prefix"] == "10.0.0.1/32"
    assert "prefix length" in bad["error"]
    assert "family" in worse["error"]


# --- the fixture, a daemon, the CLI ------------------------------------------------------


def run_fixture(bpffs_dir, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(FIXTURE), "--bpffs", str(bpffs_dir), *args],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def get_json(daemon, selector: str, *args: str) -> dict:
    proc = daemon.cli("get", selector, "-o", "json", *args, check=True)
    doc = json.loads(proc.stdout)
    assert doc["count"] == len(doc["entries"])
    return doc


def texts(doc: dict) -> set[str]:
    return {e["formatted"]["text"] for e in doc["entries"]}


@pytest.mark.kernel
def test_fixture_ipcache_by_name(daemon, bpffs_dir):
    run_fixture(bpffs_dir)
    doc = get_json(daemon, "cilium_ipcache_v2")
    assert doc["decoder"]["source"] == "cilium:cilium_ipcache_v2"
    by_prefix = {e["formatted"]["key"]["prefix"]: e["formatted"]["value"] for e in doc["entries"]}
    assert by_prefix["10.0.1.7/32"]["identity"] == 4321
    assert by_prefix["10.0.2.15/32"] == {"identity": 4321, "tunnel_endpoint": "192.168.1.11",
                                         "encrypt_key": 0, "flags": ["hastunnel"]}
    assert by_prefix["10.0.2.0/24"]["identity"] == 2
    assert by_prefix["0.0.0.0/0"]["identity"] == 2
    assert by_prefix["fd00::1:7/128"]["identity"] == 4321
    for e in doc["entries"]:  # raw hex stays beside the decoded form
        assert len(e["key"]) == 48 and len(e["value"]) == 48


EXPECTED_TEXT = {
    "cilium_lxc": "10.0.1.7:0 -> id=123 sec_id=4321 flags=<none> ifindex=12 "
                  "mac=be:ef:00:01:07:00 nodemac=52:54:00:12:34:56 parent_ifindex=0",
    "cilium_ipcache_v2": "10.0.3.9/32 -> identity=9876 encryptkey=0 tunnelendpoint=192.168.1.12 "
                         "flags=hastunnel",
    "cilium_ipcache": "10.0.3.0/24 -> identity=2 encryptkey=0 tunnelendpoint=192.168.1.12 "
                      "flags=<none>",
    "cilium_lb4_services_v2": "10.96.0.10:53/UDP (0) -> count=2 revnat=1 [ClusterIP]",
    "cilium_lb4_backends_v3": "7 -> TCP://10.0.3.9:8080 [terminating]",
    "cilium_lb4_backends_v2": "5 -> TCP://192.168.1.10:6443",
    "cilium_lb4_reverse_nat": "4 -> 0.0.0.0:30080",
    "cilium_policy_00123": "Ingress: 5678 53/UDP -> allow packets=4211 bytes=301992",
    "cilium_policy_00456": "Egress: 102 53/TCP -> allow packets=9 bytes=612",
    "cilium_node_map_v2": "192.168.1.11 -> id=1 spi=3",
    "cilium_node_map": "192.168.1.12 -> id=2",
    "cilium_world_cidrs4": "203.0.113.0/24 -> exists",
    "cilium_metrics": f"INGRESS Policy denied -> packets={sum(2 * (c + 1) for c in range(NCPUS))} "
                      f"bytes={sum(120 * (c + 1) for c in range(NCPUS))}",
}


@pytest.mark.kernel
def test_fixture_every_map_decodes(daemon, bpffs_dir):
    out = run_fixture(bpffs_dir, "--legacy").stdout
    assert set(EXPECTED_TEXT) <= set(os.listdir(bpffs_dir)), out
    for name, expected in EXPECTED_TEXT.items():
        doc = get_json(daemon, str(bpffs_dir / name))
        assert doc["decoder"]["source"].startswith("cilium:"), (name, doc["decoder"])
        assert doc["entries"], name
        assert all("error" not in e["formatted"] for e in doc["entries"]), name
        assert expected in texts(doc), (name, sorted(texts(doc)))
    metrics = get_json(daemon, str(bpffs_dir / "cilium_metrics"))
    for e in metrics["entries"]:
        f = e["formatted"]
        assert len(f["values"]) == NCPUS
        assert f["total"]["packets"] == sum(v["value"]["packets"] for v in f["values"])


@pytest.mark.kernel
def test_fixture_table_and_raw(daemon, bpffs_dir):
    run_fixture(bpffs_dir)
    pin = str(bpffs_dir / "cilium_ipcache_v2")
    table = daemon.cli("get", pin, check=True).stdout
    assert "10.0.1.7/32" in table and "identity=4321" in table
    assert "decoded by cilium:cilium_ipcache_v2" in table
    raw = daemon.cli("get", pin, "--raw", check=True).stdout
    assert "10.0.1.7/32" not in raw and "40 00 00 00" in raw
    lxc = daemon.cli("get", str(bpffs_dir / "cilium_lxc"), check=True).stdout
    assert "[fd00::1:7]:0" in lxc  # not eaten as rich markup
    metrics = daemon.cli("get", str(bpffs_dir / "cilium_metrics"), check=True).stdout
    assert " all " in metrics and "Policy denied" in metrics


@pytest.mark.kernel
def test_unknown_sizes_fall_back_with_a_note(daemon, maps, bpffs_dir):
    odd = bpffs_dir / "odd"
    odd.mkdir()
    fd, _ = maps.create("hash", 20, 40, 8, name="cilium_lxc", pin=odd / "cilium_lxc")
    from watcher.kernel.sys import syscall

    syscall.map_update_elem(fd, bytes(range(20)), bytes(40))
    doc = get_json(daemon, str(odd / "cilium_lxc"))
    assert doc["decoder"]["source"] is None
    assert "20/40 match no known Cilium layout" in " ".join(doc["decoder"]["notes"])
    assert "formatted" not in doc["entries"][0]
    assert doc["entries"][0]["key"] == bytes(range(20)).hex()
    table = daemon.cli("get", str(odd / "cilium_lxc"), check=True).stdout
    assert "shown as hex" in table and "no known Cilium layout" in table


@pytest.mark.kernel
def test_bad_entry_does_not_stop_the_others(daemon, bpffs_dir):
    run_fixture(bpffs_dir)
    from watcher.kernel.sys import syscall

    pin = str(bpffs_dir / "cilium_ipcache_v2")
    fd = syscall.obj_get(pin, flags=0)
    try:  # prefix length 20 is below the 32 bits of cluster id, pad and family
        syscall.map_update_elem(fd, struct.pack("<IHxB16s", 20, 0, 1, bytes(16)), bytes(24))
    finally:
        os.close(fd)
    doc = get_json(daemon, pin)
    errors = [e for e in doc["entries"] if "error" in e["formatted"]]
    assert len(errors) == 1 and "prefix length" in errors[0]["formatted"]["error"]
    assert len(doc["entries"]) - 1 == sum("text" in e["formatted"] for e in doc["entries"])
    table = daemon.cli("get", pin, check=True)
    assert table.returncode == 0 and "not decoded" in table.stdout


@pytest.mark.kernel
def test_events_carry_formatted_text(daemon_factory, bpffs_dir):
    run_fixture(bpffs_dir)
    d = daemon_factory(*FAST)
    pin = str(bpffs_dir / "cilium_lxc")
    with Follower(d, pin, "-f") as follower:
        wait_ready(d, "cilium_lxc")
        run_fixture(bpffs_dir, "--no-create", "--mutate", "0.05", "--rounds", "1")
        lines = follower.wait_count(1)
    added = lines[0]
    assert added["action"] == "added"
    assert added["formatted"]["key"]["ip"] == "10.0.1.99"
    assert added["formatted"]["text"].startswith("10.0.1.99:0 -> id=900 sec_id=5678")
    assert added["key"] == struct.pack("<16sBBH", bytes([10, 0, 1, 99]), 1, 0, 0).hex()


@pytest.mark.kernel
def test_fixture_clean(bpffs_dir):
    run_fixture(bpffs_dir, "--legacy")
    assert "cilium_lxc" in os.listdir(bpffs_dir)
    out = run_fixture(bpffs_dir, "--clean").stdout
    assert "unpinned 13 maps" in out
    assert os.listdir(bpffs_dir) == []
