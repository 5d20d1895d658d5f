"""The whole-chunk decoding fast path gives exactly what entry-by-entry decoding gives."""

from __future__ import annotations

import json
import os

import pytest
from conftest import need_bcc

from watcher.daemon.catalog import to_wire
from watcher.decode.choose import choose
from watcher.kernel.btf import cache as kbtf
from watcher.kernel.maps import find as kmaps

FLAT = """
struct flat { u64 a; s32 b; u16 c; char d; u8 e; u32 f; };   /* padding after f */
struct k2 { u32 ip; u16 port; u8 proto; u8 pad; };
struct name { char text[8]; };
BPF_HASH(flat_vals, struct k2, struct flat, 16);
BPF_HASH(scalar_vals, u32, s64, 16);
BPF_HASH(not_flat, u32, struct name, 16);  /* a string: no fast path */
int pymap_unused(void *ctx) { return 0; }
"""


@pytest.fixture
def bcc_maps():
    bcc = need_bcc()
    b = bcc.BPF(text=FLAT.encode())
    yield b
    b.cleanup()


def _decoding(b, name: str):
    record = kmaps.record_from_fd(b[name.encode()].map_fd)
    m = to_wire(record)
    return m, choose(m, kbtf.standalone_blob(record.btf_id))


@pytest.mark.parametrize("name", ["flat_vals", "scalar_vals"])
def test_chunk_json_equals_per_entry_decoding(bcc_maps, name):
    m, decoding = _decoding(bcc_maps, name)
    assert decoding.source == "btf"
    chunk_json = getattr(decoding.formatter, "chunk_json", None)
    assert chunk_json is not None, "flat integer layouts take the fast path"
    n = 500
    keys, values = os.urandom(n * m.key_size), os.urandom(n * m.value_stride)
    fast = [json.loads(t) for t in chunk_json(keys, values)]
    slow = [decoding.formatter(keys[i * m.key_size:(i + 1) * m.key_size],
                               values[i * m.value_stride:(i + 1) * m.value_stride])
            for i in range(n)]
    assert fast == slow


def test_strings_keep_the_per_entry_path(bcc_maps):
    _, decoding = _decoding(bcc_maps, "not_flat")
    assert decoding.source == "btf"
    assert getattr(decoding.formatter, "chunk_json", None) is None
