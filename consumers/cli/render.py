"""Output for people (rich tables) and for machines (JSON, streamed).

The JSON writer works a chunk at a time on the flat key/value buffers: it
hex-encodes each buffer once and slices the text, because per-entry bytes
objects and per-entry JSON serialisation are what make a million-entry dump
slow in Python.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import IO

import orjson
from rich.table import Table
from rich.text import Text

from watcher.wire.schema import MapInfo

from ..client import Chunk

MAP_FIELDS = ("id", "name", "type", "key_size", "value_size", "max_entries", "entries", "flags",
              "pinned", "kernel_name", "btf_id", "memlock", "frozen", "holders")


def map_json(m: MapInfo) -> dict:
    d = {f: getattr(m, f) for f in MAP_FIELDS}
    d["holders"] = [{"pid": h.pid, "comm": h.comm} for h in m.holders]
    if not m.dumpable:
        d["not_dumpable_reason"] = m.not_dumpable_reason
    return d


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def maps_table(maps: list[MapInfo]) -> Table:
    table = Table(title=f"{len(maps)} BPF maps", title_justify="left")
    for col, just in (("ID", "right"), ("Name", "left"), ("Type", "left"),
                      ("Key/Value", "right"), ("Max entries", "right"), ("Entries", "right"),
                      ("Memlock", "right"), ("Pinned", "left"), ("Held by", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for m in maps:
        entries = "-" if m.entries is None else str(m.entries)
        held = ", ".join(f"{h.comm}({h.pid})" for h in m.holders[:3])
        if len(m.holders) > 3:
            held += f" +{len(m.holders) - 3}"
        table.add_row(str(m.id), m.name, m.type, f"{m.key_size}/{m.value_size}",
                      str(m.max_entries), entries, _size(m.memlock), "\n".join(m.pinned), held)
    return table


def _spaced_hex(b: bytes) -> str:
    return b.hex(" ")


Formatter = Callable[[bytes, bytes], dict]


def entries_table(m: MapInfo, rows: list[tuple[bytes, bytes, dict | None]], total: int,
                  raw: bool, decoder: str | None = None) -> Table:
    """Entries as rows; ``decoder`` (which decoder was used, and why) goes in the caption."""
    shown = len(rows)
    more = f"showing {shown} of {total} entries; -o json prints all" if shown < total else None
    caption = "\n".join(x for x in (decoder, more) if x) or None
    table = Table(title=f"{m.name} (id {m.id}, {m.type}, {total} entries)",
                  title_justify="left", caption=caption, caption_justify="left")
    table.add_column("Key", overflow="fold")
    if m.percpu:
        table.add_column("CPU", justify="right")
    table.add_column("Value", overflow="fold")
    slot = (m.value_size + 7) & ~7
    for key, value, formatted in rows:
        use_fmt = formatted is not None and not raw and "error" not in formatted
        text_key, _, text_value = (formatted.get("text", "") if use_fmt else "").partition(" -> ")
        k = (text_key or _compact(formatted["key"])) if use_fmt else _spaced_hex(key)
        if formatted is not None and not raw and "error" in formatted:  # this entry failed
            k += f"  (not decoded: {formatted['error']})"
        if m.percpu:
            for cpu in range(m.ncpus):
                v = (_compact(formatted["values"][cpu]["value"]) if use_fmt
                     else _spaced_hex(value[cpu * slot:cpu * slot + m.value_size]))
                table.add_row(Text(k if cpu == 0 else ""), str(cpu), Text(v))
            if use_fmt and "total" in formatted:
                table.add_row("", "all", Text(text_value or _compact(formatted["total"])))
        else:  # Text: decoded data is not rich markup ("[fd00::1]:0" would vanish)
            table.add_row(Text(k), Text((text_value or _compact(formatted["value"])) if use_fmt
                                        else _spaced_hex(value)))
    return table


def _compact(obj) -> str:
    if isinstance(obj, (dict, list)):
        return orjson.dumps(obj).decode()
    return str(obj)


class JsonDumpWriter:
    """Writes ``{"map": {...}, "decoder": {...}, "entries": [...], "count": N}`` a chunk at a time.

    ``map.entries`` is null here: the count is known only once the stream ends,
    so it follows the entries as ``count``.
    """

    def __init__(self, m: MapInfo, out: IO[str] = sys.stdout, formatter: Formatter | None = None,
                 decoder: dict | None = None):
        self.m = m
        self.out = out
        self.formatter = formatter
        self._first = True
        self._count = 0
        head = '{"map":' + orjson.dumps(map_json(m)).decode()
        if decoder is not None:  # which decoder made "formatted", and notes on the others
            head += ',"decoder":' + orjson.dumps(decoder).decode()
        out.write(head + ',"entries":[')

    def chunk(self, chunk: Chunk) -> None:
        m = self.m
        n = chunk.count
        if n == 0:
            return
        kw, vw = 2 * m.key_size, 2 * m.value_stride
        khex, vhex = chunk.keys.hex(), chunk.values.hex()
        if m.percpu:
            slot, vs = 2 * ((m.value_size + 7) & ~7), 2 * m.value_size
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
            lines = [f'{{"key":"{khex[i * kw:(i + 1) * kw]}",{value_json(i)}}}' for i in range(n)]
        else:
            ks, vs_ = m.key_size, m.value_stride
            keys, values, fmt, dumps = chunk.keys, chunk.values, self.formatter, orjson.dumps
            # The decoded values are short-lived acyclic objects: a cycle collection
            # every few hundred of them would only cost time (a third of it, measured).
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                chunk_json = getattr(fmt, "chunk_json", None)
                if chunk_json is not None:  # flat integer layouts: no per-entry objects
                    texts = chunk_json(keys, values)
                else:
                    texts = [dumps(fmt(keys[i * ks:(i + 1) * ks],
                                       values[i * vs_:(i + 1) * vs_])).decode() for i in range(n)]
                if m.percpu:
                    lines = [f'{{"key":"{khex[i * kw:(i + 1) * kw]}",{value_json(i)},'
                             f'"formatted":{text}}}' for i, text in enumerate(texts)]
                else:  # the same, without a call per entry
                    lines = [f'{{"key":"{khex[i * kw:(i + 1) * kw]}","value":'
                             f'"{vhex[i * vw:(i + 1) * vw]}","formatted":{text}}}'
                             for i, text in enumerate(texts)]
            finally:
                if gc_was_enabled:
                    gc.enable()
        self._count += n
        sep = "\n" if self._first else ",\n"
        self._first = False
        self.out.write(sep + ",\n".join(lines))

    def close(self) -> None:
        self.out.write(f'\n],"count":{self._count}}}\n')
        self.out.flush()


def status_view(st) -> Table:
    """``pymap status``: the daemon, then one row per watched map."""
    table = Table(title=(f"pymap {st.version}  epoch {st.epoch}  up {st.uptime:.0f} s  "
                         f"seq {st.seq}  events {st.events_published}  "
                         f"messages {st.messages_published}  drops reported {st.drops_reported}  "
                         f"resyncs {st.resyncs}  poll errors {st.poll_errors}"),
                  title_justify="left",
                  caption="subscriptions: " + (", ".join(
                      f"{p or '(all)'}×{n}" for p, n in sorted(st.subscriptions.items())) or "none"),
                  caption_justify="left")
    for col, just in (("ID", "right"), ("Name", "left"), ("Type", "left"), ("Entries", "right"),
                      ("Every", "right"), ("Polls", "right"), ("Last poll", "right"),
                      ("Max poll", "right"), ("Events", "right"), ("State", "right"),
                      ("Kernel", "right"), ("Why", "left"), ("Engine", "left")):
        table.add_column(col, justify=just)
    for w in st.watched:
        table.add_row(str(w.id), w.name, w.type, str(w.entries), f"{w.interval:g} s",
                      str(w.polls), f"{w.last_poll_ms:.1f} ms", f"{w.max_poll_ms:.1f} ms",
                      str(w.events), _size(w.state_bytes), _size(w.kernel_bytes), w.reason,
                      w.engine)
    return table


def sources_view(st) -> Table | None:
    """``pymap status``: one row per event source buffer (None when there are none)."""
    if not getattr(st, "sources", None):
        return None
    table = Table(title="event sources", title_justify="left")
    for col, just in (("Buffer", "left"), ("Kind", "left"), ("Map id", "right"),
                      ("Records", "right"), ("Lost", "right"), ("Bytes", "right"),
                      ("Wakeups", "right"), ("Max read", "right"), ("From", "left"),
                      ("Drops map", "left")):
        table.add_column(col, justify=just)
    for s in st.sources:
        table.add_row(s.name, s.kind, str(s.map_id), str(s.records), str(s.lost),
                      _size(s.bytes), str(s.wakeups), f"{s.max_read_ms:.1f} ms", s.origin,
                      s.drops_map or "-")
    return table
