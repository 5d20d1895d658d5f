"""The daemon's life: bind its endpoints safely, serve, shut down cleanly.

Socket files are created root-only (a restrictive umask around ``bind``),
then given the configured mode and group; the directory holding them is not
world-accessible either.  SIGINT and SIGTERM cancel the serving nursery, and
socket files are removed on the way out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Iterator
from importlib import metadata

import trio
import zmq

from ..wire import schema
from ..wire.transport import recv_multipart, send_multipart
from .config import Config, ConfigError, DaemonConfig
from .server import RequestServer

log = logging.getLogger("pymap.daemon")


def _version() -> str:
    try:
        return metadata.version("pymap")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


async def _answers_ping(ctx: zmq.Context, endpoint: str) -> bool:
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        with trio.move_on_after(0.5):
            await send_multipart(sock, [schema.encode(schema.Ping())])
            await recv_multipart(sock)
            return True
    return False


@contextlib.contextmanager
def _restrictive_umask() -> Iterator[None]:
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


async def bind_endpoint(ctx: zmq.Context, sock: zmq.Socket, endpoint: str,
                        config: DaemonConfig) -> None:
    """Bind ``sock``; for ipc://, refuse to steal a live daemon's socket and fix permissions."""
    path = _ipc_path(endpoint)
    if path is None:
        sock.bind(endpoint)
        return
    gid = config.socket_gid()
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o750 if gid is not None else 0o700)
        if gid is not None:
            os.chown(directory, -1, gid)
    if os.path.exists(path):
        if await _answers_ping(ctx, endpoint):
            raise ConfigError(f"another pymap daemon is serving {endpoint}")
        os.unlink(path)  # stale socket from a daemon that died
    with _restrictive_umask():
        sock.bind(endpoint)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, config.socket_mode)


def _unlink_socket(endpoint: str) -> None:
    path = _ipc_path(endpoint)
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def run(config: Config, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation)."""
    dconf = config.daemon
    epoch = secrets.token_hex(8)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    bound = False
    try:
        await bind_endpoint(ctx, router, dconf.endpoint, dconf)
        bound = True
        server = RequestServer(router, dconf, epoch, _version())
        log.info("pymap %s serving %s (epoch %s)", server.version, dconf.endpoint, epoch)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve)

                async def stop_on_signal():
                    async for signum in signals:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                task_status.started()
    finally:
        router.close(linger=0)
        if bound:
            _unlink_socket(dconf.endpoint)
        ctx.term()
    log.info("stopped")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="pymap: %(levelname)s %(name)s: %(message)s")
