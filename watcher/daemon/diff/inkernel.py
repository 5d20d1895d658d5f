"""The in-kernel engine's daemon side: choosing it per map, and turning a kernel
walk's changed entries into the same events the user-space engine makes.

The kernel half (:mod:`watcher.kernel.kdelta.walker`) sends only entries whose
value changed and keys that were removed; it keeps fingerprints, not values.
The old value of an ``updated``/``removed`` event, and the state a snapshot
request is served from, come from here: the last delivered state, kept as the
user-space engine keeps it (a :class:`~.core.EngineSnapshot`, here sorted by key),
and patched with each walk's changes.  An entry the kernel reports whose value
equals the kept one (a re-emission after a shadow map was full, an entry
re-added with its old value between two walks) makes no event, as in a dump
diff.

Order of one poll's events: added, then updated, then removed, each in key
order (the user-space engine uses the same action order; within an action its
order can follow the dump, so tests compare a poll's events as sets).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np
import trio

from watcher.kernel.features.probe import Features
from watcher.kernel.maps.find import MapRecord

if TYPE_CHECKING:
    # The kernel half is imported where it is used (a daemon with the engine off never
    # loads its program builders: ~2.5 MB of resident memory).
    from watcher.kernel.kdelta.objects import Broker
    from watcher.kernel.kdelta.walker import WalkResult

from ..config import WatchConfig
from .core import Delta, EngineSnapshot, assemble, first_poll_is_silent, key_dtype

log = logging.getLogger("pymap.engine")

USER, KERNEL = "user-space", "in-kernel"


class KernelDelta:
    """One watched map on the in-kernel engine."""

    def __init__(self, record: MapRecord, stride: int, use_for_each: bool = True,
                 broker: Broker | None = None, iterators: bool = True):
        from watcher.kernel.kdelta.walker import IterDelta

        self.walker = IterDelta(record, stride, use_for_each,
                                broker.engine() if broker is not None else None, iterators)
        self.key_size = record.key_size
        self.stride = stride
        self.last_walk: dict[str, int] = {}
        self.last_walk_s = self.last_parse_s = 0.0  # where a poll's time went (bench_kdelta)

    @property
    def kernel_bytes(self) -> int:
        return self.walker.memlock

    def close(self) -> None:
        self.walker.close()

    def poll(self, fd: int, prev: EngineSnapshot | None, report_all: bool
             ) -> tuple[EngineSnapshot, Delta | None]:
        """Walk the map behind ``fd``; the new state and the delta (None on a silent first poll)."""
        t0 = time.perf_counter()
        res = self.walker.walk(fd)
        t1 = time.perf_counter()
        self.last_walk_s = t1 - t0
        self.last_walk = dict(res.counters, swept=int(res.swept))
        try:
            return self._apply(res, prev, report_all)
        finally:
            self.last_parse_s = time.perf_counter() - t1

    def _apply(self, res: WalkResult, prev: EngineSnapshot | None, report_all: bool
               ) -> tuple[EngineSnapshot, Delta | None]:
        ks, stride = self.key_size, self.stride
        dtype = key_dtype(ks)
        rows = np.frombuffer(res.changed, dtype=np.uint8).reshape(res.nchanged, ks + stride)
        ck = np.ascontiguousarray(rows[:, :ks]).view(dtype).ravel()
        cv = rows[:, ks:]
        # Sorted by key; a key shown twice in one walk (the map changed under it) keeps its last row.
        rev = len(ck) - 1 - np.unique(ck[::-1], return_index=True)[1]
        ck, cv = ck[rev], cv[rev]
        first, silent = prev is None, first_poll_is_silent(prev, report_all)
        if prev is None:
            prev = EngineSnapshot.empty(ks, stride)
        sk = prev.key_array()
        sv = prev.value_rows()
        # A state this engine made is in key order (order: identity); one from the
        # user-space engine is in its rows' order, and order None says nothing.
        in_order = not prev.count or (prev.order is not None and _is_identity(prev.order))
        if not in_order:
            by_key = prev.sorted_order()
            sk, sv = sk[by_key], sv[by_key]  # a state from the user-space engine
        pos = np.searchsorted(sk, ck)
        np.minimum(pos, max(len(sk) - 1, 0), out=pos)
        found = (sk[pos] == ck) if len(sk) else np.zeros(len(ck), dtype=bool)
        fpos, fk, fv = pos[found], ck[found], cv[found]
        differs = np.any(sv[fpos] != fv, axis=1) if len(fpos) else np.zeros(0, dtype=bool)
        upd_pos, upd_k, upd_v = fpos[differs], fk[differs], fv[differs]
        add_k, add_v = ck[~found], cv[~found]
        rk = np.sort(np.frombuffer(res.removed, dtype=dtype, count=res.nremoved)) \
            if res.nremoved else np.zeros(0, dtype=dtype)
        rpos = np.searchsorted(sk, rk)
        np.minimum(rpos, max(len(sk) - 1, 0), out=rpos)
        rpos = rpos[sk[rpos] == rk] if len(sk) and len(rk) else np.zeros(0, dtype=np.intp)

        if not (len(upd_pos) or len(add_k) or len(rpos)):
            return prev, (None if silent else assemble(stride, None, None, None))
        old_upd = sv[upd_pos]  # fancy indexing copies: safe from the writes below
        removed = (sk[rpos], sv[rpos])
        if not (len(rpos) or len(add_k)):  # same keys: they carry over, values are patched
            carry = in_order and not first
            values = bytearray(prev.values if carry else sv.tobytes())  # the one copy
            np.frombuffer(values, dtype=np.uint8).reshape(len(sk), stride)[upd_pos] = upd_v
            state = EngineSnapshot(prev.keys if carry else sk.tobytes(), values, len(sk), ks,
                             stride, order=prev.order if carry else None)
        else:
            state = _rebuild(sk, sv, rpos, add_k, add_v, stride)
            if len(upd_k):
                state.value_rows()[np.searchsorted(state.key_array(), upd_k)] = upd_v
        if state.order is None:
            state.order = np.arange(state.count, dtype=np.int32)
        if silent:
            return state, None
        return state, assemble(stride, (add_k, add_v), (upd_k, upd_v, old_upd), removed)


_REBUILD_STEPS = 20_000  # more removals and insertion points: numpy's delete/insert instead


def _rebuild(sk: np.ndarray, sv: np.ndarray, rpos: np.ndarray, add_k: np.ndarray,
             add_v: np.ndarray, stride: int) -> EngineSnapshot:
    """The sorted state ``sk``/``sv`` without rows ``rpos`` and with ``add_k`` (sorted,
    none present) inserted in key order: written once into the new state's buffers.

    Why not ``np.delete`` then ``np.insert``: each copies the whole state (a 1M-entry
    map's 24 MB several times over, then ``tobytes`` once more); here the rows between
    two removals or insertion points move as one slice, and only the changed rows
    cost a Python step.  Past :data:`_REBUILD_STEPS` such points numpy's way is faster.
    """
    ks = sk.dtype.itemsize
    n = len(sk) - len(rpos) + len(add_k)
    keys, values = bytearray(n * ks), bytearray(n * stride)
    nk = np.frombuffer(keys, dtype=sk.dtype, count=n)
    nv = np.frombuffer(values, dtype=np.uint8).reshape(n, stride)
    at = np.searchsorted(sk, add_k)  # each goes before row at[i] of the old state
    if len(rpos) + len(add_k) > _REBUILD_STEPS:
        keep = np.ones(len(sk), dtype=bool)
        keep[rpos] = False
        kept_k = sk[keep]
        at = np.searchsorted(kept_k, add_k)
        nk[:] = np.insert(kept_k, at, add_k)
        nv[:] = np.insert(sv[keep], at, add_v, axis=0)
        return EngineSnapshot(keys, values, n, ks, stride, order=np.arange(n, dtype=np.int32))
    points = sorted([(int(p), 0, i) for i, p in enumerate(at)]  # insert before removing
                    + [(int(p), 1, 0) for p in rpos])
    src = dst = 0
    for pos, removal, i in points:
        run = pos - src
        if run:
            nk[dst:dst + run] = sk[src:pos]
            nv[dst:dst + run] = sv[src:pos]
            dst += run
            src = pos
        if removal:
            src += 1
        else:
            nk[dst] = add_k[i]
            nv[dst] = add_v[i]
            dst += 1
    nk[dst:] = sk[src:]
    nv[dst:] = sv[src:]
    return EngineSnapshot(keys, values, n, ks, stride, order=np.arange(n, dtype=np.int32))


def _is_identity(order: np.ndarray) -> bool:
    return bool(order[0] == 0 and order[-1] == len(order) - 1 and np.all(np.diff(order) == 1))


def choose_engine(record: MapRecord, stride: int, config: WatchConfig, in_use_bytes: int,
                  features: Features, broker: Broker | None = None
                  ) -> tuple[KernelDelta | None, str]:
    """The engine for one map and why: a :class:`KernelDelta`, or None for user space.

    The route (for_each or iterator) follows what ``features`` (the daemon's one
    probe) says the host allows.  Its objects are made by ``broker`` (the daemon's),
    or in this process without one.
    A kernel that refuses the objects (no iterator BTF, verifier, memlock) or a broker
    that refuses a program costs one warning and leaves the map on the user-space
    engine; a broker that is gone was warned about once (:class:`~.objects.Broker`).
    """
    if config.kernel_delta == "off":
        return None, f"{USER}: watch.kernel_delta is off"
    from watcher.kernel.kdelta.sizing import (
        iterator_needed,
        routes,
        shadow_bytes_estimate,
        unsupported_reason,
    )
    from watcher.kernel.sys.create import Unsupported

    why = unsupported_reason(record, stride)
    if why:
        return None, f"{USER}: {why}"
    if record.type not in config.kernel_delta_types:
        return None, f"{USER}: {record.type} is not in watch.kernel_delta_types"
    if record.max_entries < config.kernel_delta_min_entries:
        return None, (f"{USER}: {record.max_entries} max entries < kernel_delta_min_entries "
                      f"{config.kernel_delta_min_entries}")
    each, iterators, refused = routes(features)
    if not (each or iterators):
        return None, f"{USER}: in-kernel engine unavailable: {refused}"
    if not (iterators or (each and not record.percpu)):
        return None, f"{USER}: {iterator_needed(record)}: {refused}"
    need = shadow_bytes_estimate(record, stride)
    if in_use_bytes + need > config.kernel_delta_max_bytes:
        return None, (f"{USER}: its shadow map needs ~{need} bytes, over kernel_delta_max_bytes "
                      f"{config.kernel_delta_max_bytes} ({in_use_bytes} in use)")
    try:
        if broker is not None and broker.gone is not None:
            return None, f"{USER}: objects broker unavailable: {broker.gone}"
        engine = KernelDelta(record, stride, each, broker, iterators)
    except (OSError, Unsupported) as e:
        log.warning("%s (id %d): in-kernel change detection unavailable, using user space: %s",
                    record.name, record.id, e)
        return None, f"{USER}: in-kernel setup failed: {e}"
    if engine.walker.each:
        route = "bpf_for_each_map_elem" + ("" if iterators else f" only ({refused})")
    elif record.percpu:
        route = "bpf_iter (a for_each callback sees one CPU's slot)"
    else:
        route = f"bpf_iter ({refused})"
    reason = f"{KERNEL}: {record.max_entries} max entries, walked by {route}"
    log.debug("%s (id %d): %s", record.name, record.id, reason)
    return engine, reason


def start_broker(config: WatchConfig) -> Broker | None:
    """The objects broker, started while the daemon may still create (before its seccomp
    filter); None with the engine off.  One that did not start is returned ``gone``:
    the engine is then unavailable, with one warning."""
    if config.kernel_delta == "off":
        return None
    from watcher.kernel.kdelta.objects import Broker

    broker = Broker()
    try:
        broker.start()
    except OSError as e:
        log.warning("in-kernel change detection unavailable, maps are polled in user space: %s",
                    e)
    return broker


async def supervise(broker: Broker) -> None:
    """Learn of the broker's exit as it happens (a pidfd): one warning, engine unavailable."""
    if broker.proc is None or broker.gone is not None:
        return
    pidfd = os.pidfd_open(broker.proc.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    await trio.to_thread.run_sync(broker.died, broker.proc.poll())
