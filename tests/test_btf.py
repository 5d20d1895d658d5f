"""watcher.kernel.btf.cache against bpftool, on real maps with rich BTF made by bcc.

bpftool is the oracle: for every entry, ``map_formatters`` applied to pymap's
raw dump must equal the ``formatted`` object of ``bpftool -j map dump``.  The
maps are filled with random bytes (non-string char arrays, unnamed enum
values, odd bitfields) plus hand-set entries (strings, named enums).

The hand-built blobs at the end check what bcc cannot produce: error paths,
floats, ENUM64, DATASEC, split BTF.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import os
import random
import shutil
import struct
import subprocess
from typing import cast

import attrs
import pytest
from conftest import require

from watcher.decode import btf as B
from watcher.decode import mapbtf
from watcher.kernel.btf import cache as kbtf
from watcher.kernel.maps import find as M
from watcher.kernel.maps.dump import dump, value_stride
from watcher.kernel.sys.abi import percpu_slot

pytestmark = pytest.mark.kernel


def _kernel_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root for the bpf syscall"
    if shutil.which("bpftool") is None:
        return "bpftool is not installed (it is the oracle)"
    return None


@pytest.fixture(scope="module")
def kernel_and_bpftool():
    require(_kernel_problem())


@pytest.fixture(scope="module")
def vmlinux_id(kernel_and_bpftool) -> int:
    out = subprocess.run(["bpftool", "-j", "btf", "list"], capture_output=True, text=True,
                         check=True).stdout
    return next(b["id"] for b in json.loads(out) if b.get("name") == "vmlinux")


@pytest.fixture(scope="module")
def bcc_bpf(kernel_and_bpftool):
    try:
        import bcc
    except ImportError as e:
        require(f"bcc does not import: {e}")
    return bcc.BPF


# bcc attaches BTF to its maps only when the program has a function; `dummy` is never loaded.
C_TEXT = r"""
enum color { RED = 1, GREEN = 2, BLUE = -3 };
enum tiny { T0, T1, T200 = 200 } __attribute__((packed));
enum wide { W1 = 1, WBIG = 0x7fffffffffULL };
typedef char name_t;
typedef unsigned int counter_t;

struct inner { u16 x; char y; char tag[5]; };
struct key { u32 pid; char comm[16]; };

struct value {
    u64 a;
    s32 b;
    enum color c;
    unsigned int f1:3, f2:5, f3:10;
    int f4:7;
    u64 w40:40;
    u8 after;
    struct inner in;
    struct inner pair[2];
    union { u32 u; u8 bytes[4]; } un;
    struct { u16 lo; u16 hi; };
    u8 raw[6];
    name_t typed[4];
    char names[2][8];
    volatile char vol[4];
    bool ok;
    enum tiny t;
    enum wide wd;
    void *p;
    s64 neg;
    s16 sh;
    counter_t cnt;
    u32 nums[3];
    struct inner many[30];
    char text[40];
};

struct big { unsigned __int128 u; __int128 s; u64 x; u64 y; };

struct pcv { u32 n; char tag[4]; s16 d; u8 bits:3, more:5; u8 pad; u32 z; };

BPF_HASH(rich_hash, struct key, struct value, 64);
BPF_ARRAY(rich_array, struct value, 6);
BPF_HASH(big_hash, u64, struct big, 16);
BPF_PERCPU_ARRAY(pc_array, struct pcv, 3);
BPF_PERCPU_HASH(pc_hash, u32, struct pcv, 8);

