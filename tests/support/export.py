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
    return records(path, "json")


def records(path: Path, fmt: str) -> list[dict]:
    """The records of an exporter's file output in format ``fmt``, as :func:`record_doc`."""
    if not path.exists():
        return []
    # Only whole lines: the exporter may be writing the last one as we read.
    complete = path.read_bytes().rpartition(b"\n")[0]
    return [record_doc(fmt, line) for line in complete.split(b"\n") if line]


def record_doc(fmt: str, payload: bytes) -> dict:
    """One exported record, whatever its format, as pymap's event object (action, seq,
    key, value, missed, ...) whose ``id`` is the format's own event id field: ECS
    ``event.id``, OCSF ``metadata.uid``, CEF ``externalId``, the JSON lines' ``id``.
    CEF carries fewer of pymap's fields: action, seq, key, value, missed."""
    if fmt == "cef":
        import pycef

        p = pycef.parse(payload.decode())
        if p is None:
            raise ValueError(f"not CEF: {payload[:120]!r}")
        doc = {"id": p["externalId"], "action": p["act"], "seq": int(p["seq"])}
        doc |= {k: p[k] for k in ("key", "value") if k in p}
        if "missed" in p:
            doc["missed"] = int(p["missed"])
        return doc
    d = json.loads(payload)
    if fmt == "ecs":
        return {**d["pymap"], "id": d["event"]["id"]}
    if fmt == "ocsf":
        return {**d["unmapped"]["pymap"], "id": d["metadata"]["uid"]}
    assert fmt == "json", fmt
    return d


def assert_one_id_per_event(docs: list[dict]) -> int:
    """Each event has one id however often it was received, and no two events share one:
    the distinct ids are the distinct events.  An event is its daemon seq; a record the
    exporter made (seq 0) is its action and content.  Returns how many there are."""
    ids_of: dict[tuple, set[str]] = {}
    for d in docs:
        event = ((d["seq"],) if d["seq"] else
                 ("made", d["action"], d.get("key"), d.get("value"), d.get("missed")))
        ids_of.setdefault(event, set()).add(d["id"])
        if d["seq"]:
            assert d["id"].endswith(f".{d['seq']}"), d
    assert all(len(ids) == 1 for ids in ids_of.values()), \
        {e: ids for e, ids in ids_of.items() if len(ids) > 1}
    distinct = {d["id"] for d in docs}
    assert len(distinct) == len(ids_of)
    return len(distinct)


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
