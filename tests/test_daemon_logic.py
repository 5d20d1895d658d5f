"""The daemon's logic in-process: socket owners, demand, the engine's cycle, the request server.

No root and no kernel: the engine and the request server take the catalog layer
as a parameter, and these tests hand them an in-memory one (tests/support/catalog.py),
with real ZeroMQ sockets over ``inproc://``.  A logic error shows here in a second;
the subprocess tests against real maps (test_events*, test_get, test_errors) stay
the proof that the whole works on the kernel.
"""

from __future__ import annotations

import itertools
import pathlib
import re
import struct
from typing import Any

import numpy as np
import pytest
import trio
import zmq
from support.catalog import FakeCatalog, record
from support.kernel import host_features

from watcher.daemon import errors, publisher
from watcher.daemon.access import View
from watcher.daemon.catalog import HostCatalog
from watcher.daemon.config import Config, DaemonConfig
from watcher.daemon.demand import Demand
from watcher.daemon.engine import Engine
from watcher.daemon.interfaces import Catalog
from watcher.daemon.publisher import PublishedStream
from watcher.daemon.reload import Reloader
from watcher.daemon.server import RequestServer
from watcher.wire import schema
from watcher.wire.transport import (
    OutFrames,
    PeerGone,
    PublisherOwner,
    SocketOwner,
    recv_multipart,
    send_multipart,
)

_ids = itertools.count()


def k(i: int) -> bytes:
    return struct.pack("<I", i)


def v(i: int) -> bytes:
    return struct.pack("<Q", i)


class Recorder:
    """Stands in for the XPUB owner under the stream: keeps what was published."""

    def __init__(self):
        self.sent: list[list[bytes]] = []
        self.outbox_bytes = self.waits = 0  # never queues: nothing to wait for

    def publish(self, frames: OutFrames) -> None:
        self.sent.append([bytes(f) for f in frames])

    async def room(self) -> None:
        pass

    def messages(self, kind: type | None = None) -> list[tuple[Any, list[bytes]]]:
        out = [(schema.decode(f[1]), f[2:]) for f in self.sent]
        return [(m, fr) for m, fr in out if kind is None or isinstance(m, kind)]


def user_space_config(**daemon) -> Config:
    config = Config(daemon=DaemonConfig(**daemon))
    config.watch.kernel_delta = "off"  # the in-kernel engine needs the kernel
    return config


def make_engine(cat: Catalog, **daemon) -> tuple[Engine, Recorder]:
    rec = Recorder()
    config = user_space_config(**daemon)
    stream = PublishedStream(rec, "e" * 16, config.daemon.recent_events, batch_events=2,
                             heartbeat_interval=1.0, recent_bytes=config.daemon.recent_bytes)
    return Engine(config, stream, host_features(), catalog=cat), rec


def stream_of(engine: Engine) -> PublishedStream:
    """The engine's stream as the real class (the engine sees it as a ``Stream``)."""
    assert isinstance(engine.stream, PublishedStream)
    return engine.stream


def subscribe(engine: Engine, topic: bytes) -> None:
    engine.on_subscription([b"\x01" + topic])


def events_of(rec: Recorder) -> list[tuple[int, bytes, bytes, bytes]]:
    """Every entry event published: (action, key, value, old value)."""
    out = []
    for msg, frames in rec.messages(schema.EventBatch):
        ks, vs = msg.key_size, msg.value_stride
        for i in range(msg.count):
            out.append((frames[0][i], frames[1][i * ks:(i + 1) * ks],
                        frames[2][i * vs:(i + 1) * vs], frames[3][i * vs:(i + 1) * vs]))
    return out


# --- demand ------------------------------------------------------------------------


def test_demand_counts_the_connections_holding_a_prefix():
    """The subscription gate reports each connection's topics once: two connections on
    one topic, two unsubscriptions before it goes."""
    d = Demand()
    assert d.update(b"\x01map:flows\0") and d.update(b"\x01map:flows\0")
    assert d.prefixes == {b"map:flows\0": 2}
    assert d.wants("flows") and not d.wants("flows2") and d.any_maps()
    assert not d.update(b"\x00map:flows\0")  # one of the two left
    assert d.wants("flows")
    assert not d.update(b"\x00map:flows\0")  # the last holder left: the prefix goes
    assert not d.wants("flows") and not d.any_maps()
    assert not d.update(b"") and not d.update(b"\x07junk")
    assert d.update(b"\x01map:cil") and d.wants("cilium_ct4") and not d.wants("flows")
    assert d.update(b"\x01hb") and not Demand().any_maps()


