"""``[[exports]]`` tables: exporters described in a TOML file (docs/export.md).

Structured by the same converter as the daemon's config (watcher/wire/tables.py),
so a bad table is the same one line: ``config FILE: exports[0] (name): KEY: WHY``.
"""

from __future__ import annotations

from typing import Any

from watcher.wire.tables import label, structure
from watcher.wire.tomlfile import TomlFileError, read_toml

from .exporter import ExportConfigError, ExportSpec

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
    specs = [spec_of(table, f"config {path}: exports[{i}]{label(table)}")
             for i, table in enumerate(tables)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ExportConfigError(f"config {path}: every [[exports]] table needs a unique name")
    return specs


def spec_of(table: dict[str, Any], where: str) -> ExportSpec:
    """One table as a checked ExportSpec: output keys may sit beside the others, and
    ``maps`` is another word for ``selectors``."""
    if not isinstance(table, dict):
        raise ExportConfigError(f"{where}: expected a table")
    table = dict(table)
    options = dict(table.pop("options", {}) or {})
    for key in OUTPUT_KEYS:
        if key in table:
            options[key] = table.pop(key)
    maps = table.pop("maps", None)
    if "selectors" not in table and maps is not None:
        table["selectors"] = maps
    spec = structure({**table, "options": options}, ExportSpec, where, ExportConfigError)
    try:
        spec.check()
    except ExportConfigError as e:
        raise ExportConfigError(f"{where}: {e}") from None
    return spec
