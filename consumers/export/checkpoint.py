"""The last delivered (epoch, seq), kept in a state file across exporter restarts.

Written atomically (a temporary file in the same directory, fsync, rename), so
a crash leaves the old or the new checkpoint, never a torn one.  Written at
most every ``interval`` seconds and at shutdown: after a SIGKILL the exporter
resumes from a slightly older point and may repeat a few events
(at-least-once), never skip one.

Outputs that pack records into messages (grouping.py) also keep here the
places where a message was cut because the stream paused (``cuts``), so that
a restarted exporter cuts its re-sends the same way.  A cut is written before
its message is sent, without fsync: it must survive SIGKILL (the page cache
does), and after a power loss the fleet consumer's de-duplication still
catches what differs.
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


MAX_CUTS = 64  # the newest cuts kept (those past the position are a few at most)


class Checkpoint:
    def __init__(self, path: str | None, interval: float = 0.5):
        self.path = path
        self.interval = interval
        self.position: Position | None = None
        self.cuts: dict[tuple[str, int], None] = {}  # shared with grouping.Grouping
        self._written: Position | None = None
        self._cuts_dirty = False
        self._last_write = 0.0
        self.advanced_at = time.time()  # wall time the position last moved (metrics)

    def load(self) -> Position | None:
        if not self.path:
            return None
        try:
            with open(self.path, "rb") as f:
                data = orjson.loads(f.read())
            self.position = Position(str(data["epoch"]), int(data["seq"]))
            self.cuts.update(((str(e), int(q)), None) for e, q in data.get("cuts", ()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"state file {self.path}: unreadable ({e})") from None
        self._written = self.position
        return self.position

    def advance(self, epoch: str, seq: int) -> None:
        """Note that everything up to ``seq`` of ``epoch`` is delivered."""
        self.position = Position(epoch, seq)
        self.advanced_at = time.time()
        if time.monotonic() - self._last_write >= self.interval:
            self.save()

    def cut(self, epoch: str, seq: int) -> None:
        """Note a message cut after ``seq`` (a pause, not the records), before it is sent."""
        self.cuts[(epoch, seq)] = None
        self._cuts_dirty = True
        self._prune()
        self.save(sync=False)

    def _prune(self) -> None:
        # Cuts behind the position are no longer needed by a restart from it, but
        # cost little; the newest are kept so an older copy of the position still
        # finds its cuts (the tests restore one to force re-sends).
        while len(self.cuts) > MAX_CUTS:
            del self.cuts[next(iter(self.cuts))]

    def save(self, sync: bool = True) -> None:
        # No position yet: a restart takes a fresh snapshot and re-sends no events,
        # so there is nothing to write, cuts included.
        if not self.path or self.position is None:
            return
        if self.position == self._written and not self._cuts_dirty:
            return
        self._prune()
        data = attrs.asdict(self.position)
        if self.cuts:
            data["cuts"] = list(self.cuts)
        tmp = f"{self.path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, orjson.dumps(data))
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            raise CheckpointError(f"state file {self.path}: {e.strerror}") from None
        self._written = self.position
        self._cuts_dirty = False
        self._last_write = time.monotonic()
