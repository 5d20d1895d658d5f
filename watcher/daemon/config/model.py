"""The daemon's configuration model: one attrs class per table, with validators.

What a valid config is, and nothing else: these classes ask the host nothing
(watcher/daemon/config/resolve.py does, after validation) and read no file
(load.py does).  Every rule a single key or table obeys is a validator here, so
the one converter (watcher/wire/tables.py) reports it on the one error line.
See docs/config.md.
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import NewType

import attrs

from watcher.kernel.maps.find import DEFAULT_BPFFS

from ...decode.layout import layout_matches
from ...wire.curve import is_tcp
from ...wire.endpoints import DEFAULT_ENDPOINT
from ...wire.tables import TableError
from ..sourceconf import SourceConfig


class ConfigError(TableError):
    """The configuration cannot be used; the message says which key and why."""


def _check_endpoint(_inst, attribute, value: str) -> None:
    if not value.startswith(("ipc://", "tcp://")):
        raise ConfigError(f"{attribute.name}: {value!r} must start with ipc:// or tcp://")


def events_endpoint_for(endpoint: str) -> str:
    """ipc://DIR/x.sock pairs with ipc://DIR/events.sock; tcp://HOST:PORT with PORT+1."""
    if endpoint.startswith("ipc://"):
        return "ipc://" + os.path.join(os.path.dirname(endpoint[len("ipc://"):]), "events.sock")
    host, _, port = endpoint.rpartition(":")
    if port.isdigit():
        return f"{host}:{int(port) + 1}"
    raise ConfigError(f"endpoint {endpoint!r}: set events_endpoint explicitly")


def _positive(_inst, attribute, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attribute.name}: {value!r} must be a positive number of seconds")


_list_of_str = attrs.validators.deep_iterable(attrs.validators.instance_of(str),
                                             attrs.validators.instance_of(list))

# A file mode: TOML integers (0o660) as they are, strings ("0660") as octal.
FileMode = NewType("FileMode", int)
# A [[layouts]] table, validated and normalised (watcher/decode/layout.py): what clients get.
LayoutSpec = NewType("LayoutSpec", dict)


def _check_mode(_inst, attribute, value: int) -> None:
    if not 0 <= value <= 0o777:
        raise ConfigError(f"{attribute.name}: {value!r} is not a file mode")
    if value & 0o002:
        raise ConfigError(f"{attribute.name}: {oct(value)} would let anyone on the host "
                          "connect; drop the world-write bit")


