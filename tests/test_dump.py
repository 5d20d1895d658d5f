"""Dump buffers sized to the map, checked on real kernel maps with bpftool as the oracle.

The daemon dumps every watched map every interval; a batch buffer sized for 64k
entries whatever the map held cost a 64 MiB memset and 64 MiB of RSS per poll of a
512-entry map with 1 KiB values (seen as a transient 64 MiB block in the daemon).
"""

from __future__ import annotations

import tracemalloc

import pytest
from support.kernel import bpftool_entries, fill_batch, pattern, token, u32

from watcher.kernel.maps import dump as kdump
from watcher.kernel.maps.find import record_from_fd

pytestmark = pytest.mark.kernel

MiB = 1 << 20


def entries(fd: int) -> dict[bytes, bytes]:
    record = record_from_fd(fd)
    stride = kdump.value_stride(record)
    out = {}
    for chunk in kdump.dump(fd, record):
        for i in range(chunk.count):
            out[chunk.keys[i * record.key_size:(i + 1) * record.key_size]] = \
                chunk.values[i * stride:(i + 1) * stride]
    return out


def hexed(kv: dict[bytes, bytes]) -> dict[str, str]:
    return {k.hex(): v.hex() for k, v in kv.items()}


def written(fd: int, n: int, value_size: int) -> dict[bytes, bytes]:
    keys, values = [u32(i) for i in range(n)], [pattern(i, value_size) for i in range(n)]
    fill_batch(fd, keys, values)
    return dict(zip(keys, values))


@pytest.mark.parametrize("type_name", ["hash", "array"])
def test_a_small_map_of_large_values_is_dumped_with_small_buffers(maps, type_name):
    fd, map_id = maps.create(type_name, 4, 1024, 512, name=f"dmp{token()}")
    expected = written(fd, 512, 1024)
    tracemalloc.start()
    try:
        got = entries(fd)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == expected
    assert bpftool_entries(map_id) == hexed(expected)
    # 512 KiB of values: the buffer, its copy and the dict above, not 64 MiB of zeros.
    assert peak < 4 * MiB, f"dumping 512 KiB of values allocated {peak / MiB:.1f} MiB"


def test_a_hash_bucket_larger_than_the_buffer_grows_it(maps, monkeypatch):
    """A hash batch needs room for a whole bucket (ENOSPC otherwise): with a one-entry
    buffer every bucket of two or more entries makes the dump grow it, and nothing is lost."""
    fd, map_id = maps.create("hash", 4, 64, 4096, name=f"dmp{token()}")
    expected = written(fd, 4096, 64)
    monkeypatch.setattr(kdump, "BATCH_BUFFER_BYTES", 64)
    assert kdump.batch_entries(65536, 4096, 64) == 1
    assert entries(fd) == expected
    assert bpftool_entries(map_id) == hexed(expected)


def test_batch_entries_bounds():
    assert kdump.batch_entries(65536, 512, 1024) == 512  # no more than the map holds
    assert kdump.batch_entries(65536, 1 << 20, 1024) == 4096  # 4 MiB of values
    assert kdump.batch_entries(16, 1 << 20, 8) == 16  # the caller's chunk
    assert kdump.batch_entries(65536, 0, 8) == 65536  # max_entries unknown (0)
    assert kdump.batch_entries(65536, 10, 64 * MiB) == 1  # one entry always fits
