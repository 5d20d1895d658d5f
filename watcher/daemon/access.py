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
"""

from __future__ import annotations

import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ..wire.curve import ZAP_DOMAIN

log = logging.getLogger("pymap.access")


class CurveAuthenticator(ThreadAuthenticator):
    def __init__(self, ctx: zmq.Context, allowed: dict[bytes, str]):
        super().__init__(ctx, log=logging.getLogger("pymap.zap"))
        self.allowed = allowed  # Z85 public key -> client name; replaced whole on reload
        self.refused = 0
        self._reported: set[bytes] = set()

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(ZAP_DOMAIN.decode(), self)

    def update(self, allowed: dict[bytes, str]) -> None:
        self.allowed = allowed
        self._reported.clear()

    def callback(self, _domain: str, key: bytes) -> bool:
        """zmq.auth's credentials provider hook: is this Z85 public key allowed?"""
        if key in self.allowed:
            return True
        self.refused += 1
        if key not in self._reported and len(self._reported) < 1000:  # one line per key
            self._reported.add(key)
            log.warning("refused a CURVE client with an unknown key %s", key.decode(),
                        extra={"client_key": key.decode()})
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.allowed.get(z85.encode(client_public_key), "")
