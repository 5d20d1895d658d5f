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
applies everything else and logs one warning naming them.  Each object that
holds reloadable state applies the new config itself (its ``reconfigure``).  Sources are not
reloaded in place because bcc's LLVM replaces the process' signal handlers
while compiling, which the daemon only allows before it starts serving.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence

import trio

from .config import Config, ConfigError

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
    """Applies a reloaded config to the live daemon; counts results for the metrics.

    It knows no object's insides: each owner of reloadable state is a target, a
    ``reconfigure(config)`` of its own (engine, stream, the log level, request
    server, metrics, ZAP handler, subscription gate), called in the order given.
    """

    def __init__(self, load: Callable[[], Config], running: Config,
                 targets: Sequence[Callable[[Config], None]],
                 counts: dict[str, int] | None = None):
        self.load = load
        self.config = running  # the config the daemon serves with now
        self.targets = tuple(targets)
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
        # Whatever changes must wait for a restart keeps its running value, so the
        # config the daemon reports is the one it actually serves with.
        pending = _keep_running(new, self.config)
        self.apply(new)
        self.counts["ok"] += 1
        log.info("config reloaded")
        if pending:
            log.warning("reload: %s changed; takes effect at the next restart",
                        ", ".join(pending))
        return True

    def apply(self, new: Config) -> None:
        self.config = new
        for reconfigure in self.targets:
            reconfigure(new)
