"""The public hook through which a stream's start can be replaced.

:class:`consumers.subscriber.EventStream` in snapshot mode starts by reading
every selected map.  A consumer that knows better where to start (the exporter,
resuming from its checkpoint: consumers/export/resume.py) passes a
:class:`StartPolicy` to the stream's constructor instead of overriding the
stream's internals.  The policy is given a :class:`StartContext`: what it may
read (the client, the selection, the epoch, the first heartbeat's positions)
and the few things it may do, as callbacks the stream hands out, so the stream
keeps sole ownership of its sequence bookkeeping, state and counters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from .client import Client
    from .events import Event
    from .recordsets import FormatterCache
    from .selection import Selection

__all__ = ["StartContext", "StartPolicy"]


@attrs.frozen
class StartContext:
    """What a start policy sees of the stream it starts, and may do to it."""

    client: Client
    selection: Selection
    epoch: str | None  # the daemon's epoch, from the first heartbeat
    topics: Mapping[str, int]  # the first heartbeat's topic_seq per map
    formatters: FormatterCache  # the stream's, for decoding buffer records alike
    # Re-read map ``name`` (reason, announce) and return the differences as events.
    resync: Callable[[str, str, bool], Awaitable[list[Event]]]
    # The ordinary start: re-read every selected map (reason, announce).
    snapshot_all: Callable[[str, bool], Awaitable[list[Event]]]
    # Map ``name``'s events up to ``topic_seq`` are reflected: the stream goes on after it.
    reflected: Callable[[str, int], None]
    # The last topic_seq of a map the stream has reflected (None: not known yet).
    last: Callable[[str], int | None]
    # Count one resync in the stream's statistics (``EventStream.resyncs``).
    count_resync: Callable[[], None]


class StartPolicy(Protocol):
    """Replaces a snapshot-mode stream's start, once.

    ``start`` returns the events the stream begins with.  If the daemon does
    not answer (DaemonUnavailable), the stream waits for it as usual and then
    starts the ordinary way: a policy is used for the first attempt only.
    """

    async def start(self, stream: StartContext) -> list[Event]: ...
