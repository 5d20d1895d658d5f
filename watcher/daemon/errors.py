"""The daemon's request errors and their wire codes, in one place.

Anything that refuses a request raises one of these; the request server turns
it into an ``error`` reply with :func:`error_reply`, and nothing else chooses a
wire code.  Any other exception is a bug and goes out as ``internal``.  The
codes are the stable, documented ones of ``schema.ErrorReply``.
"""

from __future__ import annotations

from typing import ClassVar

from ..wire import schema


class RequestError(Exception):
    """A request the daemon refuses; ``code`` is its wire error code.

    ``req`` is set when the request's id was read although the request itself
    is refused (a schema violation, a wrong version): the reply echoes it.
    Each subclass names its code in its class line (``code=...``), which also
    enters it in :data:`CODES`.
    """

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, candidates: list[schema.MapInfo] | None = None,
                 req: int | None = None):
        super().__init__(message)
        self.candidates = candidates or []
        self.req = req

    def __init_subclass__(cls, code: str, **kwargs):
        super().__init_subclass__(**kwargs)
        if code in _codes:
            raise TypeError(f"error code {code!r} used twice")
        cls.code = code
        _codes.add(code)


_codes: set[str] = set()


class BadRequest(RequestError, code="bad_request"):
    """Malformed, too large, a reply kind, or a field out of its limits."""


class VersionMismatch(RequestError, code="version"):
    """The request's schema version is not this daemon's."""


class MapNotFound(RequestError, code="not_found"):
    """No map matches the selector (or a pin that is not a map)."""


class AmbiguousSelector(RequestError, code="ambiguous"):
    """Several maps match a name; ``candidates`` lists them."""


class MapNotDumpable(RequestError, code="not_dumpable"):
    """The map's type holds no entries to read."""


class PermissionDenied(RequestError, code="permission"):
    """The kernel refused to open the map."""


class MapVanished(RequestError, code="vanished"):
    """The map went away before a snapshot of it could be read."""


class InternalError(RequestError, code="internal"):
    """Anything else: a bug."""


class Busy(RequestError, code="busy"):
    """Refused unrun: the client has ``max_requests_in_flight`` requests unanswered."""


class RepliesDropped(RequestError, code="dropped"):
    """Not a refusal but a notice (``req`` 0): replies to this client were dropped."""


CODES = frozenset(_codes)  # every wire error code (docs/protocol.md's table lists exactly these)


def error_reply(error: Exception, req: int) -> schema.ErrorReply:
    """The ``error`` reply for ``error`` raised while serving request ``req``."""
    if isinstance(error, RequestError):
        return schema.ErrorReply(error.code, str(error), list(error.candidates),
                                 req=req if error.req is None else error.req)
    return schema.ErrorReply(InternalError.code, f"internal error: {error}", req=req)
