"""Benchmark: dumping a 1,000,000-entry hash map, pymap against the usual tools.

Run as root: ``.venv/bin/python bench/bench_get.py`` (or ``make bench``).

The map: BPF_MAP_TYPE_HASH, 8-byte keys, 16-byte values, 1,000,000 entries,
pinned in a private bpffs directory and watched by a private daemon.  Each
reader runs 3 times; the best wall time counts:

(a) ``pymap get NAME -o json > /dev/null``: the whole CLI path (process
    start, daemon request, batch dump, wire, JSON), as a user runs it;
(b) ``bpftool -j map dump pinned PATH > /dev/null``: the reference;
(c) bcc ``Table.items()``: one GET_NEXT_KEY + LOOKUP_ELEM per entry;
(d) bcc ``Table.items_lookup_batch()``;
(e) ``watcher.kernel.maps.dump.dump()`` in this process: the raw batch read pymap's
    daemon does, without wire or JSON;
(f) ``pymap get NAME -o json`` of a second map of as many entries that carries
    BTF (bench_decode.py's: u64 key, a 16-byte struct of five integers), so
    every entry is decoded ("formatted");
(g) ``bpftool -j map dump`` of that map, which formats it from the BTF too.

Targets (issue 20): undecoded (a) / (b) <= 0.12; decoded (f) / (g) <= 0.15.  A missed target is printed, not fatal; the exit
status is non-zero only when something failed (setup, a reader erroring, or a
reader seeing the wrong number of entries).  Everything is removed on the way
out, errors included: the daemon, the pin, the map, the temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BenchError,
    best_of,
    big_hash,
    check_root,
    compile_bytecode,
    private_bpffs,
    private_tmp,
    run_main,
    running_daemon,
)
from bench_decode import btf_hash

from watcher.kernel.maps import dump as kdump
from watcher.kernel.maps import find as kmaps

ENTRIES = 1_000_000
TARGET = 0.12  # (a) / (b): undecoded
TARGET_DECODED = 0.15  # (f) / (g): decoded from BTF


def measure_pymap(daemon, name: str, entries: int, repeats: int):
    """``pymap get NAME -o json``: checked complete once, then timed."""
    # Once, untimed, to a file: the dump must be complete.
    out = daemon.run_dir.parent / "get.json"
    with open(out, "wb") as f:
        proc = daemon.cli("get", name, "-o", "json", stdout=f, stderr=subprocess.PIPE,
                          capture_output=False)
    if proc.returncode != 0:
        raise BenchError(f"pymap get failed: {proc.stderr.strip()}")
    with open(out, "rb") as dumped:
        dumped.seek(max(0, out.stat().st_size - 64))
        tail = dumped.read().decode()
    out.unlink()
    if f'"count":{entries}' not in tail:
        raise BenchError(f"pymap get printed the wrong count: ...{tail.strip()}")

    def run():
        p = daemon.cli("get", name, "-o", "json", stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, capture_output=False)
        if p.returncode != 0:
            raise BenchError(f"pymap get failed: {p.stderr.strip()}")

    return best_of(run, repeats)


def measure_bpftool(pin: Path, repeats: int):
    def run():
        p = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin)],
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           timeout=600)
        if p.returncode != 0:
            raise BenchError(f"bpftool map dump failed: {p.stderr.strip()}")

    return best_of(run, repeats)


@contextlib.contextmanager
def bcc_table(pin: Path, max_entries: int):
    """A bcc HashTable over the existing pinned map (BPF_TABLE_PINNED opens the pin)."""
    from bcc import BPF

    text = ("struct v16 { u64 a; u64 b; };\n"
            f'BPF_TABLE_PINNED("hash", u64, struct v16, big, {max_entries}, "{pin}");\n')
    b = BPF(text=text.encode())
    try:
        yield b[b"big"]
    finally:
        b.cleanup()


def measure_bcc(table, method: str, entries: int, repeats: int):
    def run():
        if method == "items":
            n = len(table.items())
        else:
            n = sum(1 for _ in table.items_lookup_batch())
        if n != entries:
            raise BenchError(f"bcc {method}() saw {n} entries, not {entries}")

    return best_of(run, repeats)


def measure_raw(pin: Path, entries: int, repeats: int):
    fd = kmaps.open_map(pin=str(pin))
    with kmaps.open_fd(fd):
        record = kmaps.record_from_fd(fd, (str(pin),))

        def run():
            n = sum(chunk.count for chunk in kdump.dump(fd, record))
            if n != entries:
                raise BenchError(f"dump() saw {n} entries, not {entries}")

        return best_of(run, repeats)


def measure_decoded(bpffs: Path, tmp: Path, entries: int, repeats: int) -> dict:
    """(f) and (g): the same dump of a map with BTF, decoded by pymap and by bpftool."""
    name = f"bench_btf_{secrets.token_hex(3)}"
    pin = bpffs / name
    t0 = time.perf_counter()
    out = {}
    (tmp / "btf").mkdir()
    with btf_hash(pin, name, entries):
        print(f"map {name}: {entries:,} entries with BTF, hash 8/16, filled in "
              f"{time.perf_counter() - t0:.2f} s", flush=True)
        with running_daemon(tmp / "btf", bpffs) as daemon:
            out["(f) pymap get -o json, BTF"] = measure_pymap(daemon, name, entries, repeats)
        out["(g) bpftool -j map dump, BTF"] = measure_bpftool(pin, repeats)
    return out


def verdict(label: str, ratio: float, target: float) -> str:
    return f"{label} = {ratio:.3f} (target <= {target}) {'met' if ratio <= target else 'MISSED'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=ENTRIES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-bcc-items", action="store_true",
                        help="skip (c), the slowest reader")
    parser.add_argument("--skip-decoded", action="store_true",
                        help="skip (f) and (g), the map with BTF")
    args = parser.parse_args()
    check_root()
    compile_bytecode()

    name = f"bench_{secrets.token_hex(3)}"
    results: dict[str, tuple[float, list[float]]] = {}
    notes: list[str] = []
    with private_bpffs() as bpffs, private_tmp() as tmp:
        pin = bpffs / name
        t0 = time.perf_counter()
        with big_hash(pin, args.entries, name) as fd:
            map_id = kmaps.record_from_fd(fd).id
            print(f"map {name} (id {map_id}): {args.entries:,} entries, hash 8/16, "
                  f"filled in {time.perf_counter() - t0:.2f} s; best of {args.repeats}",
                  flush=True)
            with running_daemon(tmp, bpffs) as daemon:
                results["(a) pymap get -o json"] = measure_pymap(
                    daemon, name, args.entries, args.repeats)
                if daemon.proc.poll() is not None:
                    raise BenchError(f"daemon died: {daemon.log_tail()}")
            results["(b) bpftool -j map dump"] = measure_bpftool(pin, args.repeats)
            try:
                with bcc_table(pin, args.entries) as table:
                    if args.skip_bcc_items:
                        notes.append("(c) skipped (--skip-bcc-items)")
                    else:
                        results["(c) bcc items()"] = measure_bcc(
                            table, "items", args.entries, args.repeats)
                    results["(d) bcc items_lookup_batch()"] = measure_bcc(
                        table, "batch", args.entries, args.repeats)
            except ImportError as e:
                notes.append(f"(c), (d) skipped: bcc does not import ({e})")
            results["(e) raw dump() in-process"] = measure_raw(pin, args.entries, args.repeats)
        if args.skip_decoded:
            notes.append("(f), (g) skipped (--skip-decoded)")
        else:
            results.update(measure_decoded(bpffs, tmp, args.entries, args.repeats))

    ref = results["(b) bpftool -j map dump"][0]
    print()
    print(f"{'reader':34} {'best s':>8} {'/ bpftool':>10}   all runs (s)")
    for label, (best, times) in results.items():
        runs = " ".join(f"{t:.3f}" for t in times)
        print(f"{label:34} {best:8.3f} {best / ref:10.3f}   {runs}")
    for note in notes:
        print(note)
    print()
    print(verdict("pymap get -o json / bpftool (undecoded)",
                  results["(a) pymap get -o json"][0] / ref, TARGET))
    if "(f) pymap get -o json, BTF" in results:
        print(verdict("pymap get -o json / bpftool (decoded from BTF)",
                      results["(f) pymap get -o json, BTF"][0]
                      / results["(g) bpftool -j map dump, BTF"][0], TARGET_DECODED))
    return 0


if __name__ == "__main__":
    run_main(main)