int dummy(void *ctx) { return 0; }
"""


@pytest.fixture(scope="module")
def prog(bcc_bpf):
    b = bcc_bpf(text=C_TEXT.encode())
    try:
        _fill(b, random.Random(1234))
        yield b
    finally:
        b.cleanup()


def _table(b, name: str):
    return b[name.encode()]  # bcc warns about str names


def _raw_leaf(data: bytes):
    """A ctypes object holding exactly ``data``.

    bcc's own ctypes class for ``struct value`` disagrees with clang's layout
    (a u8 after a 40-bit bitfield, a packed enum, char[2][8]), and its table
    update takes any ctypes object: raw bytes placed by BTF offsets it is.
    """
    return (ctypes.c_char * len(data)).from_buffer_copy(data)


def _offset(btf: B.Btf, type_id: int, *path: str) -> int:
    """Byte offset of a (nested) member."""
    offset = 0
    for name in path:
        t = btf.type(btf.resolve(type_id))
        member = next(m for m in t.detail if m.name == name)
        offset, type_id = offset + member.bit_offset // 8, member.type
    return offset


def _fill(b, rng: random.Random) -> None:
    h = _table(b, "rich_hash")
    record = M.record_from_fd(h.map_fd)
    btf, vt = mapbtf.load_btf(record.btf_id), record.btf_value_type_id
    named = {  # member path -> bytes, for one value in three
        ("c",): struct.pack("<i", 2), ("t",): b"\x02", ("ok",): b"\x00",
        ("text",): b'hello "world"\0',  # no backslash: bpftool prints one as \n
        ("names",): b"one\0\0\0\0\0" b"7 chars\0",
        ("in", "tag"): b"tag\0\0",
    }
    for i in range(20):
        key = h.Key.from_buffer_copy(rng.randbytes(ctypes.sizeof(h.Key)))
        if i % 2:
            key.pid, key.comm = i, f"proc-{i}".encode()
        value = bytearray(rng.randbytes(record.value_size))
        if i % 3 == 0:
            for path, data in named.items():
                at = _offset(btf, vt, *path)
                value[at:at + len(data)] = data
        h[key] = _raw_leaf(bytes(value))
    h[h.Key()] = _raw_leaf(bytes(record.value_size))  # zeros: empty strings, unnamed enums

    a = _table(b, "rich_array")
    for i in range(5):  # index 5 stays zero
        a[ctypes.c_int(i)] = _raw_leaf(rng.randbytes(record.value_size))

    big = _table(b, "big_hash")
    for i in range(6):
        big[big.Key(i)] = _raw_leaf(rng.randbytes(48))
    big[big.Key(100)] = _raw_leaf(bytes(32) + struct.pack("<QQ", 7, 0))  # 128-bit zeros: "0x0"

    for name in ("pc_array", "pc_hash"):
        t = _table(b, name)
        for i in range(3):
            t[t.Key(i)] = _raw_leaf(rng.randbytes(16 * t.total_cpu))


def _bpftool_dump(map_id: int) -> dict[bytes, dict]:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                         capture_output=True, text=True, check=True).stdout
    return {bytes(int(x, 16) for x in e["key"]): e["formatted"] for e in json.loads(out)}


def _pymap_formatted(fd: int) -> tuple[M.MapRecord, dict[bytes, dict]]:
    """What pymap shows: its own raw dump, formatted as bpftool would."""
    record = M.record_from_fd(fd)
    fmts = mapbtf.map_formatters(record)
    assert fmts is not None
    key_fmt, value_fmt = fmts
    stride, slot = value_stride(record), percpu_slot(record.value_size)
    got = {}
    for chunk in dump(fd, record):
        for i in range(chunk.count):
            key = chunk.keys[i * record.key_size:(i + 1) * record.key_size]
            entry = {"key": key_fmt(key)} if key_fmt else {}
            if record.percpu:
                base = i * stride  # the formatter reads at an offset: no slicing
                entry["values"] = [{"cpu": c, "value": value_fmt(chunk.values, base + c * slot)}
                                   for c in range(stride // slot)]
            else:
                entry["value"] = value_fmt(chunk.values[i * stride:(i + 1) * stride])
            got[key] = entry
    return record, got


@pytest.mark.parametrize("name", ["rich_hash", "rich_array", "big_hash", "pc_array", "pc_hash"])
def test_matches_bpftool(prog, name):
    table = _table(prog, name)
    record, got = _pymap_formatted(table.map_fd)
    assert record.btf_id and record.btf_key_type_id and record.btf_value_type_id
    expected = _bpftool_dump(record.id)
    assert len(expected) >= 3
    assert got.keys() == expected.keys()
    for key, entry in expected.items():
        assert not (diff := _difference(got[key], entry)), (key.hex(), diff)  # True != 1


def _difference(got, want, path="") -> str:
    """Where two formatted values first differ, for a readable failure."""
    if isinstance(got, dict) and isinstance(want, dict):
        if list(got) != list(want):
            return f"{path}: members {list(got)} != {list(want)}"
        return next((d for k in got if (d := _difference(got[k], want[k], f"{path}.{k}"))), "")
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return next((d for i, (g, w) in enumerate(zip(got, want))
                     if (d := _difference(g, w, f"{path}[{i}]"))), "")
    return "" if (got == want and type(got) is type(want)) else f"{path}: {got!r} != {want!r}"


def test_rich_values_exercise_every_rule(prog):
    """The comparison above is only as good as the data: check it hit the interesting cases."""
    _, got = _pymap_formatted(_table(prog, "rich_hash").map_fd)
    values = [e["value"] for e in got.values()]
    assert {v["c"] for v in values} >= {"GREEN", 0}  # named, and unnamed as a number
    assert any(v["text"] == 'hello "world"' for v in values)  # a string, quotes and all
    assert any(isinstance(v["text"], list) for v in values)  # random bytes: a list of numbers
    assert any(v["names"] == ["one", "7 chars"] for v in values)
    assert all(isinstance(v["typed"], list) for v in values)  # typedef'd char: never a string
    assert all(v["f4"].startswith("0x") and v["w40"].startswith("0x") for v in values)
    assert all(isinstance(v["ok"], bool) and "" in v and len(v["many"]) == 30 for v in values)
    assert any(k["comm"] == "proc-1" for k in (e["key"] for e in got.values()))
    _, big = _pymap_formatted(_table(prog, "big_hash").map_fd)
    assert {"u": "0x0", "s": "0x0", "x": 7, "y": 0} in [e["value"] for e in big.values()]


def test_formatter_reads_at_an_offset_and_rejects_short_values(prog):
    record = M.record_from_fd(_table(prog, "rich_hash").map_fd)
    _, value_fmt = cast(tuple, mapbtf.map_formatters(record))
    chunk = next(dump(_table(prog, "rich_hash").map_fd, record))
    second = chunk.values[record.value_size:2 * record.value_size]
    assert value_fmt(chunk.values, record.value_size) == value_fmt(second)
    for cut in (0, 1, record.value_size // 2, record.value_size - 1):
        with pytest.raises(B.BtfError, match="needs"):
            value_fmt(second[:cut])


def test_map_without_key_type_or_without_btf(prog, maps):
    record = M.record_from_fd(_table(prog, "rich_array").map_fd)
    key_fmt, value_fmt = cast(tuple, mapbtf.map_formatters(attrs.evolve(record, btf_key_type_id=0)))
    assert key_fmt is None and value_fmt is cast(tuple, mapbtf.map_formatters(record))[1]
    fd, _ = maps.create("hash", 4, 8, 4, name="pymap_nobtf")
    assert mapbtf.map_formatters(M.record_from_fd(fd)) is None


def test_load_btf_is_cached_and_parses_vmlinux_like_bpftool(vmlinux_id):
    """Every vmlinux type, as bpftool reads it: every kind, where bcc's BTF has few."""
    btf = mapbtf.load_btf(vmlinux_id)
    assert mapbtf.load_btf(vmlinux_id) is btf
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "id", str(vmlinux_id)],
                         capture_output=True, text=True, check=True).stdout
    types = json.loads(out)["types"]
    assert len(types) == len(btf) - 1
    for want in types:
        assert _as_bpftool(btf.type(want["id"])) == {k: v for k, v in want.items() if k != "id"}


