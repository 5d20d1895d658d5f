"""watcher.daemon.diff.diff (and poll_changes, the same diff on a dump streamed in
chunks) against a brute-force dict diff, on random inputs.

No kernel needed: snapshots are built from dicts, in a shuffled (kernel-like,
arbitrary) order, so the same content in a different order must diff to nothing.
"""

from __future__ import annotations

import random

import pytest

from watcher.daemon.diff import (
    Action,
    Delta,
    EngineSnapshot,
    diff,
    poll_changes,
    snapshot_as_added,
)
from watcher.kernel.maps.dump import Chunk

KEY_SIZES = (1, 2, 4, 8, 12, 16, 3)
STRIDES = (1, 8, 13, 32)


def snap(entries: dict[bytes, bytes], key_size: int, stride: int, rng: random.Random,
         order: list[bytes] | None = None) -> EngineSnapshot:
    keys = list(entries) if order is None else order
    if order is None:
        rng.shuffle(keys)
    return EngineSnapshot(b"".join(keys), b"".join(entries[k] for k in keys), len(keys), key_size,
                    stride)


def expected(prev: dict, cur: dict) -> dict[str, set]:
    return {
        "added": {(k, cur[k]) for k in cur.keys() - prev.keys()},
        "updated": {(k, cur[k], prev[k]) for k in cur.keys() & prev.keys() if cur[k] != prev[k]},
        "removed": {(k, prev[k]) for k in prev.keys() - cur.keys()},
    }


def unpack(delta: Delta, key_size: int, stride: int) -> dict[str, set]:
    assert len(delta.actions) == delta.count == len(delta)
    assert len(delta.keys) == delta.count * key_size
    assert len(delta.values) == len(delta.old_values) == delta.count * stride
    assert list(delta.actions) == sorted(delta.actions), "added, then updated, then removed"
    out: dict[str, set] = {"added": set(), "updated": set(), "removed": set()}
    seen = set()
    for i in range(delta.count):
        key = bytes(delta.keys[i * key_size:(i + 1) * key_size])  # a kept state's bytearray
        value = bytes(delta.values[i * stride:(i + 1) * stride])
        old = bytes(delta.old_values[i * stride:(i + 1) * stride])
        assert key not in seen, f"key {key.hex()} reported twice"
        seen.add(key)
        action = Action(delta.actions[i])
        if action is Action.UPDATED:
            out["updated"].add((key, value, old))
        else:
            assert old == bytes(stride), "old values are zeros except for updates"
            out["added" if action is Action.ADDED else "removed"].add((key, value))
    return out


def random_keys(rng: random.Random, n: int, key_size: int, dense: bool) -> list[bytes]:
    """``n`` distinct keys; ``dense`` ones differ only in a few bytes (sort edge cases)."""
    limit = 256 ** key_size
    n = min(n, limit)
    if dense:
        base = rng.randrange(max(limit - n, 1))
        nums = rng.sample(range(base, base + n), n) if n else []
    else:
        drawn: set[int] = set()
        while len(drawn) < n:
            drawn.add(rng.randrange(limit))
        nums = list(drawn)
    return [x.to_bytes(key_size, rng.choice(("little", "big"))) for x in nums]


def mutate(rng: random.Random, prev: dict, key_size: int, stride: int) -> dict:
    cur = {}
    for k, v in prev.items():
        r = rng.random()
        if r < 0.15:
            continue  # removed
        if r < 0.35:
            v = bytes(rng.randrange(256) for _ in range(stride))
            # an update that only touches the last byte
            if rng.random() < 0.3:
                v = prev[k][:-1] + bytes([(prev[k][-1] + 1) % 256])
        cur[k] = v
    for k in random_keys(rng, rng.randrange(0, 40), key_size, dense=rng.random() < 0.5):
        if k not in prev:
            cur[k] = bytes(rng.randrange(256) for _ in range(stride))
    return cur


def check(prev: dict, cur: dict, key_size: int, stride: int, rng: random.Random,
          prev_snap: EngineSnapshot | None = None, cur_order=None) -> EngineSnapshot:
    a = prev_snap or snap(prev, key_size, stride, rng)
    b = snap(cur, key_size, stride, rng, order=cur_order)
    assert unpack(diff(a, b), key_size, stride) == expected(prev, cur)
    return b


@pytest.mark.parametrize("key_size", KEY_SIZES)
@pytest.mark.parametrize("stride", STRIDES)
def test_diff_matches_brute_force(key_size, stride):
    rng = random.Random(key_size * 1000 + stride)
    for _ in range(30):
        n = rng.choice((0, 1, 2, 5, 50, 300))
        prev = {k: bytes(rng.randrange(256) for _ in range(stride))
                for k in random_keys(rng, n, key_size, dense=rng.random() < 0.5)}
        cur = mutate(rng, prev, key_size, stride)
        check(prev, cur, key_size, stride, rng)


