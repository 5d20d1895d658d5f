"""Entry deltas between two dumps of one map, computed on flat buffers.

Why numpy: a watched map is dumped every interval, and most polls change
nothing or little.  Comparing a million entries as Python objects costs
about a second and 200 MB; comparing flat buffers costs a ``memcmp`` when
nothing changed, a vectorised row compare when the keys came back in the
same order (arrays; hash maps whose values BPF programs change in place
through a lookup pointer, as counters do), and a sort + binary search
otherwise (keys came or went, or user space updated an entry, which moves
it to the front of its hash bucket).  Value rows are compared as the widest
machine words that divide the value size, in slices, to keep temporaries
small.  State per watched entry is its key and value bytes plus a
4-byte sort index: ``key_size + value_stride + 4`` bytes (docs/architecture.md).
"""

from __future__ import annotations

import enum

import attrs
import numpy as np


class Action(enum.IntEnum):
    ADDED = 0
    UPDATED = 1
    REMOVED = 2


@attrs.define(eq=False)
class Snapshot:
    """One dump of a map: keys and values back to back, in the kernel's order."""

    keys: bytes | bytearray
    values: bytes | bytearray
    count: int
    key_size: int
    stride: int
    order: np.ndarray | None = None  # argsort of the keys, computed when first needed

    @classmethod
    def empty(cls, key_size: int, stride: int) -> Snapshot:
        return cls(b"", b"", 0, key_size, stride)

    def key_array(self) -> np.ndarray:
        return np.frombuffer(self.keys, dtype=_key_dtype(self.key_size), count=self.count)

    def value_rows(self) -> np.ndarray:
        return np.frombuffer(self.values, dtype=np.uint8).reshape(self.count, self.stride)

    def value_words(self) -> np.ndarray:
        """Values as rows of the widest unsigned words dividing the stride (for comparing)."""
        width = next(w for w in (8, 4, 2, 1) if self.stride % w == 0)
        return np.frombuffer(self.values, dtype=f"u{width}").reshape(
            self.count, self.stride // width)

    def sorted_order(self) -> np.ndarray:
        if self.order is None:
            self.order = np.argsort(self.key_array(), kind="stable").astype(np.int32)
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


def _key_dtype(key_size: int) -> np.dtype:
    # Unsigned integers sort much faster than opaque bytes; any consistent order will do.
    if key_size in (1, 2, 4, 8):
        return np.dtype(f"u{key_size}")
    return np.dtype((np.void, key_size))


def _empty_delta() -> Delta:
    return Delta(b"", b"", b"", b"", 0)


def diff(prev: Snapshot, cur: Snapshot) -> Delta:
    """What changed from ``prev`` to ``cur``: added, then updated, then removed entries."""
    if prev.key_size != cur.key_size or prev.stride != cur.stride:
        raise ValueError("snapshots of differently shaped maps")
    if prev.keys == cur.keys:
        cur.order = prev.order  # same keys in the same order: the sort carries over
        if prev.values == cur.values:
            return _empty_delta()
        everyone = np.arange(cur.count)
        changed = everyone[_rows_differ(prev.value_words(), everyone, cur.value_words(), everyone)]
        pv, cv, ck = prev.value_rows(), cur.value_rows(), cur.key_array()
        return _assemble(cur.stride, None, (ck[changed], cv[changed], pv[changed]), None)

    pk, ck = prev.key_array(), cur.key_array()
    pv, cv = prev.value_rows(), cur.value_rows()
    po, co = prev.sorted_order(), cur.sorted_order()
    if prev.count:
        pks, cks = pk[po], ck[co]
        pos = np.searchsorted(pks, cks)
        np.minimum(pos, prev.count - 1, out=pos)
        found = pks[pos] == cks
        del pks, cks  # the biggest temporaries: free them before the next ones
    else:
        pos = np.zeros(cur.count, dtype=np.intp)
        found = np.zeros(cur.count, dtype=bool)
    added = co[~found]
    matched_c = co[found]
    matched_p = po[pos[found]]
    present = np.zeros(prev.count, dtype=bool)
    present[matched_p] = True
    removed = po[~present[po]]  # in key order
    changed = _rows_differ(prev.value_words(), matched_p, cur.value_words(), matched_c)
    upd_p, upd_c = matched_p[changed], matched_c[changed]
    return _assemble(cur.stride, (ck[added], cv[added]), (ck[upd_c], cv[upd_c], pv[upd_p]),
                     (pk[removed], pv[removed]))


_SLICE = 1 << 17  # rows compared at a time: bounds the temporaries to a few MB


def _rows_differ(pw: np.ndarray, p_idx: np.ndarray, cw: np.ndarray, c_idx: np.ndarray
                 ) -> np.ndarray:
    """Boolean mask: does row ``p_idx[i]`` of ``pw`` differ from row ``c_idx[i]`` of ``cw``?"""
    out = np.empty(len(p_idx), dtype=bool)
    for start in range(0, len(p_idx), _SLICE):
        sl = slice(start, start + _SLICE)
        np.any(pw[p_idx[sl]] != cw[c_idx[sl]], axis=1, out=out[sl])
    return out


def _assemble(stride: int, added, updated, removed) -> Delta:
    """Concatenate (keys, values[, old values]) row arrays of each action into one Delta."""
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


def snapshot_as_added(snap: Snapshot) -> Delta:
    """Every entry of ``snap`` as an ``added`` event (a map created while watched)."""
    return Delta(bytes([Action.ADDED]) * snap.count, snap.keys, snap.values,
                 bytes(len(snap.values)), snap.count)