def test_demand_in_a_view_covers_only_the_maps_it_sees():
    view = View(("acl_*",), ("acl_secret*",))
    d = Demand()
    d.views = {view.namespace: view}
    assert d.update(b"\x01" + view.namespace + b"map:acl_")
    assert d.wants("acl_public") and not d.wants("acl_secret1") and not d.wants("other")
    assert d.active_views() == {view.namespace: view} and d.any_maps()
    assert d.update(b"\x01v00000000:map:")  # a namespace no rule has: covers nothing
    assert not d.wants("other")
    d.update(b"\x00" + view.namespace + b"map:acl_")
    assert d.active_views() == {} and not d.wants("acl_public")


# --- the engine's cycle ----------------------------------------------------------------


async def test_engine_cycle_baseline_changes_removal_and_creation():
    cat = FakeCatalog()
    m = cat.add(record(10, "flows"), {k(1): v(1), k(3): v(3)})
    cat.add(record(11, "other"), {k(1): v(1)})
    engine, rec = make_engine(cat)

    subscribe(engine, schema.map_topic("flows"))
    (beat, _), = rec.messages(schema.Heartbeat)  # a new subscriber is greeted at once
    await engine.cycle()
    assert list(engine.watches) == [10]  # only what is wanted
    assert rec.messages(schema.EventBatch) == []  # the first poll is a baseline

    m.entries[k(1)] = v(100)
    m.entries[k(2)] = v(2)
    del m.entries[k(3)]
    await engine.poll(engine.watches[10])
    assert sorted(events_of(rec)) == [(0, k(2), v(2), bytes(8)), (1, k(1), v(100), v(1)),
                                      (2, k(3), v(3), bytes(8))]
    batches = [msg for msg, _ in rec.messages(schema.EventBatch)]
    assert [(b.topic_seq, b.count) for b in batches] == [(1, 2), (3, 1)]  # batch_events = 2
    assert [b.req for b in batches] == [0, 0]  # the live stream carries no request id

    del cat.maps[10]
    await engine.cycle()
    (gone, _), = rec.messages(schema.MapEvent)
    assert (gone.action, gone.map.id, gone.topic_seq) == ("map_removed", 10, 4)
    assert engine.watches == {}

    cat.add(record(12, "flows"), {k(7): v(7)})  # recreated while wanted: every entry is new
    await engine.cycle()
    created = [msg for msg, _ in rec.messages(schema.MapEvent)][1]
    assert (created.action, created.map.id, created.topic_seq) == ("map_created", 12, 5)
    assert events_of(rec)[-1] == (0, k(7), v(7), bytes(8))
    assert all(h.closed for h in cat.opened)


async def test_a_gone_maps_name_is_forgotten_and_its_topic_seq_never_goes_back(monkeypatch):
    """Under churn of uniquely named maps, what is kept per name (the engine's hold, the
    stream's recent ring and topic_seq) grew for ever: it now goes once nothing wants the
    name.  A name that comes back continues its topic_seq, and one forgotten past the
    bounded table starts above every number it had: a subscriber would drop a repeat."""
    monkeypatch.setattr(publisher, "GONE_TOPICS_MAX", 2)
    cat = FakeCatalog()
    cat.add(record(10, "churn_a"), {k(1): v(1)})
    engine, rec = make_engine(cat)
    engine.config.watch.linger = 0.0
    subscribe(engine, schema.MAP_TOPIC_PREFIX + b"churn_")  # a glob's prefix
    await engine.cycle()
    del cat.maps[10]
    await engine.cycle()  # map_removed; the hold (linger 0) has expired
    assert [(m.action, m.topic_seq) for m, _ in rec.messages(schema.MapEvent)] == [
        ("map_removed", 1)]
    assert not engine.holds and "churn_a" not in stream_of(engine).topic_seq
    assert engine.recent("churn_*")[0] == []  # its recent ring went with it

    cat.add(record(11, "churn_a"), {})  # the name comes back: its topic_seq continues
    await engine.cycle()
    assert [m.topic_seq for m, _ in rec.messages(schema.MapEvent)][-1] == 2
    del cat.maps[11]
    await engine.cycle()  # removed (3), forgotten again
    for i, name in enumerate(["churn_b", "churn_c", "churn_d"]):  # push churn_a out
        cat.add(record(20 + i, name), {})
        await engine.cycle()
        del cat.maps[20 + i]
        await engine.cycle()
    gone = stream_of(engine)._gone  # noqa: SLF001 (white-box: no stale entry)
    assert "churn_a" not in gone and len(gone) == 2
    assert engine.stream.last_topic_seq("churn_a") >= 3  # the floor: never back to 0
    cat.add(record(30, "churn_a"), {})
    await engine.cycle()
    assert [m.topic_seq for m, _ in rec.messages(schema.MapEvent)][-1] > 3
    engine.heartbeat()
    beat = rec.messages(schema.Heartbeat)[-1][0]
    assert beat.topics["churn_a"] == stream_of(engine).topic_seq["churn_a"]


