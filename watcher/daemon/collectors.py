"""The Prometheus collectors behind ``/metrics``: the daemon's own figures, and map
contents as metrics (:mod:`.metrics` says what is exported and how it is served).

Why a module of its own: it is the one that imports prometheus_client, and
:class:`~.metrics.MetricsServer` imports it only when ``metrics.listen`` is set,
so a daemon without metrics never carries that library (issue 20: its memory).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..decode.choose import EntryFormatter, choose
from . import catalog
from .config import Config, MetricMap, MetricsConfig
from .diff import EngineSnapshot
from .engine import Engine, EngineStatus, WatchFigures
from .metricfields import FieldError, entry_value, field_at, label_text
from .subgate import SubscriptionGate
from .zap import Authenticator

log = logging.getLogger("pymap.metrics")


@attrs.define(eq=False)
class _Decoded:
    snapshot: object  # the engine's EngineSnapshot these samples came from (held: identity check)
    generation: int  # its in-place patches when decoded
    samples: dict[tuple[str, ...], float]
    truncated: int
    errors: int


class MapMetrics:
    """Turns the engine's cached snapshots of the configured maps into metric families."""

    def __init__(self, engine: Engine, config: MetricsConfig):
        self.engine = engine
        self.config = config
        self._formatters: dict[int, EntryFormatter | None] = {}  # map id -> decoder
        self._decoded: dict[tuple[str, int], _Decoded] = {}  # (metric, map id) -> samples
        self.decode_errors: dict[str, int] = {}  # metric -> entries that did not decode
        self.truncated: dict[str, int] = {}  # metric -> entries left out (max_series)
        self._lock = threading.Lock()  # two concurrent scrapes share the caches

    def _formatter(self, watch: WatchFigures) -> EntryFormatter | None:
        record = watch.record
        if record.id not in self._formatters:
            info = catalog.to_wire(record)
            btf = catalog.btf_blob(record)
            layout = self.engine.layout_for(info)
            decoding = choose(info, btf, layout)
            if decoding.formatter is None:
                log.warning("metric for %s: no decoder (%s); not exported", record.name,
                            decoding.describe())
            self._formatters[record.id] = decoding.formatter
        return self._formatters[record.id]

    def _decode(self, spec: MetricMap, watch: WatchFigures) -> _Decoded | None:
        snap = watch.snapshot
        if snap is None:
            return None
        cache_key = (spec.name, watch.record.id)
        cached = self._decoded.get(cache_key)
        if cached is not None and cached.snapshot is snap and cached.generation == snap.generation:
            return cached  # the same state, not patched since (polls patch it in place)
        fmt = self._formatter(watch)
        if fmt is None:
            return None
        with snap.lease():  # no poll patches the rows while they are read (it patches a copy)
            return self._decode_rows(spec, watch, snap, fmt, cache_key)

    def _decode_rows(self, spec: MetricMap, watch: WatchFigures, snap: EngineSnapshot,
                     fmt: EntryFormatter, cache_key: tuple[str, int]) -> _Decoded:
        generation = snap.generation
        samples: dict[tuple[str, ...], float] = {}
        errors = 0
        count = min(snap.count, self.config.max_series)
        ks, vs = snap.key_size, snap.stride
        for i in range(count):
            entry = fmt(bytes(snap.keys[i * ks:(i + 1) * ks]), bytes(snap.values[i * vs:(i + 1) * vs]))
            try:
                if "error" in entry:
                    raise FieldError(entry["error"])
                labels = tuple(label_text(field_at(entry, lb.field)) for lb in spec.labels)
                # Entries that share labels (fields left out of the labels) add up.
                samples[labels] = samples.get(labels, 0.0) + entry_value(entry, spec.value)
            except (FieldError, ValueError) as e:
                if not errors:
                    log.warning("metric %s: an entry of %s does not fit: %s", spec.name,
                                watch.record.name, e)
                errors += 1
        decoded = _Decoded(snap, generation, samples, snap.count - count, errors)
        self.decode_errors[spec.name] = self.decode_errors.get(spec.name, 0) + errors
        self.truncated[spec.name] = decoded.truncated
        self._decoded[cache_key] = decoded
        return decoded

    def collect(self) -> Iterator[Metric]:
        watches = self.engine.watch_figures()
        with self._lock:
            for spec in self.config.maps:
                family_type = CounterMetricFamily if spec.type == "counter" else GaugeMetricFamily
                family = family_type(spec.name, spec.help or f"entries of map {spec.map}",
                                     labels=[lb.name for lb in spec.labels])
                for watch in watches:
                    if watch.record.name != spec.map:
                        continue
                    decoded = self._decode(spec, watch)
                    for labels, value in (decoded.samples.items() if decoded else ()):
                        family.add_metric(list(labels), value)
                yield family
            live = {w.record.id for w in watches}
            for key in [k for k in self._decoded if k[1] not in live]:
                del self._decoded[key]  # maps gone: free their samples
            for map_id in [i for i in self._formatters if i not in live]:
                del self._formatters[map_id]


