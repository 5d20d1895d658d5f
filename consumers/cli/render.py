"""Output for people: tables of maps, entries and the daemon's status (rich, or plain
columns when piped: columns.py).

``get -o json``, the output a million-entry dump takes, is
:mod:`consumers.cli.dumpjson`'s, which needs none of rich.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from watcher.kernel.sys.abi import percpu_slot
from watcher.wire.schema import MapInfo

from .columns import Column, Piped, print_table
from .dumpjson import map_json as map_json  # list -o json takes it from here

if TYPE_CHECKING:
    from rich.console import Console


def size_text(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"


# Most important first; in a narrow terminal the highest ``drop`` goes first.
MAP_COLUMNS = (
    Column("ID", right=True, keep=True),
    Column("Name", keep=True),
    Column("Type", drop=4),
    Column("Key/Value", right=True, drop=6),
    Column("Max entries", right=True, drop=7),
    Column("Entries", right=True, drop=5),
    Column("Memlock", right=True, drop=8),
    Column("Pinned", keep=True),
    Column("Held by", drop=9),
    Column("Kernel name", wide=True),
    Column("Flags", right=True, wide=True),
    Column("BTF id", right=True, wide=True),
    Column("Frozen", wide=True),
)


def print_maps(console: Console | Piped, maps: list[MapInfo], wide: bool = False) -> None:
    """``pymap list``: one row per map (see columns.py for narrow terminals and pipes)."""
    rows = []
    for m in maps:
        holders = [f"{h.comm}({h.pid})" for h in m.holders]
        if len(holders) > 3 and not wide:
            holders = [*holders[:3], f"+{len(holders) - 3}"]
        rows.append((str(m.id), m.name, m.type, f"{m.key_size}/{m.value_size}",
                     str(m.max_entries), "-" if m.entries is None else str(m.entries),
                     size_text(m.memlock), m.pinned, ",".join(holders), m.kernel_name,
                     f"{m.flags:#x}", str(m.btf_id or "-"), boolean(m.frozen)))
    title = f"{len(maps)} BPF maps" if console.is_terminal else None  # piped: rows only
    print_table(console, MAP_COLUMNS, rows, title=title, wide=wide)


def boolean(value: bool) -> str:
    """Booleans as every pymap output prints them: JSON's ``true``/``false``."""
    return "true" if value else "false"


def _spaced_hex(b: bytes) -> str:
    return b.hex(" ")


Formatter = Callable[[bytes, bytes], dict]


def print_entries(console: Console | Piped, m: MapInfo, rows: list[tuple[bytes, bytes, dict | None]],
                  total: int, raw: bool, decoder: str | None = None, wide: bool = False) -> None:
    """``pymap get``: entries as rows; ``decoder`` (which one was used, and why) goes in
    the caption.  A per-CPU entry takes one row per CPU (the key on each when piped, so
    every line stands alone)."""
    shown = len(rows)
    more = f"showing {shown} of {total} entries; -o json prints all" if shown < total else None
    caption = "\n".join(x for x in (decoder, more) if x) or None
    columns = [Column("Key", keep=True), Column("Value")]
    if m.percpu:
        columns.insert(1, Column("CPU", right=True, keep=True))
    repeat_key = not console.is_terminal
    slot = percpu_slot(m.value_size)
    table: list[tuple[str, ...]] = []
    for key, value, formatted in rows:
        failed = formatted is not None and not raw and "error" in formatted
        fmt = formatted if formatted is not None and not raw and not failed else None
        text_value = (fmt.get("text", "") if fmt else "").partition(" -> ")[2]
        k = key_text(key, fmt)
        if failed and formatted is not None:  # this entry did not decode
            k += f"  (not decoded: {formatted['error']})"
        if m.percpu:
            for cpu in range(m.ncpus):
                v = (compact(fmt["values"][cpu]["value"]) if fmt is not None
                     else _spaced_hex(value[cpu * slot:cpu * slot + m.value_size]))
                table.append((k if cpu == 0 or repeat_key else "", str(cpu), v))
            if fmt is not None and "total" in fmt:
                table.append((k if repeat_key else "", "all",
                              text_value or compact(fmt["total"])))
        else:
            table.append((k, (text_value or compact(fmt["value"])) if fmt is not None
                          else _spaced_hex(value)))
    print_table(console, columns, table, title=f"{m.name} (id {m.id}, {m.type}, {total} entries)",
                caption=caption, wide=wide)


