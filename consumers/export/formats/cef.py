"""``cef``: ArcSight Common Event Format, one line per event.

Header fields escape ``\\`` and ``|``; extension values escape ``\\``, ``=``
and line breaks (CEF "Implementing ArcSight CEF", rev. 25).  Custom strings go
in the csN/cnN slots with their labels.
"""

from __future__ import annotations

import orjson

from .base import Facts, Format

SEVERITY = {"lost": 7, "dropped": 7, "resync": 5, "stalled": 5, "removed": 3,
            "map_removed": 3}


def header(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def ext(text: str) -> str:
    return (text.replace("\\", "\\\\").replace("=", "\\=")
            .replace("\r", "\\r").replace("\n", "\\n"))


class CEFFormat(Format):
    name = "cef"
    text = True

    def payload(self, f: Facts) -> bytes:
        d = f.doc
        action = d["action"]
        fields: list[tuple[str, str]] = [
            ("rt", str(int((f.event.time or 0) * 1000))),
            ("dvchost", f.node),
            ("act", action),
            ("msg", f.summary()),
            ("externalId", d["id"]),
            ("cn1Label", "mapId"), ("cn1", str(d["map"]["id"])),
            ("cn2Label", "seq"), ("cn2", str(d["seq"])),
            ("cs1Label", "map"), ("cs1", d["map"]["name"]),
            ("cs2Label", "mapType"), ("cs2", f.map_type),
            ("cs3Label", "pin"), ("cs3", " ".join(f.pins)),
        ]
        if "key" in d:
            fields += [("cs4Label", "key"), ("cs4", d["key"])]
        raw = d.get("value", d.get("values"))
        if raw is not None:
            fields += [("cs5Label", "value"),
                       ("cs5", raw if isinstance(raw, str) else orjson.dumps(raw).decode())]
        if d.get("formatted") is not None:
            fields += [("cs6Label", "decoded"), ("cs6", orjson.dumps(d["formatted"]).decode())]
        if "missed" in d:
            fields += [("cn3Label", "missed"), ("cn3", str(d["missed"]))]
        head = "|".join(["CEF:0", "pymap", "pymap", header(self.version),
                         header(f"pymap:{action}"), header(f"eBPF map {action}"),
                         str(SEVERITY.get(action, 1))])
        return (head + "|" + " ".join(f"{k}={ext(v)}" for k, v in fields)).encode()
