"""The unit every format produces and every output carries, and its event id.

The event id names one event for every receiver, in every format (ECS
``event.id``, OCSF ``metadata.uid``, CEF ``externalId``, the JSON lines'
``id``, the syslog structured-data parameter ``id``, the NATS message id):
``<node>.<epoch>.<seq>`` for an event of the daemon (the daemon's epoch
changes at every start and ``seq`` numbers its events, so the id is unique for
ever); ``<node>.<epoch>.<covers>`` for a record the exporter or the client
library made itself (seq 0), where ``covers`` says what the record stands for
(:func:`covers`), so that the same record made again (re-sent after a receiver
outage, or made again by an exporter restarted from its checkpoint) has the
same id and two different ones never share one.  docs/export.md ("Event ids")
documents it for users.
"""

from __future__ import annotations

import hashlib
from itertools import repeat

import attrs
import numpy as np

from ..events import Event

RECORD_OVERHEAD = 64  # bytes counted per record beside its payload (the object itself)


def event_id(node: str, epoch: str, seq: int | str, covers: str = "") -> str:
    """``<node>.<epoch>.<seq>``, or ``<node>.<epoch>.<covers>`` for a record the exporter
    made (seq 0).  ``seq`` may be a string: the batch renderer passes a marker."""
    return f"{node}.{epoch}.{covers or seq}"


def digest(*parts: object) -> str:
    """A short stable digest of ``parts`` (16 hex digits)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


def covers(event: Event) -> str:
    """What a record without a daemon seq stands for, as the tail of its id ("" when it
    has a seq).  Always starts with a letter, so no id of a made record looks like a seq.

    - snapshot rows: ``snapshot.<map>.<topic_seq>.<digest>``: the row of one key in the
      map's state as of ``topic_seq``, the digest over action, key, values and reason;
    - ``lost``: ``lost.<map>.<first>-<last>``, the map's topic seqs that never arrived;
    - ``resync``: ``resync.<map>.<topic_seq>`` for one map re-read as of ``topic_seq``,
      ``resync`` alone for the re-read of everything at the start of a daemon epoch;
    - ``dropped``: :func:`covers_dropped`, from what the exporter dropped;
    - anything else (``stalled``, ``resumed``): ``<action>.<digest>`` over its time and
      reason: a moment, not events; stable for re-sends of the record itself.
    """
    if event.seq:
        return ""
    action, name = event.action, event.map.name
    if event.snapshot:
        return (f"snapshot.{name}.{event.topic_seq}."
                f"{digest(action, event.reason, event.key, event.value, event.old_value)}")
    if action == "lost":
        return f"lost.{name}.{event.topic_seq}-{event.topic_seq + max(event.missed, 1) - 1}"
    if action == "resync":
        return f"resync.{name}.{event.topic_seq}" if name else "resync"
    return f"{action}.{digest(event.time, event.reason, name, event.missed)}"


def covers_dropped(first_seq: int, last_seq: int, first_id: str, count: int) -> str:
    """A ``dropped`` record's tail: ``dropped.<first>-<last>``, the daemon seqs it
    covers; when its first record had no seq (snapshot rows), a digest of that record's
    id and the count instead."""
    if first_seq:
        return f"dropped.{first_seq}-{last_seq}"
    return f"dropped.{digest(first_id, count)}"


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
    name ("" for stream-wide records), the ``action``, the event ``time``
    (unix seconds) and, for records with seq 0, what they stand for
    (``covers``).  ``id`` is the event id the payload carries.
    """

    node: str
    epoch: str
    seq: int
    map: str
    action: str
    time: float
    payload: bytes
    covers: str = ""

    @property
    def id(self) -> str:
        return event_id(self.node, self.epoch, self.seq, self.covers)

    @property
    def size(self) -> int:
        """Bytes this record holds in a delivery buffer (payload plus a fixed overhead)."""
        return len(self.payload) + RECORD_OVERHEAD


