"""Bounds on what one subscriber may subscribe to, applied as subscriptions arrive.

libzmq keeps every subscription in a byte-per-node trie (about 80 bytes per
byte of prefix), so long or many subscriptions cost the daemon memory that a
subscriber controls.  Two walls:

- length: the XPUB's ``MAXMSGSIZE`` is ``max_subscription_bytes + 1``, so
  libzmq itself cuts a connection that sends a longer one, before storing it;
- count: each subscription message carries the file descriptor of the
  connection it came from (``ZMQ_SRCFD``); the gate counts distinct prefixes
  per connection (the fd and its socket inode, so a reused fd number is a new
  peer) and cuts a connection that goes over ``max_subscriptions`` with
  ``shutdown(2)``, after which libzmq drops its subscriptions (and the trie
  memory) as for any disconnect.  It is counted, and logged once per peer
  address (``uid:gid:pid`` for ipc, the IP for tcp).

The XPUB stays in automatic mode (``XPUB_MANUAL`` would not help: libzmq
stores every subscription in a second trie before the application decides).
See docs/operations.md.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import zmq

log = logging.getLogger("pymap.subscriptions")

Peer = tuple[int, int]  # (fd, inode of the socket)
GC_EVERY = 256  # subscribe messages between sweeps of connections that are gone
LOGGED_LIMIT = 4096  # peer addresses remembered for "log once"


def _inode(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def socket_name(endpoint: str) -> str | int | None:
    """What getsockname() of an accepted connection on ``endpoint`` shows: path or port."""
    if endpoint.startswith("ipc://"):
        return endpoint[len("ipc://"):]
    port = endpoint.rpartition(":")[2]
    return int(port) if port.isdigit() else None


def cut_connection(fd: int, local: str | int | None) -> bool:
    """shutdown(2) the connection on ``fd`` if it is still one accepted on our endpoint."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        name = sock.getsockname()
        if isinstance(name, tuple):
            name = name[1]
        if local is not None and name != local:
            return False  # the fd was closed and reused for something else
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.close()


class SubscriptionGate:
    def __init__(self, max_bytes: int, max_count: int, local: str | int | None,
                 cut: Callable[[int, str | int | None], bool] = cut_connection):
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.local = local
        self._cut = cut
        self._held: dict[Peer, set[bytes]] = {}
        self._logged: set[str] = set()
        self._since_gc = 0
        self.refused = 0  # connections cut for their subscriptions

    def admit(self, frame: zmq.Frame | bytes) -> bytes | None:
        """The subscription message to act on, or None (not one, or refused: peer cut)."""
        data = frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)
        if not data or data[0] not in (0, 1):
            return None  # not a subscription; XPUB subscribers have nothing else to say
        fd = self._source_fd(frame)
        peer = (fd, _inode(fd)) if fd is not None else None
        prefix = data[1:]
        if data[0] == 0:
            if peer in self._held:
                self._held[peer].discard(prefix)
            return data  # a disconnect's unsubscribes carry no fd: always applied
        if peer is None or peer[1] is None:
            return data  # cannot attribute it (the connection closed meanwhile)
        held = self._held.setdefault(peer, set())  # type: ignore[arg-type]
        if prefix not in held and (len(held) >= self.max_count or len(prefix) > self.max_bytes):
            self._refuse(frame, peer, len(held), len(prefix))  # type: ignore[arg-type]
            return None
        held.add(prefix)
        self._since_gc += 1
        if self._since_gc >= GC_EVERY:
            self._sweep()
        return data

    @staticmethod
    def _source_fd(frame: zmq.Frame | bytes) -> int | None:
        if not isinstance(frame, zmq.Frame):
            return None
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return None
        return fd if isinstance(fd, int) and fd >= 0 else None

    def _refuse(self, frame, peer: Peer, held: int, length: int) -> None:
        self.refused += 1
        self._held.pop(peer, None)
        address = "?"
        if isinstance(frame, zmq.Frame):
            try:
                address = str(frame.get("Peer-Address"))
            except zmq.ZMQError:
                pass
        if address not in self._logged:
            if len(self._logged) >= LOGGED_LIMIT:
                self._logged.clear()
            self._logged.add(address)
            log.warning("subscriber %s: cut its connection (subscription %d of at most %d, "
                        "%d bytes of at most %d); logged once per peer", address, held + 1,
                        self.max_count, length, self.max_bytes)
        self._cut(peer[0], self.local)

    def _sweep(self) -> None:
        """Forget connections whose fd is closed or now another socket."""
        self._since_gc = 0
        for peer in [p for p in self._held if _inode(p[0]) != p[1]]:
            del self._held[peer]

    def guard(self, on_subscription: Callable[[list[bytes]], None]
              ) -> Callable[[list[zmq.Frame]], None]:
        """An XPUB ``on_message`` callback that passes admitted subscriptions on."""
        def on_message(frames: list[zmq.Frame]) -> None:
            data = self.admit(frames[0])
            if data is not None:
                on_subscription([data])
        return on_message

    def connections(self) -> int:
        return len(self._held)
