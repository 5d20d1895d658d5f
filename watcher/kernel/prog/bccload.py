"""Loading a BPF C program with bcc, and finding its buffers and maps.

bcc compiles the C at run time, creates the program's maps, loads its
functions and attaches those named by convention (``TRACEPOINT_PROBE``,
``RAW_TRACEPOINT_PROBE``, ``tracepoint__cat__event``, ...), exactly as it does
for its own tools.  pymap then reads the program's ring buffers and perf event
arrays itself (:mod:`..buffers.ringbuf`, :mod:`..buffers.perfbuf`), not through bcc's
per-record Python callbacks.

Record layout: bcc remembers the C struct a program passes to
``perf_submit``/``ringbuf_output`` (``bpf_perf_event_fields``: ``name#type``
strings, which its ``table.event()`` turns into a ctypes struct).  This
module turns them into a declared layout (the config's field vocabulary, with
the C compiler's natural alignment written out as ``pad[N]`` fields), so
records from bcc sources and from attached buffers decode the same way, in
the consumer.  Like bcc's ``event()``, this assumes natural alignment (no
``__attribute__((packed))``); a field type outside the vocabulary (a nested
struct) leaves the buffer without a layout: records are then raw hex.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import sys

import attrs

import watcher.kernel.sys.syscall as syscall
from watcher.kernel.maps.kinds import type_name

log = logging.getLogger("pymap.kernel.bcc")

# bcc's C type names -> layout type; see bcc/table.py's _get_event_class.
_SCALARS: dict[str, str] = {
    "char": "s8", "s8": "s8", "signed char": "s8", "__s8": "s8",
    "unsigned char": "u8", "u8": "u8", "__u8": "u8", "_Bool": "bool", "bool": "bool",
    "short": "s16", "s16": "s16", "__s16": "s16",
    "unsigned short": "u16", "u16": "u16", "__u16": "u16",
    "int": "s32", "s32": "s32", "__s32": "s32", "enum": "s32", "pid_t": "s32",
    "unsigned int": "u32", "u32": "u32", "__u32": "u32",
    "long": "s64", "long long": "s64", "s64": "s64", "__s64": "s64",
    "unsigned long": "u64", "unsigned long long": "u64", "u64": "u64", "__u64": "u64",
    "void *": "u64", "char *": "u64", "u8 *": "u64",
    "__be16": "be16", "__be32": "be32", "__be64": "be64",
    # Hints a program can use so addresses print as text (see docs/sources.md):
    # typedef u32 pymap_ipv4; typedef u8 pymap_ipv6[16]; typedef u8 pymap_mac[6];
    "pymap_ipv4": "ipv4", "pymap_ipv6": "ipv6", "pymap_mac": "mac",
}
# layout type -> (size, alignment in a C struct)
_SIZES = {"s8": (1, 1), "u8": (1, 1), "bool": (1, 1), "s16": (2, 2), "u16": (2, 2),
          "be16": (2, 2), "s32": (4, 4), "u32": (4, 4), "be32": (4, 4), "s64": (8, 8),
          "u64": (8, 8), "be64": (8, 8), "ipv4": (4, 4), "ipv6": (16, 1), "mac": (6, 1),
          "int128": (16, 16)}
_SCALARS.update({"__int128": "int128", "unsigned __int128": "int128"})
# libbcc's soname, as bcc.libbcc loads it: dlopen gives the same library, here with a
# ctypes handle of our own (see :func:`_table_api`).
_LIBBCC = "libbcc.so.0"
_ARRAY = re.compile(r"^(.+?) ?\[(\d+)\]$")


def _table_api(lib_name: str):
    """libbcc's table enumeration, which bcc's Python module leaves undeclared.

    A separate handle, so setting argument types here cannot change how
    bcc itself calls the library.
    """
    lib = ctypes.CDLL(lib_name)
    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.bpf_table_fd_id.restype = ctypes.c_int
    lib.bpf_table_fd_id.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


class BccError(Exception):
    """A program could not be compiled, loaded or attached, or has no such buffer."""


@attrs.frozen
class Table:
    name: str
    type: str  # map type, as bpftool names it
    fd: int  # bcc's read-write fd; valid until the program is cleaned up
    map_id: int
    max_entries: int


def layout_from_bcc_fields(fields: list[str]) -> list[dict] | None:
    """``["pid#u32", "comm#char[16]", ...]`` -> layout fields with explicit padding.

    None when a type is outside the vocabulary (the records stay raw hex).
    """
    out: list[dict] = []
    offset = 0
    max_align = 1
    for item in fields:
        name, _, ctype = item.partition("#")
        ctype = ctype.strip()
        if ctype.startswith("enum "):
            ctype = "enum"
        m = _ARRAY.match(ctype)
        count = 1
        if m:
            ctype, count = m.group(1).strip(), int(m.group(2))
        if ctype not in _SCALARS:
            return None
        ltype = _SCALARS[ctype]
        size, align = _SIZES[ltype]
        max_align = max(max_align, align)
        if offset % align:
            pad = align - offset % align
            out.append({"name": "", "type": f"pad[{pad}]"})
            offset += pad
        if count == 1 and ltype != "int128":
            out.append({"name": name, "type": ltype})
        elif ctype in ("char", "s8", "signed char"):
            out.append({"name": name, "type": f"char[{count}]"})
        else:
            out.append({"name": name, "type": f"bytes[{size * count}]"})
        offset += size * count
    if offset % max_align:
        out.append({"name": "", "type": f"pad[{max_align - offset % max_align}]"})
    return out


_TRIAL = """
import sys
from bcc import BPF
BPF(text=open(sys.argv[1], "rb").read(), cflags=sys.argv[2:])
"""


def _trial_load(path: str, flags: list[str]) -> None:
    """Load the program once in a throwaway process first.

    bcc's compiler aborts the whole process on some C (a clang assertion, not
    an exception); that must cost a clear error, not the daemon.  Everything
    the trial loads is freed when it exits.
    """
    try:
        proc = subprocess.run([sys.executable, "-c", _TRIAL, path, *flags],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise BccError(f"{path}: bcc took more than 120 s to load it") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()] or lines or ["no output"]
        how = (f"exit {proc.returncode}" if proc.returncode > 0
               else f"killed by signal {-proc.returncode}")
        raise BccError(f"{path}: bcc could not load it ({how}): {errors[0][:300]}")


class BccProgram:
    """One C file compiled and loaded by bcc; :meth:`cleanup` detaches and frees it."""

    def __init__(self, path: str, cflags: list[str] | tuple[str, ...] = ()):
        try:
            from bcc import BPF
            from bcc.libbcc import lib
        except ImportError as e:
            raise BccError(f"{path}: bcc is not importable ({e}); install python3-bpfcc "
                           "(make setup)") from None
        self.path = path
        self._lib = lib
        tables_api = _table_api(_LIBBCC)
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise BccError(f"cannot read {path}: {e.strerror}") from None
        flags = [f"-I{os.path.dirname(os.path.abspath(path))}", *cflags]
        _trial_load(path, flags)
        try:
            self.bpf = BPF(text=text, cflags=flags)
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exceptions; details on stderr
            raise BccError(f"{path}: bcc could not load it: {e}") from None
        self.tables: dict[str, Table] = {}
        module = self.bpf.module
        for i in range(tables_api.bpf_num_tables(module)):
            name = tables_api.bpf_table_name(module, i).decode()
            fd = tables_api.bpf_table_fd_id(module, i)
            if fd < 0:
                continue
            info = syscall.map_info(fd)
            self.tables[name] = Table(name, type_name(info.type), fd, info.id, info.max_entries)

    def buffers(self) -> list[Table]:
        """The program's ring buffers and perf event arrays."""
        return [t for t in self.tables.values() if t.type in ("ringbuf", "perf_event_array")]

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            known = ", ".join(sorted(self.tables)) or "none"
            raise BccError(f"{self.path}: no table named {name!r} (tables: {known})") from None

    def record_layout(self, name: str) -> list[dict] | None:
        """Fields of the struct the program writes to buffer ``name``, or None if unknown."""
        module, key = self.bpf.module, name.encode()
        count = self._lib.bpf_perf_event_fields(module, key)
        fields = [self._lib.bpf_perf_event_field(module, key, i).decode() for i in range(count)]
        if not fields:
            return None
        layout = layout_from_bcc_fields(fields)
        if layout is None:
            log.warning("%s: the record type of %s (%s) has fields pymap cannot describe; "
                        "its records are shown as hex", self.path, name, ", ".join(fields))
        return layout

    def cleanup(self) -> None:
        bpf, self.bpf = self.bpf, None
        if bpf is not None:
            bpf.cleanup()
