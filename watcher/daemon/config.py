"""The daemon's configuration: a TOML file, every key overridable by a flag.

Validation happens here, at load, so a broken config stops the daemon with
one clear line instead of failing later in some task.  See docs/config.md.
"""

from __future__ import annotations

import grp
import os
import tomllib

import attrs
import cattrs

DEFAULT_RUN_DIR = "/run/pymap"
DEFAULT_ENDPOINT = f"ipc://{DEFAULT_RUN_DIR}/pymap.sock"
DEFAULT_CONFIG = "/etc/pymap/pymap.toml"


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


def _check_endpoint(_inst, attribute, value: str) -> None:
    if not value.startswith(("ipc://", "tcp://")):
        raise ConfigError(f"{attribute.name}: {value!r} must start with ipc:// or tcp://")


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
    # File mode and group of ipc:// socket files: root only, or a group of readers.
    socket_mode: int = attrs.field(default=0o660, validator=_check_mode)
    socket_group: str | None = None
    # bpffs mount points to search for pinned maps (recursively).
    bpffs: list[str] = attrs.Factory(lambda: ["/sys/fs/bpf"])
    # Entries per get chunk on the wire.
    chunk_entries: int = attrs.field(default=16384, validator=attrs.validators.in_(range(1, 1 << 20)))
    log_level: str = attrs.field(default="info",
                                 validator=attrs.validators.in_(["debug", "info", "warning", "error"]))

    def socket_gid(self) -> int | None:
        if self.socket_group is None:
            return None
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group: no group named {self.socket_group!r}") from None


@attrs.define
class Config:
    daemon: DaemonConfig = attrs.Factory(DaemonConfig)


_converter = cattrs.Converter(forbid_extra_keys=True)


def _format_one(error: BaseException, type_) -> str:
    if isinstance(error, ConfigError):
        return str(error)
    return cattrs.v.format_exception(error, type_)


def _describe(error: BaseException) -> list[str]:
    if isinstance(error, cattrs.BaseValidationError):
        return cattrs.transform_error(error, path="config", format_exception=_format_one)
    return [str(error)]


def load_config(path: str | None, overrides: dict | None = None) -> Config:
    """Read ``path`` (None: defaults, or the default file when it exists), then apply flags.

    ``overrides`` maps ``daemon`` keys to values given on the command line.
    """
    data: dict = {}
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config {path} is not valid TOML: {e}") from None
    if overrides:
        data.setdefault("daemon", {}).update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = _converter.structure(data, Config)
    except ConfigError:
        raise
    except Exception as e:  # cattrs groups every problem; report them all on one line
        where = f"config {path}" if path else "config"
        raise ConfigError(f"{where}: " + "; ".join(_describe(e))) from None
    config.daemon.socket_gid()
    return config
