"""The request server's failure handling never swallows a cancellation.

A request's work may run nested nurseries (the engine's snapshot, the catalog's
reads): cancelled, they raise a ``BaseExceptionGroup`` of ``Cancelled``.  The
server turns a request's *errors* into error replies, but a cancellation (the
daemon shutting down, the peer gone) must reach the cancel scope that asked for
it, not be logged as a failed request and dropped.
"""

from __future__ import annotations

import logging

import trio
import zmq
from support.catalog import FakeCatalog

from watcher.daemon.config import DaemonConfig
from watcher.daemon.server import RequestServer
from watcher.wire.transport import send_multipart


class StuckEngine:
    """An engine whose snapshot waits forever inside a nursery of its own."""

    def __init__(self):
        self.catalog = FakeCatalog()
        self.entered = trio.Event()
        self.finished = False

    async def snapshot(self, selector: str, reason: str = ""):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            self.entered.set()
            await trio.sleep_forever()
        self.finished = True  # never: the cancellation must not be swallowed on the way


async def test_a_cancelled_request_task_still_cancels(caplog):
    ctx = zmq.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind("inproc://cancelled-request")
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect("inproc://cancelled-request")
        engine = StuckEngine()
        server = RequestServer(router, DaemonConfig(), "e" * 16, "9.9", engine)  # type: ignore[arg-type]
        with caplog.at_level(logging.DEBUG, logger="pymap.server"):
            with trio.fail_after(10), trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.serve)
                    await send_multipart(
                        dealer, [b'{"kind":"get","selector":"flows","snapshot":true,"req":1}'])
                    await engine.entered.wait()
                    scope.cancel()  # as at shutdown: the request task is cancelled with it
        assert scope.cancelled_caught
        assert not engine.finished
        assert not [r for r in caplog.records if "request failed" in r.getMessage()], \
            "a cancellation was caught and logged as a failed request"
    finally:
        ctx.destroy(linger=0)
