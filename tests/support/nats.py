"""Real ``nats-server`` processes with JetStream for the fleet tests and bench (no tests here).

Every server listens on a free loopback port, keeps its JetStream data in its own
temporary directory and is stopped (and the directory removed) when the context
ends.  :func:`nats_cluster` starts three servers routed to each other, so streams
with three replicas work; a member can be stopped and started again on the same
ports and data directory, as an operator restarting a broker would.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from support import procs

NATS_SERVER = shutil.which("nats-server")
START_TIMEOUT = 30.0  # the machine is small and shared: a server may take seconds


def nats_problem() -> str | None:
    """Why real NATS tests cannot run here (for ``conftest.require``), or None."""
    if NATS_SERVER is None:
        return "nats-server is not installed (scripts/setup.sh installs it)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One nats-server with JetStream (``-js -sd DIR``), optionally a cluster member."""

    def __init__(self, name: str, workdir: Path, cluster_port: int | None = None,
                 routes: list[int] | None = None, extra: list[str] | None = None):
        self.name = name
        self.extra = extra or []  # e.g. --tls flags, -c FILE for nkey users
        self.port = free_port()
        self.monitor_port = free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.store = workdir / name
        self.store.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        """Start the process without waiting (cluster members wait for each other)."""
        assert NATS_SERVER is not None, "callers skip without nats-server"
        args = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port),
                "-js", "-sd", str(self.store), "-n", self.name, "-l", str(self.log), *self.extra]
        if self.cluster_port is not None:
            args += ["--cluster_name", "pymap-test", "--cluster",
                     f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

    def start(self) -> None:
        self.spawn()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Until the monitoring endpoint answers /healthz (JetStream ready)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nats-server {self.name} exited {self.proc.returncode}: "
                                   f"{err.strip()} {self.tail_log()}")
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {self.name} not healthy after {timeout:g} s: "
                                   f"{self.tail_log()}")
            time.sleep(0.1)

    def tail_log(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, 15, self.proc.stderr)
        self.proc = None


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pymap-nats-", ignore_cleanup_errors=True) as path:
        yield Path(path)


@contextlib.contextmanager
def nats_server(extra: list[str] | None = None) -> Iterator[NatsServer]:
    """One JetStream server, stopped and its data removed at the end."""
    with _workdir() as work:
        server = NatsServer("n1", work, extra=extra)
        try:
            server.start()
            yield server
        finally:
            server.stop()


class Cluster:
    def __init__(self, servers: list[NatsServer]):
        self.servers = servers

    @property
    def url(self) -> str:
        """All members, comma-separated, as ``pymap export --to`` takes them."""
        return "nats://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def wait_formed(self, timeout: float = START_TIMEOUT) -> None:
        """Until every member sees the other two routes and JetStream has a leader."""
        import json

        deadline = time.monotonic() + timeout
        while True:
            ok = True
            for s in self.servers:
                try:
                    with urllib.request.urlopen(
                            f"http://127.0.0.1:{s.monitor_port}/routez", timeout=2) as r:
                        routes = json.load(r).get("num_routes", 0)
                    with urllib.request.urlopen(
                            f"http://127.0.0.1:{s.monitor_port}/jsz", timeout=2) as r:
                        meta = json.load(r).get("meta_cluster") or {}
                except OSError:
                    ok = False
                    break
                if routes < len(self.servers) - 1 or not meta.get("leader"):
                    ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("NATS cluster did not form: "
                                   + " | ".join(s.tail_log(5) for s in self.servers))
            time.sleep(0.2)


@contextlib.contextmanager
def nats_cluster(size: int = 3) -> Iterator[Cluster]:
    """``size`` routed JetStream servers (``--cluster``/``--routes``), all stopped at the end."""
    with _workdir() as work:
        cluster_ports = [free_port() for _ in range(size)]
        servers = [NatsServer(f"n{i + 1}", work, cluster_ports[i],
                              [p for j, p in enumerate(cluster_ports) if j != i])
                   for i in range(size)]
        try:
            for s in servers:  # all at once: a member waits for a quorum
                s.spawn()
            cluster = Cluster(servers)
            for s in servers:
                s.wait_healthy()
            cluster.wait_formed()
            yield cluster
        finally:
            for s in servers:
                s.stop()
