"""Turning stream events into :class:`~consumers.export.record.ExportRecord` payloads.

Every format starts from the same facts (:class:`~.base.Facts`: pymap's own event
object as ``pymap events -o json`` prints it, plus the map's type and pins, the
host name and the daemon epoch) and lays them out in one schema.
"""

from __future__ import annotations

from .base import Facts, Format, facts
from .cef import CEFFormat
from .ecs import ECSFormat
from .json import JSONFormat
from .ocsf import OCSFFormat

FORMATS: dict[str, type[Format]] = {
    "json": JSONFormat,
    "ecs": ECSFormat,
    "ocsf": OCSFFormat,
    "cef": CEFFormat,
}

__all__ = ["FORMATS", "Facts", "Format", "facts"]
