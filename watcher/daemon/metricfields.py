"""Reading a metric's fields out of a decoded map entry (``[[metrics.maps]]``).

Why apart from the collectors: these are plain functions over decoded entries,
tested on their own, and importing them must not load prometheus_client (the
daemon loads it only when ``metrics.listen`` is set).
"""

from __future__ import annotations

from typing import Any


class FieldError(ValueError):
    """A configured field path is not in a decoded entry."""


def field_at(entry: dict, path: str) -> Any:
    """``entry["key"]["proto"]`` for ``key.proto``; list items by index (``value.counts.0``)."""
    node: Any = entry
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise FieldError(f"no field {path!r} in the decoded entry")
    return node


def as_number(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return float(int(value, 0))  # layouts may print integers as hex
    raise FieldError(f"{value!r} is not a number")


def label_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def entry_value(entry: dict, path: str) -> float:
    """The sample value: the field itself, or summed over CPUs for a per-CPU map."""
    if "values" in entry and "value" not in entry:  # per-CPU: {"values": [{"cpu", "value"}]}
        rest = path.partition(".")[2]
        return sum(as_number(field_at(cpu, "value" + ("." + rest if rest else "")))
                   for cpu in entry["values"])
    return as_number(field_at(entry, path))