class DaemonCollector(Collector):
    """The daemon's own figures, read at scrape time from the objects that keep them."""

    def __init__(self, engine: Engine, sources, reloads: dict[str, int],
                 auth: Authenticator | None = None, gate: SubscriptionGate | None = None,
                 refusals: Callable[[], dict[str, int]] | None = None):
        self.engine = engine
        self.sources = sources
        self.reloads = reloads  # "ok"/"refused" -> count, kept by the reload handler
        self.map_metrics: MapMetrics | None = None
        self.auth = auth  # its refused-connection counters
        self.gate = gate  # the event socket's view counters
        self.refusals = refusals  # the request server's: the abuse bounds' counts

    def reconfigure(self, config: Config) -> None:
        """The ``[[metrics.maps]]`` to export (at start and on reload)."""
        self.map_metrics = MapMetrics(self.engine, config.metrics) if config.metrics.maps else None

    def collect(self) -> Iterator[Metric]:
        st = self.engine.status()
        watches = self.engine.watch_figures()
        yield from self._engine_figures(st, len(watches))
        yield from self._refusal_figures()
        yield from self._per_map(watches)
        yield from self._source_figures()
        yield from self._access_figures()
        yield from self._map_metric_figures()

    def _engine_figures(self, st: EngineStatus, watched: int) -> Iterator[Metric]:
        """The engine's and its stream's counters (its status reply's figures)."""
        yield _counter("pymap_events_published", "Events published on the stream",
                       st.events_published)
        yield _counter("pymap_messages_published", "Messages published on the stream",
                       st.messages_published)
        yield _counter("pymap_subscriber_missed_events",
                       "Events subscribers reported missing (gaps: dropped at their queue)",
                       st.drops_reported)
        yield _counter("pymap_resyncs", "Snapshots clients took to recover from a gap or restart",
                       st.resyncs)
        yield _counter("pymap_poll_errors", "Failed polls and enumerations", st.poll_errors)
        yield _counter("pymap_map_creations_seen", "Map creations the bpf() tracepoints "
                       "reported (watch.discovery)", st.creations_seen)
        yield _counter("pymap_publish_waits", "Times a poll or buffer read waited for the "
                       "queue to ZeroMQ to drain (daemon.stream_queue_bytes)", st.publish_waits)
        yield _gauge("pymap_stream_queued_bytes", "Bytes queued for ZeroMQ in the daemon, "
                     "all subscribers together", st.stream_queued_bytes)
        yield _gauge("pymap_subscriptions", "Distinct topic prefixes subscribed to",
                     len(st.subscriptions))
        yield _gauge("pymap_subscribe_requests", "Subscribe requests seen (all subscribers)",
                     sum(st.subscriptions.values()))
        yield _gauge("pymap_watched_maps", "Maps being polled", watched)
        yield _gauge("pymap_map_discovery_tracepoint", "1 while map creation is learned from "
                     "the bpf() tracepoints, 0 while only polled", st.discovery == "tracepoint")
        missed = CounterMetricFamily(
            "pymap_map_creations_missed", "Map creations the tracepoint discovery could not "
            "report, by reason (the id poll still finds the maps that live)", labels=["reason"])
        for reason, n in st.creations_missed.items():
            missed.add_metric([reason], n)
        yield missed

    def _refusal_figures(self) -> Iterator[Metric]:
        """What the abuse bounds refused or dropped (the request server's refusals)."""
        refusals = self.refusals() if self.refusals else {}
        for name, help_, key in (
                ("pymap_requests_refused", "Requests refused 'busy': too many in flight from "
                 "one client (daemon.max_requests_in_flight)", "requests_refused"),
                ("pymap_replies_dropped", "Replies dropped: the client's outbox was full "
                 "(daemon.client_outbox_bytes); the client is told how many", "replies_dropped"),
                ("pymap_subscriptions_refused", "Event-socket connections cut for holding too "
                 "many subscriptions (daemon.max_subscriptions)", "subscriptions_refused")):
            yield _counter(name, help_, refusals.get(key, 0))

    @staticmethod
    def _per_map(watches: list[WatchFigures]) -> Iterator[Metric]:
        """Each watched map's poll counters, labelled by name and id."""
        per_map: list[tuple[str, str, type[CounterMetricFamily] | type[GaugeMetricFamily],
                            Callable[[WatchFigures], float]]] = [
            ("pymap_map_poll_seconds", "Time spent polling the map", CounterMetricFamily,
             lambda w: w.poll_seconds),
            ("pymap_map_polls", "Polls of the map", CounterMetricFamily, lambda w: w.polls),
            ("pymap_map_last_poll_seconds", "Duration of the map's last poll", GaugeMetricFamily,
             lambda w: w.last_poll_ms / 1000),
            ("pymap_map_events", "Events published for the map", CounterMetricFamily,
             lambda w: w.events),
            ("pymap_map_entries", "Entries at the last poll", GaugeMetricFamily,
             lambda w: w.snapshot.count if w.snapshot else 0),
        ]
        for name, help_, family_type, get in per_map:
            family = family_type(name, help_, labels=["map", "id"])
            for w in watches:
                family.add_metric([w.record.name, str(w.record.id)], get(w))
            yield family

    def _source_figures(self) -> Iterator[Metric]:
        """Each event source's records read and lost."""
        buffers = self.sources.status() if self.sources else []
        for name, help_, get in (
                ("pymap_source_records", "Records read from an event source", lambda b: b.records),
                ("pymap_source_lost", "Records an event source lost (perf loss, drops_map)",
                 lambda b: b.lost)):
            family = CounterMetricFamily(name, help_, labels=["source", "kind"])
            for b in buffers:
                family.add_metric([b.name, b.kind], get(b))
            yield family

    def _access_figures(self) -> Iterator[Metric]:
        """Reloads by result, and what the ZAP handler and the gate refused or cut."""
        reloads = CounterMetricFamily("pymap_config_reloads", "SIGHUP reloads by result",
                                      labels=["result"])
        for result in ("ok", "refused"):
            reloads.add_metric([result], self.reloads.get(result, 0))
        yield reloads
        refused = CounterMetricFamily("pymap_connections_refused",
                                      "Connections the ZAP handler refused, by reason",
                                      labels=["reason"])
        if self.auth is not None:
            refused.add_metric(["unknown_key"], self.auth.refused)
        yield refused
        gate = self.gate
        not_applied = CounterMetricFamily(
            "pymap_subscriptions_not_applied",
            "Subscriptions the event socket's gate did not apply, by reason", labels=["reason"])
        cut = CounterMetricFamily("pymap_subscriber_connections_cut",
                                  "Subscriber connections the daemon cut, by reason (too many "
                                  "subscriptions: pymap_subscriptions_refused)",
                                  labels=["reason"])
        if gate is not None:
            figures = gate.stats()
            not_applied.add_metric(["outside_view"], figures.outside_view)
            cut.add_metric(["view_changed"], figures.view_changed)
        yield not_applied
        yield cut

    def _map_metric_figures(self) -> Iterator[Metric]:
        """How the ``[[metrics.maps]]`` decoding went."""
        mm = self.map_metrics
        for name, help_, table in (
                ("pymap_metrics_decode_errors", "Map entries that did not decode into a sample",
                 mm.decode_errors if mm else {}),):
            family = CounterMetricFamily(name, help_, labels=["metric"])
            for metric, n in table.items():
                family.add_metric([metric], n)
            yield family
        truncated = GaugeMetricFamily("pymap_metrics_truncated_entries",
                                      "Entries left out of a map metric (metrics.max_series)",
                                      labels=["metric"])
        for metric, n in (mm.truncated if mm else {}).items():
            truncated.add_metric([metric], n)
        yield truncated


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)


class MapCollector(Collector):
    """The map metrics the daemon collector has now (a reload replaces them)."""

    def __init__(self, daemon: DaemonCollector):
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        mm = self.daemon.map_metrics
        if mm is not None:
            yield from mm.collect()
