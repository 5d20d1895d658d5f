"""The subscriber's hold-on logic, in-process and without root: an EventStream against a
tiny in-test ZeroMQ publisher that speaks the stream protocol and can fall silent,
skip messages or restart under a new epoch.  The end-to-end proof against a real
daemon is tests/test_events_holdon.py."""

from __future__ import annotations

import contextlib
import time

import pytest
import trio
import zmq

from consumers.client import DaemonUnavailable, ReplyChunk
from consumers.subscriber import EventStream
from watcher.wire import schema
from watcher.wire.transport import send_multipart

BEAT = 0.05  # the tiny publisher's heartbeat interval (s)
SILENCE = 0.5  # the stream's heartbeat timeout in these tests (s)


class TinyPublisher:
    """A PUB socket publishing heartbeats and events for one map, as the daemon does."""

    def __init__(self, endpoint: str, name: str = "m"):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.name = name
        self.epoch = "e1"
        self.seq = 0
        self.topic_seq = 0
        self.silent = False  # a dead or stopped daemon

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def restart(self, epoch: str) -> None:
        self.epoch, self.seq, self.topic_seq = epoch, 0, 0

    async def run(self) -> None:
        while True:
            if not self.silent:
                await self.beat()
            await trio.sleep(BEAT)

    async def beat(self) -> None:
        hb = schema.Heartbeat(epoch=self.epoch, seq=self.seq, time=time.time(), interval=BEAT,
                              topics={self.name: self.topic_seq})
        await send_multipart(self.sock, [schema.HEARTBEAT_TOPIC, schema.encode(hb)])

    async def added(self, key: int, publish: bool = True) -> None:
        """One ``added`` event; with ``publish=False`` it is numbered but lost on the way."""
        self.seq += 1
        self.topic_seq += 1
        if not publish:
            return
        batch = schema.EventBatch(epoch=self.epoch, seq=self.seq, count=1,
                                  topic_seq=self.topic_seq, time=time.time(),
                                  map=schema.MapRef(7, self.name), key_size=4, value_stride=4)
        k = key.to_bytes(4, "little")
        await send_multipart(self.sock, [schema.map_topic(self.name), schema.encode(batch),
                                         b"\0", k, k, bytes(4)])


class FakeClient:
    """The request side of a daemon, as EventStream uses it without snapshots."""

    def __init__(self, events_endpoint: str):
        self.events_endpoint = events_endpoint
        self.gaps: list[tuple[str, int]] = []

    async def ping(self) -> schema.Pong:
        return schema.Pong(version="test", epoch="e1", uptime=0.0,
                           events_endpoint=self.events_endpoint)

    async def report_gap(self, name: str, missed: int) -> None:
        self.gaps.append((name, missed))


class SnapshotClient(FakeClient):
    """Also serves snapshot gets of map "m" from ``entries``; ``unanswered`` gets time out."""

    INFO = schema.MapInfo(id=7, name="m", type="hash", key_size=4, value_size=4,
                          max_entries=16, flags=0, value_stride=4)

    def __init__(self, events_endpoint: str):
        super().__init__(events_endpoint)
        self.entries: dict[int, int] = {}
        self.seq = 0
        self.unanswered = 0
        self.gets: list[str] = []

    async def list_maps(self, pattern=None, entries=True):
        return [self.INFO]

    @contextlib.asynccontextmanager
    async def get(self, selector, snapshot=False, entries=True, reason=""):
        self.gets.append(reason)
        if self.unanswered:
            self.unanswered -= 1
            raise DaemonUnavailable("pymap daemon did not answer within 1 s")
        dump = _Dump(self.INFO, self.seq, self.entries)
        yield dump


class _Dump:
    def __init__(self, info: schema.MapInfo, seq: int, entries: dict[int, int]):
        self.map, self.seq = info, seq
        self._chunk = ReplyChunk(b"".join(k.to_bytes(4, "little") for k in entries),
                            b"".join(v.to_bytes(4, "little") for v in entries.values()),
                            len(entries))

    async def chunks(self):
        yield self._chunk


