"""The unit every format produces and every output carries."""

from __future__ import annotations

import attrs

RECORD_OVERHEAD = 64  # bytes counted per record beside its payload (the object itself)


@attrs.frozen(slots=True)
class ExportRecord:
    """One formatted event, ready for an output.

    ``payload`` is the event in the chosen format (one JSON object, one CEF line,
    ...) without framing or trailing newline: outputs add their own framing
    (newline for files, RFC 5424 header and octet count for syslog, a NATS
    message per record).  The other fields are the event's identity, kept
    beside the payload so outputs can route and label without parsing it:
    ``node`` (host name), the daemon's ``epoch`` and daemon-wide ``seq`` (0 for
    records the exporter made itself: snapshot rows, lost, resync), the ``map``
    name ("" for stream-wide records), the ``action`` and the event ``time``
    (unix seconds).
    """

    node: str
    epoch: str
    seq: int
    map: str
    action: str
    time: float
    payload: bytes

    @property
    def size(self) -> int:
        """Bytes this record holds in a delivery buffer (payload plus a fixed overhead)."""
        return len(self.payload) + RECORD_OVERHEAD
