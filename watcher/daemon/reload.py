"""SIGHUP: read the config again and apply it without dropping anyone.

The new file is loaded and validated in full first (in a worker thread: it
may read files); if anything is wrong, one log line says what and the
running config stays untouched.  Otherwise the new config replaces the old
in place: watch intervals and ``always`` globs, layouts, bpffs roots,
heartbeat/recent/batch settings, the log level, the metrics maps and the
access lists.  The sockets are not touched, so subscribers and clients
stay connected and the stream continues (same epoch, same sequence).

Keys that name what was bound or loaded at start-up (endpoints, socket
mode and group, the stream high-water mark, ``log_format``, the metrics
listen address, ``[[sources]]``, ``seccomp`` and ``watch.kernel_delta``, which
chose the seccomp filter, and ``watch.discovery``, loaded before it) need a restart: a reload that changes them
applies everything else and logs one warning naming them.  Sources are not
reloaded in place because bcc's LLVM replaces the process' signal handlers
while compiling, which the daemon only allows before it starts serving.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable

import trio

from . import logs
from .config import Config, ConfigError
from .engine import Engine

log = logging.getLogger("pymap.reload")

# Dotted config paths whose changes take effect only at the next start.
AT_RESTART: tuple[str, ...] = (
    "daemon.endpoint", "daemon.events_endpoint", "daemon.socket_mode", "daemon.socket_group",
    "daemon.stream_hwm", "daemon.log_format", "metrics.listen", "curve.server_key", "sources",
    # Socket options and queues sized once, when the sockets are made (docs/operations.md).
    "daemon.stream_queue_bytes", "daemon.stream_message_bytes", "daemon.client_outbox_bytes",
    "daemon.max_subscription_bytes", "daemon.max_subscriptions",
    # The seccomp filter is installed once, for the engine chosen at start
    # (watcher/daemon/privileges.py): it can narrow but never widen again.
    "daemon.seccomp", "watch.kernel_delta",
    # The tracepoint programs are loaded before that filter, once.
    "watch.discovery",
)


def _keep_running(new: Config, old: Config) -> list[str]:
    """Give ``new`` the running values of :data:`AT_RESTART`; the paths that differed."""
    pending = []
    for path in AT_RESTART:
        section, _, key = path.rpartition(".")
        new_holder = operator.attrgetter(section)(new) if section else new
        old_holder = operator.attrgetter(section)(old) if section else old
        if getattr(new_holder, key) != getattr(old_holder, key):
            pending.append(path)
            setattr(new_holder, key, getattr(old_holder, key))
    return pending


class Reloader:
    """Applies a reloaded config to the live daemon; counts results for the metrics."""

    def __init__(self, load: Callable[[], Config], engine: Engine,
                 targets: list[Callable[[Config], None]], counts: dict[str, int] | None = None):
        self.load = load
        self.engine = engine
        self.targets = targets  # other parts to reconfigure (server, metrics, access)
        # "ok"/"refused" -> reloads; given by the daemon, which shows it in the metrics
        self.counts = counts if counts is not None else {"ok": 0, "refused": 0}

    async def reload(self) -> bool:
        try:
            new = await trio.to_thread.run_sync(self.load)
        except ConfigError as e:
            self.counts["refused"] += 1
            log.error("reload refused, keeping the running config: %s", e,
                      extra={"error": str(e)})
            return False
        old = self.engine.config
        # Whatever changes must wait for a restart keeps its running value, so the
        # config the daemon reports is the one it actually serves with.
        pending = _keep_running(new, old)
        self.apply(new)
        self.counts["ok"] += 1
        log.info("config reloaded")
        if pending:
            log.warning("reload: %s changed; takes effect at the next restart",
                        ", ".join(pending))
        return True

    def apply(self, new: Config) -> None:
        engine = self.engine
        engine.config = new
        engine.catalog.bpffs = tuple(new.daemon.bpffs)
        stream = engine.stream
        stream.recent_limit = new.daemon.recent_events
        stream.recent_bytes = new.daemon.recent_bytes
        stream.batch_events = new.daemon.batch_events
        stream.heartbeat_interval = new.daemon.heartbeat_interval
        now = trio.current_time()
        for watch in engine.watches.values():
            interval = new.watch.interval_for(watch.record.name)
            if interval != watch.interval:
                log.info("%s: polled every %g s (was %g s)", watch.record.name, interval,
                         watch.interval)
                watch.interval = interval
                watch.next_due = min(watch.next_due, now + interval)
        logs.set_level(new.daemon.log_level)
        for target in self.targets:
            target(new)
        engine.poke()  # new always globs and intervals take effect now, not at the next tick
