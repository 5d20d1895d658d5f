"""Resolving a validated config: asking the host what it names.

Validation (model.py) is pure; what depends on the host, the socket group's id,
the CURVE key files and the source programs, is looked up here, in one explicit
step after it, by whoever is about to use the config (load_config for the
daemon's start and reloads, main.run for the facts it binds and
authenticates with).
"""

from __future__ import annotations

import grp

import attrs

from ...wire.curve import CurveError, ServerKeys, load_allowed, load_secret
from ..sourceconf import SourceError, check_programs
from .model import Config, ConfigError, CurveConfig


@attrs.frozen
class CurveKeys:
    """The CURVE key files read: the server's secret (None: no tcp://) and the clients."""

    server: ServerKeys | None
    allowed: dict[bytes, str]


@attrs.frozen
class ResolvedConfig:
    """A validated config with what the host says about it: the facts the daemon uses."""

    config: Config
    socket_gid: int | None
    curve: CurveKeys


def resolve(config: Config) -> ResolvedConfig:
    """Ask the host what the config names: the socket group, the key files, the
    programs.  After validation, apart from it: validating touches nothing."""
    try:
        check_programs(config.sources)
    except SourceError as e:
        raise ConfigError(f"sources: {e}") from None
    return ResolvedConfig(config, socket_gid(config.daemon.socket_group),
                          curve_keys(config.curve))


def socket_gid(group: str | None) -> int | None:
    """The id of the group given the ipc:// socket files (None: root's)."""
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group: no group named {group!r}") from None


def curve_keys(curve: CurveConfig) -> CurveKeys:
    """Read the key files (again at each reload: clients may have been added)."""
    try:
        server = ServerKeys(*load_secret(curve.server_key)) if curve.server_key else None
        return CurveKeys(server, load_allowed(curve.clients) if curve.clients else {})
    except CurveError as e:
        raise ConfigError(f"curve: {e}") from None
