"""``[[exports]]`` tables: exporters described in a TOML file (docs/export.md)."""

from __future__ import annotations

from typing import Any

import attrs

from watcher.wire.tomlfile import TomlFileError, read_toml

from .exporter import ExportConfigError, ExportSpec

KEYS = {f.name for f in attrs.fields(ExportSpec)} | {"maps"}
OUTPUT_KEYS = ("max_bytes", "backups", "mode", "sd_id", "app_name", "facility", "ca", "cert",
               "key", "server_name", "subject", "stream", "creds",
               # nats:// (docs/fleet.md)
               "prefix", "nkey", "tls_ca", "tls_cert", "tls_key", "replicas", "max_age",
               "duplicate_window", "create", "ack_timeout", "connect_timeout", "batch", "linger")


def load(path: str) -> list[ExportSpec]:
    """Every ``[[exports]]`` table of ``path``; ExportConfigError with one line otherwise."""
    try:
        data = read_toml(path)
    except TomlFileError as e:
        raise ExportConfigError(str(e)) from None
    tables = data.get("exports")
    if not isinstance(tables, list) or not tables:
        raise ExportConfigError(f"config {path}: no [[exports]] tables")
    specs = []
    for i, table in enumerate(tables):
        where = f"config {path}: exports[{i}]"
        specs.append(spec_of(table, where))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ExportConfigError(f"config {path}: every [[exports]] table needs a unique name")
    return specs


def spec_of(table: dict[str, Any], where: str) -> ExportSpec:
    if not isinstance(table, dict):
        raise ExportConfigError(f"{where}: expected a table")
    table = dict(table)
    options = dict(table.pop("options", {}) or {})
    for key in OUTPUT_KEYS:
        if key in table:
            options[key] = table.pop(key)
    unknown = set(table) - KEYS
    if unknown:
        raise ExportConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    maps = table.pop("maps", None)
    if "selectors" not in table and maps is not None:
        table["selectors"] = maps
    try:
        spec = ExportSpec(**table, options=options)
        _check_types(spec)
        spec.check()
    except (TypeError, ExportConfigError) as e:
        raise ExportConfigError(f"{where}: {e}") from None
    return spec


def _check_types(spec: ExportSpec) -> None:
    for name in ("selectors", "actions", "exclude"):
        value = getattr(spec, name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ExportConfigError(f"{name} must be a list of strings")
    for name in ("to", "format", "name"):
        if not isinstance(getattr(spec, name), str):
            raise ExportConfigError(f"{name} must be a string")
