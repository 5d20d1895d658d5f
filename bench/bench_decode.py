"""Benchmark: decoding a 1,000,000-entry map with BTF, against not decoding it.

Run as root: ``.venv/bin/python bench/bench_decode.py`` (or ``make bench``).

The map: a hash map created by bcc (so it carries BTF) with u64 keys and
``struct { u64 packets; u32 ifindex; u16 port; u8 proto; u8 flags; }`` values,
1,000,000 entries, pinned in a private bpffs directory and read through a
private daemon.  Each reader runs 3 times; the best wall time counts:

(a) ``pymap get NAME -o json --raw > /dev/null``: hex only;
(b) ``pymap get NAME -o json > /dev/null``: hex plus ``formatted`` from the BTF.

Target: (b) / (a) <= 1.3 (issue 20).  Decoding happens in the client with the
BTF blob the daemon ships once (docs/architecture.md); both dumps render a
whole chunk at a time (watcher/decode/dumptext.py), the decoded one with digit
columns per struct member.  The output of (b) is checked once: every entry
has a ``formatted`` object matching its raw bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BenchError, best_of, check_root, private_bpffs, private_tmp, running_daemon

from watcher.kernel.sys import syscall

ENTRIES = 1_000_000
TARGET = 1.3
VALUE = struct.Struct("<QIHBB")

PROGRAM = """
struct flow { u64 packets; u32 ifindex; u16 port; u8 proto; u8 flags; };
BPF_HASH(%s, u64, struct flow, %d);
int pymap_bench_unused(void *ctx) { return 0; }  /* bcc attaches BTF only with a function */
"""


@contextlib.contextmanager
def btf_hash(pin: Path, name: str, entries: int):
    """A bcc-created (BTF-carrying) hash map with ``entries`` entries, pinned at ``pin``."""
    from bcc import BPF

    b = BPF(text=(PROGRAM % (name, entries)).encode())
    try:
        fd = b[name.encode()].map_fd
        syscall.obj_pin(fd, str(pin))
        step = 1 << 17
        for lo in range(0, entries, step):
            hi = min(lo + step, entries)
            keys = b"".join(struct.pack("<Q", i) for i in range(lo, hi))
            values = b"".join(VALUE.pack(i * 7, i % 64, i % 65536, 6 + i % 11, i % 4)
                              for i in range(lo, hi))
            syscall.map_update_batch(fd, keys, values, hi - lo)
    finally:
        b.cleanup()  # the pin keeps the map (and its BTF) alive
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pin)


def check_decoded(daemon, name: str, entries: int) -> None:
    proc = daemon.cli("get", name, "-o", "json")
    if proc.returncode != 0:
        raise BenchError(f"pymap get failed: {proc.stderr.strip()}")
    data = json.loads(proc.stdout)
    if data["count"] != entries or len(data["entries"]) != entries:
        raise BenchError(f"pymap get printed {data['count']} entries, not {entries}")
    for e in data["entries"][:: max(1, entries // 1000)]:
        packets, ifindex, port, proto, flags = VALUE.unpack(bytes.fromhex(e["value"]))
        want = {"packets": packets, "ifindex": ifindex, "port": port, "proto": proto,
                "flags": flags}
        if e.get("formatted", {}).get("value") != want:
            raise BenchError(f"entry decoded wrongly: {e}")


def measure(daemon, name: str, repeats: int, *flags: str):
    def run():
        p = daemon.cli("get", name, "-o", "json", *flags, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, capture_output=False)
        if p.returncode != 0:
            raise BenchError(f"pymap get failed: {p.stderr.strip()}")

    return best_of(run, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=ENTRIES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    check_root()
    name = f"bd_{secrets.token_hex(3)}"
    try:
        with private_bpffs() as bpffs, private_tmp() as tmp:
            t0 = time.perf_counter()
            with btf_hash(bpffs / name, name, args.entries), \
                    running_daemon(tmp, bpffs) as daemon:
                print(f"pymap bench_decode: hash map with BTF, {args.entries:,} entries "
                      f"(u64 key, 16-byte struct value); filled in {time.perf_counter() - t0:.2f} s")
                check_decoded(daemon, name, args.entries)
                raw, raw_all = measure(daemon, name, args.repeats, "--raw")
                dec, dec_all = measure(daemon, name, args.repeats)
    except BenchError as e:
        print(f"bench_decode: error: {e}", file=sys.stderr)
        return 1
    print()
    print(f"{'reader':<40} {'best s':>8}  all runs (s)")
    print(f"{'(a) pymap get -o json --raw':<40} {raw:>8.3f}  "
          + " ".join(f"{t:.3f}" for t in raw_all))
    print(f"{'(b) pymap get -o json (BTF decoded)':<40} {dec:>8.3f}  "
          + " ".join(f"{t:.3f}" for t in dec_all))
    ratio = dec / raw
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"\ndecoded / undecoded = {ratio:.2f} (target <= {TARGET:g}) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
