"""``file:///PATH``: newline-delimited records with size-based rotation.

Rotation is logrotate's "create" mode: the full file is renamed to ``PATH.1``
(older ones shift to ``.2`` .. ``.N``, the oldest is deleted) and a new
``PATH`` is created.  A tailer that follows by name (Filebeat, Vector, Fluent
Bit, ``tail -F``) finishes the renamed file by its open descriptor and then
picks up the new one; no record is split across files.

Options (URL query or ``[[exports]]`` keys): ``max_bytes`` (rotate when the
file would pass this size; 0: never, the default 100 MiB), ``backups``
(rotated files kept, default 5), ``mode`` (octal, default 0600).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

import trio

from ..record import ExportRecord
from .base import Batch, Output, OutputConfigError, OutputUnavailable, lines

DEFAULT_MAX_BYTES = 100 * 1024 * 1024


class FileOutput(Output):
    schemes = ("file",)

    def __init__(self, url: str, options: Mapping[str, Any] | None = None):
        super().__init__(url, options)
        opts = dict(parse_qsl(self.parts.query)) | self.options
        self.path = self.parts.path
        if not self.path or not self.path.startswith("/") or self.parts.netloc:
            raise OutputConfigError(f"{url}: expected file:///ABSOLUTE/PATH")
        try:
            self.max_bytes = int(opts.get("max_bytes", DEFAULT_MAX_BYTES))
            self.backups = int(opts.get("backups", 5))
            mode = opts.get("mode", 0o600)
            self.mode = int(mode, 8) if isinstance(mode, str) else int(mode)
        except ValueError as e:
            raise OutputConfigError(f"{url}: bad option: {e}") from None
        if self.max_bytes < 0 or self.backups < 0:
            raise OutputConfigError(f"{url}: max_bytes and backups must be >= 0")
        self._fd: int | None = None
        self._size = 0

    def describe(self) -> str:
        return f"file://{self.path}"

    async def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               self.mode)
            self._size = os.fstat(self._fd).st_size
        except OSError as e:
            raise OutputUnavailable(f"{self.path}: {e.strerror}") from None

    async def send(self, batch: Sequence[ExportRecord]) -> None:
        await self.send_batch(batch)

    async def send_batch(self, batch: Batch) -> None:
        """Runs go whole: one buffer for the batch, no object per event."""
        data = lines(batch)
        try:
            await trio.to_thread.run_sync(self._write, data)
        except OSError as e:
            raise OutputUnavailable(f"{self.path}: {e.strerror}") from None

    def _write(self, data: bytes) -> None:
        """Write whole lines; rotate at a line boundary before the file passes max_bytes."""
        view = memoryview(data)
        while view:
            room = self.max_bytes - self._size if self.max_bytes else len(view)
            if room < len(view) and self._size > 0:
                cut = bytes(view[:max(room, 0)]).rfind(b"\n") + 1
                if cut == 0:  # not one whole line fits: rotate first
                    self._rotate()
                    continue
            else:
                cut = len(view)
            self._write_all(view[:cut])
            view = view[cut:]

    def _write_all(self, chunk: memoryview) -> None:
        assert self._fd is not None
        while chunk:
            n = os.write(self._fd, chunk)
            self._size += n
            chunk = chunk[n:]

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           self.mode)
        self._size = 0

    async def aclose(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