def test_the_recent_ring_is_bounded_in_bytes_too():
    """``recent_events`` counts events; with large values 1,000 of them could hold 128 MB
    per map, so ``recent_bytes`` bounds the ring as well (the last message always stays)."""
    engine, rec = make_engine(FakeCatalog(), recent_bytes=4096)
    stream = stream_of(engine)
    for i in range(10):
        stream.publish_records("big", 7, 1, b"\x00" * 4, bytes([i]) * 1500, None, 0.0)
    kept = [frames[1] for _, frames in stream.recent("big")]
    assert kept == [bytes([i]) * 1500 for i in (8, 9)]  # 2 x 1504 bytes fit in 4096
    stream.publish_records("big", 7, 1, b"\x00" * 4, b"x" * 10000, None, 0.0)
    assert [frames[1] for _, frames in stream.recent("big")] == [b"x" * 10000]
    assert len(rec.sent) == 11  # the bound is on what is kept, never on what is sent


async def test_a_view_gets_copies_of_its_maps_only():
    """A subscribed view gets each message of a map it sees once more under its namespace,
    and its own heartbeat; a hidden map's events and map_created never go there; and
    without a restricted subscriber nothing more than before is sent."""
    cat = FakeCatalog()
    pub, sec = cat.add(record(10, "acl_pub"), {k(1): v(1)}), cat.add(record(11, "acl_secret"))
    engine, rec = make_engine(cat)
    view = View(("acl_*",), ("acl_secret*",))
    engine.set_views({view.namespace: view})
    ns = view.namespace
    subscribe(engine, schema.map_topic("acl_pub"))  # an unrestricted subscriber first
    await engine.cycle()
    pub.entries[k(2)] = v(2)
    await engine.poll(engine.watches[10])
    assert [f[0] for f in rec.sent] == [b"hb", b"map:acl_pub\0"]  # no view subscribed: no copy
    rec.sent.clear()

    subscribe(engine, ns + b"map:acl_")
    subscribe(engine, ns + b"hb")
    subscribe(engine, schema.MAP_TOPIC_PREFIX + b"acl_")
    await engine.cycle()
    assert set(engine.watches) == {10, 11}
    rec.sent.clear()
    pub.entries[k(3)] = v(3)
    sec.entries[k(3)] = v(3)
    cat.add(record(12, "acl_secret2"))
    cat.add(record(13, "acl_new"))
    await engine.cycle()
    for watch in list(engine.watches.values()):
        await engine.poll(watch)
    engine.heartbeat()
    topics = [f[0] for f in rec.sent]
    seen = [f[0][len(ns):] for f in rec.sent if f[0].startswith(ns)]
    assert sorted(set(seen)) == [b"hb", b"map:acl_new\0", b"map:acl_pub\0"]
    assert b"map:acl_secret\0" in topics and b"map:acl_secret2\0" in topics  # for the others
    for frames in rec.sent:  # a copy is the same message, under another topic
        if frames[0].startswith(ns + b"map:"):
            assert [frames[0][len(ns):], *frames[1:]] in rec.sent
    beats = {f[0]: schema.decode(f[1]) for f in rec.sent if f[0].endswith(b"hb")}
    assert set(beats[ns + b"hb"].topics) == {"acl_pub", "acl_new"}
    assert set(beats[b"hb"].topics) == {"acl_pub", "acl_secret", "acl_secret2", "acl_new"}


