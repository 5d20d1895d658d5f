"""The monitoring kit (examples/monitoring/): its alert rules pass ``promtool check rules``,
and a real Prometheus, scraping a real daemon and an exporter whose destination is down,
fires the exporter's alert. Also the exporter's own ``/metrics`` (``--metrics``)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from conftest import REPO, require
from support.events import FAST, wait_ready, wait_until
from support.export import ExportProc
from support.kernel import token, u32, u64
from support.prometheus import Prometheus, free_port, scrape

from watcher.kernel import syscall

RULES = REPO / "examples/monitoring/pymap-alerts.yml"


def test_promtool_checks_the_alert_rules():
    if shutil.which("promtool") is None:
        require("promtool is missing (Debian package prometheus; scripts/setup.sh)")
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {"PymapDaemonDown", "PymapPollErrors", "PymapSubscriberDrops",
            "PymapDiscoveryMissedCreations", "PymapKernelMemoryNearCap",
            "PymapExporterLagging", "PymapExporterDrops"} <= names


def quick_rules(path) -> None:
    """The kit's rules with every ``for:`` at 0s and the lag alert's two minutes of no
    delivery cut to two seconds: the same expressions, on a test's time scale."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["for"] = "0s"
            if rule["alert"] == "PymapExporterLagging":
                assert "pymap_export_checkpoint_age_seconds > 120" in rule["expr"]
                rule["expr"] = rule["expr"].replace("> 120", "> 2")
    path.write_text(yaml.safe_dump(doc))


@pytest.mark.kernel
def test_a_stalled_exporter_fires_its_alert_in_prometheus(tmp_path, maps, daemon_factory):
    require(None if Prometheus.binary() else "the prometheus binary (Debian package "
            "prometheus) is not installed")
    daemon_port, export_port = free_port(), free_port()
    d = daemon_factory(*FAST, "--set", f'metrics.listen="127.0.0.1:{daemon_port}"')
    name = f"mon{token()}"
    fd, _ = maps.create("hash", 4, 8, 64, name=name)
    down = free_port()  # nothing listens there: the SIEM is down
    p = Prometheus(tmp_path, [])
    rules = p.dir / "rules.yml"
    quick_rules(rules)
    p.config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "pymap", "static_configs": [{"targets": [f"127.0.0.1:{daemon_port}"]}]},
            {"job_name": "pymap-export",
             "static_configs": [{"targets": [f"127.0.0.1:{export_port}"]}]}]}))
    with ExportProc(d, name, "--format", "ecs", "--to", f"syslog+tcp://127.0.0.1:{down}",
                    "--metrics", f"127.0.0.1:{export_port}", log=tmp_path / "export.log") as ex:
        p.start()
        try:
            wait_ready(d, name)
            for i in range(20):
                syscall.map_update_elem(fd, u32(i), u64(i))

            def lagging():
                try:
                    m = scrape(f"127.0.0.1:{export_port}")
                except OSError:  # not serving yet
                    assert ex.alive(), ex.stderr()
                    return None
                return m if (m['pymap_export_lag_events{export="default"}'] >= 20
                             and m['pymap_export_buffer_bytes{export="default"}'] > 0) else None

            try:
                m = wait_until(lagging, "the exporter to hold the 20 events written, undelivered",
                               timeout=30)
            except AssertionError as e:
                raise AssertionError(f"{e}: {scrape(f'127.0.0.1:{export_port}')}; "
                                     f"{ex.stderr()}") from None
            assert m['pymap_export_delivered_total{export="default"}'] == 0
            assert m['pymap_export_buffer_bytes{export="default"}'] > 0
            assert m['pymap_export_dropped_total{export="default",reason="buffer_full"}'] == 0
            p.wait_for('ALERTS{alertname="PymapExporterLagging",alertstate="firing"}',
                       lambda r: len(r) == 1, timeout=60)
            # the daemon is up and nothing else of the kit fires
            firing = {r["metric"]["alertname"] for r in p.query('ALERTS{alertstate="firing"}')}
            assert firing == {"PymapExporterLagging"}, firing
        finally:
            p.stop()
        assert ex.alive(), ex.stderr()
    assert "Traceback" not in ex.stderr()
