"""Publishing event batches to the fleet stream, acknowledged (the exporter's NATS output).

Per-event round trips cannot reach tens of thousands of events per second, so
a batch goes out pipelined: every event is published with its own reply inbox
(``js.publish_async``) and only then are the acks gathered, all within one
``ack_timeout``.  A batch either is acknowledged as a whole (each event stored
or recognised as a duplicate by its message id) or raises: FleetUnavailable
when the servers cannot be reached or do not ack in time (retrying later is
right, and the ids make the retry harmless), FleetError when JetStream refuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import attrs
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ..export.record import ExportRecord
from .bridge import AsyncioThread
from .jetstream import FleetError, FleetUnavailable, close_connection, connect, ensure_stream
from .options import FleetOptions
from .subjects import headers, subject


@attrs.frozen
class PublishResult:
    stored: int  # newly stored in the stream
    duplicates: int  # already there (a re-send within the duplicate window)


async def _publish_batch(js: JetStreamContext, prefix: str, records: Sequence[ExportRecord]
                         ) -> PublishResult:
    futures = []
    for r in records:
        futures.append(await js.publish_async(
            subject(prefix, r.node, r.map, r.action), r.payload,
            headers=headers(r.node, r.map, r.action, r.epoch, r.seq, r.time, r.payload)))
    acks = await asyncio.gather(*futures)
    dups = sum(1 for a in acks if a.duplicate)
    return PublishResult(len(acks) - dups, dups)


async def _publish_within(js: JetStreamContext, prefix: str, records: Sequence[ExportRecord],
                          timeout: float) -> PublishResult:
    try:
        return await asyncio.wait_for(_publish_batch(js, prefix, records), timeout)
    except TimeoutError:
        raise FleetUnavailable(f"no JetStream ack within {timeout:g} s") from None
    except (nats.js.errors.NoStreamResponseError, nats.js.errors.ServiceUnavailableError) as e:
        raise FleetUnavailable(f"JetStream unavailable: {e or type(e).__name__}") from None
    except nats.js.errors.APIError as e:
        raise FleetError(f"JetStream refused an event: {e.description or e}") from None
    except (nats.errors.Error, OSError) as e:  # closed, outbound buffer full while reconnecting
        raise FleetUnavailable(f"NATS connection: {e or type(e).__name__}") from None


class FleetPublisher:
    """``async with FleetPublisher(options) as pub: await pub.publish(records)`` from trio."""

    def __init__(self, options: FleetOptions, client_name: str = "pymap-export"):
        self.options = options
        self.client_name = client_name
        self._thread: AsyncioThread | None = None
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None

    async def open(self) -> None:
        self._thread = AsyncioThread()
        await self._thread.__aenter__()
        try:
            nc, js = await self._thread.run(connect(self.options, self.client_name))
            self._nc, self._js = nc, js
            await self._thread.run(ensure_stream(js, self.options))
        except BaseException:
            await self.aclose()
            raise

    async def publish(self, records: Sequence[ExportRecord]) -> PublishResult:
        if not records:
            return PublishResult(0, 0)
        assert self._thread is not None and self._js is not None, "publish before open"
        return await self._thread.run(_publish_within(self._js, self.options.prefix, records,
                                                      self.options.ack_timeout))

    async def aclose(self) -> None:
        thread, nc = self._thread, self._nc
        self._thread = self._nc = self._js = None
        if thread is None:
            return
        with trio.CancelScope(shield=True):  # closing runs even when we are cancelled
            await close_connection(thread, nc)

    async def __aenter__(self) -> FleetPublisher:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["ExportRecord", "FleetError", "FleetPublisher", "FleetUnavailable", "PublishResult"]
