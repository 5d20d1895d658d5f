"""Declared layouts ([[layouts]] in the config): parsing and validation, decoding,
the choice order, and end to end through a daemon started with ``-c``."""

from __future__ import annotations

import json
import struct
import subprocess
from typing import cast

import pytest
from conftest import PYMAP
from support.events import Follower
from support.kernel import NCPUS, one_error_line, token

from watcher.daemon.config import ConfigError, load_config
from watcher.decode.choose import choose
from watcher.decode.layout import LayoutError, load_layouts, parse_layout
from watcher.wire.schema import MapInfo

FLOW_KEY = [
    {"name": "proto", "type": "u8", "values": {"6": "TCP", "17": "UDP"}},
    {"name": "_", "type": "pad[1]"},
    {"name": "port", "type": "be16"},
    {"name": "addr", "type": "ipv4"},
]
FLOW_VALUE = [{"name": "packets", "type": "u64"}, {"name": "bytes", "type": "u64"}]


def flow_key(proto: int, port: int, addr: bytes) -> bytes:
    return bytes([proto, 0]) + port.to_bytes(2, "big") + addr


def info(name: str, ks: int, vs: int, type_: str = "hash", ncpus: int = 1) -> MapInfo:
    percpu = type_.startswith("percpu")
    return MapInfo(id=1, name=name, type=type_, key_size=ks, value_size=vs, max_entries=16,
                   flags=0, kernel_name=name[:15], percpu=percpu, ncpus=ncpus if percpu else 1)


# --- parsing and validation ---------------------------------------------------------------


def test_parse_and_decode_every_type():
    fields = [
        ("a", "u8", b"\xff", 255), ("b", "u16", b"\x01\x02", 0x0201),
        ("c", "u32", (7).to_bytes(4, "little"), 7), ("d", "u64", (1 << 40).to_bytes(8, "little"), 1 << 40),
        ("e", "s8", b"\xff", -1), ("f", "s16", (-2).to_bytes(2, "little", signed=True), -2),
        ("g", "s32", (-3).to_bytes(4, "little", signed=True), -3),
        ("h", "s64", (-4).to_bytes(8, "little", signed=True), -4),
        ("i", "be16", (443).to_bytes(2, "big"), 443), ("j", "be32", (5).to_bytes(4, "big"), 5),
        ("k", "be64", (6).to_bytes(8, "big"), 6),
        ("l", "ipv4", bytes([10, 0, 1, 7]), "10.0.1.7"),
        ("m", "ipv6", bytes.fromhex("fd000000000000000000000000010007"), "fd00::1:7"),
        ("n", "mac", bytes.fromhex("beef00010700"), "be:ef:00:01:07:00"),
        ("o", "char[8]", b"eth0\0\0\0\0", "eth0"), ("p", "bytes[3]", b"\x01\x02\x03", "010203"),
        ("q", "bool", b"\x01", True), ("", "pad[3]", b"\0\0\0", None),
    ]
    spec = {"match": "all_types", "value": [
        {"name": n, "type": t} if n else {"type": t} for n, t, _, _ in fields]}
    layout = parse_layout(spec)
    assert layout.value is not None
    data = b"".join(raw for _, _, raw, _ in fields)
    assert layout.value.size == len(data)
    assert layout.value.decode(data) == {n: want for n, _, _, want in fields if n}
    assert layout.spec["value_size"] == len(data)  # normalised: sizes filled in


def test_enum_values_and_hex_keys():
    layout = parse_layout({"match": "x", "key": FLOW_KEY, "key_size": 8,
                           "value": [{"name": "state", "type": "u8",
                                      "values": {"0x1": "up", "2": "down"}}]})
    assert layout.key is not None and layout.value is not None
    assert layout.key.decode(flow_key(6, 80, bytes([1, 2, 3, 4]))) == {
        "proto": "TCP", "port": 80, "addr": "1.2.3.4"}
    assert layout.key.decode(flow_key(47, 0, bytes(4)))["proto"] == 47  # unnamed: the number
    assert layout.value.decode(b"\x01") == {"state": "up"}


