"""``pymap get -o json``: a dump written as it arrives, a chunk at a time, as bytes.

Why a module of its own: the JSON path of ``get`` is the one a million-entry
dump takes, and it needs neither rich nor the table code that
``consumers/cli/render.py`` imports.  Why bytes: the lines are ASCII (hex and
digits) or UTF-8 from orjson, so they go to the binary stdout as they are;
decoding them to str for the text layer to encode back, with the joins
around them, cost more than rendering them (issue 20).

Whole chunks of the common map shapes are rendered at once
(:mod:`watcher.decode.dumptext`); per-CPU values and decoders that are not flat
integers take the per-entry path below.  Both give the same lines
(tests/test_decode_chunks.py).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

import orjson

from watcher.kernel.sys.abi import percpu_slot
from watcher.wire.schema import MapInfo

if TYPE_CHECKING:
    from watcher.decode.dumptext import DumpLines

    from ..dumpread import ReplyChunk

WHOLE_CHUNK_MIN = 1024  # entries in a dump's first chunk for the whole-chunk renderer
SEP = b",\n"  # before every entry line but the dump's first (dumptext.SEP, without numpy)
MAP_FIELDS = ("id", "name", "type", "key_size", "value_size", "max_entries", "entries", "flags",
              "pinned", "kernel_name", "btf_id", "memlock", "frozen", "holders")
Formatter = Callable[[bytes, bytes], dict]


def map_json(m: MapInfo) -> dict:
    """A map's metadata as ``list -o json`` and ``get -o json`` print it."""
    d = {f: getattr(m, f) for f in MAP_FIELDS}
    d["holders"] = [{"pid": h.pid, "comm": h.comm} for h in m.holders]
    if not m.dumpable:
        d["not_dumpable_reason"] = m.not_dumpable_reason
    return d


class JsonDumpWriter:
    """Writes ``{"map": {...}, "decoder": {...}, "entries": [...], "count": N}`` a chunk at a time
    to a binary stream (``sys.stdout.buffer``).

    ``map.entries`` is null here: the count is known only once the stream ends,
    so it follows the entries as ``count``.
    """

    def __init__(self, m: MapInfo, out: IO[bytes], formatter: Formatter | None = None,
                 decoder: dict | None = None):
        self.m = m
        self.out = out
        self.formatter = formatter
        self._first = True
        self._count = 0
        self._lines: DumpLines | None | bool = True  # decided on the first chunk
        head = b'{"map":' + orjson.dumps(map_json(m))
        if decoder is not None:  # which decoder made "formatted", and notes on the others
            head += b',"decoder":' + orjson.dumps(decoder)
        out.write(head + b',"entries":[')

    def chunk(self, chunk: ReplyChunk) -> None:
        n = chunk.count
        if n == 0:
            return
        if self._lines is True:  # numpy (for the whole-chunk renderer) pays off for big dumps only
            self._lines = n >= WHOLE_CHUNK_MIN and self._whole_chunks()
        if self._lines:  # hex, or flat integers: the whole chunk at once
            self._write(n, self._lines.chunk(chunk.keys, chunk.values, n))
            return
        self._write(n, (SEP.decode() + SEP.decode().join(self._entry_lines(chunk))).encode())

    def _entry_lines(self, chunk: ReplyChunk) -> list[str]:
        """The per-entry path: per-CPU values, and decoders whose output is not flat."""
        m, n = self.m, chunk.count
        kw, vw = 2 * m.key_size, 2 * m.value_stride
        khex, vhex = chunk.keys.hex(), chunk.values.hex()
        if m.percpu:
            slot, vs = 2 * percpu_slot(m.value_size), 2 * m.value_size
            cpus = range(m.ncpus)

            def value_json(i: int) -> str:
                base = i * vw
                return '"values":[' + ",".join(
                    f'{{"cpu":{c},"value":"{vhex[base + c * slot:base + c * slot + vs]}"}}'
                    for c in cpus) + "]"
        else:
            def value_json(i: int) -> str:
                return f'"value":"{vhex[i * vw:(i + 1) * vw]}"'

        if self.formatter is None:
            return [f'{{"key":"{khex[i * kw:(i + 1) * kw]}",{value_json(i)}}}' for i in range(n)]
        ks, vs_ = m.key_size, m.value_stride
        keys, values, fmt, dumps = chunk.keys, chunk.values, self.formatter, orjson.dumps
        # The decoded values are short-lived acyclic objects: a cycle collection
        # every few hundred of them would only cost time (a third of it, measured).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            texts = [dumps(fmt(keys[i * ks:(i + 1) * ks],
                               values[i * vs_:(i + 1) * vs_])).decode() for i in range(n)]
        finally:
            if gc_was_enabled:
                gc.enable()
        if m.percpu:
            return [f'{{"key":"{khex[i * kw:(i + 1) * kw]}",{value_json(i)},'
                    f'"formatted":{text}}}' for i, text in enumerate(texts)]
        return [f'{{"key":"{khex[i * kw:(i + 1) * kw]}","value":'  # without a call per entry
                f'"{vhex[i * vw:(i + 1) * vw]}","formatted":{text}}}'
                for i, text in enumerate(texts)]

    def _whole_chunks(self) -> DumpLines | None:
        from watcher.decode.dumptext import dump_lines

        m = self.m
        lines = dump_lines(m.percpu, m.key_size, m.value_stride, self.formatter)
        if lines is not None:
            _keep_freed_memory()
        return lines

    def _write(self, n: int, lines: bytes | bytearray | memoryview) -> None:
        """``lines``: the chunk's entries, each after a separator; the dump's first has none."""
        self._count += n
        if self._first:
            self._first = False
            self.out.write(b"\n")
            self.out.write(memoryview(lines)[len(SEP):])
        else:
            self.out.write(lines)

    def close(self) -> None:
        self.out.write(b'\n],"count":%d}\n' % self._count)
        self.out.flush()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _keep_freed_memory() -> None:
    """Have glibc's malloc keep the memory of a freed chunk's text for the next chunk.

    Why: each decoded chunk's lines are a new buffer of a few MB (``bytearray.replace``
    makes one), and glibc gives a buffer that large its own mapping, or trims it off
    the heap when freed, so every chunk faulted its pages in afresh: 33,000 page faults
    and 0.09 s of system time in a million-entry decoded ``get`` (a third of what it
    costs over the undecoded one).  Raising both thresholds to their largest (32 MiB
    mappings, 128 MiB kept) keeps the pages; a ``get`` is a short-lived process.
    Elsewhere than glibc this does nothing.
    """
    import ctypes  # numpy, which the whole-chunk renderer needs, imports it anyway

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)
