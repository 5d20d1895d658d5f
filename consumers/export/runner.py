"""Running exporters as a process: signals, flushing, one line per state change."""

from __future__ import annotations

import signal
from collections.abc import Callable
from importlib import metadata

import trio

from ..client import Client
from ..nurseries import one_error
from .exporter import Exporter, ExportSpec
from .metrics import serve

FLUSH_SECONDS = 5.0  # on SIGTERM/SIGINT, time given to deliver what is buffered


def _teller(say: Callable[[str], None], name: str) -> Callable[[str], None]:
    """One stderr line per state change, labelled with the exporter's name."""
    label = f"pymap export: {name}: " if name else "pymap export: "
    return lambda message: say(label + message)


def pymap_version() -> str:
    try:
        return metadata.version("pymap")
    except metadata.PackageNotFoundError:
        return "0"


async def run_exports(specs: list[ExportSpec], endpoint: str, timeout: float,
                      say: Callable[[str], None], metrics: str | None = None) -> None:
    """Run every spec side by side until SIGTERM or SIGINT, then flush and save checkpoints.
    ``metrics``: HOST:PORT to serve the exporters' /metrics on."""
    async with Client(endpoint, timeout) as client:
        exporters = [Exporter(client, spec, pymap_version(), on_status=_teller(say, spec.name))
                     for spec in specs]
        server = serve(metrics, exporters) if metrics else None
        try:
            await _run(exporters)
        finally:
            if server is not None:
                server.shutdown()


async def _run(exporters: list[Exporter]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals, one_error():
        async with trio.open_nursery() as nursery:
            for ex in exporters:
                nursery.start_soon(ex.run)
            async for _ in signals:
                break
            with trio.move_on_after(FLUSH_SECONDS):
                for ex in exporters:
                    await ex.delivery.close()
            nursery.cancel_scope.cancel()
    for ex in exporters:
        ex.checkpoint.save()
