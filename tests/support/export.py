"""Running ``pymap export`` in the tests: a subprocess per exporter, and readers for
what it wrote (no tests here)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Self

from conftest import PYMAP

from support import procs


class ExportProc:
    """``pymap export ARGS`` against ``daemon``; stdout to ``out`` (a path) or a pipe."""

    def __init__(self, daemon, *args: str, out: Path | None = None, log: Path | None = None):
        env = {**os.environ, "PYMAP_ENDPOINT": daemon.endpoint}
        self.argv = [PYMAP, "export", *args]
        self.log = log
        self._out = open(out, "ab") if out is not None else None
        self._err = open(log, "ab") if log is not None else subprocess.PIPE
        self.proc = subprocess.Popen(self.argv, stdout=self._out or subprocess.DEVNULL,
                                     stderr=self._err, env=env)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no flush, no checkpoint save."""
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 20) -> int:
        return procs.stop(self.proc, timeout, self._out, self._err)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    # Only whole lines: the exporter may be writing the last one as we read.
    complete = path.read_bytes().rpartition(b"\n")[0]
    return [json.loads(line) for line in complete.split(b"\n") if line]


def entry_seqs(docs: list[dict]) -> list[int]:
    """Daemon sequence numbers of the entry events among pymap JSON events."""
    return [d["seq"] for d in docs if d["action"] in ("added", "updated", "removed")]


class NameTailer:
    """Follows a file by name like ``tail -F``, Filebeat or Vector: reads the open file
    to its end, and when the name points at a new file (rotation), finishes the old one
    by its descriptor before switching.  ``data`` is everything read, in order."""

    def __init__(self, path: Path):
        import threading

        self.path = path
        self.data = bytearray()
        self.rotations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        f = None
        while not self._stop.is_set():
            if f is None:
                try:
                    f = open(self.path, "rb")
                except FileNotFoundError:
                    time.sleep(0.01)
                    continue
            chunk = f.read()
            if chunk:
                self.data += chunk
                continue
            try:
                moved = os.stat(self.path).st_ino != os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                moved = False
            if moved:
                self.data += f.read()  # what was written before the rename
                f.close()
                f = None
                self.rotations += 1
            else:
                time.sleep(0.01)
        if f is not None:
            self.data += f.read()
            f.close()

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(10)
        return bytes(self.data)


def rotated_files(path: Path) -> list[Path]:
    """PATH.N .. PATH.1, PATH: oldest first."""
    backups = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return backups + [path]
