"""The daemon's life: bind its endpoints safely, serve, shut down cleanly.

Socket files are created root-only (a restrictive umask around ``bind``),
then given the configured mode and group; the directory holding them is not
world-accessible either.  SIGINT and SIGTERM cancel the serving nursery, and
socket files are removed on the way out.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import attrs
import trio
import zmq

from watcher.kernel.features import probe as kf

from ..wire.curve import EVENTS_ZAP_DOMAIN, ZAP_DOMAIN, is_tcp
from ..wire.transport import PublisherOwner
from . import logs
from .access import Policy
from .config import Config, ConfigError, CurveKeys, DaemonConfig, ResolvedConfig, resolve
from .diff import start_broker, supervise
from .discovery import Discovery
from .engine import Engine
from .logs import setup_logging
from .memory import release_big_buffers_promptly, trim_heap
from .metrics import MetricsServer
from .privileges import check_capabilities, harden
from .publisher import PublishedStream
from .reload import Reloader
from .server import RequestServer
from .sources import Sources
from .subgate import SubscriptionGate, socket_name
from .zap import Authenticator

if TYPE_CHECKING:  # the in-kernel engine's objects are loaded only when it runs
    from watcher.kernel.kdelta.objects import Broker

log = logging.getLogger("pymap.daemon")

# Replies ZeroMQ queues per client beyond pymap's own outbox (client_outbox_bytes): small,
# because it counts messages whatever their size (a get chunk can be MBs).
REQUEST_SNDHWM = 16


def _version() -> str:
    from importlib import metadata  # once, at start: not worth its import for the daemon's life

    try:
        return metadata.version("pymap")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def _someone_listens(path: str) -> bool:
    """Is a process accepting connections on the unix socket ``path`` (or is it stale)?

    A plain connect answers for any ZeroMQ socket type, so the request and the
    stream endpoint are checked alike, without speaking the protocol.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # something is there that we cannot judge: do not steal it
    finally:
        probe.close()


def _refuse_live_socket(endpoint: str) -> None:
    path = _ipc_path(endpoint)
    if path and os.path.exists(path) and _someone_listens(path):
        raise ConfigError(f"another process (a pymap daemon?) is serving {endpoint}")


@contextlib.contextmanager
def _restrictive_umask() -> Iterator[None]:
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def bind_endpoint(sock: zmq.Socket, endpoint: str,
                        config: DaemonConfig, gid: int | None) -> None:
    """Bind ``sock``; for ipc://, refuse to steal a live daemon's socket and fix permissions."""
    path = _ipc_path(endpoint)
    if path is None:
        sock.bind(endpoint)
        return
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o750 if gid is not None else 0o700)
        if gid is not None:
            os.chown(directory, -1, gid)
    _refuse_live_socket(endpoint)
    if os.path.exists(path):
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


@attrs.frozen
class _Daemon:
    """The daemon's parts, built in dependency order and not serving yet."""

    router: zmq.Socket
    xpub: zmq.Socket
    publisher: PublisherOwner
    stream: PublishedStream
    sources: Sources
    broker: Broker | None
    engine: Engine
    gate: SubscriptionGate
    server: RequestServer
    metrics: MetricsServer
    reloader: Reloader

    def start(self, nursery: trio.Nursery) -> None:
        """Start every serving task in ``nursery``."""
        nursery.start_soon(self.server.serve)
        nursery.start_soon(self.publisher.serve, self.gate.guard(self.engine.on_subscription))
        nursery.start_soon(self.engine.run)
        if self.broker is not None:
            nursery.start_soon(supervise, self.broker)
        nursery.start_soon(self.sources.run)
        nursery.start_soon(_heartbeats, self.engine, self.gate, self.stream)