def key_text(key: bytes, fmt: dict | None) -> str:
    """An entry's key as ``get`` shows it: a built-in decoder's text, the decoded key, or hex."""
    if fmt is None or "error" in fmt:
        return _spaced_hex(key)
    return fmt.get("text", "").partition(" -> ")[0] or compact(fmt["key"])


def value_text(value: bytes, fmt: dict | None) -> str:
    """An entry's value in one line (a per-CPU value: its total, else every CPU's)."""
    if fmt is None or "error" in fmt:
        return _spaced_hex(value)
    text = fmt.get("text", "").partition(" -> ")[2]
    if text:
        return text
    if "value" in fmt:
        return compact(fmt["value"])
    if "total" in fmt:
        return compact(fmt["total"])
    return compact([v["value"] for v in fmt.get("values", [])])


def compact(obj) -> str:
    """A decoded field in one line: strings as they are, anything else as compact JSON
    (so a boolean is ``true`` in ``get`` and ``events`` alike, never Python's ``True``)."""
    if isinstance(obj, str):
        return obj
    return orjson.dumps(obj).decode()


STATUS_COLUMNS = (
    Column("ID", right=True, keep=True),
    Column("Name", keep=True),
    Column("Type", drop=4),
    Column("Entries", right=True, drop=3),
    Column("Every", right=True, drop=8),
    Column("Polls", right=True, drop=7),
    Column("Last poll", right=True, drop=5),
    Column("Max poll", right=True, drop=9),
    Column("Events", right=True, drop=2),
    Column("State", right=True, drop=6),
    Column("Why", drop=1),
    Column("Kernel", right=True, drop=10),
    Column("Engine", drop=3),
    Column("Engine reason", drop=11),
)

FACILITY_COLUMNS = (
    Column("Refused facility", keep=True),
    Column("Errno", keep=True),
    Column("What pymap does instead", drop=1),
)

SOURCE_COLUMNS = (
    Column("Buffer", keep=True),
    Column("Kind", drop=5),
    Column("Map id", right=True, keep=True),
    Column("Records", right=True, drop=2),
    Column("Lost", right=True, drop=1),
    Column("Bytes", right=True, drop=6),
    Column("Wakeups", right=True, drop=7),
    Column("Max read", right=True, drop=8),
    Column("From", keep=True),
    Column("Drops map", drop=4),
)


def print_status(console: Console | Piped, st, wide: bool = False) -> None:
    """``pymap status``: the daemon, one row per watched map, one per event source."""
    title = (f"pymap {st.version}  epoch {st.epoch}  up {st.uptime:.0f} s  "
             f"seq {st.seq}  events {st.events_published}  "
             f"messages {st.messages_published}  drops reported {st.drops_reported}  "
             f"resyncs {st.resyncs}  poll errors {st.poll_errors}")
    if getattr(st, "discovery", ""):
        title += (f"  discovery {st.discovery.partition(' (')[0]}  maps created seen "
                  f"{st.creations_seen} missed {sum(st.creations_missed.values())}")
    caption = "subscriptions: " + (", ".join(
        f"{p or '(all)'}×{n}" for p, n in sorted(st.subscriptions.items())) or "none")
    rows = [(str(w.id), w.name, w.type, str(w.entries), f"{w.interval:g}s", str(w.polls),
             f"{w.last_poll_ms:.1f}ms", f"{w.max_poll_ms:.1f}ms", str(w.events),
             size_text(w.state_bytes), w.reason, size_text(w.kernel_bytes),
             w.engine.partition(":")[0], w.engine.partition(": ")[2]) for w in st.watched]
    print_table(console, STATUS_COLUMNS, rows, title=title, caption=caption, wide=wide)
    refused = [f for f in getattr(st, "facilities", []) if f.state == "refused"]
    if refused:  # what this kernel refused at the daemon's start (pymap doctor: all of it)
        print_table(console, FACILITY_COLUMNS, [(f.title, f.error, f.degrades) for f in refused],
                    title="kernel facilities refused at start-up", wide=wide)
    sources = getattr(st, "sources", None)
    if sources:
        source_rows = [(s.name, s.kind, str(s.map_id), str(s.records), str(s.lost),
                        size_text(s.bytes), str(s.wakeups), f"{s.max_read_ms:.1f}ms", s.origin,
                        s.drops_map or "-") for s in sources]
        print_table(console, SOURCE_COLUMNS, source_rows, title="event sources", wide=wide)
