"""nats-py beside trio: one asyncio event loop in one thread, driven by trio tasks.

nats-py is asyncio-only, and pymap is trio.  We run nats-py in its own asyncio
loop on a dedicated thread and hand it whole coroutines (connect, publish a
batch and gather its acks, fetch a batch of messages) with
``asyncio.run_coroutine_threadsafe``; the trio side waits for the result on a
``trio.Event`` that the loop thread sets through the trio token.  Why not
trio-asyncio: it runs asyncio *inside* trio's loop, which ties nats-py's
reader, flusher and ping tasks to trio's scheduling and to a library that
must track asyncio internals; a thread keeps the two event loops independent,
and since every crossing carries a whole batch, its cost (a few microseconds
per crossing) is spread over hundreds of events.  docs/fleet.md says more.

Lifetime is structured: ``async with AsyncioThread() as loop`` starts the
thread and, on exit, cancels what still runs in it, stops it and joins it.
A trio task cancelled while waiting cancels its asyncio coroutine too.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class AsyncioThread:
    """An asyncio event loop running in a thread of its own, for trio to call into."""

    def __init__(self, name: str = "pymap-nats"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def __aenter__(self) -> AsyncioThread:
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._thread.join)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the asyncio loop; return (or raise) its outcome in trio."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # the trio side is gone; nobody waits for the result

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()  # trio cancelled us: cancel the asyncio side too
            raise
        return future.result()