@pytest.mark.parametrize("key_size", KEY_SIZES)
def test_diff_chains_carry_sort_order(key_size):
    """A watch diffs each dump against the previous one; sort orders carry over when
    the keys did not change, so chains exercise both paths."""
    rng = random.Random(key_size)
    stride = 8
    state = {k: bytes(8) for k in random_keys(rng, 100, key_size, dense=True)}
    s = snap(state, key_size, stride, rng)
    for step in range(40):
        if step % 3 == 0:  # same keys, same kernel order, some values changed
            order = [s.keys[i * key_size:(i + 1) * key_size] for i in range(s.count)]
            cur = {k: (bytes(rng.randrange(256) for _ in range(stride))
                       if rng.random() < 0.2 else v) for k, v in state.items()}
            s = check(state, cur, key_size, stride, rng, prev_snap=s, cur_order=order)
        else:
            cur = mutate(rng, state, key_size, stride)
            s = check(state, cur, key_size, stride, rng, prev_snap=s)
        state = cur


@pytest.mark.parametrize("key_size", KEY_SIZES)
def test_reordered_keys_same_content_is_no_change(key_size):
    rng = random.Random(7 + key_size)
    entries = {k: bytes([len(k)]) * 4 for k in random_keys(rng, 200, key_size, dense=False)}
    a = snap(entries, key_size, 4, rng)
    b = snap(entries, key_size, 4, rng)
    assert a.keys != b.keys or len(entries) < 2
    assert diff(a, b).count == 0
    assert diff(a, snap(entries, key_size, 4, rng, order=list(entries))).count == 0


@pytest.mark.parametrize("key_size", KEY_SIZES)
def test_empty_maps(key_size):
    rng = random.Random(key_size)
    entries = {k: b"\x01\x02" for k in random_keys(rng, 20, key_size, dense=True)}
    empty = EngineSnapshot.empty(key_size, 2)
    assert diff(empty, EngineSnapshot.empty(key_size, 2)).count == 0
    assert unpack(diff(empty, snap(entries, key_size, 2, rng)), key_size, 2) == \
        expected({}, entries)
    assert unpack(diff(snap(entries, key_size, 2, rng), empty), key_size, 2) == \
        expected(entries, {})


def test_snapshot_as_added_and_shape_mismatch():
    rng = random.Random(1)
    entries = {k: k * 2 for k in random_keys(rng, 10, 4, dense=False)}
    s = snap(entries, 4, 8, rng)
    assert unpack(snapshot_as_added(s), 4, 8) == expected({}, entries)
    with pytest.raises(ValueError):
        diff(s, EngineSnapshot.empty(8, 8))
    with pytest.raises(ValueError):
        diff(s, EngineSnapshot.empty(4, 4))


def chunked(s: EngineSnapshot, rng: random.Random) -> list[Chunk]:
    """``s`` as a dump would stream it: chunks of random sizes, in its order."""
    out, at = [], 0
    while at < s.count:
        n = min(rng.choice((1, 3, 17, 64)), s.count - at)
        k, v = at * s.key_size, at * s.stride
        out.append(Chunk(bytes(s.keys[k:k + n * s.key_size]),
                         bytes(s.values[v:v + n * s.stride]), n))
        at += n
    return out


def streamed(prev: EngineSnapshot | None, cur: EngineSnapshot, rng: random.Random,
             report_all: bool = False) -> tuple[EngineSnapshot, Delta | None]:
    """poll_changes over ``cur`` in chunks; the state it keeps must be ``cur``'s: the same
    rows, and read in the order the dump had them (its ``dump_order``), the dump itself."""
    kept, delta = poll_changes(prev, chunked(cur, rng), cur.key_size, cur.stride, report_all)
    assert (dump_ordered(kept), kept.count) == ((bytes(cur.keys), bytes(cur.values)), cur.count)
    return kept, delta


def dump_ordered(s: EngineSnapshot) -> tuple[bytes, bytes]:
    """The kept state's keys and values in the order of the dump it was patched to."""
    if s.dump_order is None:  # its rows are in the dump's order
        return bytes(s.keys), bytes(s.values)
    rows = s.dump_rows(0, s.dump_length())
    assert sorted(set(rows.tolist())) == list(range(s.count)), "every row, once"
    return s.key_rows()[rows].tobytes(), s.value_rows()[rows].tobytes()


