"""Least privilege, for real: a non-root daemon with ambient capabilities, and the files
that grant them (systemd unit, Kubernetes DaemonSet) checked against the one list in
watcher/kernel/sys/capabilities.py.

The daemon runs as ``nobody`` under ``setpriv`` with exactly :data:`CAPABILITIES`
in its ambient set and serves list (holders included), get (checked against
bpftool) and events on maps that root created and pinned 0600.  Without
CAP_SYS_ADMIN it refuses to start with one line naming it.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, Daemon, need_bcc, require
from support.events import Follower, status, wait_ready, wait_until
from support.kernel import bpftool_entries, token

from watcher.kernel.sys import syscall
from watcher.kernel.sys.capabilities import CAPABILITIES

UNIT = REPO / "examples/systemd/pymap.service"
BINARY = "/usr/local/bin/pymap"  # where docs/install.md puts it
NAMES = {cap.name for cap in CAPABILITIES}
NOBODY = pwd.getpwnam("nobody")


def unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


# --- the files that grant the capabilities ------------------------------------------------


def test_systemd_unit_grants_exactly_the_capability_list():
    text = UNIT.read_text()
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        (value,) = unit_values(text, key)
        assert set(value.split()) == NAMES, key
    assert unit_values(text, "NoNewPrivileges") == ["yes"]
    assert unit_values(text, "ProtectSystem") == ["strict"]
    assert unit_values(text, "RuntimeDirectory") == ["pymap"]
    (user,) = unit_values(text, "User")
    assert user != "root"
    (filt,) = unit_values(text, "SystemCallFilter")
    assert {"bpf", "perf_event_open"} <= set(filt.split())


@pytest.mark.parametrize("name", ["pymap.service", "pymap-export@.service"])
def test_systemd_units_pass_systemd_analyze_verify(tmp_path, name):
    if shutil.which("systemd-analyze") is None:
        require("systemd-analyze is missing (Debian package systemd; scripts/setup.sh)")
    text = (UNIT.parent / name).read_text()
    # one binary path in both units, the one docs/install.md links; verify checks it exists
    (exec_start,) = unit_values(text, "ExecStart")
    assert exec_start.startswith(f"{BINARY} "), exec_start
    unit = tmp_path / name.replace("@.", "@siem.")
    unit.write_text(text.replace(BINARY, str(Path(sys.executable).with_name("pymap"))))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    # verify exits 0 on settings it ignores; those are printed, so nothing may be printed.
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_systemd_units_reload_and_keep_state_where_the_docs_say():
    daemon = UNIT.read_text()
    assert unit_values(daemon, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    export = (UNIT.parent / "pymap-export@.service").read_text()
    (state,) = unit_values(export, "StateDirectory")
    docs = (REPO / "docs/export.md").read_text() + (REPO / "README.md").read_text()
    used = set(re.findall(r"/var/lib/([\w.-]+)/[\w.-]+\.state", docs))
    assert used == {state}, f"docs keep state files in {used}, the unit in {state}"


def test_sysusers_creates_the_units_users_in_the_socket_group(tmp_path):
    if shutil.which("systemd-sysusers") is None:
        require("systemd-sysusers is missing (Debian package systemd; scripts/setup.sh)")
    (tmp_path / "usr/lib/sysusers.d").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    shutil.copy(UNIT.parent / "pymap.sysusers", tmp_path / "usr/lib/sysusers.d/pymap.conf")
    proc = subprocess.run(["systemd-sysusers", f"--root={tmp_path}"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    groups = {line.split(":")[0]: line.split(":")[2]
              for line in (tmp_path / "etc/group").read_text().splitlines()}
    users = {line.split(":")[0]: line.split(":")[3]
             for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    for name in ("pymap.service", "pymap-export@.service"):
        text = (UNIT.parent / name).read_text()
        (user,) = unit_values(text, "User")
        (group,) = unit_values(text, "Group")
        assert users[user] == groups[group] == groups["pymap"], (name, users, groups)


def test_daemonset_mounts_bpffs_read_only_and_adds_exactly_the_capability_list():
    from support import manifest

    spec = manifest.pod_spec()
    container = manifest.container("pymap")
    sc = container["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {f"CAP_{c}" for c in sc["capabilities"]["add"]} == NAMES
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in ("/sys/fs/bpf", "/sys/kernel/btf", "/sys/kernel/tracing"):
        assert mounts[path].get("readOnly") is True, path
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    # the exporter beside it holds no capability at all
    assert manifest.container("export")["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_operations_doc_explains_every_capability():
    text = (REPO / "docs/operations.md").read_text()
    for name in NAMES:
        assert re.search(rf"^\| `{name}` \|", text, re.M), f"docs/operations.md: no row for {name}"


# --- a non-root daemon ------------------------------------------------------------------------


def setpriv(caps: set[str]) -> list[str]:
    wanted = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in sorted(caps)])
    return ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
            f"--inh-caps={wanted}", f"--ambient-caps={wanted}", "--"]


@pytest.fixture
def shared_dir(kernel):
    """A temporary directory user nobody can enter, with a run directory it owns."""
    path = Path(tempfile.mkdtemp(prefix="pymap-priv-"))
    path.chmod(0o755)
    (path / "run").mkdir()
    os.chown(path / "run", NOBODY.pw_uid, NOBODY.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sources_for_nobody(shared_dir: Path) -> tuple[str, str]:
    """The example programs, where nobody can read them whatever the checkout's mode."""
    paths = []
    for example in ("execsnoop-ringbuf/execsnoop.c", "tcpconnect-perf/tcpconnect.c"):
        dst = shared_dir / Path(example).name
        shutil.copyfile(REPO / "examples" / example, dst)
        dst.chmod(0o644)
        paths.append(str(dst))
    return paths[0], paths[1]


