"""CURVE test helpers: key pairs made by `pymap keys`, a daemon serving tcp:// on loopback."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import PYMAP, Daemon

from support.prometheus import free_port


def make_keys(tmp_path: Path) -> Path:
    keys = tmp_path / "keys"
    for name, where in (("server", "server"), ("alice", "clients-secret"),
                        ("ops", "clients-secret"), ("mallory", "mallory")):
        subprocess.run([PYMAP, "keys", "make", name, "-d", str(keys / where)], check=True,
                       capture_output=True, timeout=60)
    (keys / "clients").mkdir()
    for allowed in ("alice", "ops"):
        (keys / "clients" / f"{allowed}.key").write_bytes(
            (keys / "clients-secret" / f"{allowed}.key").read_bytes())
    return keys


class TcpDaemon(Daemon):
    """A daemon serving tcp:// on loopback, with CURVE; ``cli`` runs as the given client."""

    def __init__(self, tmp: Path, bpffs: Path, config: Path, keys: Path):
        super().__init__(tmp, bpffs, [])
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.events_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.args = [PYMAP, "daemon", "-c", str(config), "--endpoint", self.endpoint,
                     "--events-endpoint", self.events_endpoint, "--bpffs", str(bpffs),
                     "--interval", "0.2"]
        self.keys = keys
        self.client_env = {"PYMAP_CURVE_SERVER_KEY": str(keys / "server" / "server.key"),
                           "PYMAP_CURVE_CLIENT_CERT": str(keys / "clients-secret" / "alice.key_secret")}

    def start(self) -> None:
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log.read_text()}")
            if self.cli("ping", "--timeout", "1").returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"daemon did not answer ping: {self.log.read_text()}")

    def cli(self, *args: str, timeout: float = 120, check: bool = False,
            env: dict | None = None) -> subprocess.CompletedProcess:
        full = {**os.environ, "PYMAP_ENDPOINT": self.endpoint, "COLUMNS": "200",
                **self.client_env, **(env or {})}
        proc = subprocess.run([PYMAP, *args], capture_output=True, text=True, env=full,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pymap {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc




def start_tcp_daemon(tmp_path: Path, bpffs: Path, extra_config: str = "") -> TcpDaemon:
    """Keys for server, alice and ops (allowed) and mallory (not); a daemon with them, started.

    Its ``cli`` runs as alice; ``cli(..., env=as_client(d, "ops"))`` as ops."""
    keys = make_keys(tmp_path)
    config = tmp_path / "pymap.toml"
    config.write_text(f'[curve]\nserver_key = "{keys}/server/server.key_secret"\n'
                      f'clients = "{keys}/clients"\n{extra_config}')
    (tmp_path / "d").mkdir()
    d = TcpDaemon(tmp_path / "d", bpffs, config, keys)
    d.start()
    return d


def as_client(d: TcpDaemon, name: str) -> dict[str, str]:
    """Environment for ``d.cli(..., env=...)``: run as the allowed client ``name``."""
    return {"PYMAP_CURVE_CLIENT_CERT": str(d.keys / "clients-secret" / f"{name}.key_secret")}
