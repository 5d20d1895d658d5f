"""Prometheus metrics: the daemon's own counters, and map contents as metrics.

Served by ``prometheus_client``'s HTTP server, which runs in its own thread:
a scrape never waits for the trio loop, and the loop never waits for a
scrape.  Collection reads only what the daemon already holds:

- the daemon's own figures come from the query methods of the objects that
  keep them: the engine's ``status`` and ``watch_figures``, the sources'
  ``status``, the request server's ``refusals`` (the abuse bounds), and the
  ZAP handler's refusal counters.  They are ints and floats read without
  locks: a scrape may see one poll more or less, never a torn value;
- a map exported with ``[[metrics.maps]]`` is watched ``always`` by the
  engine, and the scrape decodes the engine's **cached snapshot** of it (the
  last poll, at the map's watch interval).  The scrape thread never dumps a
  map: a slow or huge map cannot make scrapes pile up kernel work, and the
  values are as fresh as the watch interval.  Decoding is bounded by
  ``metrics.max_series`` entries per map, and a snapshot once decoded is
  reused until the next poll changes it.

Map entries are decoded by the same decoders as ``pymap get`` (declared
layout, Cilium, BTF; watcher/decode/choose.py); per-CPU values are summed
over CPUs, as Cloudflare's ebpf_exporter does.  See docs/operations.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import Config
from .engine import Engine
from .subgate import SubscriptionGate
from .zap import Authenticator

if TYPE_CHECKING:  # loaded only when metrics.listen is set (collectors.py says why)
    from wsgiref.simple_server import WSGIServer

    from .collectors import DaemonCollector

log = logging.getLogger("pymap.metrics")

__all__ = ["MetricsServer"]


class MetricsServer:
    """The /metrics endpoint; :meth:`reconfigure` swaps the map metrics on reload.

    The collectors (and prometheus_client) are made in :meth:`start`, and only when
    ``metrics.listen`` is set: a daemon without metrics does not import them.
    """

    def __init__(self, engine: Engine, sources, reloads: dict[str, int],
                 auth: Authenticator | None = None, gate: SubscriptionGate | None = None,
                 refusals: Callable[[], dict[str, int]] | None = None):
        self._parts = (engine, sources, reloads, auth, gate, refusals)
        self.daemon: DaemonCollector | None = None  # once serving
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.listen: str | None = None

    def reconfigure(self, config: Config) -> None:
        if self.daemon is not None:
            self.daemon.reconfigure(config)

    def start(self, config: Config) -> None:
        listen = config.metrics.listen
        if listen is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server

        from .collectors import DaemonCollector, MapCollector

        engine, sources, reloads, auth, gate, refusals = self._parts
        registry = CollectorRegistry(auto_describe=False)
        self.daemon = DaemonCollector(engine, sources, reloads, auth, gate, refusals)
        self.daemon.reconfigure(config)
        registry.register(self.daemon)
        registry.register(MapCollector(self.daemon))
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        self._http, self._thread = start_http_server(int(port), addr=host, registry=registry)
        self.listen = listen
        log.info("metrics on http://%s/metrics", listen)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
