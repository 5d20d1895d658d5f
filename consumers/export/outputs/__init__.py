"""Export destinations, chosen by the scheme of ``--to`` URLs.

To add one: subclass :class:`~consumers.export.outputs.base.Output` in a module
here and add its schemes to :data:`SCHEMES` ("module:Class", imported only when
used, so an output's dependencies cost nothing to exporters that do not use it).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .base import Output, OutputConfigError, OutputUnavailable

__all__ = ["SCHEMES", "Output", "OutputConfigError", "OutputUnavailable", "make_output"]

SCHEMES: dict[str, str] = {
    "-": "stdout:StdoutOutput",
    "file": "file:FileOutput",
    "syslog+udp": "syslog:SyslogUDPOutput",
    "syslog+tcp": "syslog:SyslogTCPOutput",
    "syslog+tls": "syslog:SyslogTLSOutput",
    "nats": "nats:NatsOutput",
}


def scheme_of(url: str) -> str:
    return "-" if url == "-" else url.partition("://")[0] if "://" in url else ""


def make_output(url: str, options: Mapping[str, Any] | None = None) -> Output:
    """The output for ``url``; OutputConfigError for an unknown scheme."""
    scheme = scheme_of(url)
    target = SCHEMES.get(scheme)
    if target is None:
        known = ", ".join(s if s == "-" else s + "://" for s in SCHEMES)
        raise OutputConfigError(f"{url!r}: unknown output (expected one of {known})")
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    cls: type[Output] = getattr(module, class_name)
    return cls(url, options)
