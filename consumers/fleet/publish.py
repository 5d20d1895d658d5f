"""Publishing event batches to the fleet stream, acknowledged (the exporter's NATS output).

Per-event round trips cannot reach tens of thousands of events per second, so
a batch goes out pipelined: every event is published with its own reply inbox
(``js.publish_async``) and only then are the acks gathered, all within one
``ack_timeout``.  A batch either is acknowledged as a whole (each event stored
or recognised as a duplicate by its message id) or raises: FleetUnavailable
when the servers cannot be reached or do not ack in time (retrying later is
right, and the ids make the retry harmless), FleetError when JetStream refuses.

With ``batch=N`` the records are first cut into messages by the output's
:class:`~consumers.export.grouping.Grouping` (consecutive events of one map and
action, at most N, boundaries a function of the records alone), each message
packing its events one per line; a message too big for the server's
``max_payload`` goes out as single events instead.
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

from ..export.grouping import Grouping
from ..export.record import ExportRecord
from .bridge import AsyncioThread
from .jetstream import FleetError, FleetUnavailable, close_connection, connect, ensure_stream
from .options import FleetOptions
from .subjects import batch_headers, headers, subject


@attrs.frozen
class PublishResult:
    stored: int  # events newly stored in the stream
    duplicates: int  # events already there (a re-send within the duplicate window)
    messages: int = 0  # JetStream messages they went in


async def _publish_batch(nc: NATS, js: JetStreamContext, prefix: str,
                         records: Sequence[ExportRecord], grouping: Grouping | None
                         ) -> PublishResult:
    futures = []
    counts = []
    groups = grouping.split(records) if grouping is not None else [records]
    for group in groups:
        if len(group) > 1 and grouping is not None:
            payload = b"\n".join(r.payload for r in group)
            if len(payload) <= nc.max_payload - 1024:  # room for the headers
                first, last = group[0], group[-1]
                futures.append(await js.publish_async(
                    subject(prefix, first.node, first.map, first.action), payload,
                    headers=batch_headers(first.node, first.map, first.action, first.epoch,
                                          first.seq, last.seq, first.time)))
                counts.append(len(group))
                continue
        for r in group:
            futures.append(await js.publish_async(
                subject(prefix, r.node, r.map, r.action), r.payload,
                headers=headers(r.id, r.node, r.map, r.action, r.time)))
            counts.append(1)
    acks = await asyncio.gather(*futures)
    dups = sum(n for a, n in zip(acks, counts, strict=True) if a.duplicate)
    return PublishResult(len(records) - dups, dups, len(acks))


async def _publish_within(nc: NATS, js: JetStreamContext, prefix: str,
                          records: Sequence[ExportRecord], grouping: Grouping | None,
                          timeout: float) -> PublishResult:
    try:
        return await asyncio.wait_for(_publish_batch(nc, js, prefix, records, grouping), timeout)
    except TimeoutError:
        raise FleetUnavailable(f"no JetStream ack within {timeout:g} s") from None
    except (nats.js.errors.NoStreamResponseError, nats.js.errors.ServiceUnavailableError) as e:
        raise FleetUnavailable(f"JetStream unavailable: {e or type(e).__name__}") from None
    except nats.js.errors.APIError as e:
        raise FleetError(f"JetStream refused an event: {e.description or e}") from None
    except (nats.errors.Error, OSError) as e:  # closed, outbound buffer full while reconnecting
        raise FleetUnavailable(f"NATS connection: {e or type(e).__name__}") from None


class FleetPublisher:
    """``async with FleetPublisher(options) as pub: await pub.publish(records)`` from trio.

    With ``options.batch`` > 1, ``records`` must end where a message ends (the
    delivery layer sees to it through ``grouping``)."""

    def __init__(self, options: FleetOptions, client_name: str = "pymap-export",
                 grouping: Grouping | None = None):
        self.options = options
        self.client_name = client_name
        if grouping is None and options.batch > 1:
            grouping = Grouping(options.batch, options.linger)
        self.grouping = grouping
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
        assert self._thread is not None and self._js is not None and self._nc is not None, \
            "publish before open"
        return await self._thread.run(_publish_within(self._nc, self._js, self.options.prefix,
                                                      records, self.grouping,
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
