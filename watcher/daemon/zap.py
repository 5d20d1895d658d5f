"""Who may connect, and as whom: the ZAP handler for CURVE on tcp:// endpoints.

pyzmq's :class:`zmq.auth.base.Authenticator` (the ZAP protocol: requests
parsed, replies made) answers ZAP requests from a thread of its own, on its
own inproc socket that nothing else touches (so "one owner per socket" holds,
and a slow trio task never delays a handshake).  The thread is ours, not
pyzmq's ``ThreadAuthenticator``: that one runs an asyncio loop, and importing
asyncio costs the daemon a MB of memory for its whole life (issue 20); our
credentials callback never awaits, so the library's handler coroutine
completes in one step and a plain poll loop can drive it.

A client is allowed when its public key is one of the ``curve.clients``
certificates; the name of that file (``alice`` for ``alice.key``) becomes the
connection's ZeroMQ ``User-Id``, which every request and subscription from it
carries.  A refused client gets no
connection at all: ZeroMQ drops the handshake, so it sees a timeout and
learns nothing.  The allow-list is swapped in place on SIGHUP.

Which maps a connected client then sees is not decided here (:mod:`.access`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Coroutine

import zmq
from zmq.auth.base import Authenticator as ZapAuthenticator
from zmq.utils import z85

from ..wire.curve import EVENTS_ZAP_DOMAIN, ZAP_DOMAIN
from .config import Config, curve_keys

# The access log's name, as before the split: operators filter on it.
log = logging.getLogger("pymap.access")


class Authenticator(ZapAuthenticator):
    """The ZAP handler of the tcp:// sockets: CURVE keys.

    The request socket's domain is ``pymap``, the event socket's
    ``pymap-events``; both admit the same keys.  What a client may see is not
    decided here: the request server filters replies, and the event socket's
    subscription gate (watcher/daemon/subgate.py) keeps a restricted peer's
    subscriptions inside its view's namespace (docs/operations.md).
    """

    def __init__(self, ctx: zmq.Context, allowed: dict[bytes, str]):
        super().__init__(ctx, log=logging.getLogger("pymap.zap"))
        self._thread: threading.Thread | None = None
        self._pipe: zmq.Socket
        self.allowed = allowed  # Z85 public key -> client name; replaced whole on reload
        self.refused = 0  # unknown keys
        self._reported: set[bytes] = set()

    def start(self) -> None:
        """Bind the ZAP socket (here), then serve it from the handler's thread."""
        super().start()
        for domain in (ZAP_DOMAIN, EVENTS_ZAP_DOMAIN):
            self.configure_curve_callback(domain.decode(), self)
        self._pipe = self.context.socket(zmq.PAIR)
        self._pipe.linger = 1
        endpoint = f"inproc://pymap-zap-{id(self):x}"
        self._pipe.bind(endpoint)
        theirs = self.context.socket(zmq.PAIR)
        theirs.linger = 1
        theirs.connect(endpoint)
        self._thread = threading.Thread(target=self._serve, args=(theirs,), name="pymap-zap",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (it closes its sockets), then the library's side."""
        if self._thread is not None:
            self._pipe.send(b"TERMINATE")
            self._thread.join()
            self._pipe.close()
            self._thread = None
        super().stop()

    def _serve(self, pipe: zmq.Socket) -> None:
        """The handler's thread: ZAP requests until the pipe says TERMINATE."""
        poller = zmq.Poller()
        poller.register(pipe, zmq.POLLIN)
        poller.register(self.zap_socket, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if pipe in events:
                    pipe.recv()
                    return
                if self.zap_socket in events:
                    _complete(self.handle_zap_message(self.zap_socket.recv_multipart()))
        finally:
            pipe.close()

    def reconfigure(self, config: Config) -> None:
        """A reloaded config (watcher.daemon.reload): the allowed keys, swapped whole."""
        self.allowed = curve_keys(config.curve).allowed  # read again: clients may be new
        self._reported.clear()

    def _once(self, what: bytes) -> bool:
        if what in self._reported or len(self._reported) >= 1000:
            return False
        self._reported.add(what)
        return True

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's credentials provider hook: is this Z85 public key allowed here?"""
        if key in self.allowed:
            return True
        self.refused += 1
        if self._once(key):
            log.warning("refused a CURVE client with an unknown key %s", key.decode(),
                        extra={"client_key": key.decode()})
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.allowed.get(z85.encode(client_public_key), "")


def _complete(step: Coroutine) -> None:
    """Run the library's ZAP handler coroutine, which with a callback that returns at
    once (:meth:`Authenticator.callback`) finishes without awaiting anything."""
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise RuntimeError("the ZAP handler awaited: pymap's credentials callback is synchronous")