def _as_bpftool(t: B.BtfType) -> dict:
    """A parsed type in the shape of ``bpftool -j btf dump``."""
    d: dict = {"kind": t.kind.name, "name": t.name or "(anon)"}
    k = B.Kind
    if t.kind == k.INT:
        enc = {0: "(none)", 1: "SIGNED", 2: "CHAR", 4: "BOOL"}[t.detail[0]]
        d.update(size=t.size, bits_offset=t.detail[1], nr_bits=t.detail[2], encoding=enc)
    elif t.kind in (k.PTR, k.TYPEDEF, k.VOLATILE, k.CONST, k.RESTRICT, k.TYPE_TAG):
        d["type_id"] = t.type
    elif t.kind == k.ARRAY:
        d.update(type_id=t.detail[0], index_type_id=t.detail[1], nr_elems=t.detail[2])
    elif t.kind in (k.STRUCT, k.UNION):
        d.update(size=t.size, vlen=len(t.detail), members=[
            {"name": m.name or "(anon)", "type_id": m.type, "bits_offset": m.bit_offset,
             **({"bitfield_size": m.bitfield_size} if m.bitfield_size else {})}
            for m in t.detail])
    elif t.kind in (k.ENUM, k.ENUM64):
        # bpftool 7.1 widens an unsigned 32-bit value through s32: 0xffffffff shows as 2**64-1.
        widen = t.kind == k.ENUM and not t.kind_flag
        d.update(encoding="SIGNED" if t.kind_flag else "UNSIGNED", size=t.size,
                 vlen=len(t.detail), values=[
                     {"name": n, "val": v + (1 << 64) - (1 << 32) if widen and v >= 1 << 31 else v}
                     for n, v in t.detail])
    elif t.kind == k.FWD:
        d["fwd_kind"] = "union" if t.kind_flag else "struct"
    elif t.kind == k.FUNC:
        d.update(type_id=t.type, linkage=["static", "global", "extern"][t.detail])
    elif t.kind == k.FUNC_PROTO:
        d.update(ret_type_id=t.type, vlen=len(t.detail),
                 params=[{"name": n or "(anon)", "type_id": p} for n, p in t.detail])
    elif t.kind == k.VAR:
        d.update(type_id=t.type, linkage=["static", "global", "extern"][t.detail])
    elif t.kind == k.DATASEC:
        d.update(size=t.size, vlen=len(t.detail),
                 vars=[{"type_id": a, "offset": o, "size": s} for a, o, s in t.detail])
    elif t.kind == k.FLOAT:
        d["size"] = t.size
    elif t.kind == k.DECL_TAG:
        d.update(type_id=t.type, component_idx=t.detail)
    return d


