"""The event socket's gate: which subscriptions take effect, for whom, and how many.

The XPUB runs with ``XPUB_MANUAL``: libzmq hands every subscription message
to the daemon and applies none by itself; the gate applies the ones it
admits with ``setsockopt(SUBSCRIBE)``, which acts on the connection the last
received subscription came from.  So nothing reaches a subscriber before
the gate has decided, which is what makes the two checks below a guarantee
and not a race.

- Who sees what: a peer whose ``[access]`` rule restricts it (its identity
  from the message's metadata: CURVE ``User-Id``, or ``uid:gid:pid`` of the
  ipc ``Peer-Address``, which libzmq fills in from SO_PEERCRED) has a view,
  and the view a topic namespace ``v<hash>:`` (watcher/daemon/access.py).
  Its subscriptions take effect only if they start with that namespace; the
  publisher sends each message of a map the view sees once more under it.
  Any other subscription of such a peer (``map:``, another view's
  namespace, ``""``) is not applied: counted, logged once per peer.  An
  unrestricted peer's ``""`` (everything) is applied as ``map:`` and ``hb``,
  so it does not receive every view's copies as well.
- Bounds: libzmq keeps every subscription in a byte-per-node trie (about 80
  bytes per byte of prefix; in manual mode a second trie of what was asked
  for, kept for the disconnect's unsubscriptions), so long or many
  subscriptions cost memory a subscriber controls.  Length: the XPUB's
  ``MAXMSGSIZE`` is ``max_subscription_bytes + 1``, so libzmq cuts a
  connection sending a longer one before storing it.  Count: each message
  carries the file descriptor of its connection (``ZMQ_SRCFD``); the gate
  counts distinct prefixes per connection (the fd and its socket inode, so
  a reused fd number is a new peer), applied or not, and cuts a connection
  that goes over ``max_subscriptions`` with ``shutdown(2)``, after which
  libzmq drops its subscriptions as for any disconnect.

The engine's demand (which maps to poll) follows what the gate applied: one
subscribe per connection and topic when first applied, one unsubscribe when
the connection lets go of it or is gone.  See docs/operations.md.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
from collections.abc import Callable

import attrs
import zmq

from ..wire import schema
from ..wire.transport import identity
from .access import Policy, Principal
from .config import AccessConfig

log = logging.getLogger("pymap.subscriptions")

Peer = tuple[int, int]  # (fd, inode of the socket)
Changes = list[bytes]  # demand changes: b"\x01" + topic (first holder here), b"\x00" + topic
GC_EVERY = 256  # subscribe messages between sweeps of connections that are gone
LOGGED_LIMIT = 4096  # peer addresses remembered for "log once"
EVERYTHING_TOPICS = (schema.MAP_TOPIC_PREFIX, schema.HEARTBEAT_TOPIC)  # what "" is read as


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


@attrs.frozen
class GateStats:
    """What the gate refused, for ``status`` and the metrics."""

    refused: int  # connections cut for their subscriptions (too many, too long)
    outside_view: int  # subscriptions of restricted peers outside their namespace
    view_changed: int  # connections cut by a reload that changed their view


@attrs.define(eq=False)
class Connection:
    """One subscriber connection: who it is, and what it asked for and got."""

    who: Principal
    namespace: bytes | None  # its view's namespace; None: unrestricted
    address: str  # Peer-Address, for the log
    held: dict[bytes, tuple[bytes, ...]] = attrs.Factory(dict)  # asked for -> topics applied
    applied: collections.Counter[bytes] = attrs.Factory(collections.Counter)


class SubscriptionGate:
    def __init__(self, max_bytes: int, max_count: int, local: str | int | None,
                 cut: Callable[[int, str | int | None], bool] = cut_connection,
                 policy: Policy | None = None, sock: zmq.Socket | None = None):
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.local = local
        self.policy = policy or Policy(AccessConfig())
        # The XPUB (XPUB_MANUAL) admitted topics go to; None in unit tests, which only
        # look at the changes.  Only its owner task (publisher.serve) calls the gate.
        self.sock = sock
        self._cut = cut
        self._conns: dict[Peer, Connection] = {}
        self._logged: set[tuple[str, str]] = set()
        self._since_gc = 0
        self._on_change: Callable[[Changes], None] = lambda changes: None
        self.refused = 0  # connections cut for their subscriptions
        self.outside_view = 0  # subscriptions of restricted peers outside their namespace
        self.view_changed = 0  # connections cut by a reload that changed their view

    def admit(self, frame: zmq.Frame | bytes) -> Changes:
        """Act on one message from the XPUB; the demand changes it made."""
        data = frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)
        if not data or data[0] not in (0, 1):
            return []  # not a subscription; XPUB subscribers have nothing else to say
        fd = self._source_fd(frame)
        inode = _inode(fd) if fd is not None else None
        if fd is None or inode is None:
            # A disconnect's unsubscriptions carry no fd (libzmq has already dropped the
            # connection's topics), or the connection closed meanwhile: nothing to apply.
            return self._sweep() if data[0] == 0 else []
        peer, prefix = (fd, inode), data[1:]
        conn = self._conns.get(peer)
        if data[0] == 0:
            if conn is None or prefix not in conn.held:
                return []
            return self._release(conn, conn.held.pop(prefix), apply=True)
        if conn is None:
            conn = self._conns[peer] = self._identify(frame)
        if prefix in conn.held:
            return []
        if len(conn.held) >= self.max_count or len(prefix) > self.max_bytes:
            self._refuse(peer, conn, len(prefix))
            return self._forget(peer)
        topics = self._topics(conn, prefix)
        conn.held[prefix] = topics
        changes = []
        for topic in topics:
            conn.applied[topic] += 1
            if conn.applied[topic] == 1:
                self._apply(zmq.SUBSCRIBE, topic)
                changes.append(b"\x01" + topic)
        self._since_gc += 1
        if self._since_gc >= GC_EVERY:
            changes += self._sweep()
        return changes

    @staticmethod
    def _identity(frame: zmq.Frame | bytes) -> tuple[str, str]:
        return identity(frame) if isinstance(frame, zmq.Frame) else ("", "")

    def _identify(self, frame: zmq.Frame | bytes) -> Connection:
        user_id, address = self._identity(frame)
        who = Principal.from_metadata(user_id, address)
        view = self.policy.view_for(who)
        return Connection(who, view.namespace if view is not None else None, address or "?")

    def _topics(self, conn: Connection, prefix: bytes) -> tuple[bytes, ...]:
        """The topics a subscription takes effect as: itself, ``""`` widened, or none."""
        if conn.namespace is None:
            return EVERYTHING_TOPICS if prefix == b"" else (prefix,)
        if prefix.startswith(conn.namespace):
            return (prefix,)
        self.outside_view += 1
        self._log_once(conn.address, "outside", "subscriber %s: a subscription outside its view's "
                       "namespace %s was not applied (its access rule restricts it); logged "
                       "once per peer", conn.address, conn.namespace.decode())
        return ()

    def _apply(self, option: int, topic: bytes) -> None:
        # Acts on the connection of the message just received: only call from admit().
        if self.sock is not None:
            self.sock.setsockopt(option, topic)

    def _release(self, conn: Connection, topics: tuple[bytes, ...], apply: bool) -> Changes:
        changes = []
        for topic in topics:
            conn.applied[topic] -= 1
            if conn.applied[topic] <= 0:
                del conn.applied[topic]
                if apply:
                    self._apply(zmq.UNSUBSCRIBE, topic)
                changes.append(b"\x00" + topic)
        return changes

    def _forget(self, peer: Peer) -> Changes:
        """Drop a connection's bookkeeping (it is gone, or being cut): its topics leave."""
        conn = self._conns.pop(peer, None)
        if conn is None:
            return []
        return [b"\x00" + topic for topic in conn.applied]

    @staticmethod
    def _source_fd(frame: zmq.Frame | bytes) -> int | None:
        if not isinstance(frame, zmq.Frame):
            return None
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return None
        return fd if isinstance(fd, int) and fd >= 0 else None

    def _log_once(self, address: str, what: str, message: str, *args) -> None:
        if (address, what) in self._logged:
            return
        if len(self._logged) >= LOGGED_LIMIT:
            self._logged.clear()
        self._logged.add((address, what))
        log.warning(message, *args, extra={"peer": address})

    def _refuse(self, peer: Peer, conn: Connection, length: int) -> None:
        self.refused += 1
        self._log_once(conn.address, "bounds", "subscriber %s: cut its connection (subscription "
                       "%d of at most %d, %d bytes of at most %d); logged once per peer",
                       conn.address, len(conn.held) + 1, self.max_count, length, self.max_bytes)
        self._cut(peer[0], self.local)

    def _sweep(self) -> Changes:
        """Forget connections whose fd is closed or now another socket."""
        self._since_gc = 0
        changes: Changes = []
        for peer in [p for p in self._conns if _inode(p[0]) != p[1]]:
            changes += self._forget(peer)
        return changes

    def sweep(self) -> None:
        """Catch disconnects whose fd was still open when their unsubscriptions came."""
        self._on_change(self._sweep())

    def reconfigure(self, policy: Policy) -> None:
        """New access rules: cut the connections whose view they change.

        Their subscriptions were made for the old view (or for none); a SUB
        reconnects by itself and the pymap client resubscribes in the new one.
        """
        self.policy = policy
        changes: Changes = []
        cut = 0
        for peer, conn in list(self._conns.items()):
            view = policy.view_for(conn.who)
            if (view.namespace if view is not None else None) != conn.namespace:
                changes += self._forget(peer)
                cut += self._cut(peer[0], self.local)
        if cut:
            self.view_changed += cut
            log.info("reload: cut %d subscriber connections whose view changed; they "
                     "resubscribe in the new one", cut)
        self._on_change(changes)

    def guard(self, on_subscription: Callable[[list[bytes]], None]
              ) -> Callable[[list[zmq.Frame]], None]:
        """An XPUB ``on_message`` callback: admits subscriptions, reports demand changes."""
        def on_change(changes: Changes) -> None:
            for change in changes:
                on_subscription([change])

        self._on_change = on_change

        def on_message(frames: list[zmq.Frame]) -> None:
            on_change(self.admit(frames[0]))
        return on_message

    def stats(self) -> GateStats:
        """Its counters (ints: safe from the metrics scrape's thread)."""
        return GateStats(self.refused, self.outside_view, self.view_changed)

    def connections(self) -> int:
        return len(self._conns)
