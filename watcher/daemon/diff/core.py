"""What both change-detection engines share: the kept state of a watched map
(:class:`EngineSnapshot`), the changes of one poll (:class:`Delta`), how a delta
is put together (:func:`assemble`), and the first-poll rule.

Why one module: the user-space engine (:mod:`.userspace`) and the in-kernel
engine's daemon side (:mod:`.inkernel`) must make the same events from the same
changes, and a state one engine left must be one the other can carry on from
(a map falls back from the in-kernel engine to user space when a walk fails).
Both therefore build their deltas here, order keys with the same dtype, and
ask the same question on a map's first poll.

State per watched entry is its key and value bytes, plus at most 4: in-kernel, a sort
index; in user space, once a poll patched it, its place in the last dump, often as
runs (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import enum
import threading
from collections.abc import Iterator

import attrs
import numpy as np


class Action(enum.IntEnum):
    ADDED = 0
    UPDATED = 1
    REMOVED = 2


def key_dtype(key_size: int) -> np.dtype:
    """The dtype keys are compared and sorted as.

    Unsigned integers sort much faster than opaque bytes; any consistent order
    will do, as long as both engines use the same one (a state one engine sorted
    is searched by the other).
    """
    if key_size in (1, 2, 4, 8):
        return np.dtype(f"u{key_size}")
    return np.dtype((np.void, key_size))


@attrs.frozen
class Patch:
    """What one dump changed in a kept state (:mod:`.inplace`), applied in one step.

    ``rows`` get ``values`` (updated entries); ``removed`` are the rows the dump did not
    show (ascending); ``add_keys`` (in key order, each once) and ``add_values`` are new;
    ``dump_rows`` holds each dump entry's row, ``-1 - i`` for ``add_keys[i]`` (int32,
    changed by the patch).
    """

    rows: np.ndarray
    values: np.ndarray
    removed: np.ndarray
    add_keys: np.ndarray
    add_values: np.ndarray
    dump_rows: np.ndarray


@attrs.frozen
class DumpRuns:
    """The rows of a dump's entries as runs: entry ``starts[j] + i`` is row ``rows[j] + i``.

    Why: a patch keeps rows in their places, so after it most dump entries are in the
    row after the one before them (a 1M-entry map changed in 10,000 places: some 30,000
    runs, 0.2 MB, against 4 MB for a row per entry).  Used when it is a quarter of the
    plain array or less (:func:`dump_order_of`).
    """

    starts: np.ndarray  # dump positions where a run starts: ascending, the first 0
    rows: np.ndarray
    length: int  # dump entries

    @property
    def nbytes(self) -> int:
        return self.starts.nbytes + self.rows.nbytes

    def take(self, start: int, stop: int) -> np.ndarray:
        """Rows of dump entries ``start`` to ``stop`` (int32), expanded a slice at a time."""
        out = np.empty(stop - start, dtype=np.int32)
        for lo in range(start, stop, _EXPAND):
            at = np.arange(lo, min(lo + _EXPAND, stop))
            run = np.searchsorted(self.starts, at, side="right") - 1
            out[lo - start:lo - start + len(at)] = self.rows[run] + (at - self.starts[run])
        return out


_EXPAND = 1 << 16  # dump entries expanded at a time: temporaries of half a MB


def dump_order_of(rows: np.ndarray, n: int) -> np.ndarray | DumpRuns | None:
    """The smallest form of ``rows`` (each dump entry's row, int32; ``n`` rows): None when
    it is 0 .. n - 1, runs when they are at most a quarter of the array, else the array."""
    if not len(rows):
        return None if n == 0 else rows
    starts = np.flatnonzero(np.diff(rows) != 1) + 1
    if not len(starts) and len(rows) == n and rows[0] == 0:
        return None
    if (len(starts) + 1) * 8 > rows.nbytes // 4:
        return rows
    starts = np.concatenate([np.zeros(1, dtype=starts.dtype), starts]).astype(np.int32)
    return DumpRuns(starts, rows[starts], len(rows))


@attrs.define(eq=False)
class EngineSnapshot:
    """One map's entries as an engine keeps them: keys and values back to back, one row
    per entry, in the kernel's order (a first dump), in key order (in-kernel), or in
    whatever order in-place patches left them (user space, :mod:`.inplace`).

    Why patched in place: a changed poll that built the new state beside the old one held
    a 1M-entry map twice (issue 20: the daemon's peak).  A state is therefore changed by
    the poll that owns it, unless a reader holds it: the metrics scrape (another thread)
    takes a :meth:`lease`, and a snapshot reply, which streams views of the buffers
    across awaits, gets a state that is :meth:`shared` for good.  A poll that finds its
    state leased or shared patches a copy (:meth:`begin_patch`), and the copy is kept.

    Named for its side: consumers have their own snapshot, of what a client holds.
    """

    keys: bytes | bytearray
    values: bytes | bytearray
    count: int
    key_size: int
    stride: int
    order: np.ndarray | None = None  # argsort of the keys, computed when first needed
    # Row of each entry of the last dump, in the dump's order (int32, or as runs); None:
    # the rows are in the dump's order.  Lets an unchanged poll compare chunk by chunk.
    dump_order: np.ndarray | DumpRuns | None = None
    generation: int = 0  # in-place patches so far: a reader's cache of the rows is stale
    _guard: threading.Condition = attrs.field(factory=threading.Condition, init=False,
                                              repr=False)
    _readers: int = attrs.field(default=0, init=False)
    _writing: bool = attrs.field(default=False, init=False)
    _shared: bool = attrs.field(default=False, init=False)

    @contextlib.contextmanager
    def lease(self) -> Iterator[EngineSnapshot]:
        """Read the rows (from any thread): no poll patches them meanwhile (it patches a
        copy), and a patch under way is waited for."""
        with self._guard:
            self._guard.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield self
        finally:
            with self._guard:
                self._readers -= 1

    def share(self) -> EngineSnapshot:
        """Hand the state out for good (a snapshot reply's views): never patched again."""
        with self._guard:
            self._shared = True
        return self

    def begin_patch(self) -> bool:
        """Take the state to patch it in place; False when a reader holds it, it was
        shared, or its buffers are immutable ``bytes``.  Ends with :meth:`end_patch`."""
        with self._guard:
            if (self._readers or self._shared or not isinstance(self.keys, bytearray)
                    or not isinstance(self.values, bytearray)):
                return False
            self._writing = True
            return True

    def end_patch(self) -> None:
        with self._guard:
            self._writing = False
            self.generation += 1
            self._guard.notify_all()

    def patched(self, patch: Patch) -> EngineSnapshot:
        """This state with ``patch`` applied: itself, patched in place, or (when
        :meth:`begin_patch` refuses) a patched copy, which is then the state to keep."""
        if not self.begin_patch():
            return EngineSnapshot(bytearray(self.keys), bytearray(self.values), self.count,
                                  self.key_size, self.stride).patched(patch)
        try:
            self._apply(patch)
        finally:
            self.end_patch()
        return self

    def _apply(self, patch: Patch) -> None:
        """Updated rows get their values; added entries take removed rows' places, then
        go at the end; rows left past the end move into the remaining holes."""
        n, ks, stride = self.count, self.key_size, self.stride
        fill = min(len(patch.add_keys), len(patch.removed))
        new_n = n - len(patch.removed) + len(patch.add_keys)
        slots = np.concatenate([patch.removed[:fill],
                                np.arange(n, n + len(patch.add_keys) - fill)])
        holes = patch.removed[fill:]  # sorted: flatnonzero
        to = holes[holes < new_n]
        tail = np.setdiff1d(np.arange(new_n, n), holes, assume_unique=True)  # live, past the end
        add_rows = np.ascontiguousarray(patch.add_keys).view(np.uint8).reshape(-1, ks)
        keys, values = self.key_rows(), self.value_rows()
        values[patch.rows] = patch.values
        keys[to], values[to] = keys[tail], values[tail]
        keys[slots[:fill]], values[slots[:fill]] = add_rows[:fill], patch.add_values[:fill]
        del keys, values  # numpy's views pin the buffers' size
        if new_n < n:
            del self.keys[new_n * ks:], self.values[new_n * stride:]
        elif new_n > n:
            self.keys += add_rows[fill:].tobytes()
            self.values += patch.add_values[fill:].tobytes()
        self.count = new_n
        dump = patch.dump_rows  # rows as the patch left them: added entries' slots, moves
        added = dump < 0
        dump[added] = slots[-1 - dump[added]]
        if len(to):
            moved = dump >= new_n
            dump[moved] = to[np.searchsorted(tail, dump[moved])]
        self.dump_order = dump_order_of(dump, new_n)
        self.order = None

    @classmethod
    def empty(cls, key_size: int, stride: int) -> EngineSnapshot:
        return cls(b"", b"", 0, key_size, stride)

    def key_array(self) -> np.ndarray:
        return np.frombuffer(self.keys, dtype=key_dtype(self.key_size), count=self.count)

    def value_rows(self) -> np.ndarray:
        return np.frombuffer(self.values, dtype=np.uint8).reshape(self.count, self.stride)

    def value_words(self) -> np.ndarray:
        """Values as rows of the widest unsigned words dividing the stride (for comparing)."""
        width = next(w for w in (8, 4, 2, 1) if self.stride % w == 0)
        return np.frombuffer(self.values, dtype=f"u{width}").reshape(
            self.count, self.stride // width)

    def sorted_order(self) -> np.ndarray:
        """The argsort of the keys (int32), computed once.

        Not a stable sort: a dump holds each key once, and introsort sorts the index
        array in place where timsort takes a buffer of half of it (4 MB more at the
        moment a poll holds two states of a 1M-entry map).
        """
        if self.order is None:
            self.order = np.argsort(self.key_array(), kind="quicksort").astype(np.int32)
        return self.order

    def dump_length(self) -> int:
        """Entries of the last dump (rows, unless it showed a key twice)."""
        order = self.dump_order
        return self.count if order is None else (
            order.length if isinstance(order, DumpRuns) else len(order))

    def dump_rows(self, start: int, stop: int) -> np.ndarray:
        """The rows of the last dump's entries ``start`` to ``stop``."""
        order = self.dump_order
        if order is None:
            return np.arange(start, stop, dtype=np.int32)
        return order.take(start, stop) if isinstance(order, DumpRuns) else order[start:stop]

    def key_rows(self) -> np.ndarray:
        return np.frombuffer(self.keys, dtype=np.uint8).reshape(self.count, self.key_size)

    def nbytes(self) -> int:
        return (len(self.keys) + len(self.values)
                + sum(a.nbytes for a in (self.order, self.dump_order) if a is not None))


@attrs.frozen
class Delta:
    """``count`` events: one action byte each, keys, values and old values back to back.

    ``values`` holds the new value (added, updated) or the last value (removed);
    ``old_values`` the previous value for updated entries and zeros otherwise.
    """

    actions: bytes | bytearray
    keys: bytes | bytearray
    values: bytes | bytearray
    old_values: bytes | bytearray
    count: int

    def __len__(self) -> int:
        return self.count


Rows = tuple[np.ndarray, ...]  # (keys, values) or, for updates, (keys, values, old values)


def assemble(stride: int, added: Rows | None, updated: Rows | None,
             removed: Rows | None) -> Delta:
    """Concatenate (keys, values[, old values]) row arrays of each action into one Delta:
    added, then updated, then removed (the order of one poll's events, both engines)."""
    parts_k, parts_v, parts_o, actions = [], [], [], []
    for action, rows in ((Action.ADDED, added), (Action.UPDATED, updated),
                         (Action.REMOVED, removed)):
        if rows is None or not len(rows[0]):
            continue
        keys, values = rows[0], rows[1]
        parts_k.append(keys.tobytes())
        parts_v.append(values.tobytes())
        parts_o.append(rows[2].tobytes() if action is Action.UPDATED
                       else bytes(len(keys) * stride))
        actions.append(bytes([action]) * len(keys))
    act = b"".join(actions)
    return Delta(act, b"".join(parts_k), b"".join(parts_v), b"".join(parts_o), len(act))


def snapshot_as_added(snap: EngineSnapshot) -> Delta:
    """Every entry of ``snap`` as an ``added`` event (a map created while watched).

    Copies: the stream sends a delta's buffers without copying them, and the state
    is patched in place by later polls."""
    return Delta(bytes([Action.ADDED]) * snap.count, bytes(snap.keys), bytes(snap.values),
                 bytes(len(snap.values)), snap.count)


def first_poll_is_silent(prev: EngineSnapshot | None, report_all: bool) -> bool:
    """The first-poll rule: a map's first poll (no kept state yet) only records its
    state and makes no events, unless ``report_all`` (a map created while watched:
    its entries are new, so each is an ``added`` event)."""
    return prev is None and not report_all
