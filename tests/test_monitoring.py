"""The monitoring kit (examples/monitoring/): its alert rules pass ``promtool check rules``,
and a real Prometheus, scraping a real daemon and an exporter whose destination is down,
fires the exporter's alert. Also the exporter's own ``/metrics`` (``--metrics``), and the
Grafana dashboard: every metric its queries read is on a live ``/metrics``, and a real
Prometheus answers every query."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import cast

import attrs
import pytest
import yaml
from conftest import REPO, require
from support import manifest
from support.events import FAST, wait_ready, wait_until
from support.export import ExportProc
from support.kernel import token, u32, u64
from support.markdown import code_blocks
from support.prometheus import Prometheus, free_port, scrape

from watcher.kernel.sys import syscall

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


@attrs.frozen
class Kit:
    """A daemon serving metrics, one map it watches, and a free port for an exporter's."""
    daemon: object
    name: str
    fd: int
    daemon_port: int
    export_port: int

    def prometheus(self, tmp_path, rules: bool = False) -> Prometheus:
        """A Prometheus (not started) scraping the daemon as job ``pymap`` and the exporter
        as ``pymap-export``, the job names of the kit; with ``rules``, the alert rules
        as :func:`quick_rules` makes them, evaluated every second."""
        p = Prometheus(tmp_path, [])
        config: dict = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in (("pymap", self.daemon_port),
                                  ("pymap-export", self.export_port))]}
        if rules:
            quick_rules(p.dir / "rules.yml")
            config["rule_files"] = [str(p.dir / "rules.yml")]
        p.config.write_text(json.dumps(config))
        return p


@pytest.fixture
def kit(maps, daemon_factory) -> Kit:
    require(None if Prometheus.binary() else "the prometheus binary (Debian package "
            "prometheus) is not installed")
    daemon_port, export_port = free_port(), free_port()
    d = daemon_factory(*FAST, "--set", f'metrics.listen="127.0.0.1:{daemon_port}"')
    name = f"mon{token()}"
    fd, _ = maps.create("hash", 4, 8, 64, name=name)
    return Kit(d, name, fd, daemon_port, export_port)


@pytest.mark.kernel
def test_a_stalled_exporter_fires_its_alert_in_prometheus(tmp_path, kit):
    d, name, fd, export_port = kit.daemon, kit.name, kit.fd, kit.export_port
    down = free_port()  # nothing listens there: the SIEM is down
    p = kit.prometheus(tmp_path, rules=True)
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


# --- the Grafana dashboard -------------------------------------------------------------

DASHBOARD = REPO / "examples/monitoring/pymap-dashboard.json"
# Grafana's own variables, given the values Grafana would (a range) and ours (All: ".*").
GRAFANA_RANGES = ("$__rate_interval", "$__interval", "$__range")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard, panels in rows included,
    with its variables given values: Grafana's ranges 1m, ours (instance, exporter) All."""
    doc = json.loads(DASHBOARD.read_text())
    panels = [p for top in doc["panels"] for p in (top, *top.get("panels", ()))]
    out = []
    for panel in panels:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for name in GRAFANA_RANGES:
                expr = expr.replace(name, "1m")
            out.append((panel["title"], re.sub(r"\$\{?\w+\}?", ".*", expr)))
    return out


def variable_metrics() -> set[str]:
    """The metrics the dashboard's variables take their values from (label_values(m, l))."""
    doc = json.loads(DASHBOARD.read_text())
    return {cast(re.Match, re.fullmatch(r"label_values\((\w+),\s*\w+\)", v["query"]["query"])).group(1)
            for v in doc["templating"]["list"] if v["type"] == "query"}


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects, from its syntax tree (promql-parser): the name of
    each vector selector, bare or in a range, under any function, aggregation or operator."""
    import promql_parser as pp

    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, pp.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr}"
            names.add(node.name)
        elif isinstance(node, pp.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, pp.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, pp.Call):
            for arg in node.args:
                walk(arg)
        elif isinstance(node, pp.AggregateExpr):
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(node, (pp.ParenExpr, pp.SubqueryExpr, pp.UnaryExpr)):
            walk(node.expr)
        else:
            assert isinstance(node, (pp.NumberLiteral, pp.StringLiteral)), (node, expr)

    walk(pp.parse(expr))
    return names


def exposed_names(text: str) -> dict[str, int]:
    """Every sample name a ``/metrics`` page declares (counters with ``_total``, histograms
    and summaries with ``_bucket``/``_sum``/``_count``), each with how many samples it has
    now: a family with no series yet (no reason seen) still exists."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count")}
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            out.setdefault(family.name + suffix, 0)
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0) + 1
    return out


