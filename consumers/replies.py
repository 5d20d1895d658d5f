"""Reading the daemon's replies, the same way for the async client and one-shot calls."""

from __future__ import annotations

from watcher.wire import schema

from .errors import DaemonError


def reply_to(req: int, frames: list[bytes], any_req: bool = False):
    """``(message, binary frames)`` if ``frames`` answer request ``req``, else None.

    Replies to requests given up on are skipped (None).  Stream messages
    replayed by ``recent`` carry no ``req``: ``any_req`` accepts them.  An
    ``error`` reply raises DaemonError with the daemon's code.
    """
    try:
        message = schema.decode(frames[0])
    except schema.WireError as e:
        raise DaemonError("bad_reply", f"daemon sent {e}") from None
    if getattr(message, "req", None) != req and not (any_req and not hasattr(message, "req")):
        return None
    if isinstance(message, schema.ErrorReply):
        raise DaemonError(message.code, message.message, message.candidates)
    return message, frames[1:]


def expect(message, kind: type):
    """``message`` if it is a ``kind``; a bad_reply DaemonError otherwise."""
    if not isinstance(message, kind):
        raise DaemonError("bad_reply", f"expected {kind.__name__}, got {type(message).__name__}")
    return message
