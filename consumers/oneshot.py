"""One request, one reply, without an event loop: for short-lived tools.

``pymap ping``, ``status`` and ``list`` start several times faster this way
than through :class:`consumers.client.Client`, which needs trio (the largest
import of the CLI).  Replies are read and matched as the async client reads
them (:mod:`consumers.replies`).  ``get``'s stream of chunks has its own reader
without an event loop (:mod:`consumers.dumpread`); the other streams (``recent``,
events) use the async client.
"""

from __future__ import annotations

import time

import zmq

from watcher.wire import schema

from . import endpoint as _endpoint
from .errors import DaemonUnavailable
from .replies import expect, reply_to


def call(endpoint: str, message, kind: type, timeout: float = 10.0):
    """Send ``message`` to the daemon at ``endpoint`` and return its ``kind`` reply."""
    sock = _endpoint.connect(zmq.DEALER, endpoint)
    try:
        message.req = 1
        sock.send(schema.encode(message))
        return expect(receive(sock, 1, endpoint, timeout)[0], kind)
    finally:
        sock.close(0)


def receive(sock: zmq.Socket, req: int, endpoint: str,
            timeout: float) -> tuple[object, list[bytes]]:
    """The next reply to request ``req`` on ``sock`` (stale replies skipped), as
    :func:`consumers.replies.reply_to` gives it, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(max(1, int(left * 1000))):
            raise DaemonUnavailable(f"pymap daemon at {endpoint} did not answer "
                                    f"within {timeout:g} s")
        reply = reply_to(req, sock.recv_multipart())
        if reply is not None:
            return reply


def ping(endpoint: str = _endpoint.DEFAULT_ENDPOINT, timeout: float = 10.0) -> schema.Pong:
    return call(endpoint, schema.Ping(), schema.Pong, timeout)


def status(endpoint: str = _endpoint.DEFAULT_ENDPOINT,
           timeout: float = 10.0) -> schema.StatusReply:
    return call(endpoint, schema.StatusRequest(), schema.StatusReply, timeout)


def list_maps(endpoint: str = _endpoint.DEFAULT_ENDPOINT, pattern: str | None = None,
              entries: bool = True, timeout: float = 10.0) -> list[schema.MapInfo]:
    """As :meth:`consumers.client.Client.list_maps`."""
    from watcher.wire.globs import check_glob

    if pattern:
        check_glob(pattern)
    reply = call(endpoint, schema.ListRequest(pattern=pattern, entries=entries),
                 schema.ListReply, timeout)
    return reply.maps
