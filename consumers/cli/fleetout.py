"""``pymap events SEL --fleet URL``: every node's events from JetStream, each line naming its node.

The payload is the event as the exporter formatted it.  pymap's own json format
is rendered exactly as local ``pymap events`` renders it (eventsout), with the
node in front; other formats (ecs, ocsf, cef) print their text after the
node, map and action from the headers.  ``-o json`` adds ``node`` to the
event's JSON object.
"""

from __future__ import annotations

import sys
from typing import IO

import orjson
from rich.console import Console
from rich.markup import escape

from ..fleet.subscribe import FleetMessage
from .eventsout import ACTION_STYLES, event_line, rfc3339

# Records the exporter adds about its own stream; local `pymap events` never prints them.
EXPORTER_ACTIONS = ("dropped", "stalled", "resumed")


def _document(m: FleetMessage) -> dict | None:
    """The payload as pymap's event JSON, or None for other formats."""
    try:
        doc = orjson.loads(m.payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict) and {"action", "map", "time", "seq"} <= doc.keys() \
            and isinstance(doc["map"], dict):
        return doc
    return None


class FleetPrinter:
    def __init__(self, as_json: bool, out: IO[str] = sys.stdout):
        self.as_json = as_json
        self.out = out
        self.console = Console(file=out, highlight=False, soft_wrap=True)
        self.width = 12  # node column, grows to the longest node name seen
        self.count = 0

    def print(self, m: FleetMessage) -> None:
        doc = _document(m)
        self.count += 1
        if self.as_json:
            record = {"node": m.node, **doc} if doc is not None else {
                "node": m.node, "seq": m.seq, "epoch": m.epoch, "time": rfc3339(m.time),
                "map": {"name": m.map}, "action": m.action,
                "payload": m.payload.decode("utf-8", "replace")}
            self.out.write(orjson.dumps(record).decode() + "\n")
            self.out.flush()
            return
        self.width = max(self.width, len(m.node))
        node = f"[bold]{escape(m.node):<{self.width}}[/]"
        if doc is not None and doc["action"] not in EXPORTER_ACTIONS:
            line = event_line(doc)
        else:
            style = ACTION_STYLES.get(m.action, "bold red")
            if doc is not None and doc["action"] == "dropped":
                text = f"{doc.get('missed', 0)} events dropped by the exporter " \
                       f"({doc.get('reason', '')})"
            elif doc is not None:
                text = str(doc.get("reason", ""))
            else:
                text = m.payload.decode("utf-8", "replace")
            line = (f"{rfc3339(m.time)[11:23]} {m.seq:>8} {escape(m.map or '-'):<20} "
                    f"[{style}]{m.action:<11}[/] {escape(text)}")
        self.console.print(f"{node} {line}")
        self.out.flush()
