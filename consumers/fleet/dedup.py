"""Which (node, epoch, seq) a fleet reader has already seen, in a bounded window.

JetStream drops a re-sent message only when its id is one it stored within
the stream's ``duplicate_window``.  Two cases store an event twice all the
same: a re-send after the window passed, and a batched re-send cut
differently from the original (``<node>.<epoch>.257-300`` against
``<node>.<epoch>.281-300``: different ids, the same events 281..300), which
deterministic cutting (consumers/export/grouping.py) makes rare but cannot
rule out (a rate limit dropping differently, a power loss losing a cut).  So
the reader remembers, per (node, epoch), the runs of sequence numbers it has
seen, and drops an event inside one of them.  That is exact (an event is
dropped only if that very seq of that node and epoch was seen) and bounded:
``max_runs`` runs per (node, epoch), the lowest forgotten first, and
``max_keys`` (node, epoch) pairs, the least recently seen forgotten first.
An event older than what the window remembers passes as new.
"""

from __future__ import annotations

import bisect
import collections


class SeqRuns:
    """Disjoint, sorted runs ``[start, end]`` of sequence numbers seen."""

    __slots__ = ("ends", "max_runs", "starts")

    def __init__(self, max_runs: int):
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.max_runs = max_runs

    def add(self, first: int, last: int) -> list[tuple[int, int]]:
        """Note ``first``..``last`` as seen; return the sub-runs of it seen before."""
        starts, ends = self.starts, self.ends
        hi = bisect.bisect_right(starts, last + 1)  # runs starting at or before last + 1
        lo = hi
        while lo > 0 and ends[lo - 1] >= first - 1:  # ... and ending at or after first - 1
            lo -= 1
        seen = [(max(first, starts[k]), min(last, ends[k])) for k in range(lo, hi)
                if starts[k] <= last and ends[k] >= first]
        if lo < hi:
            starts[lo:hi] = [min(first, starts[lo])]
            ends[lo:hi] = [max(last, ends[hi - 1])]
        else:
            starts.insert(lo, first)
            ends.insert(lo, last)
        if len(starts) > self.max_runs:
            del starts[0], ends[0]
        return seen

    def seen(self, seq: int) -> bool:
        i = bisect.bisect_right(self.starts, seq) - 1
        return i >= 0 and self.ends[i] >= seq


class SeenWindow:
    """Per (node, epoch): the sequence numbers seen lately (see the module doc)."""

    def __init__(self, max_runs: int = 4096, max_keys: int = 100_000):
        self.max_runs = max_runs
        self.max_keys = max_keys
        self._keys: collections.OrderedDict[tuple[str, str], SeqRuns] = \
            collections.OrderedDict()

    def runs(self, node: str, epoch: str) -> SeqRuns:
        key = (node, epoch)
        runs = self._keys.get(key)
        if runs is None:
            runs = self._keys[key] = SeqRuns(self.max_runs)
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        return runs
