"""The user-space engine: entry deltas between two dumps of one map, computed on
flat buffers.

Why numpy: a watched map is dumped every interval, and most polls change
nothing or little.  Comparing a million entries as Python objects costs
about a second and 200 MB; comparing flat buffers costs a ``memcmp`` when
nothing changed, a vectorised row compare when the keys came back in the
same order (arrays; hash maps whose values BPF programs change in place
through a lookup pointer, as counters do), and a sort + binary search
otherwise (keys came or went, or user space updated an entry, which moves
it to the front of its hash bucket).  Value rows are compared as the widest
machine words that divide the value size, in slices, to keep temporaries
small.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from watcher.kernel.maps.dump import Chunk

from . import inplace
from .core import Delta, EngineSnapshot, assemble, first_poll_is_silent, snapshot_as_added


def changes(prev: EngineSnapshot | None, cur: EngineSnapshot, report_all: bool
            ) -> Delta | None:
    """One user-space poll's events: None on a silent first poll
    (:func:`~.core.first_poll_is_silent`), every entry as added on a first poll that
    reports all, else the diff from ``prev``.  Walks every entry: a worker thread's job."""
    if first_poll_is_silent(prev, report_all):
        return None
    if prev is None:
        return snapshot_as_added(cur)
    return diff(prev, cur)


def poll_changes(prev: EngineSnapshot | None, chunks: Iterable[Chunk], key_size: int,
                 stride: int, report_all: bool) -> tuple[EngineSnapshot, Delta | None]:
    """One user-space poll from a dump streaming in ``chunks``: the state to keep and
    its events (as :func:`changes`).

    Why streamed: most polls change nothing, and a joined dump beside the kept
    state is a second copy of the map (24 MB of a 1M-entry map, on every poll).
    Each chunk is compared with the kept rows the last dump had at the same place
    (:func:`.inplace.matches`) and dropped; the kept state stays the state when every
    chunk matched.  From the first chunk that does not, the rest of the dump is looked
    up in the kept state, which is then patched to it (:func:`.inplace.patch`): a changed
    poll holds the map once, too.
    """
    it = iter(chunks)
    if prev is None or prev.key_size != key_size or prev.stride != stride:
        cur = _joined(it, key_size, stride)
        return cur, changes(prev, cur, report_all)
    at = 0  # dump entries matched so far
    for chunk in it:
        if not inplace.matches(prev, at, chunk):
            return inplace.patch(prev, at, _prepend(chunk, it))
        at += chunk.count
    if at == prev.dump_length():
        return prev, _empty_delta()  # nothing changed: the kept state is the state
    return inplace.patch(prev, at, ())  # entries went at the end


def _prepend(first: Chunk, rest: Iterator[Chunk]) -> Iterator[Chunk]:
    yield first
    yield from rest


def _joined(chunks: Iterable[Chunk], key_size: int, stride: int) -> EngineSnapshot:
    """A first poll's state: ``chunks`` joined, grown in place (big buffers are mmap'd,
    so growing is mremap, not a copy), never a list joined at the end."""
    k, v, count = bytearray(), bytearray(), 0
    for chunk in chunks:
        k += chunk.keys
        v += chunk.values
        count += chunk.count
    return EngineSnapshot(k, v, count, key_size, stride)


def _empty_delta() -> Delta:
    return Delta(b"", b"", b"", b"", 0)


def diff(prev: EngineSnapshot, cur: EngineSnapshot) -> Delta:
    """What changed from ``prev`` to ``cur``: added, then updated, then removed entries."""
    if prev.key_size != cur.key_size or prev.stride != cur.stride:
        raise ValueError("snapshots of differently shaped maps")
    if prev.keys == cur.keys:
        cur.order = prev.order  # same keys in the same order: the sort carries over
        if prev.values == cur.values:
            return _empty_delta()
        pw, cw = prev.value_words(), cur.value_words()
        changed = np.concatenate([np.flatnonzero(np.any(pw[a:a + _SLICE] != cw[a:a + _SLICE],
                                                        axis=1)) + a
                                  for a in range(0, cur.count, _SLICE)])
        pv, cv, ck = prev.value_rows(), cur.value_rows(), cur.key_array()
        return assemble(cur.stride, None, (ck[changed], cv[changed], pv[changed]), None)
    return _moved(prev, cur)


def _moved(prev: EngineSnapshot, cur: EngineSnapshot) -> Delta:
    """The diff when keys came, went or moved: both states walked in key order, a
    slice at a time, like a merge.

    Why slices: a poll whose keys moved holds two states already (the kept one and the
    new dump); whole-map temporaries (the sorted keys, positions, masks, matched rows)
    were as much again.  Each slice of ``cur``'s sorted keys is looked up in a window
    of ``prev``'s: the keys up to the window's last are in it or are new, and once a
    slice goes past it, so will every later one.
    """
    pk, ck = prev.key_array(), cur.key_array()
    po, co = prev.sorted_order(), cur.sorted_order()
    pw, cw = prev.value_words(), cur.value_words()
    present = np.zeros(prev.count, dtype=bool)
    added, upd_p, upd_c = [], [], []
    i = j = 0
    while i < cur.count:
        c_idx = co[i:i + _SLICE]
        if j >= prev.count:
            added.append(c_idx)
            i += len(c_idx)
            continue
        p_idx = po[j:j + _SLICE]
        pks, cks = pk[p_idx], ck[c_idx]
        within = int(np.searchsorted(cks, pks[-1], side="right"))
        if within < len(c_idx):
            j += len(p_idx)  # the slice goes past this window: no later one comes back
        c_idx, cks = c_idx[:within], cks[:within]
        pos = np.searchsorted(pks, cks)
        np.minimum(pos, len(pks) - 1, out=pos)
        found = pks[pos] == cks
        added.append(c_idx[~found])
        mp, mc = p_idx[pos[found]], c_idx[found]
        present[mp] = True
        changed = _rows_differ(pw, mp, cw, mc)
        upd_p.append(mp[changed])
        upd_c.append(mc[changed])
        i += within
    add, up, uc = (np.concatenate(x) if x else np.zeros(0, dtype=np.int32)
                   for x in (added, upd_p, upd_c))
    removed = po[~present[po]]  # in key order
    pv, cv = prev.value_rows(), cur.value_rows()
    return assemble(cur.stride, (ck[add], cv[add]), (ck[uc], cv[uc], pv[up]),
                    (pk[removed], pv[removed]))


_SLICE = 1 << 15  # rows looked up or compared at a time: temporaries of a MB or two


def _rows_differ(pw: np.ndarray, p_idx: np.ndarray, cw: np.ndarray, c_idx: np.ndarray
                 ) -> np.ndarray:
    """Boolean mask: does row ``p_idx[i]`` of ``pw`` differ from row ``c_idx[i]`` of ``cw``?"""
    out = np.empty(len(p_idx), dtype=bool)
    for start in range(0, len(p_idx), _SLICE):
        sl = slice(start, start + _SLICE)
        np.any(pw[p_idx[sl]] != cw[c_idx[sl]], axis=1, out=out[sl])
    return out