def test_every_vmlinux_struct_compiles_and_formats(vmlinux_id):
    """A robustness sweep over ~13k real types: build, run on zeros, no surprise exception."""
    btf = mapbtf.load_btf(vmlinux_id)
    done = 0
    for type_id in range(1, len(btf)):
        if btf.type(type_id).kind in (B.Kind.STRUCT, B.Kind.UNION, B.Kind.DATASEC):
            f = btf.formatter(type_id)
            json.dumps(f(bytes(btf.size_of(type_id))))
            done += 1
    assert done > 1000


# --- hand-built blobs: no kernel needed ---------------------------------------------------


class Blob:
    """Builds a BTF blob type by type; each add_* returns the new type id."""

    def __init__(self, base: B.Btf | None = None, base_strings: int = 0, first_id: int = 1):
        self.types: list[bytes] = []
        self.strings = b"" if base else b"\0"
        self.str_base = base_strings
        self.first_id = first_id

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return self.str_base + off

    def add(self, kind: B.Kind, name: str, size_type: int, extra: bytes = b"", vlen: int = 0,
            kflag: bool = False) -> int:
        info = kind << 24 | vlen | (kflag << 31)
        self.types.append(struct.pack("<III", self.s(name), info, size_type) + extra)
        return self.first_id + len(self.types) - 1

    def int(self, name: str, size: int, bits: int, enc: int = 0, offset: int = 0) -> int:
        return self.add(B.Kind.INT, name, size, struct.pack("<I", enc << 24 | offset << 16 | bits))

    # builtins.int: from here on, `int` in this class is the method above.
    def struct(self, name: str, size: builtins.int, members, kflag=False,
               union=False) -> builtins.int:
        extra = b"".join(struct.pack("<III", self.s(n), t, o) for n, t, o in members)
        return self.add(B.Kind.UNION if union else B.Kind.STRUCT, name, size, extra,
                        len(members), kflag)

    def array(self, elem: builtins.int, n: builtins.int) -> builtins.int:
        return self.add(B.Kind.ARRAY, "", 0, struct.pack("<III", elem, elem, n))

    def enum(self, name: str, size: builtins.int, values, kflag=False) -> builtins.int:
        extra = b"".join(struct.pack("<II", self.s(n), v & 0xFFFFFFFF) for n, v in values)
        return self.add(B.Kind.ENUM, name, size, extra, len(values), kflag)

    def raw(self) -> bytes:
        types = b"".join(self.types)
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                          len(self.strings))
        return hdr + types + self.strings


