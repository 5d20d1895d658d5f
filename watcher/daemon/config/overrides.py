"""Flags over the file: ``--set SECTION.KEY=VALUE`` and the daemon's named flags.

They change the raw tables before validation, so a flag's value is checked
exactly as the same key in the file would be, on the same error line.
"""

from __future__ import annotations

import tomllib

from .model import ConfigError


def apply_flags(data: dict, path: str | None, overrides: dict | None,
                watch_overrides: dict | None, settings: list[str] | None) -> None:
    """``overrides``/``watch_overrides``: ``daemon``/``watch`` keys given as flags (None:
    not given); then ``settings``, the ``--set`` flags, which reach every key."""
    for section, values in (("daemon", overrides), ("watch", watch_overrides)):
        given = {k: v for k, v in (values or {}).items() if v is not None}
        if given:
            if not isinstance(data.setdefault(section, {}), dict):
                raise ConfigError(f"config {path}: [{section}] must be a table")
            data[section].update(given)
    for setting in settings or ():
        apply_setting(data, setting)


def apply_setting(data: dict, setting: str) -> None:
    """``--set SECTION.KEY=VALUE`` (VALUE in TOML syntax, or a bare string)."""
    name, eq, text = setting.partition("=")
    section, dot, key = name.strip().partition(".")
    if not eq or not dot or not section or not key or "." in key:
        raise ConfigError(f"--set {setting!r}: write SECTION.KEY=VALUE, e.g. watch.linger=60")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"--set {setting!r}: [{section}] is not a table")
    table[key] = value