BAD_LAYOUTS = [
    ({"match": "m", "key": FLOW_KEY, "key_size": 12},
     "layouts[0] (m): key fields add up to 8 bytes, but key_size is 12"),
    ({"match": "m", "key": [{"name": "a", "type": "u24"}]}, "key field 'a': unknown type 'u24'"),
    ({"match": "m", "key": [{"name": "a", "type": "u8"}, {"name": "a", "type": "u8"}]},
     "key field 'a': the name is used twice"),
    ({"match": "m", "value": [{"name": "s", "type": "ipv4", "values": {"1": "x"}}]},
     "value field 's': values (enum names) need an integer type"),
    ({"match": "m", "value": [{"name": "s", "type": "u8", "values": {"one": "x"}}]},
     "value field 's': values key 'one' is not a number"),
    ({"match": "m", "value": [{"type": "u8"}]}, "value[0]: a field needs a name"),
    ({"match": "m", "value": [{"name": "s", "type": "char[0]"}]}, "N must be"),
    ({"match": "m", "value": [{"name": "s", "type": "u8", "size": 2}]}, "unknown keys size"),
    ({"match": "m"}, "declares neither key nor value"),
    ({"key": FLOW_KEY}, "needs match"),
    ({"match": "m", "key": []}, "key must be a non-empty list"),
    ({"match": "m", "key": FLOW_KEY, "value_size": 4}, "value_size without value fields"),
    ({"match": "m", "key": FLOW_KEY, "colour": "red"}, "unknown keys colour"),
]


@pytest.mark.parametrize("raw, words", BAD_LAYOUTS)
def test_bad_layouts_rejected(raw, words):
    with pytest.raises(LayoutError) as e:
        parse_layout(raw, 0)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def _write(tmp_path, text: str):
    path = tmp_path / "pymap.toml"
    path.write_text(text)
    return path


GOOD_CONFIG = """
[[layouts]]
match = "flows_*"
key_size = 8
key = [
  { name = "proto", type = "u8", values = { "6" = "TCP", "17" = "UDP" } },
  { type = "pad[1]" },
  { name = "port", type = "be16" },
  { name = "addr", type = "ipv4" },
]
value = [ { name = "packets", type = "u64" }, { name = "bytes", type = "u64" } ]

[[layouts]]
match = "/sys/fs/bpf/*/states"
value = [ { name = "state", type = "u32", values = { "1" = "up" } } ]
"""


def test_config_layouts_load_and_match(tmp_path):
    conf = load_config(str(_write(tmp_path, GOOD_CONFIG)))
    assert [x["match"] for x in conf.layouts] == ["flows_*", "/sys/fs/bpf/*/states"]
    assert conf.layouts[0]["value_size"] == 16 and conf.layouts[0]["key_size"] == 8
    assert cast(dict, conf.layout_for(["flows_tcp"], []))["match"] == "flows_*"
    assert cast(dict, conf.layout_for(["x"], ["/sys/fs/bpf/pymap/flows_udp"]))["match"] == (
        "flows_*")
    assert cast(dict, conf.layout_for(["x"], ["/sys/fs/bpf/d/states"]))["match"] == (
        "/sys/fs/bpf/*/states")
    assert conf.layout_for(["states"], []) is None  # a / pattern matches pin paths only
    assert load_config(str(_write(tmp_path, "[watch]\ninterval = 2\n"))).layouts == []


def test_config_bad_layout_is_one_line(tmp_path):
    path = _write(tmp_path, GOOD_CONFIG.replace('key_size = 8', 'key_size = 9'))
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == (f"config {path}: layouts[0] (flows_*): key fields add up to 8 bytes, "
                            "but key_size is 9: 1 (proto) + 1 (pad[1]) + 2 (port) + 4 (addr)")
    path = _write(tmp_path, 'layouts = "flows"\n')
    with pytest.raises(ConfigError, match="array of tables"):
        load_config(str(path))


def test_load_layouts_is_the_one_loader_and_words_errors_as_the_config_does(tmp_path):
    """The CLI's --layout files and the daemon's [[layouts]] share the validation and
    the wording: the same table is refused with the same words after the file's name."""
    import tomllib

    layouts = load_layouts(tomllib.loads(GOOD_CONFIG)["layouts"])
    assert [x.match for x in layouts] == ["flows_*", "/sys/fs/bpf/*/states"]
    assert layouts[0].spec["key_size"] == 8
    bad = GOOD_CONFIG.replace('"ipv4"', '"ipv5"')
    with pytest.raises(LayoutError) as e:
        load_layouts(tomllib.loads(bad)["layouts"])
    path = _write(tmp_path, bad)
    with pytest.raises(ConfigError) as c:
        load_config(str(path))
    assert str(c.value) == f"config {path}: {e.value}"
    assert str(e.value).startswith("layouts[0] (flows_*): key field 'addr': unknown type 'ipv5'")
    with pytest.raises(LayoutError, match=r"layouts must be an array of tables \(\[\[layouts"):
        load_layouts({"match": "x"})


