"""Reading the fleet stream: every node's events, with acknowledgements (client library).

``FleetSubscription`` creates a JetStream pull consumer on the fleet stream,
durable (named; survives restarts and resumes where it was acknowledged) or
ephemeral (removed by the server after ``inactive`` seconds without a reader),
filtered by subject as narrowly as NATS wildcards allow and exactly by node
and map glob on the headers.  A SIEM forwarder in Python::

    async with FleetSubscription(parse_url(url), maps=["cilium_lxc"], durable="siem") as sub:
        async for batch in sub.batches():
            forward(batch)            # each FleetMessage: node, map, action, payload...
            await sub.ack(batch)      # unacked messages come again after ack_wait

Iterating ``sub`` itself yields messages and acknowledges each fetched batch when
the next one is asked for, i.e. after the caller handled it (at-least-once).

A batched JetStream message (``batch=N`` at the exporter) is unpacked here:
each line becomes one FleetMessage naming its node, with its own seq.  Acks are
per JetStream message, so acknowledging one event of a batched message
acknowledges all of them: acknowledge what ``batches()`` yields as a whole.
Events seen before (same node, epoch and seq: a re-send JetStream did not
recognise) are dropped and counted in ``duplicates`` (consumers/fleet/dedup.py).
"""

from __future__ import annotations

import datetime
import fnmatch
from collections.abc import AsyncIterator, Callable, Sequence

import attrs
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from .bridge import AsyncioThread
from .dedup import SeenWindow
from .jetstream import FleetError, FleetUnavailable, close_connection, connect
from .options import FleetOptions
from .subjects import (
    HEADER_ACTION,
    HEADER_COUNT,
    HEADER_FIRST,
    HEADER_MAP,
    HEADER_NODE,
    HEADER_TIME,
    MSG_ID,
    filter_subjects,
    parse_msg_id,
)

FETCH_WAIT = 1.0  # seconds a fetch waits for the first message before asking again


class StreamMissing(FleetError):
    """The fleet stream does not exist (yet)."""


@attrs.frozen
class FleetMessage:
    """One event from one node, as the fleet stream holds it."""

    node: str
    map: str
    action: str
    epoch: str
    seq: int
    time: float  # event time at the node
    payload: bytes
    stream_seq: int
    received: float  # when this reader fetched it (time.time())
    msg: Msg = attrs.field(repr=False, eq=False)


def _count(msg: Msg) -> int:
    """Events in ``msg`` as its headers say (one without the header; 0 if garbled)."""
    count = (msg.headers or {}).get(HEADER_COUNT)
    return 1 if count is None else int(count) if count.isdigit() else 0


def _messages(msg: Msg, now: float) -> list[FleetMessage]:
    """The events of one JetStream message: one, or one per line of a batched message."""
    h = msg.headers or {}
    node = h.get(HEADER_NODE, "")
    epoch, seq = parse_msg_id(node, h.get(MSG_ID, ""))
    map_name, action = h.get(HEADER_MAP, ""), h.get(HEADER_ACTION, "")
    t = float(h.get(HEADER_TIME, 0) or 0)
    stream_seq = msg.metadata.sequence.stream
    count = h.get(HEADER_COUNT)
    lines = msg.data.split(b"\n") if count is not None else [msg.data]
    if count is not None and (len(lines) != _count(msg) or not h.get(HEADER_FIRST, "").isdigit()):
        lines, count = [msg.data], None  # not what its headers say: shown whole, seq 0
        seq = 0
    elif count is not None:
        seq = int(h[HEADER_FIRST])
    return [FleetMessage(node=node, map=map_name, action=action, epoch=epoch, seq=seq + i,
                         time=t, payload=line, stream_seq=stream_seq, received=now, msg=msg)
            for i, line in enumerate(lines)]


def _start(since: float | None, follow: bool, after_seq: int) -> dict:
    if after_seq:
        return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": after_seq + 1}
    if since is not None:
        start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=since)
        return {"deliver_policy": DeliverPolicy.BY_START_TIME,
                "opt_start_time": start.isoformat().replace("+00:00", "Z")}
    return {"deliver_policy": DeliverPolicy.NEW if follow else DeliverPolicy.ALL}