@attrs.define
class DaemonConfig:
    # ZeroMQ ROUTER endpoint for requests (list, get, ping).
    endpoint: str = attrs.field(default=DEFAULT_ENDPOINT, validator=_check_endpoint)
    # ZeroMQ XPUB endpoint for the event stream; default: events.sock beside an ipc://
    # endpoint, or the next port after a tcp:// one.
    events_endpoint: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_check_endpoint))
    # File mode and group of ipc:// socket files: root only, or a group of readers.
    socket_mode: FileMode = attrs.field(default=FileMode(0o660), validator=_check_mode)
    socket_group: str | None = None
    # bpffs mount points to search for pinned maps (recursively).
    bpffs: list[str] = attrs.field(factory=lambda: [DEFAULT_BPFFS], validator=_list_of_str)
    # Entries per get chunk on the wire.
    chunk_entries: int = attrs.field(default=16384, validator=attrs.validators.in_(range(1, 1 << 20)))
    # Seconds between heartbeats on the stream.
    heartbeat_interval: float = attrs.field(default=1.0, validator=_positive)
    # Events kept per map for `pymap events NAME` without --follow.
    recent_events: int = attrs.field(default=1000, validator=attrs.validators.ge(0))
    # ... and at most these bytes of them per map (large values: 1,000 events of 64 KiB
    # would hold 128 MB per map).
    recent_bytes: int = attrs.field(default=4 << 20, validator=attrs.validators.ge(1024))
    # Stream messages queued per subscriber before ZeroMQ drops (seen as gaps); the
    # high-water mark is the smaller of this and stream_queue_bytes / stream_message_bytes.
    stream_hwm: int = attrs.field(default=10000, validator=attrs.validators.ge(1))
    # Bytes queued per subscriber at most (with stream_message_bytes: the high-water mark).
    stream_queue_bytes: int = attrs.field(default=64 << 20, validator=attrs.validators.ge(1024))
    # Bytes per stream message at most: event batches and buffer reads are cut to fit.
    stream_message_bytes: int = attrs.field(
        default=256 << 10, validator=attrs.validators.in_(range(1024, (64 << 20) + 1)))
    # Requests one client may have in flight; more are refused with `busy`.
    max_requests_in_flight: int = attrs.field(
        default=64, validator=attrs.validators.in_(range(1, 1 << 16)))
    # Reply bytes queued in the daemon per client before its handlers wait.
    client_outbox_bytes: int = attrs.field(default=4 << 20, validator=attrs.validators.ge(4096))
    # Longest subscription (topic prefix) a subscriber may send; longer cuts the connection.
    max_subscription_bytes: int = attrs.field(
        default=1024, validator=attrs.validators.in_(range(64, 1 << 16)))
    # Subscriptions one subscriber connection may hold; one more cuts the connection.
    max_subscriptions: int = attrs.field(
        default=1000, validator=attrs.validators.in_(range(1, 1 << 20)))
    # Entry events per stream message at most.
    batch_events: int = attrs.field(default=4096, validator=attrs.validators.in_(range(1, 1 << 20)))
    # After start-up, limit bpf(2) to the commands the daemon reads with (seccomp;
    # docs/operations.md).  Off only to debug the filter itself.
    seccomp: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    log_level: str = attrs.field(default="info",
                                 validator=attrs.validators.in_(["debug", "info", "warning", "error"]))
    # "text" (one readable line) or "json" (one JSON object per line, for a SIEM).
    log_format: str = attrs.field(default="text", validator=attrs.validators.in_(["text", "json"]))

    def __attrs_post_init__(self) -> None:
        if self.events_endpoint is None:
            self.events_endpoint = events_endpoint_for(self.endpoint)
        if self.events_endpoint == self.endpoint:
            raise ConfigError("events_endpoint must differ from endpoint")

    @property
    def stream_sndhwm(self) -> int:
        """The XPUB's high-water mark: at most stream_queue_bytes per subscriber."""
        return max(1, min(self.stream_hwm, self.stream_queue_bytes // self.stream_message_bytes))


@attrs.define
class IntervalRule:
    pattern: str  # shell glob on map names
    interval: float = attrs.field(validator=_positive)


@attrs.define
class WatchConfig:
    # Seconds between polls of a watched map.
    interval: float = attrs.field(default=1.0, validator=_positive)
    # Per-map intervals by name glob; the first matching rule wins.
    intervals: list[IntervalRule] = attrs.Factory(list)
    # Name globs of maps watched even when nobody subscribes.
    always: list[str] = attrs.field(factory=list, validator=_list_of_str)
    # Seconds a map stays watched after its last subscriber left (keeps recent events).
    linger: float = attrs.field(default=300.0, validator=attrs.validators.ge(0))
    # How new maps are learned of (docs/operations.md, "Map discovery and churn"): "auto"
    # from the bpf() syscall tracepoints where they load (else the poll), "poll" by
    # comparing map ids every interval only.
    discovery: str = attrs.field(default="auto", validator=attrs.validators.in_(["auto", "poll"]))
    # In-kernel change detection (docs/architecture.md): "auto" uses it for supported
    # maps of at least kernel_delta_min_entries (max_entries); "off" never.
    kernel_delta: str = attrs.field(default="auto", validator=attrs.validators.in_(["auto", "off"]))
    kernel_delta_min_entries: int = attrs.field(default=65536, validator=attrs.validators.ge(0))
    # Map types the in-kernel engine may take.  Not per-CPU hashes by default: they need
    # the bpf_iter route, which costs more than their batch read (bench_kdelta, docs).
    kernel_delta_types: list[str] = attrs.field(
        factory=lambda: ["hash", "lru_hash", "array", "percpu_array"],
        validator=attrs.validators.deep_iterable(attrs.validators.in_(
            ["hash", "lru_hash", "percpu_hash", "lru_percpu_hash", "array", "percpu_array"]),
            attrs.validators.instance_of(list)))
    # Cap on the kernel memory (memlock) of all shadow maps together; maps beyond it
    # stay on the user-space engine.
    kernel_delta_max_bytes: int = attrs.field(default=512 << 20,
                                              validator=attrs.validators.ge(0))

    def interval_for(self, name: str) -> float:
        for rule in self.intervals:
            if fnmatch.fnmatchcase(name, rule.pattern):
                return rule.interval
        return self.interval


def _check_listen(_inst, attribute, value: str | None) -> None:
    if value is None:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{attribute.name}: {value!r} must be HOST:PORT, "
                          "e.g. 127.0.0.1:9435")


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_FIELD_PATH = re.compile(r"(key|value)(\.[A-Za-z0-9_]+)*\Z")


def _check_metric_name(_inst, attribute, value: str) -> None:
    if not _METRIC_NAME.match(value):
        raise ConfigError(f"{attribute.name} {value!r} is not a Prometheus "
                          "metric name")


def _check_field(_inst, attribute, value: str) -> None:
    if not _FIELD_PATH.match(value):
        raise ConfigError(f"{attribute.name} {value!r} must be a field path "
                          "like key, key.proto or value.packets")


@attrs.define
class MetricLabel:
    name: str = attrs.field(validator=_check_metric_name)  # the Prometheus label name
    field: str = attrs.field(validator=_check_field)  # decoded field: key.proto, value.x


@attrs.define
class MetricMap:
    """One map exported as one metric family, the way ebpf_exporter does it."""

    map: str  # the map's name (as in pymap list)
    name: str = attrs.field(validator=_check_metric_name)
    type: str = attrs.field(default="gauge", validator=attrs.validators.in_(["gauge", "counter"]))
    help: str = ""
    labels: list[MetricLabel] = attrs.Factory(list)
    # Decoded field holding the number; per-CPU values are summed over CPUs.
    value: str = attrs.field(default="value", validator=_check_field)


@attrs.define
class MetricsConfig:
    # HOST:PORT of the /metrics HTTP endpoint; None (the default): no endpoint.
    listen: str | None = attrs.field(default=None, validator=_check_listen)
    # Entries per exported map turned into samples at most (the rest counted as truncated).
    max_series: int = attrs.field(default=10000, validator=attrs.validators.in_(range(1, 1 << 24)))
    maps: list[MetricMap] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        names = [m.name for m in self.maps]
        if len(set(names)) != len(names):
            raise ConfigError("two [[metrics.maps]] define the same metric name")


@attrs.define
class CurveConfig:
    """Keys for tcp:// endpoints (watcher/wire/curve.py); TCP is refused without them."""

    # The server's zmq.auth secret certificate (NAME.key_secret, made by `pymap keys make`).
    server_key: str | None = None
    # Directory of allowed clients' public certificates (*.key); the file stem names the client.
    clients: str | None = None

    def check(self, daemon: DaemonConfig) -> None:
        """Refuse TCP without keys (the key files are read when the config is resolved)."""
        tcp = [e for e in (daemon.endpoint, daemon.events_endpoint) if is_tcp(e)]
        if tcp and not (self.server_key and self.clients):
            raise ConfigError(f"{tcp[0]}: a tcp:// endpoint needs CURVE: set curve.server_key "
                              "and curve.clients (make keys with: pymap keys make)")


@attrs.define
class AccessRule:
    """Who (any of clients, users, groups) sees which maps (allow, then deny, name globs)."""

    clients: list[str] = attrs.field(factory=list, validator=_list_of_str)  # CURVE key names
    users: list[str] = attrs.field(factory=list, validator=_list_of_str)  # unix socket peers
    groups: list[str] = attrs.field(factory=list, validator=_list_of_str)  # ... by group
    allow: list[str] = attrs.field(factory=list, validator=_list_of_str)  # empty: every map
    deny: list[str] = attrs.field(factory=list, validator=_list_of_str)

    def __attrs_post_init__(self) -> None:
        if not (self.clients or self.users or self.groups):
            raise ConfigError("a rule names no clients, users or groups")


@attrs.define
class AccessConfig:
    # What a peer that no rule names sees: "allow" (every map) or "deny" (none).
    default: str = attrs.field(default="allow", validator=attrs.validators.in_(["allow", "deny"]))
    rules: list[AccessRule] = attrs.Factory(list)  # the first rule naming the peer applies


@attrs.define
class Config:
    daemon: DaemonConfig = attrs.Factory(DaemonConfig)
    watch: WatchConfig = attrs.Factory(WatchConfig)
    # [[layouts]]: declared key/value layouts for maps without BTF, validated and
    # normalised at load (watcher/decode/layout.py, docs/decoding.md).
    layouts: list[LayoutSpec] = attrs.Factory(list)
    # [[sources]] and --source: BPF programs and pinned buffers to publish
    # (watcher/daemon/sourceconf.py, docs/sources.md).
    sources: list[SourceConfig] = attrs.Factory(list)
    metrics: MetricsConfig = attrs.Factory(MetricsConfig)
    curve: CurveConfig = attrs.Factory(CurveConfig)
    access: AccessConfig = attrs.Factory(AccessConfig)

    def __attrs_post_init__(self) -> None:
        self.curve.check(self.daemon)

    def always_watched(self) -> list[str]:
        """Name globs polled whatever the demand: ``watch.always`` and the metrics maps."""
        return [*self.watch.always, *(m.map for m in self.metrics.maps)]

    def layout_for(self, names: list[str], pins: list[str]) -> dict | None:
        """The first declared layout whose ``match`` fits a map's names or pin paths."""
        for spec in self.layouts:
            if layout_matches(spec["match"], names, pins):
                return spec
        return None
