"""A real Prometheus server for the tests: loopback, free port, temp storage, stopped after;
and :func:`scrape`, which reads a daemon's ``/metrics`` endpoint directly.

Debian's ``prometheus`` package provides the binary; the server scrapes the
targets given every second and is queried through its HTTP API
(``/api/v1/query``), the way a dashboard or an alert rule would read it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from support import procs


def scrape(listen: str) -> dict[str, float]:
    """The daemon's ``/metrics`` at ``listen`` (host:port), parsed by prometheus-client:
    sample name (with ``{labels}`` when it has any) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, tmp: Path, targets: list[str]):
        self.dir = tmp / "prometheus"
        self.dir.mkdir()
        self.port = free_port()
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: pymap\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n")
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("prometheus")

    def start(self) -> None:
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [self.binary() or "prometheus", f"--config.file={self.config}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"prometheus not ready: {self.log.read_text()}")

    def query(self, expr: str) -> list[dict]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        with urllib.request.urlopen(url, timeout=10) as reply:
            doc = json.load(reply)
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def wait_for(self, expr: str, ready, timeout: float = 60) -> list[dict]:
        """Query ``expr`` until ``ready(result)`` holds (scrapes come every second)."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if ready(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"{expr}: still {result} after {timeout} s; "
                             f"targets: {self.targets()}")

    def targets(self) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/targets"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return [{"health": t["health"], "lastError": t["lastError"]}
                    for t in json.load(reply)["data"]["activeTargets"]]

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, 20, self._log_file)
