"""Fuzzing the request endpoint and the subscription socket with hypothesis.

Malformed frames and requests (random bytes, JSON of every shape, real request kinds
with wrong, missing or hostile fields, multi-frame messages) go to the ROUTER from one
client, a bounded number in flight; random subscription messages go to the XPUB. Every
request gets a reply carrying its ``req`` when the request had a readable one; the daemon
keeps answering another client; its RSS and fd count stay flat.

10,000 requests and subscription messages by default; 100,000 with PYMAP_LONG_TESTS=1.
"""

from __future__ import annotations

import json
import os

import orjson
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from watcher.wire import schema

LONG = os.environ.get("PYMAP_LONG_TESTS") == "1"
TOTAL = int(os.environ.get("PYMAP_FUZZ_TOTAL", 100_000 if LONG else 10_000))
BATCH = 10  # requests per hypothesis example (more make hypothesis itself slow)
IN_FLIGHT = 32  # below the daemon's max_requests_in_flight: no `busy` here
MB = 1 << 20

KIND_NAMES = ["ping", "list", "get", "recent", "status", "gap_report", "pong", "error",
              "events", "get_begin", "", "nope"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)
field_names = st.sampled_from(["selector", "pattern", "entries", "snapshot", "reason", "map",
                               "missed", "v", "req", "kind", "extra", ""])


@st.composite
def request_like(draw, req: int) -> list[bytes]:
    """One message for the ROUTER: mostly a request kind with fuzzed fields."""
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return [draw(st.binary(max_size=200))]
    if shape == 1:
        return [json.dumps(draw(json_values)).encode()]
    if shape == 2:
        return [draw(st.binary(max_size=50)) for _ in range(draw(st.integers(0, 3)))]
    obj = {name: draw(json_values) for name in draw(st.lists(field_names, max_size=4))}
    obj["kind"] = draw(st.sampled_from(KIND_NAMES))
    obj["req"] = req
    if draw(st.booleans()):
        obj["v"] = 1
    if shape == 3:
        obj["selector"] = draw(st.sampled_from(["../../etc/passwd", "id:", "id:-1", "id:99999999",
                                                "[", "*" * 300, "\0", "/sys/fs/bpf/../x"]))
    return [json.dumps(obj).encode()]


def readable_req(frames: list[bytes]) -> int | None:
    if len(frames) != 1:
        return None
    try:
        obj = orjson.loads(frames[0])  # strict JSON: lone surrogates make it unreadable
    except orjson.JSONDecodeError:
        return None
    req = obj.get("req") if isinstance(obj, dict) else None
    return req if schema.valid_req(req) else None


def rss(pid: int) -> int:
    return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ping(sock: zmq.Socket, req: int) -> None:
    sock.send(schema.encode(schema.Ping(req=req)))
    while True:
        assert sock.poll(20_000), "the other client's ping went unanswered"
        reply = schema.decode(sock.recv_multipart()[0])
        if reply.req == req:
            return


@pytest.mark.kernel
def test_fuzzed_requests_all_answered(daemon):
    pid = daemon.proc.pid
    ctx = zmq.Context()
    fuzz = ctx.socket(zmq.DEALER)
    other = ctx.socket(zmq.DEALER)
    for s in (fuzz, other):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(daemon.endpoint)
    ping(other, 1)
    counter = iter(range(10**9, 2 * 10**9))
    sent = {"n": 0, "pings": 1}
    base = {"rss": rss(pid), "fds": fds(pid)}

    def finals(reply) -> bool:
        """Is ``reply`` the last message of its request?"""
        return not isinstance(reply, (schema.GetBegin, schema.GetChunk))

    @settings(max_examples=TOTAL // BATCH, deadline=None, database=None,
              phases=[Phase.generate],  # no shrinking: each step is a daemon round trip
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        batch = [data.draw(request_like(next(counter))) for _ in range(BATCH)]
        expected: dict[int, int] = {}  # readable req -> requests still waiting
        unreadable = 0
        outstanding = 0
        queue = list(batch)
        while queue or outstanding:
            while queue and outstanding < IN_FLIGHT:
                frames = queue.pop()
                fuzz.send_multipart(frames or [b""])
                req = readable_req(frames or [b""])
                if req is None:
                    unreadable += 1
                else:
                    expected[req] = expected.get(req, 0) + 1
                outstanding += 1
            assert fuzz.poll(20_000), f"{outstanding} requests unanswered"
            reply = schema.decode(fuzz.recv_multipart()[0])
            if not finals(reply):
                continue
            if isinstance(reply, schema.ErrorReply):
                assert reply.code != "internal", reply
            if expected.get(reply.req):
                expected[reply.req] -= 1
            else:
                assert reply.req == 0, reply
                unreadable -= 1
            outstanding -= 1
        assert not any(expected.values()) and unreadable == 0
        sent["n"] += len(batch)
        sent["pings"] += 1
        ping(other, sent["pings"])

    while sent["n"] < TOTAL:
        run()
    ping(other, 10**6)
    grown = rss(pid) - base["rss"]
    print(f"{sent['n']} fuzzed requests answered; RSS {base['rss'] / MB:.1f} -> "
          f"{rss(pid) / MB:.1f} MB, fds {base['fds']} -> {fds(pid)}")
    assert sent["n"] >= TOTAL
    assert grown < 40 * MB
    assert fds(pid) <= base["fds"] + 2
    fuzz.close(0)
    other.close(0)
    ctx.term()


@pytest.mark.kernel
def test_fuzzed_subscriptions_do_not_hurt(daemon):
    pid = daemon.proc.pid
    events = daemon.endpoint.replace("pymap.sock", "events.sock")
    ctx = zmq.Context()
    other = ctx.socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    other.connect(daemon.endpoint)
    ping(other, 1)
    base = {"rss": rss(pid), "fds": fds(pid)}
    done = {"n": 0}

    @settings(max_examples=TOTAL // BATCH, deadline=None, database=None,
              phases=[Phase.generate],  # no shrinking: each step is a daemon round trip
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(st.binary(max_size=2000),
                              st.binary(max_size=300).map(lambda b: b"\x01" + b),
                              st.binary(max_size=300).map(lambda b: b"\x00" + b)),
                    min_size=BATCH, max_size=BATCH))
    def run(messages):
        for m in messages:
            sock.send(m)
        done["n"] += len(messages)
        if done["n"] % (20 * BATCH) == 0:
            ping(other, done["n"])

    # An XSUB sends subscription messages (and anything else) as they are; when the daemon
    # cuts it (too long, too many), libzmq reconnects it.
    sock = ctx.socket(zmq.XSUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(events)

    while done["n"] < TOTAL:
        run()
    ping(other, 10**6)
    sock.close(0)
    print(f"{done['n']} fuzzed subscription messages; RSS {base['rss'] / MB:.1f} -> "
          f"{rss(pid) / MB:.1f} MB, fds {base['fds']} -> {fds(pid)}")
    assert rss(pid) - base["rss"] < 40 * MB
    assert fds(pid) <= base["fds"] + 2
    other.close(0)
    ctx.term()