@pytest.fixture
async def wire(tmp_path):
    """(publisher, client, nursery): the publisher heartbeats until the test ends."""
    endpoint = f"ipc://{tmp_path}/events.sock"
    pub = TinyPublisher(endpoint)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pub.run)
            yield pub, FakeClient(endpoint), nursery
            nursery.cancel_scope.cancel()
    finally:
        pub.close()


async def _next(it, timeout: float = 10.0):
    with trio.fail_after(timeout):
        return await it.__anext__()


async def _started(pub: TinyPublisher, stream: EventStream, batches: bool = False):
    """The stream's iterator (of events, or of ``batches()``), once its subscription is
    live (it has seen an event)."""
    it = stream.batches() if batches else aiter(stream)
    async with trio.open_nursery() as nursery:  # publish until the subscription is live
        async def keep_publishing():
            key = 0
            while True:
                await pub.added(key)
                key += 1
                await trio.sleep(BEAT)

        nursery.start_soon(keep_publishing)
        first = await _next(it)
        nursery.cancel_scope.cancel()
    if batches:
        (first,) = first  # one event per message here
    assert first.action == "added"
    return it


async def test_silence_is_a_stall_then_the_daemon_resumes_and_losses_are_counted(wire):
    pub, client, _ = wire
    async with EventStream(client, ["m"], heartbeat_timeout=SILENCE) as stream:
        it = await _started(pub, stream)
        pub.silent = True
        stalled = await _next(it)
        assert stalled.action == "stalled" and f"{SILENCE:g} s" in stalled.reason
        # While silent, 3 events are numbered but never arrive; then the daemon speaks.
        for key in range(100, 103):
            await pub.added(key, publish=False)
        await trio.sleep(SILENCE)  # still waiting, no second notice
        pub.silent = False
        await pub.added(200)
        resumed, lost = await _next(it), await _next(it)
        assert resumed.action == "resumed" and "of silence" in resumed.reason
        assert (lost.action, lost.missed) == ("lost", 3)
        assert client.gaps == [("m", 3)]
        added = await _next(it)
        assert (added.action, added.key) == ("added", (200).to_bytes(4, "little"))


async def test_batches_are_what_each_message_or_notice_brings(wire):
    """``stream.batches()``: the same events as above, a list per message: the stall and
    the resume each alone, the gap's ``lost`` with the message that revealed it."""
    pub, client, _ = wire
    async with EventStream(client, ["m"], heartbeat_timeout=SILENCE) as stream:
        it = await _started(pub, stream, batches=True)
        pub.silent = True
        (stalled,) = await _next(it)
        assert stalled.action == "stalled"
        for key in range(100, 103):
            await pub.added(key, publish=False)
        pub.silent = False
        await pub.added(200)  # sent before the next heartbeat: it ends the stall
        (resumed,) = await _next(it)
        lost, added = await _next(it)
        assert resumed.action == "resumed" and (lost.action, lost.missed) == ("lost", 3)
        assert (added.action, added.key) == ("added", (200).to_bytes(4, "little"))
        await pub.added(201)
        (added,) = await _next(it)  # heartbeats in between bring nothing: no empty batch
        assert (added.action, added.key) == ("added", (201).to_bytes(4, "little"))
        assert client.gaps == [("m", 3)]


async def test_a_restarted_daemon_is_a_resync_not_an_error(wire):
    pub, client, _ = wire
    async with EventStream(client, ["m"], heartbeat_timeout=SILENCE) as stream:
        it = await _started(pub, stream)
        pub.silent = True
        assert (await _next(it)).action == "stalled"
        pub.restart("e2")
        pub.silent = False
        assert (await _next(it)).action == "resumed"
        resync = await _next(it)
        assert (resync.action, resync.reason) == ("resync", "epoch")
        assert stream.epoch == "e2"
        await pub.added(300)
        added = await _next(it)
        assert (added.action, added.topic_seq) == ("added", 1)  # numbering restarted, no gap
        assert client.gaps == []


