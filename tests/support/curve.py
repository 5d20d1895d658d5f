"""CURVE test helpers: key pairs made by `pymap keys`, a daemon serving tcp:// on loopback."""

from __future__ import annotations

import subprocess
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

    start_timeout = 30.0  # the CURVE handshake and ZAP thread add to the start

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

    def answers(self) -> bool:
        return self.cli("ping", "--timeout", "1").returncode == 0  # no socket file on tcp://


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