@pytest.mark.parametrize("key_size", (1, 4, 8, 12))
def test_streamed_poll_matches_brute_force(key_size):
    """The streamed poll diverges anywhere (a changed value, a moved key, entries
    gone or added at the end) and must make the brute-force diff's events."""
    rng = random.Random(99 + key_size)
    stride = 8
    state = {k: bytes(8) for k in random_keys(rng, 150, key_size, dense=True)}
    kept, delta = streamed(None, snap(state, key_size, stride, rng), rng)
    assert delta is None  # the first poll only records the state
    for step in range(40):
        dumped = dump_ordered(kept)[0]  # the last dump's order: the kernel's, unchanged
        kept_order = [dumped[i * key_size:(i + 1) * key_size] for i in range(kept.count)]
        order: list[bytes] | None = kept_order
        if step % 4 == 0:  # same kernel order, some values changed
            cur = {k: (bytes(rng.randrange(256) for _ in range(stride))
                       if rng.random() < 0.1 else v) for k, v in state.items()}
        elif step % 4 == 1:  # same order, entries gone from the end and others appended
            cur = {k: state[k] for k in kept_order[:rng.randrange(len(kept_order) + 1)]}
            cur.update({k: b"\x07" * stride for k in random_keys(rng, 5, key_size, dense=False)
                        if k not in state})
            order = list(cur)
        else:
            cur = mutate(rng, state, key_size, stride)
            order = None
        kept, delta = streamed(kept, snap(cur, key_size, stride, rng, order=order), rng)
        assert delta is not None
        assert unpack(delta, key_size, stride) == expected(state, cur)
        state = cur


def test_streamed_unchanged_poll_keeps_the_state_it_had():
    """Nothing changed: no second copy is made, the kept state (and its sort) is reused."""
    rng = random.Random(5)
    entries = {k: b"\x01" * 8 for k in random_keys(rng, 300, 8, dense=False)}
    first = snap(entries, 8, 8, rng)
    first.sorted_order()
    kept, delta = streamed(first, first, rng)
    assert kept is first and delta is not None and delta.count == 0
    empty = EngineSnapshot.empty(8, 8)
    assert streamed(empty, empty, rng)[0] is empty


def test_streamed_first_poll_and_shape_change():
    rng = random.Random(6)
    entries = {k: k * 2 for k in random_keys(rng, 30, 4, dense=False)}
    s = snap(entries, 4, 8, rng)
    _, delta = streamed(None, s, rng, report_all=True)
    assert delta is not None and unpack(delta, 4, 8) == expected({}, entries)
    with pytest.raises(ValueError):
        poll_changes(EngineSnapshot.empty(8, 8), chunked(s, rng), 4, 8, False)


@pytest.mark.parametrize("slice_rows", (1, 2, 3, 7, 64))
def test_diff_in_small_slices_matches_brute_force(slice_rows, monkeypatch):
    """The keys-moved diff walks both states in windows of ``_SLICE`` sorted keys; with
    tiny windows every edge shows up (a slice past its window, a window past the slice,
    keys before, between and after every window, a state running out first)."""
    from watcher.daemon.diff import userspace

    monkeypatch.setattr(userspace, "_SLICE", slice_rows)
    rng = random.Random(slice_rows)
    for key_size in (1, 4, 8, 3):
        for _ in range(25):
            n = rng.choice((0, 1, 2, 5, 50, 200))
            prev = {k: bytes(rng.randrange(256) for _ in range(8))
                    for k in random_keys(rng, n, key_size, dense=rng.random() < 0.5)}
            cur = mutate(rng, prev, key_size, 8)
            if rng.random() < 0.2:  # one side much larger: the other runs out first
                cur.update({k: bytes(8) for k in random_keys(rng, 100, key_size, dense=False)
                            if k not in prev})
            check(prev, cur, key_size, 8, rng)


def _changed_poll_setup(rng: random.Random) -> tuple[dict, EngineSnapshot, dict, EngineSnapshot]:
    state = {k: b"\x01" * 8 for k in random_keys(rng, 200, 8, dense=False)}
    kept, _ = streamed(None, snap(state, 8, 8, rng), rng)
    cur = mutate(rng, state, 8, 8)
    return state, kept, cur, snap(cur, 8, 8, rng)


@pytest.mark.parametrize("reader", ("shared", "leased"))
def test_a_changed_poll_never_changes_a_state_a_reader_holds(reader):
    """A snapshot reply (shared for good) or a metrics scrape (a lease) reads the rows
    while the next poll runs: that poll patches a copy, and the copy is the kept state."""
    rng = random.Random(11)
    state, kept, cur, dump = _changed_poll_setup(rng)
    before = (bytes(kept.keys), bytes(kept.values), kept.count, kept.generation)
    if reader == "shared":
        kept.share()
        new, delta = streamed(kept, dump, rng)
    else:
        with kept.lease():
            new, delta = streamed(kept, dump, rng)
    assert new is not kept
    assert (bytes(kept.keys), bytes(kept.values), kept.count, kept.generation) == before
    assert delta is not None and unpack(delta, 8, 8) == expected(state, cur)
    assert streamed(new, dump, rng)[1] == Delta(b"", b"", b"", b"", 0)  # then: unchanged