@attrs.frozen(slots=True)
class RecordRun:
    """The records of one map events message, carried as one object.

    Why: an :class:`ExportRecord` per event cost about as much as rendering the
    event (its constructor, its ``size`` read at every step of delivery), and an
    exporter gets thousands of events per message.  A run keeps the message's
    payloads as the lines of one buffer, ``text`` (each payload followed by a
    newline; no payload holds one), as the batch renderer makes them, with their
    sequence numbers and actions beside them and its buffer size computed once.
    The delivery buffer, the checkpoint and the line outputs (file, stdout) handle
    a message as one item and write ``text`` as it is; :meth:`records` gives the
    very records the per-event path makes, for outputs that frame each record
    themselves.  Every record of a run is a daemon event (seq > 0) of one node,
    epoch and map, at one time.

    Build it with :meth:`of` (or :meth:`of_payloads`), which compute ``size`` and
    ``width``.
    """

    node: str
    epoch: str
    map: str
    time: float
    seqs: list[int]
    actions: list[str]
    text: bytes
    size: int  # bytes it holds in a delivery buffer, as its records would count
    width: int  # every line's length (newline included) when they are all one length, or 0

    @classmethod
    def of(cls, node: str, epoch: str, map_name: str, time: float, seqs: list[int],
           actions: list[str], text: bytes) -> RecordRun:
        n = len(seqs)
        size = len(text) + (RECORD_OVERHEAD - 1) * n  # payloads: ``text`` less a newline each
        # The renderer's lines are usually all one width: then cuts are arithmetic.  The n
        # newlines of ``text`` are at every width-th byte exactly when its first line's
        # width divides it into n lines that all end there (a C-level strided slice).
        width = text.find(b"\n") + 1
        if not (n and len(text) == n * width and text[width - 1::width] == b"\n" * n):
            width = 0
        return cls(node, epoch, map_name, time, seqs, actions, text, size, width)

    @classmethod
    def of_payloads(cls, node: str, epoch: str, map_name: str, time: float, seqs: list[int],
                    actions: list[str], payloads: list[bytes]) -> RecordRun:
        """From separate payloads (none may hold a newline)."""
        text = b"\n".join(payloads) + b"\n" if payloads else b""
        return cls.of(node, epoch, map_name, time, seqs, actions, text)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def last_seq(self) -> int:
        return self.seqs[-1]

    @property
    def payloads(self) -> list[bytes]:
        return self.text.split(b"\n")[:-1]

    def records(self) -> list[ExportRecord]:
        """The run as the records the per-event path makes (byte for byte)."""
        n = len(self.seqs)
        return list(map(ExportRecord, repeat(self.node, n), repeat(self.epoch, n), self.seqs,
                        repeat(self.map, n), self.actions, repeat(self.time, n),
                        self.payloads))

    def chunks(self, first: int, size: int) -> list[RecordRun]:
        """The run cut into runs of about ``first`` bytes, then ``size`` bytes each (a
        cut ends the record that holds the byte budget; at least one record each): a
        delivery batch stays near its byte budget when a message is larger.  One pass
        over ``text`` (a find and a count per cut) and one copy of it, however many
        cuts, and no object per record."""
        text, seqs, actions = self.text, self.seqs, self.actions
        scale = len(text) / max(self.size, 1)  # text bytes per buffer byte
        ends = self._line_ends()
        out: list[RecordRun] = []
        at = done = 0
        budget = first
        while done < len(seqs):
            target = at + max(int(budget * scale), 1)  # the cut ends the line holding it
            k = min(max(int(np.searchsorted(ends, target, "left")) + 1 - done, 1),
                    len(seqs) - done)
            end = int(ends[done + k - 1])
            out.append(RecordRun.of(self.node, self.epoch, self.map, self.time,
                                    seqs[done:done + k], actions[done:done + k], text[at:end]))
            at, done, budget = end, done + k, size
        return out

    def _line_ends(self) -> np.ndarray:
        """Where each line ends (the offset after its newline): arithmetic when the lines
        are one width, else one vectorised pass over ``text``."""
        if self.width:
            return np.arange(1, len(self.seqs) + 1, dtype=np.int64) * self.width
        return np.flatnonzero(np.frombuffer(self.text, np.uint8) == ord("\n")) + 1