async def run(config: Config, task_status=trio.TASK_STATUS_IGNORED,
              reload: Callable[[], Config] | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation); SIGHUP re-reads the config via ``reload``.

    The daemon is built in dependency order, each object given what it needs when
    made; everything that holds a resource registers its release on one exit stack,
    so whatever was opened is closed exactly once, in reverse order, also when the
    start fails half-way.
    """
    dconf = config.daemon
    check_capabilities()  # before anything is opened: one line naming what is missing
    # The one probe of what this kernel allows, before the seccomp filter: every choice
    # between routes (engine, discovery) is made from it, and status shows it.
    features = await trio.to_thread.run_sync(probe_features)
    release_big_buffers_promptly()
    resolved = resolve(config)  # the socket group's id and the CURVE keys
    with contextlib.ExitStack() as stack:
        daemon = await _build(resolved, features, reload or (lambda: config), stack)
        # From here signals are ours until cleanup is done, a second one included: what
        # the stack holds so far moves to one closed inside the signal receiver.
        with (trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
              as signals, stack.pop_all() as held):
            _serve_on(resolved, daemon.metrics, daemon.router, daemon.xpub, held)
            harden(config, features)  # start-up is over: from here bpf() only reads (seccomp)
            # What start-up made (modules, bcc, config) lives as long as the daemon: out of
            # the collector's sight, so a full collection, which stops the loop too, is short.
            # Collected first: start-up's cycles (a BTF scan's closures hold vmlinux's 5 MB
            # blob) would otherwise be frozen with it and never freed (5 MB of RSS, measured).
            gc.collect()
            gc.freeze()
            log.info("pymap %s serving %s, events on %s (epoch %s)", daemon.server.version,
                     dconf.endpoint, _events_endpoint(dconf), daemon.stream.epoch)
            log_degraded(features)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_signals, signals, daemon.reloader, nursery.cancel_scope)
                daemon.start(nursery)
                task_status.started()
    log.info("stopped")


async def _build(resolved: ResolvedConfig, features: kf.Features,
                 reload: Callable[[], Config], stack: contextlib.ExitStack) -> _Daemon:
    """Every part, each given what it needs when made; releases registered on ``stack``."""
    config = resolved.config
    dconf = config.daemon
    router, xpub, auth = _open_sockets(config, resolved.curve, stack)
    publisher = PublisherOwner(xpub, dconf.stream_queue_bytes)
    stream = PublishedStream(publisher, secrets.token_hex(8), dconf.recent_events,
                             dconf.batch_events, dconf.heartbeat_interval,
                             dconf.stream_message_bytes, dconf.recent_bytes)
    sources, broker, discovery = await _load(config, features, stream, stack)
    policy = Policy(config.access)
    engine = Engine(config, stream, features, discovery=discovery, broker=broker,
                    views=policy.views())
    gate = SubscriptionGate(dconf.max_subscription_bytes, dconf.max_subscriptions,
                            socket_name(_events_endpoint(dconf)), policy=policy, sock=xpub)
    server = RequestServer(router, dconf, stream.epoch, _version(), engine, sources,
                           gate=gate, access=policy)
    reload_counts = {"ok": 0, "refused": 0}
    metrics = MetricsServer(engine, sources, reload_counts, auth=auth, gate=gate,
                            refusals=server.refusals)
    # In the order the reload always applied them: the engine's and stream's settings,
    # the log level, then the rest; the engine's views change before the gate cuts.
    reloader = Reloader(reload, config, [
        engine.reconfigure, stream.reconfigure, logs.reconfigure, server.reconfigure,
        metrics.reconfigure, auth.reconfigure, lambda new: gate.reconfigure(Policy(new.access))],
        reload_counts)
    return _Daemon(router, xpub, publisher, stream, sources, broker, engine, gate, server,
                   metrics, reloader)


async def _on_signals(signals, reloader: Reloader, scope: trio.CancelScope) -> None:
    """SIGHUP reloads the config; SIGINT or SIGTERM cancels ``scope`` (the daemon's)."""
    async for signum in signals:
        if signum == signal.SIGHUP:
            await reloader.reload()
            continue
        log.info("%s: shutting down", signal.Signals(signum).name)
        scope.cancel()
        return


def _events_endpoint(dconf: DaemonConfig) -> str:
    assert dconf.events_endpoint is not None  # DaemonConfig derives it from endpoint
    return dconf.events_endpoint


def _open_sockets(config: Config, curve: CurveKeys, stack: contextlib.ExitStack
                  ) -> tuple[zmq.Socket, zmq.Socket, Authenticator]:
    """The context, the request ROUTER and the event XPUB (not bound yet), and the ZAP
    handler guarding them; each one's release registered on ``stack``."""
    dconf = config.daemon
    ctx = zmq.Context()
    stack.callback(ctx.term)
    router = ctx.socket(zmq.ROUTER)
    stack.callback(router.close, linger=0)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, REQUEST_SNDHWM)
    xpub = ctx.socket(zmq.XPUB)
    stack.callback(xpub.close, linger=0)
    xpub.setsockopt(zmq.LINGER, 0)
    # Bytes per subscriber bounded: messages are cut to stream_message_bytes (docs/operations.md).
    xpub.setsockopt(zmq.SNDHWM, dconf.stream_sndhwm)
    # libzmq cuts a connection sending a longer subscription before storing it.
    xpub.setsockopt(zmq.MAXMSGSIZE, dconf.max_subscription_bytes + 1)
    # Subscriptions take effect only when the gate applies them (subgate.py): access rules.
    xpub.setsockopt(zmq.XPUB_MANUAL, 1)
    auth = _authenticate(config, curve, ctx, router, xpub)
    stack.callback(auth.stop)
    return router, xpub, auth


