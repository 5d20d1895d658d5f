"""``ocsf``: OCSF 1.3 events of class Kernel Activity (1003, category System Activity).

An eBPF map is a kernel resource; an entry added or a map created is its
"Create" activity, removed its "Delete", a changed value "Other" named
"Update".  Records of event sources and the stream's own records (lost,
resync, dropped) are "Other" activities named after the action, so one class
carries everything and a SIEM rule can key on ``activity_name``.  The
validated schema is the one the ``ocsf-json-schema`` package ships
(tests/test_export_formats.py).
"""

from __future__ import annotations

import orjson

from .base import Facts, Format

OCSF_VERSION = "1.3.0"
CLASS_UID = 1003  # Kernel Activity
CATEGORY_UID = 1  # System Activity
ACTIVITY = {"added": (1, "Create"), "map_created": (1, "Create"),
            "removed": (3, "Delete"), "map_removed": (3, "Delete"),
            "updated": (99, "Update")}
SEVERITY_INFO, SEVERITY_MEDIUM = 1, 3
KERNEL_TYPE_OTHER = 99


class OCSFFormat(Format):
    name = "ocsf"

    def payload(self, f: Facts) -> bytes:
        d = f.doc
        action = d["action"]
        activity_id, activity_name = ACTIVITY.get(action, (99, action))
        lost = action in ("lost", "dropped")
        kernel: dict = {"name": d["map"]["name"] or "pymap-stream", "type_id": KERNEL_TYPE_OTHER,
                        "type": f"bpf map {f.map_type}".strip()}
        if f.pins:
            kernel["path"] = f.pins[0]
        doc = {
            "class_uid": CLASS_UID,
            "class_name": "Kernel Activity",
            "category_uid": CATEGORY_UID,
            "category_name": "System Activity",
            "activity_id": activity_id,
            "activity_name": activity_name,
            "type_uid": CLASS_UID * 100 + activity_id,
            "severity_id": SEVERITY_MEDIUM if lost else SEVERITY_INFO,
            "time": int((f.event.time or 0) * 1000),
            "message": f.summary(),
            "metadata": {
                "product": {"name": "pymap", "vendor_name": "pymap", "version": self.version},
                "version": OCSF_VERSION,
                "sequence": d["seq"],
                "uid": d["id"],
            },
            "device": {"hostname": f.node, "type_id": 0},
            "actor": {"app_name": "pymap"},
            "kernel": kernel,
            "unmapped": {"pymap": d},
        }
        if lost:
            doc["count"] = d.get("missed", 0)
        return orjson.dumps(doc)
