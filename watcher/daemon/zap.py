"""Who may connect, and as whom: the ZAP handler for CURVE on tcp:// endpoints.

pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator` answers ZAP requests
from its own thread, on its own inproc socket that nothing else touches (so
"one owner per socket" holds, and a slow trio task never delays a
handshake).  A client is allowed when its public key is one of the
``curve.clients`` certificates; the name of that file (``alice`` for
``alice.key``) becomes the connection's ZeroMQ ``User-Id``, which every
request and subscription from it carries.  A refused client gets no
connection at all: ZeroMQ drops the handshake, so it sees a timeout and
learns nothing.  The allow-list is swapped in place on SIGHUP.

Which maps a connected client then sees is not decided here (:mod:`.access`).
"""

from __future__ import annotations

import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ..wire.curve import EVENTS_ZAP_DOMAIN, ZAP_DOMAIN
from .config import Config, curve_keys

# The access log's name, as before the split: operators filter on it.
log = logging.getLogger("pymap.access")


class Authenticator(ThreadAuthenticator):
    """The ZAP handler of the tcp:// sockets: CURVE keys.

    The request socket's domain is ``pymap``, the event socket's
    ``pymap-events``; both admit the same keys.  What a client may see is not
    decided here: the request server filters replies, and the event socket's
    subscription gate (watcher/daemon/subgate.py) keeps a restricted peer's
    subscriptions inside its view's namespace (docs/operations.md).
    """

    def __init__(self, ctx: zmq.Context, allowed: dict[bytes, str]):
        super().__init__(ctx, log=logging.getLogger("pymap.zap"))
        self.allowed = allowed  # Z85 public key -> client name; replaced whole on reload
        self.refused = 0  # unknown keys
        self._reported: set[bytes] = set()

    def start(self) -> None:
        super().start()
        for domain in (ZAP_DOMAIN, EVENTS_ZAP_DOMAIN):
            self.configure_curve_callback(domain.decode(), self)

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
