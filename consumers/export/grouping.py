"""Several records per message, cut where a re-send will cut them again.

An output that packs records into messages (``nats://...?batch=N``) names each
message by its records (``<node>.<epoch>.<first>-<last>``), and the receiver
de-duplicates re-sends by that name.  That works only if a restarted exporter,
re-sending from its checkpoint, cuts the same records into the same messages.
So message boundaries are a function of the records alone, never of how the
delivery buffer happened to be filled:

- a message holds consecutive sequence numbers of one node, epoch, map and
  action; any other record (another map or action, a gap in the sequence, a
  record the exporter made itself, seq 0) ends it;
- a message never crosses a multiple of ``size`` (seq ``k*size`` starts one);
- a payload that holds a newline travels alone (lines are the packing).

The delivery layer hands an output only whole messages: it holds back a
trailing message that may still grow, for ``linger`` seconds at most.  When
the stream pauses that long, the message is cut where it stands, an
*accidental* cut; it is written to the checkpoint file before the message goes
out (:meth:`Checkpoint.cut`), so a restarted exporter cuts there too.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from .record import ExportRecord

CutKey = tuple[str, int]  # (epoch, seq) after which a message was cut by lingering


def packable(r: ExportRecord) -> bool:
    """A record that may share a message: a daemon event whose payload is one line."""
    return r.seq > 0 and b"\n" not in r.payload


@attrs.define
class Grouping:
    size: int
    linger: float = 0.05
    cuts: dict[CutKey, None] = attrs.Factory(dict)  # shared with the checkpoint

    def continues(self, prev: ExportRecord, r: ExportRecord) -> bool:
        """``r`` belongs in the message that ``prev`` is the last record of (so far)."""
        return (r.seq == prev.seq + 1 and r.seq % self.size != 0 and r.map == prev.map
                and r.action == prev.action and r.epoch == prev.epoch and r.node == prev.node
                and packable(prev) and packable(r) and (prev.epoch, prev.seq) not in self.cuts)

    def closed(self, last: ExportRecord) -> bool:
        """No record can follow ``last`` in its message, whatever comes next."""
        return (not packable(last) or (last.seq + 1) % self.size == 0
                or (last.epoch, last.seq) in self.cuts)

    def open_tail(self, records: Sequence[ExportRecord]) -> int:
        """How many records at the end of ``records`` form a message that may still grow."""
        if not records or self.closed(records[-1]):
            return 0
        n = 1
        while n < len(records) and self.continues(records[-n - 1], records[-n]):
            n += 1
        return n

    def split(self, records: Sequence[ExportRecord]) -> list[Sequence[ExportRecord]]:
        """``records`` (whole messages, in order) cut into messages."""
        out: list[Sequence[ExportRecord]] = []
        start = 0
        for i in range(1, len(records)):
            if not self.continues(records[i - 1], records[i]):
                out.append(records[start:i])
                start = i
        if records:
            out.append(records[start:])
        return out
