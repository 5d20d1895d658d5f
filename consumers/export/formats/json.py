"""``json``: pymap's own event lines, as ``pymap events -o json`` prints them."""

from __future__ import annotations

import orjson

from .base import Facts, Format


class JSONFormat(Format):
    name = "json"

    def payload(self, f: Facts) -> bytes:
        return orjson.dumps(f.doc)
