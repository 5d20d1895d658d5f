"""Which maps a subscriber's selectors (names or globs) cover, and what it subscribes to."""

from __future__ import annotations

import fnmatch

from watcher.wire import schema
from watcher.wire.globs import check_glob, is_glob, literal_prefix


class Selection:
    def __init__(self, selectors: list[str]):
        """Raises GlobError (a ValueError) for a selector that is not a valid glob."""
        if not selectors:
            raise ValueError("at least one map name or glob is needed")
        self.selectors = [check_glob(s) for s in selectors]

    def subscriptions(self) -> list[bytes]:
        """Topic prefixes: a name's own topic, or a glob's literal prefix (filtered here)."""
        subs = []
        for sel in self.selectors:
            if is_glob(sel):
                subs.append(schema.MAP_TOPIC_PREFIX + literal_prefix(sel).encode())
            else:
                subs.append(schema.map_topic(sel))
        return list(dict.fromkeys(subs))  # a repeat would leak demand (XPUB_VERBOSER)

    def matches(self, name: str) -> bool:
        return any(name == s or fnmatch.fnmatchcase(name, s) for s in self.selectors)
