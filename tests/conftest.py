"""Shared fixtures: real kernel maps, a private bpffs directory, a real daemon.

Tests never use the default /run/pymap endpoint: each daemon gets its own
ipc:// socket in a temporary directory and its own bpffs subdirectory, and
everything a test creates is removed at teardown.

Kernel tests need root and the bpf syscall.  Elsewhere they skip with a
reason; with PYMAP_REQUIRE_KERNEL=1 (CI) a missing kernel is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from support import procs

REPO = Path(__file__).resolve().parent.parent
PYMAP = str(Path(sys.executable).with_name("pymap"))
BPFFS = "/sys/fs/bpf"
# Where everything is slow, deadlines stretch by this factor (make test-kernels sets it in
# its emulated guests, where starting one Python process takes ~10 s). Timings are never
# asserted on; this only moves how long a test waits before it gives up.
TIME_SCALE = float(os.environ.get("PYMAP_TEST_TIME_SCALE", "1"))


def _kernel_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root for the bpf syscall"
    try:
        from watcher.kernel.sys import syscall

        syscall.map_get_next_id(0)
    except OSError as e:
        return f"bpf syscall unusable: {e}"
    if not os.path.ismount(BPFFS):
        return f"bpffs is not mounted at {BPFFS} (run: make setup)"
    return None


def require(problem: str | None) -> None:
    """Skip for ``problem`` where the host cannot run a test; fail instead in CI.

    The one way tests may skip: with PYMAP_REQUIRE_KERNEL=1 (``.ci/run``) a
    missing prerequisite is a failure, so kernel tests always run there.
    """
    if problem is None:
        return
    if os.environ.get("PYMAP_REQUIRE_KERNEL") == "1":
        pytest.fail(f"PYMAP_REQUIRE_KERNEL=1 but {problem}")
    pytest.skip(problem)


def need_kernel() -> None:
    require(_kernel_problem())


def need_bcc():
    need_kernel()
    try:
        import bcc
    except ImportError as e:
        require(f"bcc does not import: {e}")
    return bcc


@pytest.fixture(scope="session")
def nobody_pymap():
    """A ``pymap`` that ``nobody`` can run even when the checkout is private (0700):
    a world-readable copy in the system temp dir, removed after the session."""
    if shutil.which("setpriv") is None:
        require("setpriv (util-linux) is not installed")
    from support.nobody import make_runtime

    tmp, pymap = make_runtime()
    yield str(pymap)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def kernel():
    """Skip (or, in CI, fail) unless the real kernel is usable."""
    need_kernel()


@pytest.fixture
def bpffs_dir(kernel):
    """A fresh directory under bpffs for this test's pins, removed afterwards."""
    path = Path(BPFFS) / f"pymap-test-{uuid.uuid4().hex[:10]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Maps:
    """Creates real kernel maps for a test and closes them all at teardown."""

    def __init__(self):
        self.fds: list[int] = []

    def create(self, type_name: str, key_size: int, value_size: int, max_entries: int,
               name: str = "", flags: int = 0, pin: str | Path | None = None) -> tuple[int, int]:
        """Returns (fd, map id)."""
        from watcher.kernel.maps.kinds import TYPE_IDS
        from watcher.kernel.sys import syscall

        fd = syscall.map_create(TYPE_IDS[type_name], key_size, value_size, max_entries,
                                name=name, flags=flags)
        self.fds.append(fd)
        if pin is not None:
            syscall.obj_pin(fd, str(pin))
        return fd, syscall.map_info(fd).id

    def close(self, fd: int) -> None:
        os.close(fd)
        self.fds.remove(fd)

    def close_all(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@pytest.fixture
def maps(kernel):
    m = Maps()
    yield m
    m.close_all()


class Daemon:
    start_timeout = 15.0 * TIME_SCALE  # seconds until it must answer ping

    def __init__(self, tmp: Path, bpffs: Path, extra: list[str], prefix: tuple[str, ...] = ()):
        """``prefix``: a command the daemon runs under (the degradation harness's
        ``python -m support.refuse RULES --``)."""
        self.run_dir = tmp / "run"
        self.endpoint = f"ipc://{self.run_dir}/pymap.sock"
        self.socket = self.run_dir / "pymap.sock"
        self.log = tmp / "daemon.log"
        self.args = [*prefix, PYMAP, "daemon", "--endpoint", self.endpoint, "--bpffs", str(bpffs),
                     *extra]
        self.client_env: dict[str, str] = {}  # for every cli() run (a CURVE client's keys)
        self.proc: subprocess.Popen | None = None

    def answers(self) -> bool:
        return self.socket.exists() and self.cli("ping").returncode == 0

    def start(self) -> None:
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log.read_text()}")
            if self.answers():
                return
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not answer ping: {self.log.read_text()}")

    def cli(self, *args: str, timeout: float = 120, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        full = {**os.environ, "PYMAP_ENDPOINT": self.endpoint, "COLUMNS": "200",
                **self.client_env, **(env or {})}
        proc = subprocess.run([PYMAP, *args], capture_output=True, text=True, env=full,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pymap {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def stop(self) -> int:
        assert self.proc is not None
        return procs.stop(self.proc, 10, self._log_file)


@pytest.fixture
def daemon_factory(tmp_path, bpffs_dir):
    started: list[Daemon] = []

    def make(*extra: str, start: bool = True, prefix: tuple[str, ...] = ()) -> Daemon:
        d = Daemon(tmp_path / f"d{len(started)}", bpffs_dir, list(extra), prefix)
        d.run_dir.parent.mkdir(parents=True, exist_ok=True)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        if d.proc is not None:
            d.stop()


@pytest.fixture
def daemon(daemon_factory):
    """A running daemon on a private endpoint, watching this test's bpffs directory."""
    return daemon_factory()
