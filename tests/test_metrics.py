"""Prometheus metrics: a real Prometheus scrapes the daemon; its HTTP API must see the
daemon's own figures and a real map's entries exactly as bpftool dumps them."""

from __future__ import annotations

import urllib.request

import pytest
from conftest import require
from support.kernel import NCPUS, bpftool_dump, percpu_value, token, u32, u64
from support.prometheus import Prometheus, free_port, scrape

from watcher.daemon.metricfields import entry_value, field_at
from watcher.kernel.sys import syscall

PROTO = {1: "ICMP", 6: "TCP", 17: "UDP"}


def _le(byte_strings: list[str]) -> int:
    return int.from_bytes(bytes(int(b, 16) for b in byte_strings), "little")


def _config(tmp_path, listen: str, flows: str, cpu: str) -> str:
    conf = tmp_path / "pymap.toml"
    conf.write_text(f"""
[watch]
interval = 0.5

[metrics]
listen = "{listen}"

[[layouts]]
match = "pmx_*"
key = [ {{ name = "proto", type = "u32", values = {{ "1" = "ICMP", "6" = "TCP", "17" = "UDP" }} }} ]
value = [ {{ name = "packets", type = "u64" }} ]

[[metrics.maps]]
map = "{flows}"
name = "pymap_test_flow_packets"
type = "counter"
help = "Packets per protocol"
labels = [ {{ name = "proto", field = "key.proto" }} ]
value = "value.packets"

[[metrics.maps]]
map = "{cpu}"
name = "pymap_test_cpu_packets"
labels = [ {{ name = "proto", field = "key.proto" }} ]
value = "value.packets"
""")
    return str(conf)


@pytest.fixture
def prometheus_factory(tmp_path):
    require(None if Prometheus.binary() else "the prometheus binary (Debian package "
            "prometheus) is not installed")
    started: list[Prometheus] = []

    def make(targets: list[str]) -> Prometheus:
        p = Prometheus(tmp_path, targets)
        started.append(p)
        p.start()
        return p

    yield make
    for p in started:
        p.stop()


def test_prometheus_sees_map_entries_as_bpftool_does(tmp_path, maps, daemon_factory,
                                                       prometheus_factory):
    tag = token()
    flows, cpu = f"pmx_f{tag}", f"pmx_c{tag}"
    ffd, fid = maps.create("hash", 4, 8, 16, name=flows)
    cfd, cid = maps.create("percpu_hash", 4, 8, 16, name=cpu)

    for proto, packets in ((1, 7), (6, 600), (17, 1700)):
        syscall.map_update_elem(ffd, u32(proto), u64(packets))
        syscall.map_update_elem(cfd, u32(proto), percpu_value(
            8, [u64(packets * (c + 1)) for c in range(NCPUS)]))
    port = free_port()
    daemon = daemon_factory("-c", _config(tmp_path, f"127.0.0.1:{port}", flows, cpu))
    prom = prometheus_factory([f"127.0.0.1:{port}"])

    # bpftool is the oracle: its dump, decoded by hand.
    want_flows = {PROTO[_le(e["key"])]: float(_le(e["value"])) for e in bpftool_dump(fid)}
    want_cpu = {PROTO[_le(e["key"])]: float(sum(_le(v["value"]) for v in e["values"]))
                for e in bpftool_dump(cid)}
    assert want_flows == {"ICMP": 7.0, "TCP": 600.0, "UDP": 1700.0}

    def as_dict(result):
        return {r["metric"]["proto"]: float(r["value"][1]) for r in result}

    got = prom.wait_for("pymap_test_flow_packets_total", lambda r: as_dict(r) == want_flows)
    assert all(r["metric"]["job"] == "pymap" for r in got)
    prom.wait_for("pymap_test_cpu_packets", lambda r: as_dict(r) == want_cpu)

    # A change in the map reaches Prometheus at the next poll and scrape.
    syscall.map_update_elem(ffd, u32(6), u64(601))
    want_flows["TCP"] = 601.0
    assert {PROTO[_le(e["key"])]: float(_le(e["value"])) for e in bpftool_dump(fid)} == want_flows
    prom.wait_for("pymap_test_flow_packets_total", lambda r: as_dict(r) == want_flows)

    # The daemon's own figures: both maps polled, the change published as an event.
    polls = prom.wait_for(f'pymap_map_polls_total{{map=~"pmx_.{tag}"}}', lambda r: len(r) == 2)
    assert {r["metric"]["id"] for r in polls} == {str(fid), str(cid)}
    prom.wait_for(f'pymap_map_events_total{{map="{flows}"}}',
                  lambda r: r and float(r[0]["value"][1]) >= 1)
    prom.wait_for(f'pymap_map_poll_seconds_total{{map="{flows}"}}',
                  lambda r: r and float(r[0]["value"][1]) > 0)
    assert prom.query('pymap_config_reloads_total{result="refused"}')[0]["value"][1] == "0"
    assert {r["metric"]["reason"]: r["value"][1] for r in prom.query(
        "pymap_connections_refused_total")} == {"unknown_key": "0"}
    for bound in ("requests_refused", "replies_dropped", "subscriptions_refused"):
        # Exported from the start (zero until a bound is hit: tests/test_abuse.py hits them).
        assert prom.query(f"pymap_{bound}_total")[0]["value"][1] == "0"
    errors = prom.query("pymap_metrics_decode_errors_total")
    assert {r["metric"]["metric"]: r["value"][1] for r in errors} == {
        "pymap_test_flow_packets": "0", "pymap_test_cpu_packets": "0"}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert "# HELP pymap_test_flow_packets_total Packets per protocol" in text
    # Map discovery: the gauge agrees with what the daemon logged at start; the creations
    # it missed are exported by reason (none here: a few maps, nothing near a bound).
    samples = scrape(f"127.0.0.1:{port}")
    by_tracepoint = "map discovery: bpf() syscall tracepoints" in daemon.log.read_text()
    assert samples["pymap_map_discovery_tracepoint"] == float(by_tracepoint)
    assert {k: v for k, v in samples.items() if k.startswith("pymap_map_creations_missed")} == {
        f'pymap_map_creations_missed_total{{reason="{r}"}}': 0.0
        for r in ("ring_full", "unresolved", "queue_full")}
    assert daemon.cli("ping").returncode == 0


def test_metrics_endpoint_refuses_a_port_in_use(tmp_path, daemon_factory):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d = daemon_factory("--set", f'metrics.listen="127.0.0.1:{port}"', start=False)
        with pytest.raises(RuntimeError) as e:
            d.start()
    lines = [ln for ln in str(e.value).splitlines() if ln.strip()]
    assert "metrics.listen" in lines[-1] and "Traceback" not in str(e.value)


def test_field_paths_and_per_cpu_sums():
    entry = {"key": {"proto": "TCP"}, "value": {"packets": 3, "hist": [1, 2]}}
    assert field_at(entry, "key.proto") == "TCP"
    assert field_at(entry, "value.hist.1") == 2
    assert entry_value(entry, "value.packets") == 3.0
    per_cpu = {"key": 1, "values": [{"cpu": 0, "value": {"p": 2}}, {"cpu": 1, "value": {"p": 5}}]}
    assert entry_value(per_cpu, "value.p") == 7.0
    assert entry_value({"key": 1, "value": "0x10"}, "value") == 16.0
    with pytest.raises(ValueError):
        field_at(entry, "value.bytes")