BAD_CONFIGS = [
    pytest.param(GOOD_CONFIG.replace("key_size = 8", "key_size = 9"),
                 "layouts[0] (flows_*): key fields add up to 8 bytes", id="sizes"),
    pytest.param(GOOD_CONFIG.replace('"ipv4"', '"ipv5"'),
                 "layouts[0] (flows_*): key field 'addr': unknown type 'ipv5'", id="type"),
    pytest.param(GOOD_CONFIG.replace('"1" = "up"', '"up" = "1"'),
                 "layouts[1] (/sys/fs/bpf/*/states): value field 'state': values key 'up'",
                 id="values"),
]


@pytest.mark.parametrize("text, words", BAD_CONFIGS)
def test_daemon_refuses_bad_layouts(tmp_path, text, words):
    proc = subprocess.run([PYMAP, "daemon", "-c", str(_write(tmp_path, text))],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert words in one_error_line(proc.stderr)


# --- the choice order -----------------------------------------------------------------------


def test_layout_beats_builtin_and_misfit_falls_through_with_a_note():
    spec = {"match": "*", "key": [{"name": "raw", "type": "bytes[24]"}]}
    d = choose(info("cilium_ipcache_v2", 24, 24), None, spec)
    assert d.source == "layout"
    assert d.formatter is not None
    out = d.formatter(bytes(24), bytes(24))
    assert out == {"key": {"raw": "00" * 24}, "value": "00" * 24}  # undeclared side: hex
    misfit = {"match": "*", "key": [{"name": "id", "type": "u32"}]}
    d = choose(info("cilium_ipcache_v2", 24, 24), None, misfit)
    assert d.source == "cilium:cilium_ipcache_v2"
    assert d.notes == ("layout '*' does not fit: key is 4 bytes, the map's 24",)
    d = choose(info("plain", 8, 8), None, misfit)
    assert d.source is None and "does not fit" in d.describe()
    d = choose(info("plain", 8, 8), None, {"match": "*", "key": "nonsense"})
    assert d.source is None and "declared layout not usable" in d.describe()


def test_layout_per_cpu_and_bad_entries():
    spec = {"match": "*", "key": [{"name": "id", "type": "u32"}],
            "value": [{"name": "n", "type": "u32"}]}
    d = choose(info("counts", 4, 4, "percpu_hash", ncpus=3), None, spec)
    assert d.formatter is not None
    values = b"".join(struct.pack("<I4x", n) for n in (1, 2, 3))
    assert d.formatter((9).to_bytes(4, "little"), values) == {
        "key": {"id": 9}, "values": [{"cpu": c, "value": {"n": c + 1}} for c in range(3)]}
    d = choose(info("counts", 4, 4), None, spec)
    assert d.formatter is not None
    assert "error" in d.formatter(b"\1\2\3", b"\0\0\0\0")  # a short buffer: that entry only
    assert d.formatter(b"\1\0\0\0", b"\2\0\0\0") == {"key": {"id": 1}, "value": {"n": 2}}


# --- end to end -----------------------------------------------------------------------------


def _flows_config(tmp_path, name: str, extra: str = "") -> str:
    return str(_write(tmp_path, GOOD_CONFIG.replace("flows_*", f"{name}*") + extra))


@pytest.mark.kernel
def test_get_decodes_with_the_configured_layout(daemon_factory, maps, bpffs_dir, tmp_path):
    from watcher.kernel.sys import syscall

    name = f"flows_{token()}"
    fd, _ = maps.create("hash", 8, 16, 16, name=name, pin=bpffs_dir / name)
    syscall.map_update_elem(fd, flow_key(6, 443, bytes([10, 0, 1, 7])), struct.pack("<QQ", 3, 180))
    syscall.map_update_elem(fd, flow_key(17, 53, bytes([10, 96, 0, 10])), struct.pack("<QQ", 9, 612))
    sfd, _ = maps.create("array", 4, 4, 2, name="states", pin=bpffs_dir / "states")
    syscall.map_update_elem(sfd, b"\0\0\0\0", (1).to_bytes(4, "little"))
    d = daemon_factory("-c", _flows_config(tmp_path, name))

    doc = json.loads(d.cli("get", name, "-o", "json", check=True).stdout)
    assert doc["decoder"] == {"source": "layout", "notes": []}
    got = sorted((e["formatted"]["key"]["proto"], e["formatted"]["key"]["port"],
                  e["formatted"]["key"]["addr"], e["formatted"]["value"]["packets"])
                 for e in doc["entries"])
    assert got == [("TCP", 443, "10.0.1.7", 3), ("UDP", 53, "10.96.0.10", 9)]
    assert all(len(e["key"]) == 16 for e in doc["entries"])  # hex beside formatted

    table = d.cli("get", str(bpffs_dir / name), check=True).stdout
    assert '"proto":"TCP"' in table and "decoded by layout" in table
    # Matched by pin path; the key side is undeclared and there is no BTF: an index in hex.
    states = json.loads(d.cli("get", str(bpffs_dir / "states"), "-o", "json", check=True).stdout)
    assert states["decoder"]["source"] == "layout"
    assert {"key": "00000000", "value": {"state": "up"}} in [e["formatted"]
                                                            for e in states["entries"]]
    raw = json.loads(d.cli("get", name, "-o", "json", "--raw", check=True).stdout)
    assert "formatted" not in raw["entries"][0]


@pytest.mark.kernel
def test_layout_that_does_not_fit_the_map_is_a_note(daemon_factory, maps, bpffs_dir, tmp_path):
    from watcher.kernel.sys import syscall

    name = f"flows_{token()}"
    fd, _ = maps.create("hash", 12, 16, 4, name=name, pin=bpffs_dir / name)
    syscall.map_update_elem(fd, bytes(12), bytes(16))
    d = daemon_factory("-c", _flows_config(tmp_path, name))
    doc = json.loads(d.cli("get", name, "-o", "json", check=True).stdout)
    assert doc["decoder"]["source"] is None
    assert "key is 8 bytes, the map's 12" in doc["decoder"]["notes"][0]
    assert "formatted" not in doc["entries"][0]


@pytest.mark.kernel
def test_cli_layout_file_overrides(daemon, maps, bpffs_dir, tmp_path):
    from watcher.kernel.sys import syscall

    name = f"pairs_{token()}"
    fd, _ = maps.create("percpu_hash", 4, 4, 4, name=name, pin=bpffs_dir / name)
    syscall.map_update_elem(fd, (5).to_bytes(4, "little"),
                            b"".join(struct.pack("<I4x", c) for c in range(NCPUS)))
    spec = tmp_path / "one.toml"
    spec.write_text('key = [ { name = "id", type = "u32" } ]\n'
                    'value = [ { name = "n", type = "u32" } ]\n')
    doc = json.loads(daemon.cli("get", name, "-o", "json", "--layout", str(spec),
                                check=True).stdout)
    assert doc["decoder"]["source"] == "layout"
    assert doc["entries"][0]["formatted"] == {
        "key": {"id": 5}, "values": [{"cpu": c, "value": {"n": c}} for c in range(NCPUS)]}
    bad = tmp_path / "bad.toml"
    bad.write_text('key = [ { name = "id", type = "u33" } ]\n')
    proc = daemon.cli("get", name, "--layout", str(bad))
    assert proc.returncode == 2
    assert "unknown type 'u33'" in one_error_line(proc.stderr)


@pytest.mark.kernel
def test_events_use_the_configured_layout(daemon_factory, maps, bpffs_dir, tmp_path):
    from support.events import FAST, wait_ready

    from watcher.kernel.sys import syscall

    name = f"flows_{token()}"
    fd, _ = maps.create("hash", 8, 16, 16, name=name, pin=bpffs_dir / name)
    d = daemon_factory(*FAST, "-c", _flows_config(tmp_path, name))
    with Follower(d, name, "-f") as follower:
        wait_ready(d, name)
        syscall.map_update_elem(fd, flow_key(6, 22, bytes([192, 168, 1, 11])),
                                struct.pack("<QQ", 1, 60))
        line = follower.wait_count(1)[0]
    assert line["action"] == "added"
    assert line["formatted"] == {"key": {"proto": "TCP", "port": 22, "addr": "192.168.1.11"},
                                 "value": {"packets": 1, "bytes": 60}}
