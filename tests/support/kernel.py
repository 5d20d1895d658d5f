"""Helpers shared by the tests: bpftool as the oracle, map fillers, output parsers.

bpftool prints keys and values as arrays of ``"0x.."`` strings; pymap prints
one hex string.  Both are normalised here to ``{key_hex: value}`` where value
is a hex string, or for per-CPU maps a tuple of per-CPU hex strings, so a
test compares two dicts and a failure shows the differing entries.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import uuid

import attrs

from watcher.kernel.features import probe as features
from watcher.kernel.sys import syscall
from watcher.kernel.sys.abi import percpu_slot
from watcher.kernel.sys.cpus import possible_cpus

NCPUS = possible_cpus()


@functools.cache
def host_features() -> features.Features:
    """This host's answers, probed once per test run as the daemon probes once per start:
    a test of a facility checks its behaviour where the host allows it, and the documented
    fallback where the host refuses it."""
    return features.probe()


def host_allows(name: str) -> bool:
    return host_features().allows(name)


def made_up_features(refused: dict[str, str], others: bool | None = None
                     ) -> features.Features:
    """This host's answers with the facilities in ``refused`` refused with those errnos,
    and the others as the host says (or all available with ``others=True``): for testing
    a choice made from the answers; the refusals themselves are test_degrade.py's."""
    return features.Features(tuple(
        attrs.evolve(f, available=False, error=refused[f.name], detail=f"made up ({refused[f.name]})",
                     degrades="-", fix="-") if f.name in refused
        else attrs.evolve(f, available=True) if others else f
        for f in host_features().facilities))


def token() -> str:
    """A short random tag that keeps this test's map names apart from anyone else's."""
    return uuid.uuid4().hex[:6]


# --- bpftool, the independent oracle ---------------------------------------------


