"""Who may connect, as whom, and which maps they see.

Connecting: the ZAP handler for CURVE on tcp:// endpoints.

pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator` answers ZAP requests
from its own thread, on its own inproc socket that nothing else touches (so
"one owner per socket" holds, and a slow trio task never delays a
handshake).  A client is allowed when its public key is one of the
``curve.clients`` certificates; the name of that file (``alice`` for
``alice.key``) becomes the connection's ZeroMQ ``User-Id``, which every
request and subscription from it carries.  A refused client gets no
connection at all: ZeroMQ drops the handshake, so it sees a timeout and
learns nothing.  The allow-list is swapped in place on SIGHUP.

Seeing: ``[access]`` rules give a principal (a CURVE client's name, or a unix
socket peer's user and groups from SO_PEERCRED, which libzmq passes as the
``Peer-Address`` metadata ``...:uid:gid:pid``) a :class:`View`: allow and
deny globs on map names.  The request server filters ``list``, ``status``
and ``recent`` through it, and answers ``get`` of a map outside it exactly
as it answers a map that does not exist (:func:`hidden`), so a denial never
confirms that a map exists.  See docs/operations.md#who-sees-which-maps.
"""

from __future__ import annotations

import contextlib
import fnmatch
import grp
import logging
import os
import pwd
from collections.abc import Callable, Iterable

import attrs
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ..wire.curve import EVENTS_ZAP_DOMAIN, ZAP_DOMAIN
from . import errors
from .config import AccessConfig

log = logging.getLogger("pymap.access")


class Authenticator(ThreadAuthenticator):
    """The ZAP handler of both sockets: CURVE keys on tcp://, and the events gate.

    The request socket's domain is ``pymap``, the event socket's
    ``pymap-events``.  A peer whose access rule restricts it to some maps is
    refused on the event socket (over CURVE and over ipc://, by its uid): one
    XPUB serves every subscriber, and a subscription to a prefix such as
    ``map:`` cannot be cut down to the maps a rule allows, so such a peer gets
    no event stream rather than a filtered one (docs/operations.md).
    """

    def __init__(self, ctx: zmq.Context, allowed: dict[bytes, str], policy: Policy):
        super().__init__(ctx, log=logging.getLogger("pymap.zap"))
        self.allowed = allowed  # Z85 public key -> client name; replaced whole on reload
        self.policy = policy
        self.refused = 0  # unknown keys
        self.events_refused = 0  # restricted peers on the event socket
        self._reported: set[bytes | str] = set()

    def start(self) -> None:
        super().start()
        for domain in (ZAP_DOMAIN, EVENTS_ZAP_DOMAIN):
            self.configure_curve_callback(domain.decode(), self)

    def update(self, allowed: dict[bytes, str], policy: Policy) -> None:
        self.allowed, self.policy = allowed, policy
        self._reported.clear()

    def _once(self, what: bytes | str) -> bool:
        if what in self._reported or len(self._reported) >= 1000:
            return False
        self._reported.add(what)
        return True

    def _restricted_on_events(self, who: Principal, label: str) -> bool:
        if self.policy.view_for(who) is None:
            return False
        self.events_refused += 1
        if self._once(label):
            log.warning("refused %s on the event socket: its access rule limits the maps it "
                        "sees, and events are not filtered per client", label,
                        extra={"peer": label})
        return True

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's credentials provider hook: is this Z85 public key allowed here?"""
        name = self.allowed.get(key)
        if name is None:
            self.refused += 1
            if self._once(key):
                log.warning("refused a CURVE client with an unknown key %s", key.decode(),
                            extra={"client_key": key.decode()})
            return False
        if domain == EVENTS_ZAP_DOMAIN.decode():
            return not self._restricted_on_events(Principal(client=name), f"client {name}")
        return True

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # ipc:// peers come with the NULL mechanism and "...:uid:gid:pid" as their address.
        if len(msg) >= 6 and msg[5] == b"NULL" and msg[2] == EVENTS_ZAP_DOMAIN:
            who = Principal.from_metadata("", msg[3].decode(errors="replace"))
            if self._restricted_on_events(who, f"uid {who.uid}"):
                self._send_zap_reply(msg[1], b"400", b"NO ACCESS")
                return
        await super().handle_zap_message(msg)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.allowed.get(z85.encode(client_public_key), "")


# --- who sees which maps -------------------------------------------------------------


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


@attrs.frozen
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
    """An engine status showing only what ``view`` may see (watched maps, exact topics)."""
    def shown(prefix: str) -> bool:
        if prefix == "hb":
            return True
        return (prefix.startswith("map:") and prefix.endswith("\0")
                and view.sees_name(prefix[len("map:"):-1]))

    return attrs.evolve(status, watched=[w for w in status.watched if view.sees_name(w.name)],
                        subscriptions={p: n for p, n in status.subscriptions.items() if shown(p)})
