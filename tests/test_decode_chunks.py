"""The whole-chunk dump renderer gives exactly what entry-by-entry decoding gives."""

from __future__ import annotations

import json
import os

import pytest
from conftest import need_bcc

from watcher.daemon.catalog import to_wire
from watcher.decode.choose import choose
from watcher.decode.dumptext import dump_lines
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


def _extremes(m) -> tuple[bytes, bytes]:
    """Entries whose integers are 0, 1, 9, 10, the largest and the most negative of
    every width, and random bytes: every digit count and both signs."""
    patterns = [b"\0", b"\1", b"\x09", b"\x0a", b"\xff", b"\x7f", b"\x80"]
    keys, values = [], []
    for p in patterns:
        keys.append((p * m.key_size)[:m.key_size])
        values.append((p * m.value_stride)[:m.value_stride])
        keys.append(b"\0" * (m.key_size - 1) + p)  # a sign bit alone: the minimum
        values.append(b"\0" * (m.value_stride - 1) + p)
    n = 500
    return (b"".join(keys) + os.urandom(n * m.key_size),
            b"".join(values) + os.urandom(n * m.value_stride))


@pytest.mark.parametrize("name", ["flat_vals", "scalar_vals"])
def test_chunk_lines_equal_per_entry_decoding(bcc_maps, name):
    m, decoding = _decoding(bcc_maps, name)
    assert decoding.source == "btf"
    lines = dump_lines(m.percpu, m.key_size, m.value_stride, decoding.formatter)
    assert lines is not None and lines.decoded, "flat integer layouts take the fast path"
    keys, values = _extremes(m)
    n = len(keys) // m.key_size
    fast = [json.loads(t) for t in lines.render(keys, values, n).split(",\n")]
    slow = []
    for i in range(n):
        key = keys[i * m.key_size:(i + 1) * m.key_size]
        value = values[i * m.value_stride:(i + 1) * m.value_stride]
        slow.append({"key": key.hex(), "value": value.hex(),
                     "formatted": decoding.formatter(key, value)})
    assert fast == slow


def test_hex_lines_without_a_decoder(bcc_maps):
    m, _ = _decoding(bcc_maps, "flat_vals")
    lines = dump_lines(m.percpu, m.key_size, m.value_stride, None)
    assert lines is not None and not lines.decoded
    keys, values = os.urandom(3 * m.key_size), os.urandom(3 * m.value_stride)
    ks, vs = m.key_size, m.value_stride
    want = ",\n".join(f'{{"key":"{keys[i * ks:(i + 1) * ks].hex()}",'
                       f'"value":"{values[i * vs:(i + 1) * vs].hex()}"}}' for i in range(3))
    assert lines.render(keys, values, 3) == want


def test_strings_keep_the_per_entry_path(bcc_maps):
    m, decoding = _decoding(bcc_maps, "not_flat")
    assert decoding.source == "btf"
    assert dump_lines(m.percpu, m.key_size, m.value_stride, decoding.formatter) is None