async def test_engine_query_api():
    cat = FakeCatalog()
    cat.add(record(10, "flows"), {k(1): v(1)})
    cat.add(record(11, "rb", type_="ringbuf", key_size=0, value_size=0))
    engine, rec = make_engine(cat)
    stream_of(engine).add_source_topics(["flows_src"])

    got, snap, seq = await engine.snapshot("flows", "gap")
    assert (got.id, snap.count, bytes(snap.keys), seq) == (10, 1, k(1), 0)
    assert engine.watches[10].reason == "snapshot"

    cat.maps[10].entries[k(2)] = v(2)
    await engine.poll(engine.watches[10])
    got, snap, seq = await engine.snapshot("id:10")
    assert snap.count == 2 and seq == 1  # the state includes topic_seq 1, a poll boundary

    with pytest.raises(errors.MapNotDumpable):
        await engine.snapshot("rb")
    with pytest.raises(errors.MapNotFound):
        await engine.snapshot("nope")
    assert all(h.closed for h in cat.opened)

    messages, watched = engine.recent("flows*")
    assert watched == ["flows", "flows_src"]
    assert [type(m) for m, _ in messages] == [schema.EventBatch]

    engine.report_gap("whatever", 5)
    st = engine.status()
    assert (st.seq, st.events_published, st.drops_reported, st.resyncs) == (1, 1, 5, 1)
    assert [(w.name, w.entries, w.reason) for w in st.watched] == [("flows", 2, "snapshot")]
    assert engine.layout_for(schema.MapInfo(10, "flows", "hash", 4, 8, 64, 0)) is None


# --- the request server ------------------------------------------------------------


