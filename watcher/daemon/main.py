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
from ..wire.transport import PublisherOwner, recv_multipart, send_multipart
from .config import Config, ConfigError, DaemonConfig
from .engine import Engine
from .server import RequestServer
from .stream import Stream

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
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.setsockopt(zmq.SNDHWM, dconf.stream_hwm)
    # Every subscribe and unsubscribe, duplicates included: demand is counted exactly.
    xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
    bound: list[str] = []
    try:
        await bind_endpoint(ctx, router, dconf.endpoint, dconf)
        bound.append(dconf.endpoint)
        await bind_endpoint(ctx, xpub, dconf.events_endpoint, dconf)
        bound.append(dconf.events_endpoint)
        publisher = PublisherOwner(xpub)
        stream = Stream(publisher, epoch, dconf.recent_events, dconf.batch_events,
                        dconf.heartbeat_interval)
        engine = Engine(config, stream)
        server = RequestServer(router, dconf, epoch, _version(), engine)
        log.info("pymap %s serving %s, events on %s (epoch %s)", server.version,
                 dconf.endpoint, dconf.events_endpoint, epoch)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve)
                nursery.start_soon(publisher.serve, engine.on_subscription)
                nursery.start_soon(engine.run)
                nursery.start_soon(_heartbeats, engine, dconf.heartbeat_interval)

                async def stop_on_signal():
                    async for signum in signals:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                task_status.started()
    finally:
        router.close(linger=0)
        xpub.close(linger=0)
        for endpoint in bound:
            _unlink_socket(endpoint)
        ctx.term()
    log.info("stopped")


async def _heartbeats(engine: Engine, interval: float) -> None:
    while True:
        engine.stream.heartbeat(engine.watched_topics())
        await trio.sleep(interval)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="pymap: %(levelname)s %(name)s: %(message)s")
