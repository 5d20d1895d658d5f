"""Install without make: ``python -m build`` makes a wheel, pip installs it into a fresh
venv over Debian's python3 (``--system-site-packages``: bcc is Debian's python3-bpfcc),
and that venv's ``pymap`` runs the daemon and ``pymap list`` equals bpftool. The steps
are the ones in docs/install.md."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Daemon
from support.kernel import bpftool_show, token

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout[-1500:]} {proc.stderr[-1500:]}"
    return proc


def test_a_wheel_installs_into_a_fresh_venv_and_lists_maps(kernel, tmp_path, maps, bpffs_dir):
    started = time.monotonic()
    dist = tmp_path / "dist"
    run(str(REPO / ".venv/bin/python"), "-m", "build", "--wheel", "--outdir", str(dist),
        str(REPO))
    (wheel,) = dist.glob("pymap-*.whl")
    venv = tmp_path / "venv"
    run("/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv))
    run(str(venv / "bin/pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel))
    pymap = str(venv / "bin/pymap")
    print(f"build + install: {time.monotonic() - started:.0f} s")

    assert run(pymap, "--version").stdout.startswith("pymap ")
    # bcc comes from Debian's dist-packages, everything else from the venv
    where = run(str(venv / "bin/python"), "-c",
                "import bcc, zmq; print(bcc.__file__); print(zmq.__file__)").stdout.split()
    assert where[0].startswith("/usr/lib/python3/dist-packages/") and where[1].startswith(
        str(venv)), where

    fd, map_id = maps.create("hash", 4, 8, 16, name=f"wh{token()}", pin=bpffs_dir / "wheel")
    d = Daemon(tmp_path / "d", bpffs_dir, [])
    d.run_dir.parent.mkdir(parents=True, exist_ok=True)
    d.args[0] = pymap  # this venv's daemon, not the checkout's
    d.start()
    try:
        proc = subprocess.run([pymap, "list", "-o", "json"], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYMAP_ENDPOINT": d.endpoint})
        assert proc.returncode == 0, proc.stderr
        listed = {m["id"]: m for m in json.loads(proc.stdout)}
        theirs = bpftool_show(map_id)
        assert (listed[map_id]["name"], listed[map_id]["type"], listed[map_id]["pinned"]) == (
            theirs["name"], theirs["type"], theirs["pinned"])
    finally:
        d.stop()
    assert "Traceback" not in d.log.read_text()
