"""Connecting to NATS and making sure the stream exists (runs on the asyncio side).

Stream defaults when pymap creates it (docs/fleet.md): subjects ``<prefix>.>``,
limits retention (by ``max_age`` and ``max_bytes``, oldest discarded first),
file storage, ``replicas`` copies, a ``duplicate_window`` for message-id
de-duplication.  With ``create=false`` the stream must exist and is used as is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from .bridge import AsyncioThread
from .options import FleetOptions

log = logging.getLogger("pymap.fleet")


class FleetUnavailable(Exception):
    """The NATS servers cannot be reached, or JetStream does not answer."""


class FleetError(Exception):
    """JetStream refused something (a missing stream, bad credentials): no retry helps."""


def stream_config(options: FleetOptions) -> StreamConfig:
    return StreamConfig(name=options.stream, subjects=options.subjects,
                        retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
                        max_age=options.max_age, max_bytes=options.max_bytes,
                        storage=StorageType.FILE, num_replicas=options.replicas,
                        duplicate_window=options.duplicate_window,
                        description="pymap fleet events (docs/fleet.md)")


async def connect(options: FleetOptions, name: str,
                  on_state: Callable[[str], None] | None = None
                  ) -> tuple[NATS, JetStreamContext]:
    """Connect (bounded in time) and reconnect for ever after; ``on_state`` hears of
    disconnects and reconnects.  nats-py's errors go to the ``pymap.fleet`` logger,
    one line each, instead of its default traceback on stderr."""
    last_error: list[BaseException] = []
    client: list[NATS] = []

    async def error_cb(e: Exception) -> None:
        last_error[:] = [e]
        log.debug("nats: %s", e or type(e).__name__)

    async def disconnected_cb() -> None:
        # nats-py calls this on our own close() too (status CLOSED): only a lost
        # connection that it now tries to restore is news.
        if on_state is not None and client and client[0].is_reconnecting:
            on_state("disconnected from NATS; reconnecting")

    async def reconnected_cb() -> None:
        if on_state is not None:
            on_state("reconnected to NATS")

    # The first connection is bounded here, or nats-py would cycle through the
    # servers for ever (reconnects are unbounded, which is what we want later).
    bound = options.connect_timeout * len(options.servers) + 1
    try:
        nc = await asyncio.wait_for(
            nats.connect(name=name, error_cb=error_cb, disconnected_cb=disconnected_cb,
                         reconnected_cb=reconnected_cb, **options.connect_kwargs()), bound)
    except (OSError, nats.errors.NoServersError, TimeoutError) as e:
        cause = last_error[0] if last_error else e
        raise FleetUnavailable(f"cannot reach NATS at {', '.join(options.servers)}: "
                               f"{cause or type(cause).__name__}") from None
    except nats.errors.Error as e:
        raise FleetError(f"NATS refused the connection: {e}") from None
    client.append(nc)
    return nc, nc.jetstream(timeout=options.ack_timeout)


async def ensure_stream(js: JetStreamContext, options: FleetOptions) -> None:
    """Create the stream if missing and allowed; otherwise check that it exists."""
    try:
        await js.stream_info(options.stream)
        return
    except nats.js.errors.NotFoundError:
        if not options.create_stream:
            raise FleetError(f"JetStream stream {options.stream!r} does not exist "
                             "(and create=false)") from None
    except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as e:
        raise FleetUnavailable(f"JetStream does not answer: {e or type(e).__name__}") from None
    try:
        await js.add_stream(stream_config(options))
    except nats.js.errors.BadRequestError as e:
        raise FleetError(f"cannot create stream {options.stream!r}: {e.description}") from None
    except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as e:
        raise FleetUnavailable(f"JetStream did not create stream {options.stream!r}: "
                               f"{e or type(e).__name__}") from None


async def close_connection(thread: AsyncioThread, nc: NATS | None) -> None:
    """Close ``nc`` (flushing what it still holds, 5 s at most), then stop ``thread``."""
    if nc is not None:
        try:
            await thread.run(asyncio.wait_for(nc.close(), 5))
        except (TimeoutError, nats.errors.Error, OSError):
            pass  # closing a dead connection: nothing is left to flush
    await thread.__aexit__(None, None, None)
