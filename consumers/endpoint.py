"""Connecting to the daemon: the default endpoint, the check that fails fast where
ZeroMQ would only wait, and the one ZeroMQ context of the process.

Every socket the library opens (a client's DEALER, a stream's SUB) comes from
:func:`connect`, so all of them share ``zmq.Context.instance()`` (one I/O
thread per process, not one per client) and close without lingering.
"""

from __future__ import annotations

import os

import zmq

from watcher.wire import endpoints

from .errors import DaemonUnavailable

DEFAULT_ENDPOINT = os.environ.get("PYMAP_ENDPOINT", endpoints.DEFAULT_ENDPOINT)

_NO_ACCESS = "run as root or as a member of the daemon's socket_group"


def check(endpoint: str) -> None:
    """Raise DaemonUnavailable, with the fix, for an ipc:// socket that is missing or
    that this user cannot use (ZeroMQ would wait for ever on either)."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    try:
        os.stat(path)
    except PermissionError:
        raise DaemonUnavailable(f"permission denied on {path}: {_NO_ACCESS}") from None
    except OSError:
        raise DaemonUnavailable(f"pymap daemon is not running: no socket at {path} "
                                "(start it with: pymap daemon)") from None
    if not os.access(path, os.R_OK | os.W_OK):
        raise DaemonUnavailable(f"permission denied on {path}: {_NO_ACCESS}")


def connect(kind: int, endpoint: str, options: dict[int, int] | None = None) -> zmq.Socket:
    """A ``kind`` socket (zmq.DEALER, zmq.SUB) connected to ``endpoint`` after :func:`check`."""
    check(endpoint)
    sock: zmq.Socket = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as e:
        sock.close(0)
        raise DaemonUnavailable(f"cannot connect to {endpoint}: {e}") from None
    return sock
