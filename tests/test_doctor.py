"""``pymap doctor``: the real host checks, the daemon check, and the pure parsers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest
from conftest import PYMAP
from support.events import cli_status
from support.kernel import facility_rows, table_rows

from watcher.kernel.features import checks as probe

CHECKS = ("privileges", "bpf syscall", "bpffs", "kernel BTF", "tracefs", "bcc",
          "kernel headers", "daemon")


def doctor(*args: str, endpoint: str | None = None, prefix: tuple[str, ...] = (),
           pymap: str = PYMAP) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONFAULTHANDLER": "1"}
    env.pop("PYMAP_ENDPOINT", None)
    if endpoint is not None:
        args = (*args, "--endpoint", endpoint)
    cmd = [*prefix, pymap, "doctor", *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints where it hung
        out, err = proc.communicate()
        pytest.fail(f"pymap doctor hung for 60 s; stdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def rows(stdout: str) -> dict[str, tuple[str, ...]]:
    """Check name -> (status, detail, fix) from doctor's table (continuation lines joined)."""
    return table_rows(stdout, 4)


def assert_clean(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.stderr == ""


# --- the real thing ----------------------------------------------------------------------


def test_doctor_all_ok_with_a_running_daemon(daemon):
    proc = daemon.cli("doctor")
    assert_clean(proc)
    assert proc.returncode == 0, proc.stdout
    table = rows(proc.stdout)
    assert tuple(table) == CHECKS, proc.stdout
    for name, (status, detail, _fix) in table.items():
        assert status == "ok", f"{name}: {status} {detail}"
    assert daemon.endpoint in table["daemon"][1]
    assert "epoch" in table["daemon"][1]
    assert "FAIL" not in proc.stdout and "warn" not in proc.stdout
    assert "all 8 checks passed" in proc.stdout
    # the feature probe's table: what this host allows, as the daemon's status says it
    facilities = facility_rows(proc.stdout)
    shown = {f["name"]: f for f in cli_status(daemon)["facilities"]}
    assert set(facilities) == {f["title"] for f in shown.values()}
    for f in shown.values():
        assert facilities[f["title"]][0] == {"available": "ok"}.get(f["state"], f["state"])
        assert facilities[f["title"]][1] == f["error"]


def test_doctor_dead_ipc_endpoint_fails_on_the_daemon_check(kernel, tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody-home.sock"
    proc = doctor(endpoint=endpoint)
    assert_clean(proc)
    assert proc.returncode == 1, proc.stdout
    table = rows(proc.stdout)
    status, detail, fix = table["daemon"]
    assert status == "FAIL"
    assert "not running" in detail
    # Long paths wrap in the table: compare without whitespace.
    assert fix.replace(" ", "") == f"startit:pymapdaemon-e{endpoint}"
    # Everything else on this host is fine: the daemon is the one failure.
    assert [n for n, (s, _, _) in table.items() if s != "ok"] == ["daemon"]
    assert "1 of 8 checks failed: daemon" in proc.stdout


def test_doctor_silent_tcp_endpoint_times_out(kernel, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("server", "client"):  # tcp:// is CURVE only: with keys, silence is a timeout
        subprocess.run([PYMAP, "keys", "make", name, "-d", str(tmp_path)], check=True,
                       capture_output=True, timeout=60)
    monkeypatch.setenv("PYMAP_CURVE_SERVER_KEY", str(tmp_path / "server.key"))
    monkeypatch.setenv("PYMAP_CURVE_CLIENT_CERT", str(tmp_path / "client.key_secret"))
    proc = doctor(endpoint=f"tcp://127.0.0.1:{port}")
    assert_clean(proc)
    assert proc.returncode == 1
    status, detail, fix = rows(proc.stdout)["daemon"]
    assert status == "FAIL" and "did not answer" in detail and "pymap daemon" in fix


@pytest.mark.parametrize("endpoint, words", [
    ("not-an-endpoint", "is not a pymap endpoint"),
    ("tcp://no host:x", "cannot connect"),  # ZeroMQ refuses it in connect()
])
def test_doctor_malformed_endpoint_is_a_failed_check_not_a_traceback(kernel, endpoint, words):
    proc = doctor(endpoint=endpoint)
    assert_clean(proc)
    assert proc.returncode == 1
    status, detail, fix = rows(proc.stdout)["daemon"]
    assert status == "FAIL" and words in detail and "ipc://" in fix


def test_doctor_as_an_unprivileged_user(kernel, tmp_path, nobody_pymap):
    proc = doctor(endpoint=f"ipc://{tmp_path}/none.sock", pymap=nobody_pymap,
                  prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
    assert_clean(proc)
    assert proc.returncode == 1
    table = rows(proc.stdout)
    assert table["privileges"][0] == "FAIL" and "run as root" in table["privileges"][2]
    assert table["bpf syscall"][0] == "FAIL"
    facilities = facility_rows(proc.stdout)  # refusals degrade, named with their errno
    assert facilities["maps by id"][:2] == ("refused", "EPERM"), facilities
    assert facilities["batch lookups"][0] == "refused"


# --- the checks, one by one, on fake files -----------------------------------------------


STATUS = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t{:016x}\n"


@pytest.mark.parametrize("caps, euid, ok", [
    ((probe.CAP_SYS_ADMIN, probe.CAP_BPF, probe.CAP_PERFMON), 0, True),
    ((probe.CAP_SYS_ADMIN,), 1000, True),
    ((probe.CAP_BPF, probe.CAP_PERFMON), 1000, False),  # cannot enumerate maps by id
    ((), 0, False),  # root without capabilities (a locked-down container)
])
def test_privileges(tmp_path, caps, euid, ok):
    status = tmp_path / "status"
    status.write_text(STATUS.format(sum(1 << c for c in caps)))
    check = probe.privileges(str(status), euid=euid)
    assert check.ok is ok and check.required
    assert ("root" if euid == 0 else f"uid {euid}") in check.detail
    if not ok:
        assert "root" in check.fix
    if caps == (probe.CAP_BPF, probe.CAP_PERFMON):
        assert "CAP_SYS_ADMIN" in check.detail
    if ok and len(caps) < 5:  # the optional ones it lacks are named
        assert "; without " in check.detail and "CAP_SYS_PTRACE (see docs" in check.detail


def test_parse_capeff():
    assert probe.parse_capeff(STATUS.format(0x1fffeffffff)) == 0x1fffeffffff
    assert probe.parse_capeff("Name:\tx\n") is None


MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/bpf tmpfs rw 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
bpf /mnt/with\\040space bpf rw 0 0
"""


def test_parse_mounts_unescapes_paths():
    assert ("/mnt/with space", "bpf") in probe.parse_mounts(MOUNTS)


def test_bpffs_and_tracefs_from_a_fake_mounts_file(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert probe.bpffs(str(mounts)).ok
    assert probe.bpffs(str(mounts), "/mnt/with space").ok
    missing = probe.bpffs(str(mounts), "/elsewhere")
    assert not missing.ok and missing.required and "mount -t bpf bpf /elsewhere" in missing.fix
    mounts.write_text("tmpfs /sys/fs/bpf tmpfs rw 0 0\n")
    wrong = probe.bpffs(str(mounts))
    assert not wrong.ok and "tmpfs" in wrong.detail
    trace = probe.tracefs(str(mounts))
    assert not trace.ok and not trace.required and "mount -t tracefs" in trace.fix


def test_kernel_headers(tmp_path):
    (tmp_path / "1.0" / "build").mkdir(parents=True)
    assert probe.kernel_headers("1.0", str(tmp_path)).ok
    (tmp_path / "2.0").mkdir()
    (tmp_path / "2.0" / "build").symlink_to(tmp_path / "gone")
    dangling = probe.kernel_headers("2.0", str(tmp_path))
    assert not dangling.ok and not dangling.required and "does not exist" in dangling.detail
    none = probe.kernel_headers("3.0", str(tmp_path))
    assert not none.ok and none.fix.startswith("make setup")


def test_kernel_btf_missing(tmp_path):
    check = probe.kernel_btf(str(tmp_path / "vmlinux"))
    assert not check.ok and not check.required


def test_a_crashing_check_reports_instead_of_raising(tmp_path):
    check = probe.privileges(str(tmp_path / "no-such-status"))
    assert not check.ok and check.name == "privileges"
    assert "FileNotFoundError" in check.detail


def test_host_checks_on_this_host(kernel):
    checks = probe.host_checks()
    assert [c.name for c in checks] == list(CHECKS[:-1])
    assert all(c.ok for c in checks if c.required), checks
