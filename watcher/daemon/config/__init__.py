"""The daemon's configuration: a TOML file, every key overridable by a flag.

Validation happens at load, so a broken config stops the daemon with one
clear line instead of failing later in some task; what the config names on
the host (a group, key files, programs) is resolved in a separate step after
it.  See docs/config.md.

- ``model``: the attrs classes and their validators (what a valid config is);
- ``convert``: the daemon's hooks on the one table converter (watcher/wire/tables.py);
- ``overrides``: ``--set`` and the daemon's flags over the raw tables;
- ``load``: file, flags, validation, in that order (``parse_config``, ``load_config``);
- ``resolve``: the host's answers (``resolve`` -> ``ResolvedConfig``).
"""

from .load import DEFAULT_CONFIG, load_config, parse_config
from .model import (
    AccessConfig,
    AccessRule,
    Config,
    ConfigError,
    CurveConfig,
    DaemonConfig,
    IntervalRule,
    LayoutSpec,
    MetricLabel,
    MetricMap,
    MetricsConfig,
    WatchConfig,
    events_endpoint_for,
)
from .resolve import CurveKeys, ResolvedConfig, curve_keys, resolve, socket_gid

__all__ = [
    "DEFAULT_CONFIG", "AccessConfig", "AccessRule", "Config", "ConfigError", "CurveConfig",
    "CurveKeys", "DaemonConfig", "IntervalRule", "LayoutSpec", "MetricLabel", "MetricMap",
    "MetricsConfig", "ResolvedConfig", "WatchConfig", "curve_keys", "events_endpoint_for",
    "load_config", "parse_config", "resolve", "socket_gid",
]
