"""Which maps a connected peer sees: the ``[access]`` rules and their views.

Who may connect at all is decided before this, by the ZAP handler
(:mod:`.zap`); here a peer is already connected, as a principal.
``[access]`` rules give a principal (a CURVE client's name, or a unix
socket peer's user and groups from SO_PEERCRED, which libzmq passes as the
``Peer-Address`` metadata ``...:uid:gid:pid``) a :class:`View`: allow and
deny globs on map names.  The request server filters ``list``, ``status``
and ``recent`` through it, and answers ``get`` of a map outside it exactly
as it answers a map that does not exist (:func:`hidden`), so a denial never
confirms that a map exists.  On the event stream each view has its own topic
namespace (:attr:`View.namespace`): the publisher sends a copy of each
message of a visible map under it, and the subscription gate applies a
restricted peer's subscriptions only inside it.
See docs/operations.md#who-sees-which-maps.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import grp
import hashlib
import logging
import os
import pwd
from collections.abc import Callable, Iterable

import attrs

from . import errors
from .config import AccessConfig

log = logging.getLogger("pymap.access")


@attrs.frozen
class Principal:
    """Who sent a request: a CURVE client's name (tcp://), or a unix peer's uid/gid (ipc://)."""

    client: str = ""
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def from_metadata(cls, user_id: str, peer_address: str) -> Principal:
        client = "" if user_id in ("", "anonymous") else user_id
        parts = peer_address.rsplit(":", 3)  # ipc: "<address>:uid:gid:pid" (SO_PEERCRED)
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            return cls(client, int(parts[1]), int(parts[2]))
        return cls(client)


@attrs.frozen(cache_hash=True)
class View:
    """The maps one principal may see: allowed by a glob (or all), denied by none."""

    allow: tuple[str, ...]
    deny: tuple[str, ...]
    nothing: bool = False

    def sees(self, names: Iterable[str]) -> bool:
        """Is a map with these names (name, kernel name, pin paths and basenames) visible?"""
        if self.nothing:
            return False
        names = list(names)
        if any(fnmatch.fnmatchcase(n, g) for g in self.deny for n in names):
            return False
        return not self.allow or any(fnmatch.fnmatchcase(n, g) for g in self.allow for n in names)

    def sees_map(self, m) -> bool:
        """``m``: a MapInfo or a kernel MapRecord."""
        pins = list(m.pinned)
        return self.sees([m.name, m.kernel_name, *pins, *(os.path.basename(p) for p in pins)])

    def sees_name(self, name: str) -> bool:
        return self.sees([name])

    @functools.cached_property
    def namespace(self) -> bytes:
        """This view's topic prefix on the event stream, ``v<8 hex>:``.

        A hash of the rule's globs, not its position: a SIGHUP that leaves a
        rule unchanged leaves its namespace (and its subscribers) alone.
        """
        digest = hashlib.sha256(repr((self.allow, self.deny, self.nothing)).encode())
        return b"v" + digest.hexdigest()[:8].encode() + b":"


NAMESPACE_BYTES = len(b"v12345678:")  # a view's topic namespace: "v", 8 hex digits, ":"
EVERYTHING: View | None = None  # no rule restricts the principal


class Policy:
    """``[access]``: the first rule naming a principal decides its view of the maps."""

    def __init__(self, config: AccessConfig):
        self.config = config
        self._groups: dict[tuple[int, int], tuple[str | None, set[str]]] = {}

    @property
    def active(self) -> bool:
        return bool(self.config.rules) or self.config.default == "deny"

    def _unix(self, uid: int, gid: int) -> tuple[str | None, set[str]]:
        """The user name and every group name (primary and supplementary) of a peer."""
        if (uid, gid) not in self._groups:
            try:
                user: str | None = pwd.getpwuid(uid).pw_name
            except KeyError:
                user = None
            gids = set(os.getgrouplist(user, gid)) if user else {gid}
            names = set()
            for g in gids:
                with contextlib.suppress(KeyError):
                    names.add(grp.getgrgid(g).gr_name)
            if len(self._groups) > 4096:
                self._groups = {}  # replaced, not cleared: the ZAP thread may be reading it
            self._groups[(uid, gid)] = (user, names)
            return user, names
        return self._groups[(uid, gid)]

    def view_for(self, who: Principal) -> View | None:
        """None: no restriction (the daemon's behaviour without ``[access]``)."""
        if not self.active:
            return EVERYTHING
        user, groups = (self._unix(who.uid, who.gid) if who.uid is not None
                        and who.gid is not None else (None, set()))
        for rule in self.config.rules:
            if ((who.client and who.client in rule.clients)
                    or (user is not None and user in rule.users)
                    or (groups & set(rule.groups))):
                if not rule.allow and not rule.deny:
                    return EVERYTHING
                return View(tuple(rule.allow), tuple(rule.deny))
        return EVERYTHING if self.config.default == "allow" else View((), (), nothing=True)

    def views(self) -> dict[bytes, View]:
        """Every restricted view the rules can give, by namespace."""
        found = [View(tuple(r.allow), tuple(r.deny)) for r in self.config.rules
                 if r.allow or r.deny]
        if self.active and self.config.default == "deny":
            found.append(View((), (), nothing=True))
        return {v.namespace: v for v in found}


def hidden(selector: str) -> errors.MapNotFound:
    """The error a selector naming no map gets, word for word: a denied map is invisible."""
    if selector.startswith("id:"):
        return errors.MapNotFound(f"no map {selector}")
    if selector.startswith("/"):
        return errors.MapNotFound(f"no map is pinned at {selector}")
    return errors.MapNotFound(f"no map named {selector!r} (see: pymap list)")


def open_visible(open_selected: Callable, selector: str, view: View):
    """``open_selected(selector)`` as if the maps outside ``view`` did not exist (blocking).

    A name shared by a visible and a hidden map selects the visible one, and an
    ``ambiguous`` reply lists only visible maps: neither hints at the hidden one.
    """
    try:
        handle = open_selected(selector)
    except errors.AmbiguousSelector as e:
        visible = [c for c in e.candidates if view.sees_map(c)]
        if not visible:
            raise hidden(selector) from None
        if len(visible) == 1:
            handle = open_selected(f"id:{visible[0].id}")
        else:
            ids = ", ".join(f"id:{c.id}" for c in visible)
            raise errors.AmbiguousSelector(f"{len(visible)} maps are named {selector!r}: {ids}; "
                                           "select one by id:N or pin path", visible) from None
    if not view.sees_map(handle.record):
        handle.close()
        raise hidden(selector)
    return handle


def restricted_status(status, view: View):
    """An engine status showing only what ``view`` may see: watched maps, and the
    subscriptions in its own namespace (shown without it, as its peers made them)."""
    namespace = view.namespace.decode()
    return attrs.evolve(status, watched=[w for w in status.watched if view.sees_name(w.name)],
                        subscriptions={p[len(namespace):]: n
                                       for p, n in status.subscriptions.items()
                                       if p.startswith(namespace)})