class FleetSubscription:
    """A pull consumer on the fleet stream, read from trio.

    ``since``: replay from that many seconds ago.  Without it, ``follow=True``
    starts with new events and ``follow=False`` reads the whole stream.
    ``follow=False`` ends when the consumer has caught up with the stream.
    """

    def __init__(self, options: FleetOptions, maps: Sequence[str] | None = None,
                 node_glob: str | None = None, since: float | None = None, follow: bool = True,
                 durable: str | None = None, batch: int = 512, inactive: float = 300.0,
                 ack_wait: float = 30.0, on_notice: Callable[[str], None] | None = None):
        self.options = options
        self.maps = list(maps or [])
        self.node_glob = node_glob
        self.since = since
        self.follow = follow
        self.durable = durable
        self.batch = batch  # events per fetch, about: see _fetch
        self._fetch_n = 1  # messages to ask for next; grows once their size is known
        self.inactive = inactive
        self.ack_wait = ack_wait
        self.on_notice = on_notice
        one_map = self.maps[0] if len(self.maps) == 1 else None
        self.filters = filter_subjects(options.prefix, node_glob, one_map)
        self._thread: AsyncioThread | None = None
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._last_stream_seq = 0
        self.filtered_out = 0  # messages the subject filter let through but the globs did not
        self.seen = SeenWindow()
        self.duplicates = 0  # events dropped as seen before (a re-send stored twice)

    def wanted(self, m: FleetMessage) -> bool:
        if self.node_glob and not fnmatch.fnmatchcase(m.node, self.node_glob):
            return False
        return (not self.maps or not m.map  # a node's stream-wide records always pass
                or any(fnmatch.fnmatchcase(m.map, g) for g in self.maps))

    async def __aenter__(self) -> FleetSubscription:
        self._thread = AsyncioThread("pymap-fleet")
        await self._thread.__aenter__()
        token = trio.lowlevel.current_trio_token()

        def notice(text: str) -> None:
            if self.on_notice is not None:
                try:
                    token.run_sync_soon(self.on_notice, text)
                except trio.RunFinishedError:
                    pass

        try:
            self._nc, self._js = await self._thread.run(
                connect(self.options, "pymap-fleet-reader", notice))
            await self._subscribe_when_ready()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _subscribe_when_ready(self) -> None:
        """Subscribe; a follower whose stream does not exist yet waits for it (tail -F)."""
        told = False
        while True:
            try:
                return await self._subscribe()
            except StreamMissing:
                if not self.follow:
                    raise
                if not told and self.on_notice:
                    self.on_notice(f"stream {self.options.stream!r} does not exist yet; "
                                   "waiting for an exporter to create it")
                told = True
                await trio.sleep(1)

    async def _subscribe(self) -> None:
        assert self._thread is not None and self._js is not None
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait,
                                max_ack_pending=max(4 * self.batch, 1024),
                                inactive_threshold=None if self.durable else self.inactive,
                                **_start(self.since, self.follow, self._last_stream_seq))
        js, stream = self._js, self.options.stream
        assert self._nc is not None
        version = self._nc.connected_server_version
        if len(self.filters) == 1:
            subject = self.filters[0]
        elif (version.major, version.minor) >= (2, 10):  # several filters per consumer
            subject, config.filter_subjects = self.filters[0], self.filters
        else:  # 2.9: one filter; the map is matched here on the headers instead
            subject = self.filters[0].rsplit(".", 2)[0] + ".*.*"

        async def create() -> JetStreamContext.PullSubscription:
            try:
                return await js.pull_subscribe(subject, durable=self.durable, stream=stream,
                                               config=config)
            except nats.js.errors.NotFoundError:
                raise StreamMissing(f"JetStream stream {stream!r} does not exist "
                                 "(no exporter has published yet?)") from None
            except nats.js.errors.APIError as e:
                raise FleetError(f"cannot create a consumer on {stream!r}: "
                                 f"{e.description or e}") from None
            except (TimeoutError, nats.errors.Error) as e:
                raise FleetUnavailable(f"JetStream does not answer: {e or type(e).__name__}"
                                       ) from None

        self._sub = await self._thread.run(create())

    async def _fetch(self) -> list[Msg] | None:
        """The next batch, or None when nothing came within FETCH_WAIT.

        A fetch asks for messages, and a batched message holds up to 1,000 events:
        what a fetch holds is kept near ``batch`` events by asking for as many
        messages as the last fetch's events per message allow (one at first)."""
        sub = self._sub
        assert self._thread is not None and sub is not None

        async def fetch() -> list[Msg] | None:
            try:
                return await sub.fetch(self._fetch_n, timeout=FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError):
                return None

        return await self._thread.run(fetch())

    async def _caught_up(self) -> bool:
        sub = self._sub
        assert self._thread is not None and sub is not None
        info = await self._thread.run(sub.consumer_info())
        return info.num_pending == 0

    async def batches(self) -> AsyncIterator[list[FleetMessage]]:
        """Batches of wanted messages, until caught up (``follow=False``) or forever."""
        import time

        while True:
            try:
                msgs = await self._fetch()
            except nats.js.errors.NotFoundError:
                # The server dropped our ephemeral consumer (a long outage): resume after
                # the last message seen.
                if self.on_notice:
                    self.on_notice("consumer lost; re-creating it after the last message seen")
                await self._subscribe()
                continue
            except (nats.errors.Error, OSError) as e:
                if self.on_notice:
                    self.on_notice(f"fetch failed ({e or type(e).__name__}); retrying")
                await trio.sleep(1)
                continue
            if not msgs:
                if not self.follow and await self._caught_up():
                    return
                continue
            now = time.time()
            self._last_stream_seq = msgs[-1].metadata.sequence.stream
            in_msgs = sum(max(1, _count(m)) for m in msgs)
            self._fetch_n = max(1, min(self.batch, self.batch * len(msgs) // in_msgs))
            wanted: list[FleetMessage] = []
            done: list[Msg] = []  # JetStream messages with nothing to yield: acked now
            for msg in msgs:
                events = _messages(msg, now)
                if not self.wanted(events[0]):
                    self.filtered_out += 1
                    done.append(msg)
                elif fresh := self._fresh(events):
                    wanted += fresh
                else:
                    done.append(msg)
            await self._ack_msgs(done)
            if wanted:
                yield wanted
            if not self.follow and msgs[-1].metadata.num_pending == 0:
                return

    def _fresh(self, events: list[FleetMessage]) -> list[FleetMessage]:
        """``events`` (of one JetStream message) less those seen before, counted."""
        first = events[0]
        if first.seq <= 0:
            return events  # records the exporter made: JetStream's id de-duplication only
        seen = self.seen.runs(first.node, first.epoch).add(first.seq, events[-1].seq)
        if not seen:
            return events
        dup = {s for a, b in seen for s in range(a, b + 1)}
        self.duplicates += len(dup)
        if self.on_notice:
            self.on_notice(f"{len(dup)} event(s) of {first.node} seen before (seq "
                           f"{min(dup)}..{max(dup)}; a re-send stored twice): dropped")
        return [m for m in events if m.seq not in dup]

    async def __aiter__(self) -> AsyncIterator[FleetMessage]:
        async for batch in self.batches():
            for m in batch:
                yield m
            await self.ack(batch)

    async def ack(self, messages: Sequence[FleetMessage]) -> None:
        """Acknowledge the JetStream messages of ``messages`` (one crossing to the asyncio
        side for all of them; a batched message's events share one ack)."""
        await self._ack_msgs(list({id(m.msg): m.msg for m in messages}.values()))

    async def _ack_msgs(self, msgs: Sequence[Msg]) -> None:
        if not msgs or self._thread is None:
            return

        async def ack_all() -> None:
            for msg in msgs:
                await msg.ack()

        await self._thread.run(ack_all())

    async def aclose(self) -> None:
        thread, nc = self._thread, self._nc
        self._thread = self._nc = self._js = self._sub = None
        if thread is not None:
            with trio.CancelScope(shield=True):
                await close_connection(thread, nc)

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
