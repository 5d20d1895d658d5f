"""Helpers for the event-source tests (no tests here).

:class:`Producer` is a tiny bcc program whose functions write records to a
ring buffer or a perf event array when *run by the test* through
``BPF_PROG_TEST_RUN`` (socket filters: no syscall, no tracepoint, no other
process can add records).  It counts what it produced, and for the ring
buffer what it failed to write, in arrays the test (and pymap's drops_map)
can read.  Its buffers can be pinned so a daemon attaches to them by path.
"""

from __future__ import annotations

import ctypes
import os
import struct

from watcher.kernel.sys import syscall

PRODUCER_TEXT = r"""
struct rec { u64 seq; u64 ts; u32 cpu; u32 tag; };
BPF_RINGBUF_OUTPUT(rb, RB_PAGES);
BPF_PERF_OUTPUT(pb);
BPF_ARRAY(produced, u64, 2);   // [0]: ring buffer attempts, [1]: perf attempts
BPF_ARRAY(dropped, u64, 1);    // ring buffer writes that failed (ring full)

static __always_inline void fill(struct rec *r, u64 seq) {
    r->seq = seq;
    r->ts = bpf_ktime_get_ns();
    r->cpu = bpf_get_smp_processor_id();
    r->tag = TAG;
}

int produce_rb(struct __sk_buff *skb) {
    int zero = 0;
    u64 *p = produced.lookup(&zero);
    if (!p)
        return 0;
    struct rec r = {};
    fill(&r, __sync_fetch_and_add(p, 1));
    if (rb.ringbuf_output(&r, sizeof(r), 0) != 0) {
        u64 *d = dropped.lookup(&zero);
        if (d)
            __sync_fetch_and_add(d, 1);
    }
    return 0;
}

int produce_pb(struct __sk_buff *skb) {
    int one = 1;
    u64 *p = produced.lookup(&one);
    if (!p)
        return 0;
    struct rec r = {};
    fill(&r, __sync_fetch_and_add(p, 1));
    pb.perf_submit(skb, &r, sizeof(r));
    return 0;
}
"""

REC = struct.Struct("<QQII")
# The record's declared layout, as a config would give it for a pinned buffer.
REC_LAYOUT_TOML = ('[{ name = "seq", type = "u64" }, { name = "ts", type = "u64" }, '
                   '{ name = "cpu", type = "u32" }, { name = "tag", type = "u32" }]')
PACKET = bytes(64)  # a socket filter's test input; the content does not matter


class Producer:
    def __init__(self, tag: int, rb_pages: int = 16):
        from bcc import BPF

        self.tag = tag
        self.bpf = BPF(text=PRODUCER_TEXT.replace("RB_PAGES", str(rb_pages))
                       .replace("TAG", str(tag)).encode())
        try:
            self.fn_rb = self.bpf.load_func(b"produce_rb", BPF.SOCKET_FILTER)
            self.fn_pb = self.bpf.load_func(b"produce_pb", BPF.SOCKET_FILTER)
        except BaseException:
            self.bpf.cleanup()
            raise

    def fd(self, table: str) -> int:
        return self.bpf[table.encode()].map_fd

    def pin(self, table: str, path) -> str:
        syscall.obj_pin(self.fd(table), str(path))
        return str(path)

    def run_rb(self, n: int) -> None:
        syscall.prog_test_run(self.fn_rb.fd, PACKET, n)

    def run_pb(self, n: int) -> None:
        syscall.prog_test_run(self.fn_pb.fd, PACKET, n)

    def produced_rb(self) -> int:
        return self.bpf[b"produced"][ctypes.c_int(0)].value

    def produced_pb(self) -> int:
        return self.bpf[b"produced"][ctypes.c_int(1)].value

    def dropped(self) -> int:
        return self.bpf[b"dropped"][ctypes.c_int(0)].value

    def close(self) -> None:
        self.bpf.cleanup()


class OneCpu:
    """Run this thread on one CPU (test runs write to the CPU they run on; perf
    reports a CPU's lost count with that CPU's next record)."""

    def __init__(self, cpu: int | None = None):
        self.cpu = cpu if cpu is not None else min(os.sched_getaffinity(0))

    def __enter__(self):
        self._old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.cpu})
        return self

    def __exit__(self, *exc):
        os.sched_setaffinity(0, self._old)


def source_config(path, tables: list[str]) -> str:
    """Write a config file with the given ``[[sources]]`` tables (TOML text each)."""
    text = "\n".join(f"[[sources]]\n{t}\n" for t in tables)
    with open(path, "w") as f:
        f.write(text)
    return str(path)
