"""What both change-detection engines share: the kept state of a watched map
(:class:`EngineSnapshot`), the changes of one poll (:class:`Delta`), how a delta
is put together (:func:`assemble`), and the first-poll rule.

Why one module: the user-space engine (:mod:`.userspace`) and the in-kernel
engine's daemon side (:mod:`.inkernel`) must make the same events from the same
changes, and a state one engine left must be one the other can carry on from
(a map falls back from the in-kernel engine to user space when a walk fails).
Both therefore build their deltas here, order keys with the same dtype, and
ask the same question on a map's first poll.

State per watched entry is its key and value bytes plus a 4-byte sort index:
``key_size + value_stride + 4`` bytes (docs/architecture.md).
"""

from __future__ import annotations

import enum

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


@attrs.define(eq=False)
class EngineSnapshot:
    """One dump of a map as an engine keeps it: keys and values back to back,
    in the kernel's order (user space) or in key order (in-kernel).

    Named for its side: consumers have their own snapshot, of what a client holds.
    """

    keys: bytes | bytearray
    values: bytes | bytearray
    count: int
    key_size: int
    stride: int
    order: np.ndarray | None = None  # argsort of the keys, computed when first needed

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

    def nbytes(self) -> int:
        return len(self.keys) + len(self.values) + (self.order.nbytes if self.order is not None else 0)


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
    """Every entry of ``snap`` as an ``added`` event (a map created while watched)."""
    return Delta(bytes([Action.ADDED]) * snap.count, snap.keys, snap.values,
                 bytes(len(snap.values)), snap.count)


def first_poll_is_silent(prev: EngineSnapshot | None, report_all: bool) -> bool:
    """The first-poll rule: a map's first poll (no kept state yet) only records its
    state and makes no events, unless ``report_all`` (a map created while watched:
    its entries are new, so each is an ``added`` event)."""
    return prev is None and not report_all
