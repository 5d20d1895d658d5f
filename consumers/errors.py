"""What can go wrong talking to the daemon, as the client library raises it.

The daemon's own refusals carry its wire code (``schema.ErrorReply``); the
library adds ``unavailable`` (no daemon, no answer in time, no heartbeat
within ``max_wait``) and ``bad_reply`` (a reply this client cannot read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from watcher.wire.schema import MapInfo


class DaemonError(Exception):
    """The daemon refused a request; ``code`` is one of schema.ErrorReply's codes."""

    def __init__(self, code: str, message: str, candidates: list[MapInfo] | None = None):
        super().__init__(message)
        self.code = code
        self.candidates = candidates or []


class DaemonUnavailable(DaemonError):
    """No daemon at the endpoint, or it did not answer in time."""

    def __init__(self, message: str):
        super().__init__("unavailable", message)
