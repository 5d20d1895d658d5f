"""What an export destination must provide: :class:`Output`.

An output is opened once, then given batches of records, then closed.  It is
driven by one task (``consumers.export.delivery``), never concurrently, so it
needs no locking.  The contract:

- ``open()`` connects (or opens the file).  It raises :class:`OutputUnavailable`
  when the destination is down; the delivery layer retries with backoff.
- ``send(batch)`` delivers every record of ``batch`` in order, or raises
  :class:`OutputUnavailable`.  After that error the delivery layer calls
  ``aclose()`` and ``open()`` again and resends the WHOLE batch (at-least-once:
  a receiver may see a record twice, never a silent hole), so ``send`` should
  not swallow partial failures.
- ``aclose()`` releases everything; it must not raise for a dead destination.
- ``grouping``: None, or the :class:`~consumers.export.grouping.Grouping` of an
  output that packs several records into one message; the delivery layer then
  hands ``send`` whole messages only (the output cuts them with ``grouping.split``).
- ``send_batch(batch)`` is what the delivery layer calls: its batch may hold
  :class:`~consumers.export.record.RecordRun` items (a message's records as one
  object) beside records.  By default it hands ``send`` the records; an output that
  writes lines overrides it to write a run whole, with no object per event.

Other errors (a bad URL, a certificate that cannot be read) are configuration
mistakes: raise :class:`OutputConfigError` from the constructor with a one-line
message; the CLI prints it and exits non-zero.

Outputs are chosen by URL scheme through :data:`consumers.export.outputs.SCHEMES`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import SplitResult, urlsplit

from ..grouping import Grouping
from ..record import ExportRecord, RecordRun

Batch = Sequence[ExportRecord | RecordRun]  # what the delivery layer hands ``send_batch``


def records(batch: Batch) -> list[ExportRecord]:
    """``batch`` with each run as its records."""
    out: list[ExportRecord] = []
    for r in batch:
        if isinstance(r, RecordRun):
            out += r.records()
        else:
            out.append(r)
    return out


def lines(batch: Batch) -> bytes:
    """``batch`` as newline-terminated payloads in one buffer (file and stdout outputs)."""
    return b"".join([r.text if isinstance(r, RecordRun) else r.payload + b"\n"
                     for r in batch])


class OutputUnavailable(Exception):
    """The destination is down or refused the batch: retry later."""


class OutputConfigError(ValueError):
    """The output cannot work as configured (bad URL, option or file)."""


class Output(abc.ABC):
    """One destination.  Subclasses set ``schemes`` and implement the three methods."""

    schemes: ClassVar[tuple[str, ...]] = ()
    grouping: Grouping | None = None

    def __init__(self, url: str, options: Mapping[str, Any] | None = None):
        self.url = url
        self.parts: SplitResult = urlsplit(url)
        self.options: dict[str, Any] = dict(options or {})

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect or open; raise OutputUnavailable if the destination is down."""

    @abc.abstractmethod
    async def send(self, batch: Sequence[ExportRecord]) -> None:
        """Deliver all of ``batch`` in order, or raise OutputUnavailable."""

    async def send_batch(self, batch: Batch) -> None:
        """``send`` with every run of ``batch`` as its records (same contract)."""
        await self.send(records(batch))

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the destination; never raises for one that is already gone."""

    def describe(self) -> str:
        """A short name for logs and status lines (no secrets)."""
        p = self.parts
        return f"{p.scheme}://{p.hostname or ''}{':' + str(p.port) if p.port else ''}{p.path}"

    def host_port(self, default_port: int) -> tuple[str, int]:
        """HOST:PORT of a network URL, with a one-line error for a bad one."""
        try:
            host, port = self.parts.hostname, self.parts.port
        except ValueError as e:
            raise OutputConfigError(f"{self.url}: {e}") from None
        if not host:
            raise OutputConfigError(f"{self.url}: no host (expected SCHEME://HOST:PORT)")
        return host, port or default_port