def small_blob() -> tuple[Blob, dict[str, int]]:
    b = Blob()
    ids = {}
    ids["u64"] = b.int("unsigned long long", 8, 64)
    ids["u32"] = b.int("unsigned int", 4, 32)
    ids["char"] = b.int("char", 1, 8, enc=1)
    ids["s"] = b.struct("s", 16, [("a", ids["u64"], 0), ("b", ids["u32"], 64),
                                  ("c", ids["u32"], 96)])
    ids["name"] = b.struct("n", 8, [("text", b.array(ids["char"], 8), 0)])
    return b, ids


def test_small_struct_and_offsets():
    b, ids = small_blob()
    btf = B.parse_btf(b.raw())
    f = btf.formatter(ids["s"])
    data = struct.pack("<QII", 1 << 63, 2, 3)
    assert f(data) == {"a": 1 << 63, "b": 2, "c": 3}
    assert f(b"xx" + data, 2) == f(data)
    assert btf.formatter(ids["s"]) is f
    g = btf.formatter(ids["name"])
    assert g(b"abc\0\xff\xff\xff\xff") == {"text": "abc"}
    assert g(b"abc\x01\0\0\0\0") == {"text": [97, 98, 99, 1, 0, 0, 0, 0]}
    assert g(b"12345678") == {"text": [49, 50, 51, 52, 53, 54, 55, 56]}  # no NUL: no string


def test_every_truncation_is_a_btf_error():
    raw = small_blob()[0].raw()
    for cut in range(len(raw)):
        with pytest.raises(B.BtfError):
            B.parse_btf(raw[:cut])


def test_bad_headers():
    raw = small_blob()[0].raw()
    with pytest.raises(B.BtfError, match="magic"):
        B.parse_btf(b"\0\0" + raw[2:])
    with pytest.raises(B.BtfError, match="big-endian"):
        B.parse_btf(b"\xeb\x9f" + raw[2:])
    with pytest.raises(B.BtfError, match="version"):
        B.parse_btf(raw[:2] + b"\x02" + raw[3:])
    with pytest.raises(B.BtfError, match="unknown kind"):
        b = Blob()
        b.add(31, "", 0)  # type: ignore[arg-type]
        B.parse_btf(b.raw())
    with pytest.raises(B.BtfError, match="string offset"):
        b = Blob()
        b.types.append(struct.pack("<III", 999, B.Kind.PTR << 24, 0))
        B.parse_btf(b.raw())


@pytest.mark.parametrize("make", [small_blob, lambda: scalar_blob(), lambda: arrays_blob()])
def test_random_corruption_never_leaks_other_errors(make):
    """Flipped bytes give BtfError or a working formatter: never struct.error and friends."""
    raw = make()[0].raw()
    rng = random.Random(7)
    for _ in range(1000):
        bad = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(24, len(bad))] = rng.randrange(256)
        try:
            btf = B.parse_btf(bytes(bad))
            for type_id in range(1, len(btf)):
                try:
                    btf.formatter(type_id)(rng.randbytes(256))
                except B.BtfError:
                    pass
        except B.BtfError:
            pass


