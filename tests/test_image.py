"""The OCI image (``make image``) run as the DaemonSet runs it, against the real kernel.

The ``podman run`` flags come from examples/kubernetes/pymap-daemonset.yaml
(support/manifest.py): ``--cap-drop ALL`` plus exactly the manifest's capabilities,
a read-only root file system, bpffs, /sys/kernel/btf, tracefs, /lib/modules and
/usr/src mounted as there, the host's PID namespace, the ConfigMap's pymap.toml, and
the socket directory, here a temp directory. From the host, ``pymap list`` and
``pymap get`` through that socket equal bpftool, a follower outside the container
replays a host writer's changes, the probes' ``pymap ping`` passes inside the
container and the metrics port answers. (``podman kube play`` in podman 4.3 does not
run DaemonSets, hence the flags.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PYMAP, require
from support import manifest
from support.events import Follower, status, wait_ready
from support.foreign import make_maps, no_traceback, replay_foreign_writes
from support.kernel import bpftool_entries, bpftool_show, pymap_entries, token
from support.prometheus import free_port, scrape

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[1]
IMAGE = manifest.container("pymap")["image"]


@pytest.fixture(scope="module")
def image():
    """``make image`` (idempotent: seconds when nothing changed)."""
    require("podman missing and not root to install it"
            if shutil.which("podman") is None and os.geteuid() != 0 else None)
    started = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts/image.sh")], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"make image failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    print(f"make image: {time.monotonic() - started:.0f} s; {proc.stdout.strip().splitlines()[-1]}")
    return IMAGE


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args[:3])}...: {proc.stderr.strip()}"
    return proc


@pytest.fixture
def pod(kernel, image, tmp_path):
    """The daemon container of the DaemonSet, its sockets in a temp directory."""
    run_dir = Path(tempfile.mkdtemp(prefix="pymap-image-run-"))
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    port = free_port()
    for name, text in manifest.config_map_data().items():
        assert 'listen = "0.0.0.0:9435"' in text or name != "pymap.toml"
        (config_dir / name).write_text(text.replace("0.0.0.0:9435", f"127.0.0.1:{port}"))
    name = f"pymap-test-{uuid.uuid4().hex[:8]}"
    flags = manifest.podman_run_args("pymap", host_paths={"/run/pymap": str(run_dir)},
                                     config_dir=config_dir)
    cmd = manifest.command("pymap")
    podman("run", "--detach", "--name", name, *flags, "--entrypoint", json.dumps(cmd), image)
    endpoint = f"ipc://{run_dir}/pymap.sock"
    pod = SimpleNamespace(name=name, endpoint=endpoint, metrics=f"127.0.0.1:{port}",
                          logs=lambda: podman("logs", name, check=False).stdout
                          + podman("logs", name, check=False).stderr)

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([PYMAP, *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYMAP_ENDPOINT": endpoint, "COLUMNS": "200"})
        if check:
            assert proc.returncode == 0, f"pymap {' '.join(args)}: {proc.stderr}"
        return proc

    pod.cli = cli
    try:
        deadline = time.monotonic() + 60
        while cli("ping", check=False).returncode != 0:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running" and time.monotonic() < deadline, \
                f"the container ({state}) does not answer ping: {pod.logs()}"
            time.sleep(0.5)
        yield pod
    finally:
        podman("rm", "--force", "--time", "10", name, check=False)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_the_image_runs_as_the_daemonset_and_serves_the_host(pod, maps, bpffs_dir):
    # what the container got: exactly the manifest's capabilities, a read-only root
    caps = podman("inspect", "--format", "{{json .EffectiveCaps}}", pod.name).stdout
    added = manifest.container("pymap")["securityContext"]["capabilities"]["add"]
    assert sorted(json.loads(caps)) == sorted(f"CAP_{c}" for c in added)
    assert podman("exec", pod.name, "touch", "/x", check=False).returncode != 0

    # the probes, as the kubelet runs them
    c = manifest.container("pymap")
    for probe in ("livenessProbe", "readinessProbe"):
        proc = podman("exec", pod.name, *c[probe]["exec"]["command"], check=False)
        assert proc.returncode == 0, f"{probe}: {proc.stdout} {proc.stderr}"

    made = make_maps(maps, bpffs_dir, token())
    listed = {m["id"]: m for m in json.loads(pod.cli("list", "-o", "json").stdout)}
    for _fd, map_id in made.values():
        theirs = bpftool_show(map_id)
        assert listed[map_id]["type"] == theirs["type"]
        assert listed[map_id]["name"] == theirs["name"]
        assert listed[map_id]["pinned"] == theirs["pinned"]
        got = pod.cli("get", f"id:{map_id}", "-o", "json")
        assert pymap_entries(json.loads(got.stdout)) == bpftool_entries(map_id)

    names = {k: listed[map_id]["name"] for k, (_, map_id) in made.items()}
    with Follower(pod, *names.values(), "-f") as f:
        for name in names.values():
            try:
                wait_ready(pod, name)
            except AssertionError as e:
                raise AssertionError(f"{e}; status: {status(pod)}; daemon log: {pod.logs()}; "
                                     f"follower: {f.stderr}") from None
        replay_foreign_writes(f, made, names)
        follower_err = f.stderr

    metrics = scrape(pod.metrics)
    assert metrics["pymap_watched_maps"] >= len(made)
    no_traceback(pod.logs(), follower_err)