class Dealer:
    """A client DEALER used from one task, through the transport's helpers."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def ask(self, frame: bytes, *extra: bytes) -> list[tuple[Any, list[bytes]]]:
        """Send one request; every reply up to the one that ends it."""
        await send_multipart(self.sock, [frame, *extra])
        out = []
        with trio.fail_after(10):
            while True:
                frames = await recv_multipart(self.sock)
                msg = schema.decode(frames[0])
                out.append((msg, frames[1:]))
                if not isinstance(msg, (schema.GetBegin, schema.GetChunk, schema.EventBatch,
                                        schema.MapEvent, schema.RecordBatch, schema.LostRecords)):
                    return out


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


async def test_request_server_in_process(zctx):
    cat = FakeCatalog()
    cat.add(record(10, "flows"), {k(i): v(i) for i in range(5)})
    cat.add(record(11, "twin"))
    cat.add(record(12, "twin"))
    engine, rec = make_engine(cat, chunk_entries=2)
    endpoint = f"inproc://server-{next(_ids)}"
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    server = RequestServer(router, engine.config.daemon, "e" * 16, "9.9", engine)
    client = Dealer(zctx, endpoint)

    def one(replies):
        (msg, frames), = replies
        return msg

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        pong = one(await client.ask(b'{"kind":"ping","req":1}'))
        assert isinstance(pong, schema.Pong) and (pong.req, pong.version) == (1, "9.9")

        replies = await client.ask(b'{"kind":"get","selector":"flows","req":2}')
        begin, *chunks, end = (m for m, _ in replies)
        assert isinstance(begin, schema.GetBegin) and begin.map.id == 10 and not begin.btf
        assert [c.count for c in chunks] == [2, 2, 1] and end.entries == 5
        assert all(m.req == 2 for m, _ in replies)
        assert b"".join(fr[0] for _, fr in replies[1:-1]) == b"".join(k(i) for i in range(5))
        assert all(h.closed for h in cat.opened)  # the handle is closed with the request

        err = one(await client.ask(b'{"kind":"get","selector":"twin","req":3}'))
        assert (err.code, err.req, [c.id for c in err.candidates]) == ("ambiguous", 3, [11, 12])

        # Schema-invalid requests with a readable req get it back; unreadable ones get 0.
        for frame, code, req in [
                (b'{"kind":"get","selector":null,"req":4}', "bad_request", 4),
                (b'{"kind":"get","req":5}', "bad_request", 5),
                (b'{"kind":"nonsense","req":6}', "bad_request", 6),
                (b'{"kind":"status","req":7,"v":2}', "version", 7),
                (b'{"kind":"pong","version":"x","epoch":"y","uptime":1,"req":8}',
                 "bad_request", 8),
                (b'{"kind":"ping","req":"9"}', "bad_request", 0),
                (b"not json", "bad_request", 0)]:
            err = one(await client.ask(frame))
            assert isinstance(err, schema.ErrorReply) and (err.code, err.req) == (code, req), frame
        err = one(await client.ask(b'{"kind":"ping","req":10}', b"extra"))
        assert (err.code, err.req) == ("bad_request", 10)

        replies = await client.ask(b'{"kind":"get","selector":"flows","snapshot":true,"req":11}')
        begin = replies[0][0]
        assert (begin.seq, begin.epoch, replies[-1][0].entries) == (0, "e" * 16, 5)

        cat.maps[10].entries[k(9)] = v(9)
        await engine.poll(engine.watches[10])
        replies = await client.ask(b'{"kind":"recent","selector":"fl*","req":12}')
        *replayed, (end, _) = replies
        assert [(type(m), m.req) for m, _ in replayed] == [(schema.EventBatch, 12)]
        assert replayed[0][1][1] == k(9)  # no topic frame: actions, keys, values, old values
        assert (end.events, end.watched, end.req) == (1, ["flows"], 12)

        ack = one(await client.ask(b'{"kind":"gap_report","map":"unknown","missed":3,"req":13}'))
        assert isinstance(ack, schema.Ack) and ack.req == 13
        st = one(await client.ask(b'{"kind":"status","req":14}'))
        assert (st.drops_reported, st.seq, [w.name for w in st.watched]) == (3, 1, ["flows"])

        listed = one(await client.ask(b'{"kind":"list","pattern":"t*","req":15}'))
        assert [m.id for m in listed.maps] == [11, 12]
        nursery.cancel_scope.cancel()


# --- the socket owners ----------------------------------------------------------------


async def test_socket_owner_bounds_each_peer_and_reports_vanished_peers(zctx):
    endpoint = f"inproc://owner-{next(_ids)}"
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 1)
    router.bind(endpoint)
    owner = SocketOwner(router, outbox_bytes=250)  # two 100-byte messages
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    peers: list[bytes] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner.serve, lambda frames: peers.append(frames[0]))
        await send_multipart(dealer, [b"hello"])
        with trio.fail_after(5):
            while not peers:
                await trio.sleep(0.01)
        peer = peers[0]
        # The client reads nothing: ZeroMQ's queue fills, then the outbox, then send waits.
        sent = 0
        for _ in range(200):
            with trio.move_on_after(0.2) as scope:
                await owner.send(peer, [b"x" * 100])
            if scope.cancelled_caught:
                break
            sent += 1
        assert sent < 200, "send never waited: the outbox is not bounded"
        assert len(owner._outboxes[peer]) == 2  # noqa: SLF001 (counts messages, not bytes)
        # Reading on the client frees the outbox: sends proceed again.
        got = 0
        with trio.fail_after(10):
            while got < sent:
                await recv_multipart(dealer)
                got += 1
            await owner.send(peer, [b"again"])

        await owner.send(b"no-such-peer", [b"x"])  # ROUTER_MANDATORY: unreachable is noticed
        with trio.fail_after(5):
            while True:
                try:
                    await owner.send(b"no-such-peer", [b"y"])
                except PeerGone:
                    break
                await trio.sleep(0.01)
        owner.forget(b"no-such-peer")
        assert b"no-such-peer" not in owner._outboxes  # noqa: SLF001 (white-box: no stale entry)
        nursery.cancel_scope.cancel()
    dealer.close()


async def test_publisher_owner_reports_subscriptions_and_never_waits(zctx):
    endpoint = f"inproc://pub-{next(_ids)}"
    xpub = zctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.bind(endpoint)
    owner = PublisherOwner(xpub)
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    subs: list[bytes] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner.serve, lambda frames: subs.append(bytes(frames[0])))
        sub.setsockopt(zmq.SUBSCRIBE, b"map:a\0")
        sub.setsockopt(zmq.SUBSCRIBE, b"hb")
        with trio.fail_after(5):
            while len(subs) < 2:
                await trio.sleep(0.01)
        assert subs == [b"\x01map:a\0", b"\x01hb"]  # in the order they were made
        for i in range(3):
            owner.publish([b"map:b\0", b"%d" % i])  # nobody wants it: dropped by ZeroMQ
            owner.publish([b"map:a\0", b"%d" % i])
        with trio.fail_after(5):
            got = [await recv_multipart(sub) for _ in range(3)]
        assert got == [[b"map:a\0", b"0"], [b"map:a\0", b"1"], [b"map:a\0", b"2"]]
        assert owner.sent == 6
        nursery.cancel_scope.cancel()
    sub.close()


async def test_publisher_owner_hands_a_message_to_zeromq_once_whatever_the_subscribers(zctx):
    """Fan-out costs the daemon no per-subscriber work (issue 20): a message is queued
    and sent once, its bytes counted once, and ZeroMQ gives every subscriber the same
    frames (bench_export.py measures the CPU side: <= 1.5x with three exporters)."""
    endpoint = f"inproc://pub-{next(_ids)}"
    xpub = zctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every SUB's subscribe comes up: wait for all three
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.bind(endpoint)
    owner = PublisherOwner(xpub)
    subs = []
    for _ in range(3):
        sub = zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"map:a\0")
        sub.connect(endpoint)
        subs.append(sub)
    seen: list[bytes] = []
    payload = np.arange(4096, dtype=np.uint64)  # a view, as publish_delta sends: 32 KiB
    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner.serve, lambda frames: seen.append(bytes(frames[0])))
        with trio.fail_after(5):
            while len(seen) < 3:
                await trio.sleep(0.01)
        for i in range(4):
            owner.publish([b"map:a\0", b"%d" % i, payload.data])
        assert owner.outbox_bytes == 4 * (6 + 1 + payload.nbytes)  # counted once, not per SUB
        with trio.fail_after(5):
            got = [[await recv_multipart(sub) for _ in range(4)] for sub in subs]
        want = [[b"map:a\0", b"%d" % i, payload.tobytes()] for i in range(4)]
        assert got == [want, want, want]
        assert owner.sent == 4 and owner.outbox_bytes == 0
        nursery.cancel_scope.cancel()
    for sub in subs:
        sub.close()


async def test_publisher_owner_bounds_its_queue_in_bytes_by_making_producers_wait(zctx):
    """The queue before ZeroMQ is the daemon's: past its byte bound producers wait
    (``room``) until the pump has drained it to half; nothing is dropped there."""
    endpoint = f"inproc://pub-{next(_ids)}"
    xpub = zctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.bind(endpoint)
    owner = PublisherOwner(xpub, outbox_bytes=1000)
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"map:a")
    sub.connect(endpoint)
    big = np.zeros(100, dtype=np.uint64)  # a view's len is 100 items; its bytes are 800
    await owner.room()  # empty: at once
    owner.publish([b"map:a\0", big.data])  # a memoryview of the array, as memoryview(big)
    assert owner.outbox_bytes == 806 and owner.waits == 0
    owner.publish([b"map:a\0", b"x" * 300])
    assert owner.outbox_bytes == 1112
    resumed = trio.Event()

    async def producer():
        await owner.room()
        resumed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.sleep(0.1)
        assert not resumed.is_set(), "a producer went on past the byte bound"
        assert owner.waits == 1
        nursery.start_soon(owner.serve, lambda frames: None)  # the pump drains the queue
        with trio.fail_after(5):
            await resumed.wait()
        assert owner.outbox_bytes == 0 and owner.sent == 2
        nursery.cancel_scope.cancel()
    sub.close()


async def test_reload_reaches_the_catalog():
    """A reloaded daemon.bpffs is where the next listing and selection look."""
    cat = HostCatalog(["/sys/fs/bpf/a"])
    engine, _ = make_engine(cat)
    new = user_space_config(bpffs=["/sys/fs/bpf/b"])
    Reloader(lambda: new, engine.config, [engine.reconfigure]).apply(new)
    assert engine.catalog is cat and engine.config is new
    assert cat.bpffs == ("/sys/fs/bpf/b",)


def test_every_error_code_is_documented_and_no_other():
    """errors.py is the one place codes come from; protocol.md's table lists exactly them."""
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    table = doc[doc.index("| code | when |"):]
    table = table[:table.index("\n\n")]
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.M)) == errors.CODES
