"""``ecs``: Elastic Common Schema 8.x documents.

Only ECS fields (checked against ECS's own field list in tests/test_export_formats.py)
plus pymap's event object under the custom ``pymap`` namespace, as ECS advises
for fields it does not define.
"""

from __future__ import annotations

import orjson

from .base import Facts, Format

ECS_VERSION = "8.17.0"

# event.type per action (ECS allowed values for the "configuration" category).
EVENT_TYPES = {"added": "creation", "map_created": "creation", "updated": "change",
               "removed": "deletion", "map_removed": "deletion"}


class ECSFormat(Format):
    name = "ecs"

    def payload(self, f: Facts) -> bytes:
        d = f.doc
        action = d["action"]
        stream_fault = action in ("lost", "dropped")
        if action in ("record", "records"):
            category = ["host"]
        else:
            category = ["configuration"]
        doc = {
            "@timestamp": d["time"],
            "ecs": {"version": ECS_VERSION},
            "event": {
                "kind": "pipeline_error" if stream_fault else "event",
                "category": category,
                "type": ["error" if stream_fault else EVENT_TYPES.get(action, "info")],
                "action": action,
                "id": d["id"],
                "sequence": d["seq"],
                "dataset": "pymap.events",
                "module": "pymap",
            },
            "host": {"name": f.node, "hostname": f.node},
            "agent": {"type": "pymap", "name": "pymap-export", "version": self.version},
            "message": f.summary(),
            "pymap": d,
        }
        return orjson.dumps(doc)
