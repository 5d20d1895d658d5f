"""The buffer readers (watcher/kernel/buffers/ringbuf.py, perfbuf.py) against real rings:
variable-length and discarded records, bounded slices, records wrapping past the
end of a ring, many rounds through a small ring."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import need_bcc
from support.sources import PACKET, OneCpu

from watcher.kernel.buffers.perfbuf import PerfBufReader
from watcher.kernel.buffers.ringbuf import RingBufReader
from watcher.kernel.sys import syscall

pytestmark = pytest.mark.kernel

VAR_TEXT = r"""
struct small { u64 a; u64 b; };
struct var { u64 seq; u8 rest[40]; };   // records are a prefix of it, 8 to 42 bytes
BPF_RINGBUF_OUTPUT(rb, 1);      // one page: the tests go round it many times
BPF_PERF_OUTPUT(pb);
BPF_ARRAY(counter, u64, 2);

static __always_inline u32 size_of(u64 seq) { return 8 + (seq % 5) * 8 + (seq % 3); }

int var_rb(struct __sk_buff *skb) {
    int zero = 0;
    u64 *p = counter.lookup(&zero);
    if (!p)
        return 0;
    u64 seq = __sync_fetch_and_add(p, 1);
    if (seq % 7 == 3) {            // a reserved and discarded record in between
        struct small *x = rb.ringbuf_reserve(sizeof(struct small));
        if (x)
            rb.ringbuf_discard(x, 0);
    }
    struct var v = {};
    v.seq = seq;
    u64 len = size_of(seq);
    asm volatile("" : "+r"(len));  // keep the bound check below for the verifier
    if (len > sizeof(v))
        return 0;
    rb.ringbuf_output(&v, len, 0);
    return 0;
}

int var_pb(struct __sk_buff *skb) {
    int one = 1;
    u64 *p = counter.lookup(&one);
    if (!p)
        return 0;
    u64 seq = __sync_fetch_and_add(p, 1);
    struct var v = {};
    v.seq = seq;
    u64 len = size_of(seq);
    asm volatile("" : "+r"(len));  // keep the bound check below for the verifier
    if (len > sizeof(v))
        return 0;
    pb.perf_submit(skb, &v, len);
    return 0;
}
"""


def size_of(seq: int) -> int:
    return 8 + (seq % 5) * 8 + (seq % 3)


@pytest.fixture
def var_prog():
    bcc = need_bcc()
    b = bcc.BPF(text=VAR_TEXT.encode())
    try:
        yield b, b.load_func(b"var_rb", bcc.BPF.SOCKET_FILTER), b.load_func(
            b"var_pb", bcc.BPF.SOCKET_FILTER)
    finally:
        b.cleanup()


def split(chunk) -> list[bytes]:
    lengths = np.frombuffer(chunk.lengths, dtype="<u4")
    out, pos = [], 0
    for n in lengths.tolist():
        out.append(chunk.data[pos:pos + n])
        pos += n
    assert pos == len(chunk.data)
    return out


def test_ringbuf_variable_records_in_bounded_slices(var_prog):
    b, fn_rb, _ = var_prog
    fd = b[b"rb"].map_fd
    reader = RingBufReader(fd, syscall.map_info(fd).max_entries)
    try:
        seen: list[bytes] = []
        for _ in range(40):  # 40 rounds of 60 records through a 4 KiB ring: it wraps often
            syscall.prog_test_run(fn_rb.fd, PACKET, 60)
            while True:
                chunk = reader.read(7)
                assert chunk.count <= 7
                seen += split(chunk)
                if not chunk.more:
                    break
            assert reader.pending() == 0
        assert len(seen) == 2400
        for seq, rec in enumerate(seen):
            assert len(rec) == size_of(seq), seq
            assert struct.unpack_from("<Q", rec)[0] == seq
    finally:
        reader.close()


def test_ringbuf_uniform_records_fast_path_and_byte_limit(var_prog):
    """Runs of one length are copied as a block; a read also stops at ``max_bytes``."""
    b, fn_rb, _ = var_prog
    fd = b[b"rb"].map_fd
    reader = RingBufReader(fd, syscall.map_info(fd).max_entries)
    try:
        syscall.prog_test_run(fn_rb.fd, PACKET, 50)
        chunk = reader.read(1000, max_bytes=100)
        assert chunk.more and 0 < sum(split(chunk)[i].__len__() for i in range(chunk.count)) <= 148
        rest = reader.read(1000)
        recs = split(chunk) + split(rest)
        assert [struct.unpack_from("<Q", r)[0] for r in recs] == list(range(50))
        assert not rest.more and reader.read(10).count == 0
    finally:
        reader.close()


def test_perf_variable_records_wrapping_the_ring(var_prog):
    b, _, fn_pb = var_prog
    reader = PerfBufReader(b[b"pb"].map_fd, page_cnt=1)
    try:
        seen: list[bytes] = []
        with OneCpu(reader.cpus[0]):
            for _ in range(30):  # 30 rounds of 50 records through one 4 KiB page: it wraps
                syscall.prog_test_run(fn_pb.fd, PACKET, 50)
                while True:
                    chunk = reader.read(9)
                    assert chunk.lost == 0
                    seen += split(chunk)
                    if not chunk.more:
                        break
        assert len(seen) == 1500
        for seq, rec in enumerate(seen):
            # perf pads the u32 size + data to 8 bytes: the record is at least size_of(seq)
            assert size_of(seq) <= len(rec) < size_of(seq) + 8 and (len(rec) + 4) % 8 == 0
            assert struct.unpack_from("<Q", rec)[0] == seq
    finally:
        reader.close()
