"""Connecting to the daemon: the default endpoint, the check that fails fast where
ZeroMQ would only wait, and the one ZeroMQ context of the process.

A tcp:// endpoint is only served with CURVE (docs/protocol.md); the keys come
from :func:`use_curve` or the environment, and are applied to every socket.

Every socket the library opens (a client's DEALER, a stream's SUB) comes from
:func:`connect`, so all of them share ``zmq.Context.instance()`` (one I/O
thread per process, not one per client) and close without lingering.

zmq (and the CURVE module, which needs it) is imported when the first socket
is made: the CLI reads :data:`DEFAULT_ENDPOINT` for every command's
``--endpoint`` default, ``pymap --help`` included (bench/bench_cli.py).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from watcher.wire import endpoints

from .errors import DaemonUnavailable

if TYPE_CHECKING:
    import zmq

    from watcher.wire.curve import ClientKeys

DEFAULT_ENDPOINT = os.environ.get("PYMAP_ENDPOINT", endpoints.DEFAULT_ENDPOINT)

_NO_ACCESS = "run as root or as a member of the daemon's socket_group"


_curve: ClientKeys | None = None  # set by use_curve (the CLI's --curve-* flags)


def use_curve(keys: ClientKeys | None) -> None:
    """CURVE keys for every tcp:// socket this process opens from now on."""
    global _curve
    _curve = keys


def curve_keys() -> ClientKeys | None:
    """The keys given to :func:`use_curve`, else those named by PYMAP_CURVE_SERVER_KEY
    and PYMAP_CURVE_CLIENT_CERT (a public key or certificate, a secret certificate)."""
    if _curve is not None:
        return _curve
    server = os.environ.get("PYMAP_CURVE_SERVER_KEY")
    cert = os.environ.get("PYMAP_CURVE_CLIENT_CERT")
    if not server or not cert:
        return None
    from watcher.wire.curve import ClientKeys, CurveError

    try:
        return ClientKeys.load(server, cert)
    except CurveError as e:
        raise DaemonUnavailable(str(e)) from None


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
    import zmq

    check(endpoint)
    # watcher.wire.curve.is_tcp, without importing the CURVE module (zmq.auth
    # certificates, attrs classes) for the ipc:// sockets of most runs.
    tcp = endpoint.startswith("tcp://")
    sock: zmq.Socket = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    try:
        keys = curve_keys() if tcp else None
        if keys is not None:
            keys.apply(sock)
        sock.connect(endpoint)
        if tcp and keys is None:  # a daemon serves TCP only with CURVE: it would
            raise DaemonUnavailable(          # never answer, so say so now
                f"{endpoint}: tcp:// needs CURVE keys (--curve-server-key and "
                "--curve-client-cert, or PYMAP_CURVE_*; see: pymap keys)")
    except zmq.ZMQError as e:
        sock.close(0)
        raise DaemonUnavailable(f"cannot connect to {endpoint}: {e}") from None
    except DaemonUnavailable:
        sock.close(0)
        raise
    return sock


def events_seen_from_here(request_endpoint: str, reported: str) -> str:
    """The event endpoint to connect to, given the one the daemon reports (as it sees it).

    A daemon in a container whose socket directory is mounted elsewhere on the host
    (a test's temp directory, a ``hostPath`` other than ``/run/pymap``) reports an
    ``ipc://`` path that does not exist out here. When the request socket this client
    reached is an ``ipc://`` one and the reported file is missing, the file of that name
    beside the request socket is taken instead (the daemon's default is ``events.sock``
    beside its request socket)."""
    prefix = "ipc://"
    if not (request_endpoint.startswith(prefix) and reported.startswith(prefix)):
        return reported
    here = reported[len(prefix):]
    if os.path.exists(here):
        return reported
    beside = os.path.join(os.path.dirname(request_endpoint[len(prefix):]),
                          os.path.basename(here))
    return prefix + beside if os.path.exists(beside) else reported