def test_the_dashboard_parses_and_its_metrics_are_documented():
    queries = dashboard_queries()
    assert len(queries) > 30
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))
    docs = (REPO / "docs/operations.md").read_text() + (REPO / "docs/export.md").read_text()
    used = set().union(*(metric_names(q) for _, q in queries)) | variable_metrics()
    # documented as written, or as one of a pair: `pymap_a_total`, `pymap_b_total`
    missing = {m for m in used - {"up"} if f"`{m}`" not in docs and f"`{m}{{" not in docs}
    assert not missing, f"dashboard metrics not in docs/operations.md or docs/export.md: {missing}"


def get_text(listen: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as reply:
        return reply.read().decode()


@pytest.mark.kernel
def test_every_dashboard_query_runs_on_live_metrics(tmp_path, kit):
    """A real daemon and a real exporter (delivering to a file) serve /metrics; every
    metric the dashboard queries is on one of them, and a real Prometheus scraping both
    (jobs pymap and pymap-export, as the dashboard and the alert rules expect) answers
    every query, with data where every metric it reads has series."""
    d, name, fd = kit.daemon, kit.name, kit.fd
    daemon_port, export_port = kit.daemon_port, kit.export_port
    out = tmp_path / "out.jsonl"
    with ExportProc(d, name, "--to", f"file://{out}", "--metrics", f"127.0.0.1:{export_port}",
                    log=tmp_path / "export.log") as ex:
        wait_ready(d, name)
        for i in range(5):
            syscall.map_update_elem(fd, u32(i), u64(i))

        def serving():
            try:
                return get_text(f"127.0.0.1:{export_port}")
            except OSError:
                assert ex.alive(), ex.stderr()
                return None

        wait_until(lambda: serving() and scrape(f"127.0.0.1:{export_port}")
                   ['pymap_export_delivered_total{export="default"}'] >= 5,
                   "the exporter to deliver the 5 events")
        exposed = exposed_names(get_text(f"127.0.0.1:{daemon_port}")) | exposed_names(
            serving() or "")
        queries = dashboard_queries()
        for metric in variable_metrics():
            assert exposed.get(metric), f"variable's {metric} has no series: {exposed}"
        for title, expr in queries:
            absent = metric_names(expr) - set(exposed) - {"up"}  # up: Prometheus' own
            assert not absent, f"panel {title!r}: {absent} on neither /metrics ({expr})"

        p = kit.prometheus(tmp_path)
        p.start()
        try:
            p.wait_for('up == 1', lambda r: len(r) == 2, timeout=30)
            # two scrapes of each at least, so that rate() and increase() have data
            p.wait_for('count_over_time(up[1m]) >= 3', lambda r: len(r) == 2, timeout=30)
            for title, expr in queries:
                result = p.query(expr)  # asserts status "success"
                if all(exposed.get(m) for m in metric_names(expr) - {"up"}):
                    assert result, f"panel {title!r}: no data from {expr}"
            assert p.query('sum(up{job="pymap", instance=~".*"})')[0]["value"][1] == "1"
        finally:
            p.stop()
        assert ex.alive(), ex.stderr()
    assert "Traceback" not in ex.stderr()


def test_the_prometheus_configs_in_operations_md_pass_promtool(tmp_path):
    """docs/operations.md, Monitoring: the scrape configs shown pass ``promtool check
    config``, the rule file they name being the kit's."""
    if shutil.which("promtool") is None:
        require("promtool is missing (Debian package prometheus; scripts/setup.sh)")
    full, kubernetes = code_blocks(REPO / "docs/operations.md", "yaml", "Monitoring")
    assert full.first_comment() == "/etc/prometheus/prometheus.yml"
    assert "- /etc/prometheus/rules/pymap-alerts.yml" in full.text
    # Debian's Prometheus is built without Kubernetes discovery: the test swaps it for a
    # static target and checks the rest (the relabelling) with promtool
    sd = "kubernetes_sd_configs: [{role: pod, namespaces: {names: [kube-system]}}]"
    assert kubernetes.text.count(sd) == 2
    configs = [full.text.replace("/etc/prometheus/rules/pymap-alerts.yml", str(RULES)),
               "scrape_configs:\n" + kubernetes.text.replace(
                   sd, 'static_configs: [{targets: ["127.0.0.1:9435"]}]')]
    for i, text in enumerate(configs):
        path = tmp_path / f"prometheus{i}.yml"
        path.write_text(text)
        proc = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, text + proc.stdout + proc.stderr
    # the DaemonSet's pods carry the label and the port names the relabelling keeps
    assert {p["name"] for c in manifest.pod_spec()["containers"] for p in c.get("ports", ())} \
        == {"metrics", "export-metrics"}
    assert manifest.documents()["DaemonSet"]["spec"]["template"]["metadata"]["labels"] \
        == {"app.kubernetes.io/name": "pymap"}
    for text in configs:  # the jobs the rules and the dashboard expect
        jobs = [j["job_name"] for j in yaml.safe_load(text)["scrape_configs"]]
        assert jobs == ["pymap", "pymap-export"], text
