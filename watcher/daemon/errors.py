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
    """

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, candidates: list[schema.MapInfo] | None = None,
                 req: int | None = None):
        super().__init__(message)
        self.candidates = candidates or []
        self.req = req


class BadRequest(RequestError):
    code = "bad_request"


class VersionMismatch(RequestError):
    code = "version"


class MapNotFound(RequestError):
    code = "not_found"


class AmbiguousSelector(RequestError):
    code = "ambiguous"


class MapNotDumpable(RequestError):
    code = "not_dumpable"


class PermissionDenied(RequestError):
    code = "permission"


class MapVanished(RequestError):
    code = "vanished"


class InternalError(RequestError):
    code = "internal"


class Busy(RequestError):
    """Refused unrun: the client has ``max_requests_in_flight`` requests unanswered."""

    code = "busy"


class RepliesDropped(RequestError):
    """Not a refusal but a notice (``req`` 0): replies to this client were dropped."""

    code = "dropped"


CODES = frozenset(c.code for c in (BadRequest, VersionMismatch, MapNotFound, AmbiguousSelector,
                                   MapNotDumpable, PermissionDenied, MapVanished, InternalError,
                                   Busy, RepliesDropped))


def error_reply(error: Exception, req: int) -> schema.ErrorReply:
    """The ``error`` reply for ``error`` raised while serving request ``req``."""
    if isinstance(error, RequestError):
        return schema.ErrorReply(error.code, str(error), list(error.candidates),
                                 req=req if error.req is None else error.req)
    return schema.ErrorReply(InternalError.code, f"internal error: {error}", req=req)