def test_unformattable_types_and_dangling_ids():
    b = Blob()
    fwd = b.add(B.Kind.FWD, "later", 0)
    proto = b.add(B.Kind.FUNC_PROTO, "", 0)
    loop = b.add(B.Kind.TYPEDEF, "loop", 3)  # a typedef of itself
    dangling = b.add(B.Kind.PTR, "", 0)
    member = b.struct("m", 4, [("x", 99, 0)])
    btf = B.parse_btf(b.raw())
    for type_id in (0, fwd, proto, loop, member, 1234):
        with pytest.raises(B.BtfError):
            btf.formatter(type_id)
    assert btf.formatter(dangling)(struct.pack("<Q", 5)) == 5


def scalar_blob() -> tuple[Blob, dict[str, int]]:
    b = Blob()
    u8 = b.int("unsigned char", 1, 8)
    i24 = b.int("int24", 4, 24, enc=1)
    i128 = b.int("__int128", 16, 128, enc=1)
    cchar = b.int("ch", 1, 8, enc=2)
    boolean = b.int("_Bool", 1, 8, enc=4)
    s8 = b.int("signed char", 1, 8, enc=1)
    color = b.enum("color", 4, [("RED", 1), ("MINUS", -3)], kflag=True)
    uenum = b.enum("u", 4, [("A", 1)])  # kind_flag clear: unsigned
    tiny = b.enum("tiny", 1, [("BIG", 200), ("ONE", 1)])
    flt = b.add(B.Kind.FLOAT, "float", 4)
    dbl = b.add(B.Kind.FLOAT, "double", 8)
    const_u8 = b.add(B.Kind.CONST, "", u8)
    tagged = b.add(B.Kind.TYPE_TAG, "user", const_u8)
    bits = b.struct("bits", 8, [("a", u8, 3 << 24 | 0), ("b", s8, 5 << 24 | 3),
                                ("c", color, 20 << 24 | 8), ("d", u8, 56)], kflag=True)
    anon = b.struct("", 1, [("z", u8, 0)])
    outer = b.struct("o", 2, [("", anon, 0), ("x", tagged, 8)])
    e64 = b.add(B.Kind.ENUM64, "e64", 8, struct.pack("<III", b.s("NEG"), 0xFFFFFFFF, 0xFFFFFFFF),
                1, kflag=True)
    return b, {name: value for name, value in locals().items() if isinstance(value, int)}


def test_bpftool_scalar_rules():
    b, ids = scalar_blob()
    btf = B.parse_btf(b.raw())
    fmt = {name: btf.formatter(type_id) for name, type_id in ids.items()}
    assert fmt["i24"](b"\xff\xff\xff\x7f") == "0xffffff"  # odd widths: unsigned hex
    assert fmt["i128"](b"\xff" * 16) == "0x" + "f" * 32
    assert fmt["i128"](struct.pack("<QQ", 10, 0)) == "0xa"
    assert fmt["cchar"](b"A") == "A" and fmt["cchar"](b"\x01") == "\x01"
    assert fmt["boolean"](b"\x02") is True and fmt["boolean"](b"\0") is False
    assert fmt["s8"](b"\xff") == -1
    assert fmt["color"](struct.pack("<i", -3)) == "MINUS"
    assert fmt["color"](struct.pack("<i", 9)) == 9
    assert fmt["uenum"](struct.pack("<I", 0xFFFFFFFF)) == -1  # bpftool reads enums signed
    assert fmt["tiny"](b"\xc8") == -56 and fmt["tiny"](b"\x01") == "ONE"
    assert fmt["flt"](struct.pack("<f", 1.5)) == 1.5  # bpftool: "(unsupported-kind)"
    assert fmt["dbl"](struct.pack("<d", -2.25)) == -2.25
    assert fmt["tagged"](b"\x07") == 7
    data = bytes([0b11111_101, 0xFF, 0x0F, 0, 0, 0, 0, 9])
    assert fmt["bits"](data) == {"a": "0x5", "b": "0x1f", "c": "0xfff", "d": 9}
    assert fmt["outer"](b"\x01\x02") == {"": {"z": 1}, "x": 2}
    assert fmt["e64"](b"\xff" * 8) == "NEG" and fmt["e64"](b"\0" * 8) == 0


