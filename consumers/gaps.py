"""Which stream messages are new, which were missed, and when state must be re-read.

The bookkeeping half of the Clone pattern (zguide ch. 5), kept apart from the
sockets and the hold-on waiting in :mod:`consumers.subscriber` so that it can
be reasoned about, and tested, with plain numbers.  Every map (topic) has its
own ``topic_seq``; the tracker remembers the last one reflected per topic and
answers, for each message or heartbeat, "in order", "a gap of N before it", or
"already reflected" (in a snapshot read after the message was sent).  A new
daemon epoch means every sequence restarted: the caller must resync.

It owns no policy: what a gap leads to (a ``lost`` event, a report to the
daemon, a snapshot) is the stream's decision, told back through
:meth:`SequenceTracker.resynced` and :meth:`SequenceTracker.forget`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

__all__ = ["Gap", "SequenceTracker"]


@attrs.frozen
class Gap:
    """``missed`` messages of topic ``name`` never arrived, ``first`` the first of them."""

    name: str
    first: int
    missed: int


class SequenceTracker:
    """The last ``topic_seq`` reflected per topic, for topics ``matches`` accepts.

    A topic is unknown until a heartbeat, a message or a snapshot tells its
    position; the first thing heard of it is then taken as in order.
    """

    def __init__(self, matches: Callable[[str], bool]):
        self._matches = matches
        self._last: dict[str, int] = {}
        self.epoch: str | None = None

    def last(self, name: str) -> int | None:
        """The last ``topic_seq`` of ``name`` reflected so far (None: not known yet)."""
        return self._last.get(name)

    def tracks(self, name: str) -> bool:
        return self._matches(name)

    def new_epoch(self, epoch: str) -> bool:
        """Whether ``epoch`` is a restarted daemon's; if so every topic starts afresh.

        The first epoch heard is not a restart (``epoch`` was None)."""
        if epoch == self.epoch:
            return False
        restarted = self.epoch is not None
        self.epoch = epoch
        if restarted:
            self._last.clear()
        return restarted

    def baseline(self, topics: Mapping[str, int]) -> None:
        """Take a heartbeat's positions as the start, without a snapshot: only what
        comes after them is new."""
        for name, tseq in topics.items():
            if self._matches(name):
                self._last.setdefault(name, tseq)

    def heartbeat(self, topics: Mapping[str, int]) -> list[Gap]:
        """The gaps a heartbeat reveals: topics whose ``topic_seq`` moved past the
        last one seen (the messages in between never came)."""
        gaps = []
        for name, tseq in topics.items():
            if not self._matches(name):
                continue
            last = self._last.get(name)
            if last is None:
                self._last[name] = tseq
            elif tseq > last:
                gaps.append(Gap(name, last + 1, tseq - last))
        return gaps

    def gap_before(self, name: str, first: int) -> Gap | None:
        """The gap before a message whose first ``topic_seq`` is ``first``, if any.

        Nothing moves: the caller resyncs or forgets the topic, then calls :meth:`take`."""
        last = self._last.get(name)
        if last is not None and first > last + 1:
            return Gap(name, last + 1, first - last - 1)
        return None

    def take(self, name: str, first: int, count: int) -> int | None:
        """Record a message of ``count`` events from ``topic_seq`` ``first``.

        Returns the index of its first event not yet reflected (0: all new), or
        None when every one of them already is (the message changes nothing)."""
        last = self._last.get(name)
        if last is not None and first + count - 1 <= last:
            return None
        self._last[name] = first + count - 1
        return 0 if last is None else max(0, last + 1 - first)

    def resynced(self, name: str, seq: int) -> None:
        """A snapshot of ``name`` reflects everything up to ``seq``."""
        self._last[name] = seq

    def forget(self, name: str) -> None:
        """Nothing to resync ``name`` against: carry on from whatever comes next."""
        self._last.pop(name, None)