async def _load(config: Config, features: kf.Features, stream: PublishedStream,
                stack: contextlib.ExitStack
                ) -> tuple[Sources, Broker | None, Discovery]:
    """What creates BPF objects, all before the seccomp filter: the event sources, the
    objects broker, the discovery programs (each closed through ``stack``)."""
    dconf = config.daemon
    for endpoint in (dconf.endpoint, _events_endpoint(dconf)):
        _refuse_live_socket(endpoint)  # before seconds of compiling, not after
    sources = Sources(config.sources, stream)
    stack.callback(sources.close)
    # Event sources load before serving: once the daemon answers ping, they publish.
    # Before the signal handlers, too: LLVM (inside bcc) installs its own for SIGINT
    # and SIGTERM, which would kill the daemon without cleaning up.
    if config.sources:
        await trio.to_thread.run_sync(sources.open)
    # The process that makes the engine's objects: after the sources, so a broken
    # source is the one line a failed start prints.
    broker = await trio.to_thread.run_sync(start_broker, config.watch)
    if broker is not None:
        stack.callback(broker.close)
    # Discovery creates maps and programs too; after the broker, whose creations it
    # leaves out like the daemon's own.
    discovery = Discovery(config.watch.discovery, features)
    stack.callback(discovery.close)
    broker_pid = () if broker is None or broker.proc is None else (broker.proc.pid,)
    await trio.to_thread.run_sync(discovery.open, broker_pid)
    return sources, broker, discovery


def _serve_on(resolved: ResolvedConfig, metrics: MetricsServer, router: zmq.Socket,
              xpub: zmq.Socket, stack: contextlib.ExitStack) -> None:
    """Open the metrics endpoint and bind the two sockets (their files removed through
    ``stack``, once bound: a refused bind must not remove a live daemon's socket)."""
    config = resolved.config
    dconf = config.daemon
    try:
        metrics.start(config)
    except OSError as e:
        raise ConfigError(f"metrics.listen {config.metrics.listen}: {e.strerror}") from None
    stack.callback(metrics.close)
    for sock, endpoint in ((router, dconf.endpoint), (xpub, _events_endpoint(dconf))):
        bind_endpoint(sock, endpoint, dconf, resolved.socket_gid)
        stack.callback(_unlink_socket, endpoint)


def probe_features() -> kf.Features:
    """Probe the host once (:mod:`watcher.kernel.features.probe`); every answer to the debug log."""
    found = kf.probe()
    for f in found.facilities:
        log.debug("kernel facility %s: %s: %s", f.name, f.state, f.detail)
    return found


def log_degraded(features: kf.Features) -> None:
    """One line per facility this kernel does not give pymap, and what pymap does instead
    (``pymap status`` and ``pymap doctor`` show the same).  Logged once the daemon serves,
    so a start that fails still prints its one error line alone."""
    for f in features.refused():
        log.info("kernel facility not available: %s (%s): %s", f.title, f.error, f.degrades)


def _authenticate(config: Config, curve: CurveKeys, ctx: zmq.Context, router: zmq.Socket,
                  xpub: zmq.Socket) -> Authenticator:
    """CURVE on the sockets bound to tcp:// (the config refuses TCP without keys)."""
    dconf = config.daemon
    keys = curve.server
    for sock, endpoint, domain in ((router, dconf.endpoint, ZAP_DOMAIN),
                                   (xpub, dconf.events_endpoint or "", EVENTS_ZAP_DOMAIN)):
        if is_tcp(endpoint):
            assert keys is not None
            keys.apply(sock, domain)
    auth = Authenticator(ctx, curve.allowed)
    auth.start()
    return auth


async def _heartbeats(engine: Engine, gate: SubscriptionGate, stream: PublishedStream) -> None:
    while True:
        gate.sweep()  # subscribers gone since: their maps stop being wanted
        engine.heartbeat()
        trim_heap()  # memory freed after abuse and under stalled subscribers goes back
        await trio.sleep(stream.heartbeat_interval)  # a reload may change it


__all__ = ["run", "setup_logging"]