def test_datasec_and_var():
    b = Blob()
    u32 = b.int("unsigned int", 4, 32)
    v1 = b.add(B.Kind.VAR, "counter", u32, struct.pack("<I", 1))
    v2 = b.add(B.Kind.VAR, "limit", u32, struct.pack("<I", 1))
    sec = b.add(B.Kind.DATASEC, ".bss", 12, struct.pack("<III", v1, 0, 4) +
                struct.pack("<III", v2, 8, 4), vlen=2)
    btf = B.parse_btf(b.raw())
    assert btf.formatter(sec)(struct.pack("<III", 1, 0, 3)) == {
        ".bss": [{"counter": 1}, {"limit": 3}]}


def arrays_blob() -> tuple[Blob, dict[str, int]]:
    b = Blob()
    u16 = b.int("u16", 2, 16)
    i24 = b.int("int24", 4, 24)
    char = b.int("char", 1, 8, enc=1)
    pair = b.struct("pair", 6, [("x", u16, 0), ("tag", b.array(char, 4), 16)])
    odd = b.struct("odd", 4, [("v", i24, 0)])
    ids = {
        "rows": b.array(pair, 100),  # one struct per element: iter_unpack
        "loop": b.array(odd, 100),  # reads bytes itself: a call per element
        "grid": b.array(b.array(u16, 3), 4),  # small: unrolled
        "names": b.array(b.array(char, 3), 2),
    }
    return b, ids


def test_arrays():
    b, ids = arrays_blob()
    btf = B.parse_btf(b.raw())
    data = b"".join(struct.pack("<H4s", i, b"ab\0\xff" if i % 2 else b"abcd") for i in range(100))
    got = btf.formatter(ids["rows"])(data)
    assert got[:2] == [{"x": 0, "tag": [97, 98, 99, 100]}, {"x": 1, "tag": "ab"}]
    assert len(got) == 100 and got[99] == {"x": 99, "tag": "ab"}
    got = btf.formatter(ids["loop"])(struct.pack("<100I", *range(1 << 24, (1 << 24) + 100)))
    assert got[0] == {"v": "0x0"} and got[99] == {"v": "0x63"}
    grid = btf.formatter(ids["grid"])
    assert grid(struct.pack("<12H", *range(12))) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert btf.formatter(ids["names"])(b"ab\0xyz") == ["ab", [120, 121, 122]]
    for name in ("rows", "loop", "grid", "names"):
        with pytest.raises(B.BtfError, match="needs"):
            btf.formatter(ids[name])(bytes(btf.size_of(ids[name]) - 1))


def test_split_btf_on_a_base():
    base_blob, ids = small_blob()
    base = B.parse_btf(base_blob.raw())
    split = Blob(base=base, base_strings=len(base_blob.strings), first_id=len(base))
    wrapper = split.struct("w", 24, [("inner", ids["s"], 0), ("extra", ids["u64"], 128)])
    raw = split.raw()
    with pytest.raises(B.BtfError, match="split BTF"):
        B.parse_btf(raw)  # its strings do not stand alone
    btf = B.parse_btf(raw, base=base)
    assert btf.type(wrapper).name == "w" and btf.type(ids["u32"]).name == "unsigned int"
    data = struct.pack("<QIIQ", 1, 2, 3, 4)
    assert btf.formatter(wrapper)(data) == {"inner": {"a": 1, "b": 2, "c": 3}, "extra": 4}
    # What the daemon ships for split BTF: one blob a consumer parses without the base.
    assert B.needs_base(raw) and not B.needs_base(base_blob.raw())
    merged = B.merge_split(base_blob.raw(), raw)
    assert not B.needs_base(merged)
    alone = B.parse_btf(merged)
    assert len(alone) == len(btf) and alone.type(wrapper) == btf.type(wrapper)
    assert alone.formatter(wrapper)(data) == btf.formatter(wrapper)(data)
    assert alone.type(ids["u32"]) == btf.type(ids["u32"])


def test_standalone_blob_of_vmlinux_is_the_kernel_file(vmlinux_id):
    """vmlinux stands alone: shipped as the kernel has it (split BTF is merged onto it)."""
    with open(kbtf.VMLINUX_BTF, "rb") as f:
        assert kbtf.standalone_blob(vmlinux_id) == f.read()
