"""pyzmq under trio: waiting on ZeroMQ sockets without blocking the loop.

There is no maintained trio binding for pyzmq, so this module is the one
place that knows the rules:

- ``zmq.FD`` is edge-triggered and only means "events may have changed".
  After every wake, and after every send or recv, ``zmq.EVENTS`` must be
  re-read and the socket drained until ``POLLIN`` is clear, or a wake-up is
  lost and the socket hangs.
- Sockets are not thread-safe: each has exactly one owner task.  Other tasks
  talk to the owner through :meth:`SocketOwner.send` and the callback given
  to :meth:`SocketOwner.serve`.
"""

from __future__ import annotations

import collections
import errno
import time
from collections.abc import Callable
from typing import Any, cast

import trio
import zmq

Frames = list[bytes]
# Going out, a frame may also be a view of a buffer: ZeroMQ sends it without a copy.
OutFrames = list[bytes | memoryview]
# What an owner hands ``on_message``: bytes, or zmq.Frame where metadata is needed.
OnMessage = Callable[[list[Any]], None]


def _fd(sock: zmq.Socket) -> int:
    return cast(int, sock.getsockopt(zmq.FD))


def _events(sock: zmq.Socket) -> int:
    return cast(int, sock.getsockopt(zmq.EVENTS))


async def recv_multipart(sock: zmq.Socket) -> Frames:
    """Receive one multipart message, for a socket used by a single task."""
    while True:
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            pass
        if _events(sock) & zmq.POLLIN:
            continue
        await trio.lowlevel.wait_readable(_fd(sock))


async def send_multipart(sock: zmq.Socket, frames: OutFrames) -> None:
    """Send one multipart message, waiting while the socket is at its high-water mark."""
    while True:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return
        except zmq.Again:
            pass
        if _events(sock) & zmq.POLLOUT:
            continue
        await trio.lowlevel.wait_readable(_fd(sock))


class PeerGone(Exception):
    """The ROUTER peer a message was addressed to has disconnected."""