async def test_max_wait_gives_up_with_a_clear_error(wire):
    pub, client, _ = wire
    async with EventStream(client, ["m"], heartbeat_timeout=SILENCE, max_wait=0.3) as stream:
        it = await _started(pub, stream)
        pub.silent = True
        assert (await _next(it)).action == "stalled"
        with pytest.raises(DaemonUnavailable, match="gave up after waiting 0.3 s"):
            await _next(it)


@pytest.mark.parametrize("options", [{"hold_on": False}, {"max_wait": 0}])
async def test_without_hold_on_silence_raises(wire, options):
    pub, client, _ = wire
    async with EventStream(client, ["m"], heartbeat_timeout=SILENCE, **options) as stream:
        it = await _started(pub, stream)
        pub.silent = True
        with pytest.raises(DaemonUnavailable, match="no heartbeat"):
            await _next(it)


async def test_a_stopped_subscriber_is_not_a_silent_daemon(wire):
    """The whole process stops (here: the trio thread blocks, as under SIGSTOP) for
    longer than the heartbeat timeout; when it runs again the daemon's heartbeats are
    there, so there is no stall to report."""
    pub, client, _ = wire
    async with EventStream(client, ["m"], heartbeat_timeout=SILENCE) as stream, \
            trio.open_nursery() as nursery:  # ends (cancelled) before the stream closes
        it = await _started(pub, stream)

        async def freeze():
            await trio.sleep(0.1)  # let the stream wait on its socket first
            time.sleep(3 * SILENCE)  # noqa: ASYNC251 -- blocking is the point

        seen: list = []

        async def consume():
            async for event in it:
                seen.append(event)

        nursery.start_soon(freeze)
        nursery.start_soon(consume)
        await trio.sleep(6 * SILENCE)
        assert seen == []
        await pub.added(400)
        with trio.fail_after(10):
            while not seen:
                await trio.sleep(0.01)
        assert [e.action for e in seen] == ["added"]
        nursery.cancel_scope.cancel()


async def test_a_resync_the_daemon_left_unanswered_is_redone(tmp_path):
    """A restarted daemon that does not answer the resync's snapshot request: a
    ``stalled`` event, then, once the daemon is heard, the snapshot is redone and the
    state comes out right."""
    endpoint = f"ipc://{tmp_path}/events.sock"
    pub = TinyPublisher(endpoint)
    client = SnapshotClient(endpoint)
    client.entries = {1: 10, 2: 20}
    k = lambda n: n.to_bytes(4, "little")  # noqa: E731
    try:
        async with trio.open_nursery() as nursery, \
                EventStream(client, ["m"], snapshot=True,  # type: ignore[arg-type]
                            heartbeat_timeout=SILENCE) as stream:
            nursery.start_soon(pub.run)
            it = aiter(stream)
            start = [await _next(it), await _next(it)]
            assert {(e.action, e.key) for e in start} == {("added", k(1)), ("added", k(2))}
            # The daemon restarts with other entries, and its first answer times out.
            client.entries, client.unanswered = {2: 21, 3: 30}, 1
            pub.restart("e2")
            stalled = await _next(it)
            assert stalled.action == "stalled" and "did not answer" in stalled.reason
            assert (await _next(it)).action == "resumed"
            redone = [await _next(it) for _ in range(4)]
            assert (redone[0].action, redone[0].reason) == ("resync", "epoch")
            assert {(e.action, e.key, e.value) for e in redone[1:]} == {
                ("added", k(3), k(30)), ("updated", k(2), k(21)), ("removed", k(1), k(10))}
            assert client.gets == ["start", "epoch", "epoch"]
            assert stream.entries("m") == {k(2): k(21), k(3): k(30)}
            nursery.cancel_scope.cancel()
    finally:
        pub.close()


def test_max_wait_must_not_be_negative():
    with pytest.raises(ValueError, match="max_wait"):
        EventStream(FakeClient("ipc://x"), ["m"], max_wait=-1)  # type: ignore[arg-type]
