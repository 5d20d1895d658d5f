"""Small shared pieces for the benchmarks: a private bpffs directory, a big hash map, a daemon.

A benchmark runs on its own (no pytest), as root, and removes everything it
made even when it fails half-way.  From tests/ it takes only
tests/support/procs.py, plain Python: stopping a child process the one way the
tests do too.
"""

from __future__ import annotations

import array
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "tests"):  # the packages; tests/support (procs)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from support import procs  # noqa: E402 (after the sys.path lines above)

from watcher.kernel.maps.kinds import TYPE_IDS  # noqa: E402
from watcher.kernel.sys import syscall  # noqa: E402

BPFFS = "/sys/fs/bpf"
PYMAP = str(Path(sys.executable).with_name("pymap"))


class BenchError(Exception):
    """The benchmark cannot measure what it claims (setup failed, wrong results)."""


def run_main(main: Callable[[], int]) -> NoReturn:
    """A benchmark's ``__main__``: exit with ``main()``'s status, a BenchError as one line
    (exit 1), Ctrl-C as 130."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"{Path(sys.argv[0]).stem}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def check_root() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root: the benchmark creates BPF maps")
    if not os.path.ismount(BPFFS):
        raise BenchError(f"bpffs is not mounted at {BPFFS} (run: make setup)")


def compile_bytecode() -> None:
    """Compile pymap's modules to bytecode, as installing pymap does (pip compiles what it
    installs).  A checkout run with ``PYTHONDONTWRITEBYTECODE`` set, as CI and this
    machine's shells are, has no bytecode for what changed, and every process would compile
    those sources again: a start-up figure would time the compiler."""
    import compileall

    for package in ("watcher", "consumers"):
        if not compileall.compile_dir(REPO / package, quiet=1):
            raise BenchError(f"cannot compile {REPO / package} to bytecode")


@contextlib.contextmanager
def private_bpffs() -> Iterator[Path]:
    """A fresh directory under bpffs, removed (with its pins) on the way out."""
    path = Path(BPFFS) / f"pymap-bench-{secrets.token_hex(5)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def private_tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pymap-bench-", ignore_cleanup_errors=True) as path:
        yield Path(path)


@contextlib.contextmanager
def big_hash(pin: Path, entries: int, name: str, max_entries: int | None = None,
             fill_batch: int = 1 << 17) -> Iterator[int]:
    """A pinned hash map (u64 key, 16-byte value) holding ``entries`` entries; yields its fd.

    Entry ``i`` has key ``i`` and value ``(i * 3, i ^ 0xFFFF)`` as two u64s.
    The pin and the fd go on the way out, so the map is freed.
    """
    fd = syscall.map_create(TYPE_IDS["hash"], 8, 16, max_entries or entries, name=name)
    try:
        syscall.obj_pin(fd, str(pin))
        try:
            for lo in range(0, entries, fill_batch):
                hi = min(lo + fill_batch, entries)
                keys = array.array("Q", range(lo, hi))
                values = array.array("Q", bytes(16 * (hi - lo)))
                values[0::2] = array.array("Q", (i * 3 for i in range(lo, hi)))
                values[1::2] = array.array("Q", (i ^ 0xFFFF for i in range(lo, hi)))
                syscall.map_update_batch(fd, keys.tobytes(), values.tobytes(), hi - lo)
            yield fd
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pin)
    finally:
        os.close(fd)


class Daemon:
    """A real ``pymap daemon`` on a private ipc:// endpoint, watching one bpffs directory."""

    def __init__(self, tmp: Path, bpffs: Path, *extra: str):
        self.run_dir = tmp / "run"
        self.endpoint = f"ipc://{self.run_dir}/pymap.sock"
        self.log_path = tmp / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PYMAP, "daemon", "--endpoint", self.endpoint, "--bpffs", str(bpffs),
             "--log-level", "warning", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def cli(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYMAP_ENDPOINT": self.endpoint}
        kwargs.setdefault("capture_output", True)
        return subprocess.run([PYMAP, *args], check=False, env=env, text=True, timeout=600,
                              **kwargs)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"daemon exited {self.proc.returncode}: {self.log_tail()}")
            if self.cli("ping").returncode == 0:
                return
            time.sleep(0.1)
        raise BenchError(f"daemon did not answer ping within {timeout:g} s: {self.log_tail()}")

    def stop(self) -> None:
        procs.stop(self.proc, 15, self._log)


@contextlib.contextmanager
def running_daemon(tmp: Path, bpffs: Path, *extra: str) -> Iterator[Daemon]:
    d = Daemon(tmp, bpffs, *extra)
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    """Run ``fn`` ``repeats`` times; (best wall time, every wall time) in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times
