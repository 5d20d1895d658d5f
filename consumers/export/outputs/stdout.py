"""``-``: newline-delimited records on standard output, flushed per batch."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import trio

from ..record import ExportRecord
from .base import Batch, Output, OutputUnavailable, lines


class StdoutOutput(Output):
    schemes = ("-",)

    async def open(self) -> None:
        self._fd = sys.stdout.fileno()
        sys.stdout.flush()

    async def send(self, batch: Sequence[ExportRecord]) -> None:
        await self.send_batch(batch)

    async def send_batch(self, batch: Batch) -> None:
        """Runs go whole: one buffer for the batch, no object per event."""
        data = lines(batch)
        # A thread, so a stalled reader (a full pipe) never blocks the stream task.  A
        # reader that went away (BrokenPipeError) ends the exporter: no one can come back
        # to this pipe; the CLI exits 0 for it, as for `| head`.
        try:
            await trio.to_thread.run_sync(_write_all, self._fd, data)
        except OSError as e:
            if isinstance(e, BrokenPipeError):
                raise
            raise OutputUnavailable(f"stdout: {e.strerror}") from None

    async def aclose(self) -> None:
        pass

    def describe(self) -> str:
        return "stdout"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
