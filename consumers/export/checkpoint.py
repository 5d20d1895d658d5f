"""The last delivered (epoch, seq), kept in a state file across exporter restarts.

Written atomically (a temporary file in the same directory, fsync, rename), so
a crash leaves the old or the new checkpoint, never a torn one.  Written at
most every ``interval`` seconds and at shutdown: after a SIGKILL the exporter
resumes from a slightly older point and may repeat a few events
(at-least-once), never skip one.
"""

from __future__ import annotations

import os
import time

import attrs
import orjson


class CheckpointError(Exception):
    """The state file exists but cannot be read or written."""


@attrs.define
class Position:
    epoch: str
    seq: int


class Checkpoint:
    def __init__(self, path: str | None, interval: float = 0.5):
        self.path = path
        self.interval = interval
        self.position: Position | None = None
        self._written: Position | None = None
        self._last_write = 0.0

    def load(self) -> Position | None:
        if not self.path:
            return None
        try:
            with open(self.path, "rb") as f:
                data = orjson.loads(f.read())
            self.position = Position(str(data["epoch"]), int(data["seq"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"state file {self.path}: unreadable ({e})") from None
        self._written = self.position
        return self.position

    def advance(self, epoch: str, seq: int) -> None:
        """Note that everything up to ``seq`` of ``epoch`` is delivered."""
        self.position = Position(epoch, seq)
        if time.monotonic() - self._last_write >= self.interval:
            self.save()

    def save(self) -> None:
        if not self.path or self.position is None or self.position == self._written:
            return
        tmp = f"{self.path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, orjson.dumps(attrs.asdict(self.position)))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            raise CheckpointError(f"state file {self.path}: {e.strerror}") from None
        self._written = self.position
        self._last_write = time.monotonic()
