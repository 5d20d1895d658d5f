"""An unparseable glob is an error everywhere (CLI, client library, daemon), never a
pattern that silently matches nothing or, cut into a subscription prefix, every map."""

from __future__ import annotations

import fnmatch

import pytest
import zmq
from support.events import status
from support.kernel import one_error_line

from consumers.selection import Selection
from watcher.wire import schema
from watcher.wire.globs import GlobError, check_glob, literal_prefix

BAD = ["[", "x[!", "[]", "[!]", "cilium_[abc", "a*[", "ok[a]then["]
GOOD = ["", "cilium_*", "x?y", "[abc]", "[!abc]_*", "[]]", "[!]]", "[[]", "a[*]b", "*"]


@pytest.mark.parametrize("pattern", BAD)
def test_unclosed_sets_are_errors(pattern):
    with pytest.raises(GlobError, match="never closed"):
        check_glob(pattern)
    with pytest.raises(ValueError):  # what the client library raises, before any request
        Selection([pattern])


@pytest.mark.parametrize("pattern", GOOD)
def test_valid_globs_pass(pattern):
    assert check_glob(pattern) == pattern


def test_valid_globs_match_as_fnmatch_reads_them():
    assert fnmatch.fnmatchcase("a[b", "a[[]b") and fnmatch.fnmatchcase("]", "[]]")
    assert fnmatch.fnmatchcase("x", "[!]]") and not fnmatch.fnmatchcase("]", "[!]]")


def test_subscriptions_of_globs_are_their_literal_prefixes():
    assert literal_prefix("cilium_policy_*") == "cilium_policy_"
    assert Selection(["cilium_[ab]*", "exact"]).subscriptions() == [
        schema.MAP_TOPIC_PREFIX + b"cilium_", schema.map_topic("exact")]


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("args", [("events", "[", "-f"), ("events", "x[!", "-f"),
                                  ("events", "x[!"), ("list", "[")])
def test_cli_refuses_an_invalid_glob(daemon, args):
    proc = daemon.cli(*args, timeout=30)
    assert proc.returncode == 2, proc
    assert "never closed" in one_error_line(proc.stderr)
    assert proc.stdout == ""
    assert status(daemon)["subscriptions"] == {}  # nothing subscribed, nothing watched


@pytest.mark.kernel
def test_daemon_answers_bad_request_for_an_invalid_glob(daemon):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(daemon.endpoint)
        requests: list[schema.Request] = [schema.ListRequest(pattern="["),
                                          schema.ListRequest(pattern="x[!", entries=False),
                                          schema.RecentRequest(selector="[")]
        for req, request in enumerate(requests, start=1):
            request.req = req
            sock.send(schema.encode(request))
            assert sock.poll(20000), f"no reply to {request}"
            reply = schema.decode(sock.recv_multipart()[0])
            assert isinstance(reply, schema.ErrorReply), reply
            assert (reply.code, reply.req) == ("bad_request", req)
            assert "never closed" in reply.message
        # ... and it goes on serving.
        sock.send(schema.encode(schema.ListRequest(pattern="[[]", entries=False, req=9)))
        assert sock.poll(20000)
        reply = schema.decode(sock.recv_multipart()[0])
        assert isinstance(reply, schema.ListReply) and reply.maps == []
    finally:
        sock.close(0)
        ctx.term()
    assert status(daemon)["watched"] == []
