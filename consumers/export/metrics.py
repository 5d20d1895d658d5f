"""The exporter's own ``/metrics`` (``pymap export --metrics HOST:PORT``), read at scrape
time from each exporter's delivery figures, as the daemon's collector does its own.

One ``export`` label per exporter (its ``[[exports]]`` name, or ``default``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .exporter import Exporter


class ExportCollector(Collector):
    def __init__(self, exporters: list[Exporter]):
        self.exporters = exporters

    def collect(self) -> Iterator:
        labels = ["export"]
        delivered = CounterMetricFamily("pymap_export_delivered", "Records delivered", labels=labels)
        dropped = CounterMetricFamily(
            "pymap_export_dropped", "Records dropped: buffer_full (the destination was too "
            "slow or down for --buffer), rate_limit (--rate)", labels=[*labels, "reason"])
        reconnects = CounterMetricFamily(
            "pymap_export_reconnects", "Failed deliveries, each followed by a reconnect",
            labels=labels)
        buffered = GaugeMetricFamily("pymap_export_buffer_bytes",
                                     "Bytes buffered for the destination (queued and being "
                                     "sent)", labels=labels)
        limit = GaugeMetricFamily("pymap_export_buffer_limit_bytes", "The buffer's bound (--buffer)",
                                  labels=labels)
        lag = GaugeMetricFamily("pymap_export_lag_events",
                                "Events received from the daemon, not delivered yet "
                                "(the daemon's seq minus the checkpoint's)", labels=labels)
        age = GaugeMetricFamily("pymap_export_checkpoint_age_seconds",
                                "Seconds since the delivered position last moved",
                                labels=labels)
        now = time.time()
        for ex in self.exporters:
            name = [ex.spec.name or "default"]
            stats = ex.delivery.stats
            delivered.add_metric(name, stats.delivered)
            dropped.add_metric([*name, "buffer_full"], stats.dropped)
            dropped.add_metric([*name, "rate_limit"], stats.rate_limited)
            reconnects.add_metric(name, stats.reconnects)
            buffered.add_metric(name, ex.delivery.buffered_bytes + ex.delivery.in_flight_bytes)
            limit.add_metric(name, ex.delivery.max_bytes)
            lag.add_metric(name, ex.lag())
            age.add_metric(name, max(0.0, now - ex.checkpoint.advanced_at))
        yield from (delivered, dropped, reconnects, buffered, limit, lag, age)


def serve(listen: str, exporters: list[Exporter]):
    """Serve ``/metrics`` on ``HOST:PORT`` in prometheus-client's own thread; returns the
    server (``shutdown()`` it)."""
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExportCollector(exporters))
    try:
        server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0",
                                            registry=registry)
    except (OSError, ValueError) as e:
        raise OSError(f"--metrics {listen}: {getattr(e, 'strerror', None) or e}") from None
    return server
