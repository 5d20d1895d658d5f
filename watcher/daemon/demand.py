"""Demand: which maps someone wants watched, and for how long after.

Why a module of its own: the subscriptions (learned from the XPUB through the
subscription gate), the ``watch.always`` globs and the holds (a map kept after
its last subscriber left, or after a snapshot request) decide *which* maps the
engine polls; none of it touches the kernel, so it is tested without one.
"""

from __future__ import annotations

import fnmatch

from watcher.kernel.maps import find as kmaps

from ..wire import schema
from .access import NAMESPACE_BYTES, View

Scope = tuple[View | None, bytes]  # (the view a prefix is limited to, or None; the prefix)


class Demand:
    """Topic prefixes that at least one subscriber connection holds.

    The subscription gate (watcher/daemon/subgate.py) reports a topic when a
    connection first takes it and again when it lets go of it or is gone, so
    a prefix is held while some connection holds it; ``prefixes`` counts the
    subscribe requests seen per held prefix, for ``pymap status``.  A prefix in
    a view's namespace (``v<hash>:map:...``, ``views``: the namespaces of the
    access rules in force) covers only the maps that view sees.
    """

    def __init__(self):
        self.prefixes: dict[bytes, int] = {}  # prefix -> subscribe requests seen
        self._holders: dict[bytes, int] = {}  # prefix -> connections holding it
        self.views: dict[bytes, View] = {}  # namespace -> view

    def set_views(self, views: dict[bytes, View]) -> None:
        """The access rules' restricted views by namespace (at start and on reload)."""
        self.views = views

    def update(self, message: bytes) -> bool:
        """Apply one subscription change; True if it was a subscribe."""
        if not message or message[0] not in (0, 1):
            return False
        prefix = bytes(message[1:])
        if message[0] == 1:
            self._holders[prefix] = self._holders.get(prefix, 0) + 1
            self.prefixes[prefix] = self.prefixes.get(prefix, 0) + 1
            return True
        left = self._holders.get(prefix, 0) - 1
        if left > 0:
            self._holders[prefix] = left
        else:
            self._holders.pop(prefix, None)
            self.prefixes.pop(prefix, None)
        return False

    def scopes(self) -> tuple[Scope, ...]:
        """Each held prefix as (its view, or None: unrestricted; the prefix within it)."""
        out = []
        for prefix in self.prefixes:
            ns = prefix[:NAMESPACE_BYTES]
            view = self.views.get(ns) if prefix.startswith(b"v") else None
            out.append((view, prefix[len(ns):]) if view is not None else (None, prefix))
        return tuple(out)

    def active_views(self) -> dict[bytes, View]:
        """The views some connection subscribes in: the stream publishes for these."""
        return {ns: view for ns, view in self.views.items()
                if any(p.startswith(ns) for p in self.prefixes)}

    def any_maps(self) -> bool:
        """Could any subscription cover a map topic at all?"""
        prefix = schema.MAP_TOPIC_PREFIX
        return any(p.startswith(prefix) or prefix.startswith(p) for _, p in self.scopes())

    def wants(self, name: str) -> bool:
        return self.covers(self.scopes(), name)

    @staticmethod
    def covers(scopes: tuple[Scope, ...], name: str, record: kmaps.MapRecord | None = None
               ) -> bool:
        topic = schema.map_topic(name)
        return any(topic.startswith(p) and (view is None or (
            view.sees_map(record) if record is not None else view.sees_name(name)))
            for view, p in scopes)


def wanted(records: list[kmaps.MapRecord], scopes: tuple[Scope, ...],
           always: tuple[str, ...]) -> dict[int, str]:
    """Map id -> "subscribed" or "always", for the maps demand or config want.

    A host has thousands of maps: matching each against every subscription and glob
    is a worker thread's job (on copies of the demand), not the loop's.
    """
    found = {}
    for record in records:
        if Demand.covers(scopes, record.name, record):
            found[record.id] = "subscribed"
        elif any(fnmatch.fnmatchcase(record.name, p) for p in always):
            found[record.id] = "always"
    return found


class Holds:
    """Map names watched for a while though nobody subscribes to them now.

    A map stays watched ``watch.linger`` seconds after its last subscriber
    (``lingering``: ``pymap events NAME`` still has its recent events), and a
    while after a snapshot request (``snapshot``: the client follows it next).
    """

    def __init__(self):
        self._until: dict[str, tuple[float, str]] = {}  # name -> (until, reason)

    def __bool__(self) -> bool:
        return bool(self._until)

    def __contains__(self, name: str) -> bool:
        return name in self._until

    def names(self) -> set[str]:
        return set(self._until)

    def hold(self, name: str, until: float, reason: str) -> None:
        self._until[name] = (until, reason)

    def why_watched(self, name: str, now: float, wanted: str | None, linger: float
                    ) -> str | None:
        """Why to watch ``name`` (None: not to); ``wanted`` is :func:`wanted`'s answer.

        A subscribed map is held ``linger`` seconds from now, so it lingers once
        its last subscriber leaves.
        """
        if wanted == "subscribed":
            self._until[name] = (now + linger, "lingering")
            return wanted
        if wanted is not None:
            return wanted
        until, reason = self._until.get(name, (0.0, ""))
        if until > now:
            return reason
        self._until.pop(name, None)
        return None

    def expire(self, now: float) -> None:
        """Forget the holds that ran out (a gone map's was never looked at again)."""
        self._until = {name: hold for name, hold in self._until.items() if hold[0] > now}
