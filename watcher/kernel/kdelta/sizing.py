"""What the in-kernel engine can take on for one map, and what it will cost.

Why a module of its own: the daemon decides engine by engine (and checks a
memory cap) before any kernel object exists, from the map's record alone; the
walker and the program generators only run once that is decided.  So the
limits (key and value sizes a program can handle, map kinds with an element
walk), the routes a host allows and the memory a shadow map will take live
here, with no syscall.
"""

from __future__ import annotations

import watcher.kernel.features.probe as features_mod
from watcher.kernel.features.probe import Features
from watcher.kernel.maps.find import MapRecord

SUPPORTED_TYPES = frozenset({"hash", "lru_hash", "percpu_hash", "lru_percpu_hash", "array",
                             "percpu_array"})
EXACT_MAX = 32  # value rows up to this many bytes are kept whole in the shadow map
MAX_STRIDE = 8192  # longer rows: the unrolled fingerprint would be too long a program
MAX_KEY = 256  # keys are copied to the 512-byte stack
RING_BYTES = 4 << 20  # for_each output per run; more goes through the iterator
# Kernel per-element overhead of a preallocated hash map (struct htab_elem) and a bucket.
_HTAB_ELEM, _HTAB_BUCKET = 48, 16


def unsupported_reason(record: MapRecord, stride: int) -> str | None:
    """Why this map cannot be watched in the kernel, or None if it can."""
    if record.type not in SUPPORTED_TYPES:
        return f"{record.type} maps have no bpf_map_elem iterator"
    if record.key_size > MAX_KEY:
        return f"keys of {record.key_size} bytes exceed {MAX_KEY} (copied to the BPF stack)"
    if stride > MAX_STRIDE:
        return f"values of {stride} bytes exceed {MAX_STRIDE} (program too long)"
    return None


def routes(features: Features) -> tuple[bool, bool, str]:
    """What the host lets the in-kernel engine walk with: (for_each, iterators, why not).

    Every route resets its state with ``BPF_PROG_TEST_RUN``; the for_each route also
    needs ``bpf_for_each_map_elem`` and a ring buffer; the other, ``bpf_map_elem``
    iterators.  ``why not`` names what was refused, "" when nothing was.
    """
    f = features_mod
    refused = [features.why_not(name) for name in (f.PROG_TEST_RUN, f.FOR_EACH, f.RINGBUF,
                                                    f.MAP_ITER) if not features.allows(name)]
    run = features.allows(f.PROG_TEST_RUN)
    each = run and features.allows(f.FOR_EACH) and features.allows(f.RINGBUF)
    return each, run and features.allows(f.MAP_ITER), "; ".join(refused)


def iterator_needed(record: MapRecord) -> str:
    """Why ``record`` cannot be walked without a ``bpf_map_elem`` iterator."""
    if record.percpu:
        return ("per-CPU maps need a bpf_map_elem iterator (a for_each callback sees one "
                "CPU's slot)")
    return "the iterator route was asked for"


def fingerprint_words(stride: int) -> int:
    return (stride + 7) // 8 if stride <= EXACT_MAX else 1


def shadow_bytes_estimate(record: MapRecord, stride: int) -> int:
    """Kernel memory the shadow map of ``record`` will cost (to check the cap before creating)."""
    value = 8 * (fingerprint_words(stride) + 1)
    ring = ring_bytes(record, stride) if uses_for_each(record) else 0
    if record.type in ("array", "percpu_array"):
        return record.max_entries * value + ring
    n = shadow_entries(record)
    buckets = 1 << max(n - 1, 1).bit_length()
    order = 2 * n * (((record.key_size + 7) & ~7) + value) if uses_for_each(record) else 0
    return (n * (_HTAB_ELEM + ((record.key_size + 7) & ~7) + value) + buckets * _HTAB_BUCKET
            + ring + order)


def ring_bytes(record: MapRecord, stride: int) -> int:
    """The for_each output ring: room for a quarter of the entries changing at once, within
    [64 KiB, RING_BYTES]; a walk with more output finishes through the iterator."""
    want = record.max_entries * ((record.key_size + stride + 15) & ~7) // 4
    return min(max(1 << max(want - 1, 1).bit_length(), 64 << 10), RING_BYTES)


def uses_for_each(record: MapRecord) -> bool:
    """for_each callbacks see one CPU's slot of a per-CPU value: those maps use the iterator."""
    return not record.percpu


def shadow_entries(record: MapRecord) -> int:
    """A hash shadow's capacity: room for new keys while removed ones still occupy it."""
    return record.max_entries + record.max_entries // 8 + 64
