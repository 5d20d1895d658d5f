"""Map types: their names as bpftool spells them, and how each can be read.

Why a table: whether a map can be dumped, and how, depends only on its type.
Hash and array maps support ``BPF_MAP_LOOKUP_BATCH``; LPM tries and a few
others only the per-key walk; ring buffers, perf event arrays and friends hold
streams or file descriptors, not entries, and ``get`` must say so instead of
printing nothing.
"""

from __future__ import annotations

import enum

# enum bpf_map_type, in kernel order, named as bpftool names them.
TYPE_NAMES: tuple[str, ...] = (
    "unspec", "hash", "array", "prog_array", "perf_event_array", "percpu_hash",
    "percpu_array", "stack_trace", "cgroup_array", "lru_hash", "lru_percpu_hash",
    "lpm_trie", "array_of_maps", "hash_of_maps", "devmap", "sockmap", "cpumap",
    "xskmap", "sockhash", "cgroup_storage", "reuseport_sockarray",
    "percpu_cgroup_storage", "queue", "stack", "sk_storage", "devmap_hash",
    "struct_ops", "ringbuf", "inode_storage", "task_storage", "bloom_filter",
    "user_ringbuf", "cgrp_storage", "arena", "insn_array",
)

TYPE_IDS: dict[str, int] = {name: i for i, name in enumerate(TYPE_NAMES)}


def type_name(type_id: int) -> str:
    """bpftool's name for a map type; unknown (newer) types read ``type_N``."""
    if 0 <= type_id < len(TYPE_NAMES):
        return TYPE_NAMES[type_id]
    return f"type_{type_id}"


class DumpMethod(enum.Enum):
    BATCH = "batch"  # BPF_MAP_LOOKUP_BATCH, falling back to PER_KEY if refused
    PER_KEY = "per_key"  # BPF_MAP_GET_NEXT_KEY + BPF_MAP_LOOKUP_ELEM
    NONE = "none"  # nothing to dump; see NOT_DUMPABLE_REASONS


_BATCH = {"hash", "percpu_hash", "lru_hash", "lru_percpu_hash", "array", "percpu_array"}
_PER_KEY = {
    "lpm_trie", "array_of_maps", "hash_of_maps", "devmap", "devmap_hash", "cpumap",
    "cgroup_storage", "percpu_cgroup_storage", "stack_trace",
}
PERCPU_TYPES = frozenset({"percpu_hash", "percpu_array", "lru_percpu_hash",
                          "percpu_cgroup_storage"})
NOT_DUMPABLE_REASONS: dict[str, str] = {
    "ringbuf": "a ring buffer is a stream of records, not a map of entries; "
               "watch it as an event source instead",
    "user_ringbuf": "a user ring buffer is a stream written by user space, not a map of entries",
    "perf_event_array": "a perf event array holds one perf ring fd per CPU, not entries; "
                        "watch it as an event source instead",
    "prog_array": "a program array holds program file descriptors (tail calls), not data",
    "cgroup_array": "a cgroup array holds cgroup file descriptors, not data",
    "sockmap": "a sockmap holds sockets, not data",
    "sockhash": "a sockhash holds sockets, not data",
    "xskmap": "an XSK map holds AF_XDP sockets, not data",
    "reuseport_sockarray": "a reuseport array holds sockets, not data",
    "queue": "a queue can only be popped, and reading it would consume it",
    "stack": "a stack can only be popped, and reading it would consume it",
    "bloom_filter": "a bloom filter cannot be enumerated, only queried",
    "sk_storage": "socket-local storage is keyed by socket fds",
    "inode_storage": "inode-local storage is keyed by file fds",
    "task_storage": "task-local storage is keyed by pidfds",
    "cgrp_storage": "cgroup-local storage is keyed by cgroup fds",
    "struct_ops": "a struct_ops map holds kernel function tables, not entries",
    "arena": "an arena is shared memory, not a map of entries",
    "insn_array": "an instruction array belongs to a program's jump tables",
}


def dump_method(type_name_: str) -> DumpMethod:
    if type_name_ in _BATCH:
        return DumpMethod.BATCH
    if type_name_ in _PER_KEY:
        return DumpMethod.PER_KEY
    return DumpMethod.NONE


def not_dumpable_reason(type_name_: str) -> str:
    return NOT_DUMPABLE_REASONS.get(type_name_, f"pymap cannot dump maps of type {type_name_}")