class OwnedSocket:
    """Base for the one task that owns a socket: wake on the fd or on new work, then pump.

    Subclasses implement :meth:`_pump`, which must receive until ``POLLIN`` is
    clear and send what it can; :meth:`serve` handles the edge-triggered fd.
    """

    RETRY_INTERVAL = 0.005  # how soon to retry when a send could not proceed
    # How long one turn of the pump may send before yielding to the other tasks: a
    # million-event delta is hundreds of messages, and a send costs ~0.1 ms on a busy
    # machine, so sending them all in one go would hold the loop.
    TURN_SECONDS = 0.002

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self._fd = _fd(sock)
        self._wake = trio.Event()
        self._fd_checked = trio.Event()
        self._turn_end = 0.0  # when this turn of the pump is over
        self._more = False  # the turn ended with messages left to send

    def _poke(self) -> None:
        self._wake.set()

    async def serve(self, on_message: OnMessage) -> None:
        """Own the socket until cancelled; ``on_message`` must not block."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_fd)
            while True:
                self._wake = trio.Event()
                self._turn_end, self._more = time.perf_counter() + self.TURN_SECONDS, False
                blocked = self._pump(on_message)
                self._fd_checked.set()
                if self._more:  # let the other tasks run, then go on sending
                    await trio.lowlevel.checkpoint()
                elif blocked:
                    with trio.move_on_after(self.RETRY_INTERVAL):
                        await self._wake.wait()
                else:
                    await self._wake.wait()

    async def _watch_fd(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            self._fd_checked = trio.Event()
            self._wake.set()
            # Wait until the owner has read EVENTS, which resets the fd.
            await self._fd_checked.wait()

    def _receive_all(self, on_message: OnMessage) -> bool:
        received = False
        while _events(self.sock) & zmq.POLLIN:
            on_message(self.sock.recv_multipart(zmq.NOBLOCK))
            received = True
        return received

    def _pump(self, on_message: OnMessage) -> bool:
        raise NotImplementedError

    def _turn_over(self) -> bool:
        """True once this turn has sent for ``TURN_SECONDS``: stop, and come back."""
        if time.perf_counter() >= self._turn_end:
            self._more = True
        return self._more


def frames_size(frames: OutFrames) -> int:
    """Bytes in ``frames`` (a view's ``nbytes``: its ``len`` counts items, not bytes)."""
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def identity(frame: zmq.Frame) -> tuple[str, str]:
    """(User-Id, Peer-Address) of a received frame: the CURVE client's name ("" without
    ZAP), and for ipc:// peers ``...:uid:gid:pid`` (SO_PEERCRED, filled in by libzmq)."""
    out: list[str] = []
    for prop in ("User-Id", "Peer-Address"):
        try:
            out.append(str(frame.get(prop) or ""))
        except zmq.ZMQError:
            out.append("")  # not set on this connection
    return out[0], out[1]


class SocketOwner(OwnedSocket):
    """The one task that touches a ROUTER socket, with an outbox per peer bounded in bytes.

    Handlers run in their own tasks and call :meth:`send`, which waits while
    that peer's outbox is full: a slow client slows only its own replies, and
    memory stays bounded.  :meth:`try_send` never waits (for refusals, which
    must not pile up behind a client that does not read).  The socket runs
    with ``ROUTER_MANDATORY`` so a full peer queue is reported (and retried)
    instead of dropped silently, and a vanished peer (``EHOSTUNREACH``) fails
    its waiting handlers with :class:`PeerGone` and is reported to
    ``on_gone``, which cancels its other work.
    """

    # Read each request's ZeroMQ metadata (for access rules): (User-Id, Peer-Address)
    # of the message being handed to on_message, in ``last_identity``.
    identify = False
    last_identity: tuple[str, str] = ("", "")

    def __init__(self, sock: zmq.Socket, outbox_bytes: int = 4 << 20,
                 on_gone: Callable[[bytes], None] | None = None):
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        super().__init__(sock)
        self._limit = outbox_bytes
        self._on_gone = on_gone
        self._outboxes: dict[bytes, collections.deque[OutFrames]] = {}
        self._bytes: dict[bytes, int] = {}
        self._space: dict[bytes, trio.Event] = {}
        self._gone: set[bytes] = set()

    def _receive_all(self, on_message: Callable[[Frames], None]) -> bool:
        if not self.identify:
            return super()._receive_all(on_message)
        received = False
        while _events(self.sock) & zmq.POLLIN:
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            self.last_identity = identity(frames[-1])
            on_message([f.bytes for f in frames])
            received = True
        return received

    def _fits(self, peer: bytes, size: int) -> bool:
        # One message larger than the whole budget still goes, alone (a big get chunk).
        used = self._bytes.get(peer, 0)
        return used == 0 or used + size <= self._limit

    def _queue(self, peer: bytes, frames: OutFrames, size: int) -> None:
        self._outboxes.setdefault(peer, collections.deque()).append([peer, *frames])
        self._bytes[peer] = self._bytes.get(peer, 0) + size
        self._poke()

    async def send(self, peer: bytes, frames: OutFrames) -> None:
        """Queue ``frames`` for ``peer``; waits while its outbox is full."""
        size = frames_size(frames)
        while True:
            if peer in self._gone:
                raise PeerGone(peer)
            if self._fits(peer, size):
                self._queue(peer, frames, size)
                return
            event = self._space.setdefault(peer, trio.Event())
            await event.wait()

    def try_send(self, peer: bytes, frames: OutFrames) -> bool:
        """Queue ``frames`` for ``peer`` if its outbox has room; False if not (or gone)."""
        size = frames_size(frames)
        if peer in self._gone or not self._fits(peer, size):
            return False
        self._queue(peer, frames, size)
        return True

    def queued_bytes(self, peer: bytes) -> int:
        return self._bytes.get(peer, 0)

    def forget(self, peer: bytes) -> None:
        """Drop a peer's bookkeeping once nothing more will be sent to it."""
        self._gone.discard(peer)
        if not self._outboxes.get(peer):
            self._outboxes.pop(peer, None)
            self._bytes.pop(peer, None)

    def _peer_gone(self, peer: bytes) -> None:
        box = self._outboxes.pop(peer, None)
        if box is not None:
            box.clear()  # free the replies now, not when the last handler ends
        self._bytes.pop(peer, None)
        self._gone.add(peer)
        if (event := self._space.pop(peer, None)) is not None:
            event.set()  # waiting handlers wake and raise PeerGone
        if self._on_gone is not None:
            self._on_gone(peer)

    def _pump(self, on_message: OnMessage) -> bool:
        """Receive and send until neither can progress; True if a peer is blocked."""
        while True:
            progressed = self._receive_all(on_message)
            blocked = False
            for peer in list(self._outboxes):
                box = self._outboxes[peer]
                gone = False
                while box and not self._more:
                    try:
                        self.sock.send_multipart(box[0], zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        blocked = True
                        break
                    except zmq.ZMQError as e:
                        if e.errno != errno.EHOSTUNREACH:
                            raise
                        gone = True
                        break
                    self._bytes[peer] -= frames_size(box.popleft()[1:])
                    progressed = True
                    self._turn_over()
                if gone:
                    self._peer_gone(peer)
                    continue
                if (event := self._space.pop(peer, None)) is not None and (
                        self._bytes[peer] < self._limit):
                    event.set()
                elif event is not None:
                    self._space[peer] = event
                if not box:
                    del self._outboxes[peer]
                    del self._bytes[peer]
            if not progressed or self._more:
                return blocked


class PublisherOwner(OwnedSocket):
    """The one task that touches an XPUB socket.

    :meth:`publish` never waits: PUB semantics are that a subscriber too slow
    to keep up loses messages at its high-water mark (it sees a sequence gap),
    and nobody else is slowed down.  Subscription messages from the XPUB go
    to the ``on_message`` callback given to :meth:`serve`.
    """

    def __init__(self, sock: zmq.Socket, outbox_bytes: int = 64 << 20):
        super().__init__(sock)
        self._outbox: collections.deque[OutFrames] = collections.deque()
        self.sent = 0
        # The queue before ZeroMQ is the daemon's, shared by all subscribers: bounded in
        # bytes by making producers wait (:meth:`room`), never by dropping.  A poll that
        # waits is coalesced into the next one; a buffer reader that waits leaves records
        # in the kernel's ring, which counts what it overwrites.
        self.outbox_limit = outbox_bytes
        self.outbox_bytes = 0
        self.waits = 0  # times a producer waited for room
        self._room = trio.Event()
        self._room.set()

    def _receive_all(self, on_message: OnMessage) -> bool:
        # Uncopied frames: their metadata (ZMQ_SRCFD, Peer-Address) says who subscribed.
        received = False
        while _events(self.sock) & zmq.POLLIN:
            on_message(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
            received = True
        return received

    def publish(self, frames: OutFrames) -> None:
        """Queue ``frames``; never waits (producers call :meth:`room` first)."""
        self._outbox.append(frames)
        self.outbox_bytes += frames_size(frames)
        if self.outbox_bytes > self.outbox_limit and self._room.is_set():
            self._room = trio.Event()
        self._poke()

    async def room(self) -> None:
        """Return once the queue is under its byte bound (at once if it is).

        Once over the bound, producers wait until the queue is down to half of it,
        so they resume in one batch rather than one message at a time.
        """
        if not self._room.is_set():
            self.waits += 1
            await self._room.wait()

    def _pump(self, on_message: OnMessage) -> bool:
        while True:
            progressed = self._receive_all(on_message)
            while self._outbox:
                if self._turn_over():
                    return False  # serve() yields, then pumps again
                try:
                    self.sock.send_multipart(self._outbox[0], zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return True  # only with XPUB_NODROP; retried shortly
                self.outbox_bytes -= frames_size(self._outbox.popleft())
                if self.outbox_bytes <= self.outbox_limit // 2:
                    self._room.set()
                self.sent += 1
                progressed = True
            if not progressed:
                return False