def bpftool(*args: str):
    proc = subprocess.run(["bpftool", "-j", *args], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"bpftool {' '.join(args)}: {proc.stdout} {proc.stderr}"
    return json.loads(proc.stdout)


def bpftool_show(map_id: int) -> dict:
    """``bpftool -j -f map show id N`` (``-f`` adds the ``pinned`` paths).

    One map at a time on purpose: bpftool v7.1's show-everything loop carries
    ``btf_id`` over from the previous map with BTF to later maps without one.
    """
    return bpftool("-f", "map", "show", "id", str(map_id))


def _hex(byte_strings: list[str]) -> str:
    return "".join(b[2:].zfill(2) for b in byte_strings)


def bpftool_dump(map_id: int) -> list[dict]:
    return bpftool("map", "dump", "id", str(map_id))


def bpftool_entries(map_id: int) -> dict[str, str | tuple[str, ...]]:
    """``bpftool map dump`` as {key hex: value hex | (cpu0 hex, cpu1 hex, ...)}."""
    out: dict[str, str | tuple[str, ...]] = {}
    for e in bpftool_dump(map_id):
        key = _hex(e["key"])
        assert key not in out, f"bpftool printed key {key} twice"
        if "values" in e:
            vals = sorted(e["values"], key=lambda v: v["cpu"])
            assert [v["cpu"] for v in vals] == list(range(len(vals)))
            out[key] = tuple(_hex(v["value"]) for v in vals)
        else:
            out[key] = _hex(e["value"])
    return out


def bpftool_formatted(map_id: int) -> dict[str, dict]:
    """{key hex: bpftool's BTF-formatted entry}."""
    return {_hex(e["key"]): e["formatted"] for e in bpftool_dump(map_id) if "formatted" in e}


# --- pymap output -----------------------------------------------------------------


def pymap_entries(doc: dict) -> dict[str, str | tuple[str, ...]]:
    """A ``pymap get -o json`` document in the same shape as :func:`bpftool_entries`."""
    out: dict[str, str | tuple[str, ...]] = {}
    for e in doc["entries"]:
        key = e["key"]
        assert key not in out, f"pymap printed key {key} twice"
        if "values" in e:
            assert [v["cpu"] for v in e["values"]] == list(range(len(e["values"])))
            out[key] = tuple(v["value"] for v in e["values"])
        else:
            out[key] = e["value"]
    return out


def table_rows(stdout: str, columns: int) -> dict[str, tuple[str, ...]]:
    """First cell -> the other cells, from rich tables of ``columns`` columns in
    ``stdout`` (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│").split("│")]
        if not line.startswith("│") or len(cells) != columns:
            continue
        if cells[0]:
            current = cells[0]
            out[current] = cells[1:]
        elif current:
            out[current] = [f"{a} {b}".strip() for a, b in zip(out[current], cells[1:])]
    return {k: tuple(v) for k, v in out.items()}


def facility_rows(stdout: str) -> dict[str, tuple[str, ...]]:
    """Facility title -> (state, errno, detail, fix) from doctor's second table."""
    return table_rows(stdout, 5)


def one_error_line(stderr: str) -> str:
    """The CLI's error contract: one ``pymap: error:`` line, never a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("pymap: error: "), lines[0]
    return lines[0]


# --- filling maps -----------------------------------------------------------------


def percpu_value(value_size: int, per_cpu: list[bytes]) -> bytes:
    """The buffer a per-CPU update takes: one 8-byte-aligned slot per possible CPU."""
    slot = percpu_slot(value_size)
    assert len(per_cpu) == NCPUS
    return b"".join(v.ljust(slot, b"\0") for v in per_cpu)


def fill_batch(fd: int, keys: list[bytes], values: list[bytes], step: int = 50_000) -> None:
    for i in range(0, len(keys), step):
        ks, vs = keys[i:i + step], values[i:i + step]
        syscall.map_update_batch(fd, b"".join(ks), b"".join(vs), len(ks))


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def pattern(n: int, size: int) -> bytes:
    """``size`` bytes that differ from entry to entry (and from zero)."""
    seed = struct.pack("<Q", (n * 0x9E3779B97F4A7C15 + 1) & (2**64 - 1))
    return (seed * (size // 8 + 1))[:size]


def lpm_key(prefixlen: int, addr: bytes) -> bytes:
    return struct.pack("<I", prefixlen) + addr


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# --- a zoo of every common map type, filled with distinct data ----------------------


class ZooMap:
    def __init__(self, kind: str, name: str, fd: int, map_id: int, pin, expected):
        self.kind = kind  # map type, as pymap and bpftool name it
        self.name = name  # kernel name
        self.fd = fd
        self.id = map_id
        self.pin = pin  # Path or None
        self.expected = expected  # {key hex: value hex | per-CPU tuple}, None: not dumpable

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} id:{self.id}>"


def build_zoo(maps, bpffs_dir, tag: str) -> list[ZooMap]:
    """One map of each common type, named ``pt<tag>_*``; some pinned under ``bpffs_dir``."""
    zoo: list[ZooMap] = []

    def add(kind, short, key_size, value_size, max_entries, flags=0, pin=False):
        name = f"pt{tag}_{short}"
        assert len(name) <= 15
        path = bpffs_dir / f"{short}_pin" if pin else None
        fd, map_id = maps.create(kind, key_size, value_size, max_entries, name=name,
                                 flags=flags, pin=path)
        z = ZooMap(kind, name, fd, map_id, path, {})
        zoo.append(z)
        return z

    # hash: 300 of 1024 slots, batch-filled, pinned.
    z = add("hash", "hash", 8, 16, 1024, pin=True)
    keys = [u64(i * 7 + 1) for i in range(300)]
    values = [pattern(i, 16) for i in range(300)]
    fill_batch(z.fd, keys, values)
    z.expected = {k.hex(): v.hex() for k, v in zip(keys, values)}

    # array: every slot exists; even ones written.
    z = add("array", "array", 4, 12, 64)
    keys = [u32(i) for i in range(0, 64, 2)]
    values = [pattern(1000 + i, 12) for i in range(0, 64, 2)]
    fill_batch(z.fd, keys, values)
    z.expected = {u32(i).hex(): bytes(12).hex() for i in range(64)}
    z.expected.update({k.hex(): v.hex() for k, v in zip(keys, values)})

    # percpu_hash: a different value on each CPU; 12-byte values leave padding per slot.
    z = add("percpu_hash", "pcpuh", 4, 12, 128, pin=True)
    for i in range(50):
        per_cpu = [pattern(2000 + i * 16 + c, 12) for c in range(NCPUS)]
        syscall.map_update_elem(z.fd, u32(i * 3), percpu_value(12, per_cpu))
        z.expected[u32(i * 3).hex()] = tuple(v.hex() for v in per_cpu)

    # percpu_array: all slots; the first half written.
    z = add("percpu_array", "pcpua", 4, 8, 16)
    for i in range(16):
        per_cpu = [pattern(3000 + i * 16 + c, 8) if i < 8 else bytes(8) for c in range(NCPUS)]
        if i < 8:
            syscall.map_update_elem(z.fd, u32(i), percpu_value(8, per_cpu))
        z.expected[u32(i).hex()] = tuple(v.hex() for v in per_cpu)

    # lru_hash: far below max_entries, so nothing is evicted.
    z = add("lru_hash", "lru", 8, 8, 1024)
    keys = [u64(0xABCD0000 + i) for i in range(100)]
    values = [pattern(4000 + i, 8) for i in range(100)]
    fill_batch(z.fd, keys, values)
    z.expected = {k.hex(): v.hex() for k, v in zip(keys, values)}

    # lru_percpu_hash
    z = add("lru_percpu_hash", "lrupc", 4, 4, 1024)
    for i in range(40):
        per_cpu = [pattern(5000 + i * 16 + c, 4) for c in range(NCPUS)]
        syscall.map_update_elem(z.fd, u32(0x1000 + i), percpu_value(4, per_cpu))
        z.expected[u32(0x1000 + i).hex()] = tuple(v.hex() for v in per_cpu)

    # lpm_trie: nested prefixes of several lengths; no batch support, so a per-key walk.
    z = add("lpm_trie", "lpm", 8, 8, 128, flags=1, pin=True)  # BPF_F_NO_PREALLOC
    prefixes = [(8, bytes([10, 0, 0, 0]))]
    prefixes += [(16, bytes([10, i, 0, 0])) for i in range(10)]
    prefixes += [(24, bytes([10, 1, i, 0])) for i in range(10)]
    prefixes += [(32, bytes([192, 168, 0, i])) for i in range(9)]
    for n, (plen, addr) in enumerate(prefixes):
        key, value = lpm_key(plen, addr), pattern(6000 + n, 8)
        syscall.map_update_elem(z.fd, key, value)
        z.expected[key.hex()] = value.hex()

    # Streams and fd holders: listed, never dumped.
    z = add("ringbuf", "rb", 0, 0, 4096, pin=True)
    z.expected = None
    z = add("perf_event_array", "pea", 4, 4, NCPUS)
    z.expected = None
    return zoo


# --- maps with BTF, created by bcc --------------------------------------------------

BCC_TEXT = """
struct val_t { u64 count; u32 pid; char comm[8]; };
struct key_t { u32 a; u16 b; u8 c[2]; };
BPF_HASH(TAG_h, u32, u64);
BPF_ARRAY(TAG_a, u64, 4);
BPF_HASH(TAG_s, struct key_t, struct val_t);
BPF_PERCPU_ARRAY(TAG_p, u32, 2);
/* bcc loads BTF (and gives the maps a btf_id) only when the text has a function. */
int TAG_fn(void *ctx) {
    u32 k = 0;
    struct key_t kk = {};
    u64 *h = TAG_h.lookup(&k);
    u64 *a = TAG_a.lookup(&k);
    struct val_t *s = TAG_s.lookup(&kk);
    u32 *p = TAG_p.lookup(&k);
    return (h && a && s && p) ? 1 : 0;
}
"""


class BccMaps:
    """bcc's BPF object plus {short name: (kernel name, map id)} for its maps."""

    def __init__(self, tag: str):
        import ctypes

        from bcc import BPF

        self.prefix = f"b{tag}"
        self.bpf = BPF(text=BCC_TEXT.replace("TAG", self.prefix).encode())
        try:
            self.ids = {}
            for short in ("h", "a", "s", "p"):
                name = f"{self.prefix}_{short}"
                self.ids[short] = (name, syscall.map_info(self.table(short).map_fd).id)
            self.table("h")[ctypes.c_uint32(5)] = ctypes.c_uint64(99)
            self.table("h")[ctypes.c_uint32(6)] = ctypes.c_uint64(2**63 + 1)
            self.table("a")[ctypes.c_int(1)] = ctypes.c_uint64(7)
            t = self.table("s")
            for i in range(3):
                k = t.Key()
                k.a, k.b, k.c[0], k.c[1] = 7 + i, 3, 1, 2
                v = t.Leaf()
                v.count, v.pid, v.comm = 42 + i, 1234, b"bash"
                t[k] = v
            p = self.table("p")
            vals = p.Leaf(*[100 + c for c in range(len(p.Leaf()))])
            p[ctypes.c_int(1)] = vals
        except BaseException:
            self.bpf.cleanup()
            raise

    def table(self, short: str):
        return self.bpf[f"{self.prefix}_{short}".encode()]

    def close(self) -> None:
        self.bpf.cleanup()