def nonroot_daemon(pymap: str, shared_dir: Path, bpffs: Path, caps: set[str],
                   *extra: str) -> Daemon:
    """A daemon run as nobody from ``pymap`` (tests/support/nobody.py: readable by nobody)."""
    d = Daemon(shared_dir, bpffs, list(extra))
    d.args = [*setpriv(caps), pymap, *d.args[1:]]
    return d


def listed_map(d: Daemon, map_id: int) -> dict:
    (mine,) = [m for m in json.loads(d.cli("list", "-o", "json", check=True).stdout)
               if m["id"] == map_id]
    return mine


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_nonroot_daemon_serves_list_get_events_and_sources(nobody_pymap, shared_dir, bpffs_dir,
                                                           maps):
    need_bcc()
    name = f"lp_{token()}"
    fd, map_id = maps.create("hash", 4, 8, 32, name=name, pin=bpffs_dir / name)
    assert (bpffs_dir / name).stat().st_mode & 0o777 == 0o600  # root's pin: nobody can't read
    for i in range(5):
        syscall.map_update_elem(fd, struct.pack("<I", i), struct.pack("<Q", i * 7))
    execsnoop, tcpconnect = sources_for_nobody(shared_dir)
    d = nonroot_daemon(nobody_pymap, shared_dir, bpffs_dir, NAMES, "--interval", "0.2",
                       "--source", f"{execsnoop}:execs", "--source", tcpconnect)
    d.start()
    try:
        assert d.proc is not None
        st = proc_status(d.proc.pid)
        assert st["Uid"].split()[0] == str(NOBODY.pw_uid)
        assert int(st["CapEff"], 16) == sum(1 << c.number for c in CAPABILITIES)
        log = d.log.read_text()
        assert "without CAP_" not in log and "seccomp filter installed" in log

        mine = listed_map(d, map_id)
        assert mine["pinned"] == [str(bpffs_dir / name)]  # the 0600 pin: CAP_DAC_READ_SEARCH
        assert os.getpid() in [h["pid"] for h in mine["holders"]]  # root's fds: CAP_SYS_PTRACE

        got = json.loads(d.cli("get", name, "-o", "json", check=True).stdout)
        assert {e["key"]: e["value"] for e in got["entries"]} == bpftool_entries(map_id)

        with Follower(d, name, "-f") as f:
            wait_ready(d, name)
            syscall.map_update_elem(fd, struct.pack("<I", 9), struct.pack("<Q", 99))
            (line,) = f.wait_count(1)
            assert line["action"] == "added" and line["key"] == "09000000"

        # Event sources: bcc programs loaded, a ring buffer and perf rings read, as nobody.
        kinds = {s["name"]: s["kind"] for s in status(d)["sources"]}
        assert kinds == {"execs": "ringbuf", "connects": "perf"}
        with Follower(d, "execs", "-f") as ex:
            wait_until(lambda: subprocess.run(["/bin/true"]) and ex.snapshot(), "an exec record")
    finally:
        assert d.stop() == 0


def test_without_cap_sys_admin_the_daemon_names_it_and_exits(nobody_pymap, shared_dir,
                                                             bpffs_dir):
    d = nonroot_daemon(nobody_pymap, shared_dir, bpffs_dir, NAMES - {"CAP_SYS_ADMIN"})
    proc = subprocess.run(d.args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("pymap: error: missing capability CAP_SYS_ADMIN, needed for listing")


def test_a_source_without_cap_dac_read_search_fails_naming_it(nobody_pymap, shared_dir,
                                                               bpffs_dir):
    need_bcc()
    execsnoop, _ = sources_for_nobody(shared_dir)
    d = nonroot_daemon(nobody_pymap, shared_dir, bpffs_dir, NAMES - {"CAP_DAC_READ_SEARCH"},
                       "--source", f"{execsnoop}:execs")
    proc = subprocess.run(d.args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pymap: error: ") and "bcc could not load it" in last
    assert "/sys/kernel/tracing is not readable by uid" in last
    assert "grant CAP_DAC_READ_SEARCH" in last


def test_without_an_optional_capability_the_daemon_says_what_it_cannot_do(
        nobody_pymap, shared_dir, bpffs_dir, maps):
    name = f"lq_{token()}"
    _fd, map_id = maps.create("hash", 4, 8, 4, name=name, pin=bpffs_dir / name)
    d = nonroot_daemon(nobody_pymap, shared_dir, bpffs_dir, NAMES - {"CAP_DAC_READ_SEARCH"})
    d.start()
    try:
        assert ("WARNING pymap.daemon: without CAP_DAC_READ_SEARCH: no opening pins"
                in d.log.read_text())
        mine = listed_map(d, map_id)
        assert mine["pinned"] == []  # seen by id, but its 0600 pin is closed to nobody
    finally:
        assert d.stop() == 0
