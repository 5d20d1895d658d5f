"""Dumping a map's entries, in chunks of flat buffers.

Entries stay as two flat byte strings per chunk (keys back to back, values
back to back) because per-entry Python objects are what make a dump slow:
one ``BPF_MAP_LOOKUP_BATCH`` call copies 64k entries into ctypes buffers at
kernel speed, and the chunk travels to the client as two frames without
ever being split.  Consumers slice it with ``key_size`` and ``value_stride``.

Consistency: the caller holds an fd, so the map cannot be freed mid-dump;
entries added or deleted meanwhile may or may not show, as with bpftool.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator

import attrs

import watcher.kernel.sys.syscall as syscall
from watcher.kernel.maps.find import MapRecord
from watcher.kernel.maps.kinds import DumpMethod, dump_method
from watcher.kernel.sys.abi import percpu_slot
from watcher.kernel.sys.cpus import possible_cpus

DEFAULT_CHUNK = 65536
# Bytes of values one batch call fills at most.  The buffers are zeroed when made, so a
# 64k-entry buffer for 1 KiB values cost a 64 MiB memset and 64 MiB of RSS on every poll
# of a 512-entry map; the kernel fills only what the map holds.
BATCH_BUFFER_BYTES = 4 << 20
_ENOTSUPP = 524  # kernel-internal "operation not supported", seen by user space


class NotDumpable(Exception):
    """The map's type holds no entries a dump could show (ring buffers, ...)."""


@attrs.frozen
class Chunk:
    keys: bytes
    values: bytes
    count: int


def value_stride(record: MapRecord, ncpus: int | None = None) -> int:
    """Bytes per value in a dump: per-CPU maps hold one 8-aligned slot per CPU."""
    if record.percpu:
        return percpu_slot(record.value_size) * (ncpus or possible_cpus())
    return record.value_size


def dump(fd: int, record: MapRecord, chunk_entries: int = DEFAULT_CHUNK) -> Iterator[Chunk]:
    """Every entry of the map behind ``fd``, ``chunk_entries`` at a time."""
    method = dump_method(record.type)
    if method is DumpMethod.NONE:
        raise NotDumpable(record.type)
    stride = value_stride(record)
    if method is DumpMethod.BATCH:
        try:
            yield from _dump_batch(fd, record.key_size, stride,
                                   batch_entries(chunk_entries, record.max_entries, stride))
            return
        except _BatchRefused:
            pass
    yield from _dump_per_key(fd, record.key_size, stride, chunk_entries)


class _BatchRefused(Exception):
    pass


def batch_entries(chunk: int, max_entries: int, stride: int) -> int:
    """Entries per batch buffer: ``chunk``, no more than the map can hold or
    ``BATCH_BUFFER_BYTES`` of values take (a bucket larger than that is met by ENOSPC)."""
    if max_entries > 0:
        chunk = min(chunk, max_entries)
    return max(1, min(chunk, BATCH_BUFFER_BYTES // max(stride, 1)))


def _dump_batch(fd: int, key_size: int, stride: int, chunk: int) -> Iterator[Chunk]:
    cursor = syscall.BatchCursor(fd, key_size)
    keys = ctypes.create_string_buffer(chunk * key_size)
    values = ctypes.create_string_buffer(chunk * stride)
    while not cursor.done:
        try:
            n = syscall.map_lookup_batch(cursor, keys, values, chunk)
        except syscall.BpfError as e:
            if e.errno == errno.ENOSPC:
                # One hash bucket holds more than `chunk` entries: grow and retry.
                chunk *= 2
                keys = ctypes.create_string_buffer(chunk * key_size)
                values = ctypes.create_string_buffer(chunk * stride)
                continue
            if not cursor.started and e.errno in (errno.EINVAL, _ENOTSUPP, errno.EOPNOTSUPP):
                raise _BatchRefused from e
            raise
        if n:
            yield Chunk(ctypes.string_at(keys, n * key_size),
                        ctypes.string_at(values, n * stride), n)


def _dump_per_key(fd: int, key_size: int, stride: int, chunk: int) -> Iterator[Chunk]:
    keys: list[bytes] = []
    values: list[bytes] = []
    seen: set[bytes] = set()
    key = None
    while (key := syscall.map_get_next_key(fd, key, key_size)) is not None:
        if key in seen:
            # The previous key was deleted under us and the walk restarted.
            continue
        seen.add(key)
        value = syscall.map_lookup_elem(fd, key, stride)
        if value is None:
            continue  # deleted between GET_NEXT_KEY and LOOKUP_ELEM
        keys.append(key)
        values.append(value)
        if len(keys) == chunk:
            yield Chunk(b"".join(keys), b"".join(values), len(keys))
            keys.clear()
            values.clear()
    if keys:
        yield Chunk(b"".join(keys), b"".join(values), len(keys))


def count_entries(fd: int, record: MapRecord) -> int | None:
    """Entries in the map (None when its type holds none): there is no syscall for it."""
    if dump_method(record.type) is DumpMethod.NONE:
        return None
    return sum(c.count for c in dump(fd, record))
