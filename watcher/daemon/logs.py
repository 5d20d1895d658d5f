"""The daemon's own log: a readable line, or one JSON object per line on request.

``log_format = "json"`` (or ``--log-format json``) makes every record a JSON
object with ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
any structured fields passed with ``extra=`` (``map``, ``id``, ``error``, ...)
and ``exc_info`` for a traceback, so the SIEM that takes pymap's events takes
the daemon's own log too.  python-json-logger does the encoding.
"""

from __future__ import annotations

import logging

from .config import Config

TEXT_FORMAT = "pymap: %(levelname)s %(name)s: %(message)s"


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter("{levelname}{name}{message}", style="{", timestamp="time",
                         rename_fields={"levelname": "level", "name": "logger"})


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger once; :func:`set_level` changes the level on reload."""
    handler = logging.StreamHandler()
    handler.setFormatter(json_formatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def reconfigure(config: Config) -> None:
    """A reloaded config (watcher.daemon.reload): its ``log_level``; the format stays."""
    set_level(config.daemon.log_level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