def test_a_changed_poll_patches_its_own_state_in_place_and_the_next_poll_compares_rows():
    rng = random.Random(12)
    state, kept, cur, dump = _changed_poll_setup(rng)
    generation = kept.generation
    new, delta = streamed(kept, dump, rng)
    assert new is kept and kept.generation == generation + 1
    assert delta is not None and unpack(delta, 8, 8) == expected(state, cur)
    again, delta = streamed(kept, dump, rng)  # the same dump again: no event, same state
    assert again is kept and delta is not None and delta.count == 0
    assert kept.generation == generation + 1  # matched chunk by chunk: not patched


def test_a_dump_failing_half_way_leaves_the_kept_state_as_it_was():
    """The map went away mid-dump: the poll raises, and the next poll diffs from the
    state as it was (no half-applied patch, so no event is lost)."""
    rng = random.Random(13)
    state, kept, cur, dump = _changed_poll_setup(rng)
    before = (bytes(kept.keys), bytes(kept.values), kept.count)

    def failing():
        chunks = chunked(dump, rng)
        yield from chunks[:len(chunks) // 2]
        raise OSError(2, "gone")

    with pytest.raises(OSError):
        poll_changes(kept, failing(), 8, 8, False)
    assert (bytes(kept.keys), bytes(kept.values), kept.count) == before
    _, delta = streamed(kept, dump, rng)
    assert delta is not None and unpack(delta, 8, 8) == expected(state, cur)


def test_a_key_the_dump_shows_twice_is_kept_once_with_its_last_value():
    """A hash map changed under a dump can show a key twice: one row, its last value."""
    rng = random.Random(14)
    state = {k: b"\x01" * 8 for k in random_keys(rng, 50, 8, dense=False)}
    kept, _ = streamed(None, snap(state, 8, 8, rng), rng)
    new_key = next(k for k in random_keys(rng, 10, 8, dense=False) if k not in state)
    keys = [*state, new_key, new_key]
    values = [*state.values(), b"\x02" * 8, b"\x03" * 8]
    chunks = [Chunk(b"".join(keys), b"".join(values), len(keys))]
    kept, delta = poll_changes(kept, chunks, 8, 8, False)
    assert delta is not None
    assert unpack(delta, 8, 8) == {"added": {(new_key, b"\x03" * 8)}, "updated": set(),
                                   "removed": set()}
    rows = {bytes(kept.keys[i * 8:(i + 1) * 8]): bytes(kept.values[i * 8:(i + 1) * 8])
            for i in range(kept.count)}
    assert kept.count == 51 and rows == {**state, new_key: b"\x03" * 8}


def test_few_changes_keep_each_dump_entrys_row_as_runs():
    """After a patch rows keep their places, so a big map changed in a few places keeps
    its dump order as runs of consecutive rows; polls stay exact, unchanged ones match
    chunk by chunk."""
    from watcher.daemon.diff.core import DumpRuns

    rng = random.Random(15)
    state = {k: b"\x01" * 8 for k in random_keys(rng, 4000, 8, dense=False)}
    kept, _ = streamed(None, snap(state, 8, 8, rng), rng)
    spare = [k for k in random_keys(rng, 400, 8, dense=False) if k not in state]
    for _ in range(8):
        dumped = dump_ordered(kept)[0]
        order = [dumped[i * 8:(i + 1) * 8] for i in range(kept.count)]
        gone = set(rng.sample(order, 3))
        changed = rng.sample([k for k in order if k not in gone], 6)
        cur = {k: v for k, v in state.items() if k not in gone}
        order = [k for k in order if k not in gone and k not in changed]
        for k in [*changed, *(spare.pop() for _ in range(3))]:  # relinked or new: moved
            cur[k] = bytes(rng.randrange(256) for _ in range(8))
            order.insert(rng.randrange(len(order) + 1), k)
        kept, delta = streamed(kept, snap(cur, 8, 8, rng, order=order), rng)
        assert delta is not None and unpack(delta, 8, 8) == expected(state, cur)
        state = cur
    assert isinstance(kept.dump_order, DumpRuns)
    assert kept.dump_order.nbytes < kept.count  # under a byte an entry, against 4
    again, delta = streamed(kept, snap(state, 8, 8, rng, order=order), rng)
    assert again is kept and delta is not None and delta.count == 0
