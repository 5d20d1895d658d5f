"""Loading the daemon's config: the file, the flags over it, validation, resolution.

The order is the point: read the TOML, lay the flags over the raw tables,
structure everything with the one converter (one error line for all of it),
add the ``--source`` flags, then resolve.  See docs/config.md.
"""

from __future__ import annotations

import os

import attrs

from ...wire.tomlfile import TomlFileError, read_toml
from ..sourceconf import SourceError, check_topics, cli_sources, with_base_dir
from .convert import structure_config
from .model import Config, ConfigError
from .overrides import apply_flags
from .resolve import resolve

DEFAULT_CONFIG = "/etc/pymap/pymap.toml"


def load_config(path: str | None, overrides: dict | None = None,
                watch_overrides: dict | None = None, sources: list[str] | None = None,
                settings: list[str] | None = None) -> Config:
    """The config the daemon starts (or reloads) with: validated, then resolved once, so
    an unknown group or a bad key file is refused here, as a config error, before
    anything starts.  Arguments as for :func:`parse_config`; ``main.run`` resolves
    the config it is given for the facts it uses (:func:`resolve`)."""
    config = parse_config(path, overrides, watch_overrides, sources, settings)
    resolve(config)
    return config


def parse_config(path: str | None, overrides: dict | None = None,
                 watch_overrides: dict | None = None, sources: list[str] | None = None,
                 settings: list[str] | None = None) -> Config:
    """Read ``path`` (None: defaults, or the default file when it exists), then apply flags;
    validate, asking the host nothing.

    ``overrides`` and ``watch_overrides`` map ``daemon`` and ``watch`` keys to
    values given on the command line (None: not given); ``sources`` are
    ``--source`` flags, added to the config's ``[[sources]]``; ``settings`` are
    ``--set SECTION.KEY=VALUE`` flags, which reach every key, applied last.
    """
    data: dict = {}
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            data = read_toml(path)
        except TomlFileError as e:
            raise ConfigError(str(e)) from None
    apply_flags(data, path, overrides, watch_overrides, settings)
    config = structure_config(data, f"config {path}" if path else "config")
    base_dir = os.path.dirname(os.path.abspath(path)) if path else None
    try:
        more = cli_sources(sources or [])
        config = attrs.evolve(config, sources=[
            *(with_base_dir(s, base_dir) for s in config.sources), *more])
        check_topics(config.sources)
    except SourceError as e:
        raise ConfigError(str(e)) from None
    return config
