"""The ``[[sources]]`` config tables and ``pymap daemon --source``: event sources.

A source is a BPF program pymap loads with bcc (``program = "x.c"``) and
whose ring buffers / perf event arrays it publishes, or one pinned buffer it
attaches to (``pin = "/sys/fs/bpf/..."``).  Validated here, at config load,
so a typo stops the daemon with one line naming the source and the key,
before anything is compiled or attached.  See docs/sources.md.
"""

from __future__ import annotations

import os
import re

import attrs

from ..decode.layout import LayoutError, parse_layout

KINDS = ("ringbuf", "perf")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEYS = {"program", "buffers", "cflags", "pin", "kind", "name", "layout", "read_slice",
         "page_cnt", "wakeup_events", "flush_interval", "drops_map"}


class SourceError(ValueError):
    """A source table that cannot be used; the message names the source and the key."""


@attrs.define
class SourceConfig:
    # A BPF C file loaded with bcc; its tracepoints attach as bcc attaches them.
    program: str | None = None
    # Ring buffers / perf event arrays of the program to publish (empty: all of them).
    buffers: list[str] = attrs.Factory(list)
    # Extra compiler flags for bcc (-DNAME=1, -I...).
    cflags: list[str] = attrs.Factory(list)
    # Or: a pinned ring buffer or perf event array to attach to.
    pin: str | None = None
    # "ringbuf" or "perf": checked against the pinned map's type (default: its type).
    kind: str | None = None
    # Topic name of a pinned buffer (default: the pin file's name).
    name: str | None = None
    # Record layout (declared layout vocabulary), normalised: {"match", "value", "value_size"}.
    layout: dict | None = None
    # Records per read slice: a burst is read in slices of this many, yielding in between.
    read_slice: int = 8192
    # Perf event arrays: data pages per CPU ring (power of two) and samples per wakeup.
    page_cnt: int = 64
    wakeup_events: int = 1
    # Perf with wakeup_events > 1: drain at least this often (seconds) so records never wait.
    flush_interval: float = 0.1
    # A counter map (program: table name; pin: pin path) where the producer counts
    # records it failed to write; its total is reported as the buffer's loss.
    drops_map: str | None = None

    @property
    def label(self) -> str:
        return self.program or self.pin or "?"


def parse_source(raw: object, where: str, base_dir: str | None = None) -> SourceConfig:
    """Validate one source table; ``base_dir`` resolves relative program paths."""
    if not isinstance(raw, dict):
        raise SourceError(f"{where}: must be a table with program = ... or pin = ...")
    unknown = sorted(set(raw) - _KEYS)
    label = raw.get("program") or raw.get("pin") or ""
    at = f"{where} ({label})" if label else where
    if unknown:
        raise SourceError(f"{at}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(_KEYS))})")
    program, pin = raw.get("program"), raw.get("pin")
    if (program is None) == (pin is None):
        raise SourceError(f"{at}: set exactly one of program = \"file.c\" or pin = \"/sys/fs/bpf/...\"")
    src = SourceConfig()
    if program is not None:
        src.program = _program_path(at, program, base_dir)
        for key in ("kind", "name"):
            if key in raw:
                raise SourceError(f"{at}: {key} is for pinned buffers; a program's buffers are "
                                  "named by their tables")
        src.buffers = _names(at, "buffers", raw.get("buffers", []))
        src.cflags = _strings(at, "cflags", raw.get("cflags", []))
        if raw.get("drops_map") is not None:
            src.drops_map = _names(at, "drops_map", [raw["drops_map"]])[0]
    else:
        if not isinstance(pin, str) or not pin.startswith("/"):
            raise SourceError(f"{at}: pin must be an absolute path under bpffs")
        src.pin = pin
        for key in ("buffers", "cflags"):
            if key in raw:
                raise SourceError(f"{at}: {key} is for programs; a pin is one buffer")
        kind = raw.get("kind")
        if kind is not None and kind not in KINDS:
            raise SourceError(f"{at}: kind must be \"ringbuf\" or \"perf\", not {kind!r}")
        src.kind = kind
        name = raw.get("name", os.path.basename(pin.rstrip("/")))
        if not isinstance(name, str) or not name or "\0" in name or len(name) > 255:
            raise SourceError(f"{at}: name must be a non-empty string")
        src.name = name
        drops = raw.get("drops_map")
        if drops is not None and (not isinstance(drops, str) or not drops.startswith("/")):
            raise SourceError(f"{at}: drops_map of a pinned buffer is the counter map's pin path")
        src.drops_map = drops
    if raw.get("layout") is not None:
        try:
            src.layout = parse_layout({"match": src.name or label, "value": raw["layout"]}).spec
        except LayoutError as e:
            raise SourceError(f"{at}: layout: {e}") from None
    src.read_slice = _int(at, "read_slice", raw.get("read_slice", src.read_slice), 1, 1 << 20)
    src.page_cnt = _int(at, "page_cnt", raw.get("page_cnt", src.page_cnt), 1, 1 << 16)
    if src.page_cnt & (src.page_cnt - 1):
        raise SourceError(f"{at}: page_cnt must be a power of two, not {src.page_cnt}")
    src.wakeup_events = _int(at, "wakeup_events", raw.get("wakeup_events", 1), 1, 1 << 20)
    flush = raw.get("flush_interval", src.flush_interval)
    if isinstance(flush, bool) or not isinstance(flush, (int, float)) or not 0 < flush <= 60:
        raise SourceError(f"{at}: flush_interval must be a number of seconds in (0, 60]")
    src.flush_interval = float(flush)
    return src


_CLI_OPTIONS = {"drops": "drops_map", "read_slice": "read_slice", "page_cnt": "page_cnt",
                "wakeup_events": "wakeup_events", "kind": "kind", "name": "name"}


def parse_cli_source(spec: str) -> dict:
    """``--source`` -> a source table.

    ``FILE.c[:buf1,buf2,...]`` is a program (its buffers; default all), a path
    under ``/`` not ending in ``.c`` a pin (``PIN[:opt=value,...]``).  Items of
    the form ``key=value`` are options: ``drops=MAP`` (drops_map), ``read_slice``,
    ``page_cnt``, ``wakeup_events``, and for pins ``kind`` and ``name``.
    """
    if not spec:
        raise SourceError("--source: empty")
    path, _, rest = spec.partition(":")
    program = not spec.startswith("/") or path.endswith(".c")
    table: dict = {"program": path} if program else {"pin": path}
    for item in (x.strip() for x in rest.split(",") if x.strip()):
        key, eq, value = item.partition("=")
        if not eq:
            if not program:
                raise SourceError(f"--source {spec}: a pin is one buffer; options are key=value")
            table.setdefault("buffers", []).append(item)
            continue
        if key not in _CLI_OPTIONS:
            raise SourceError(f"--source {spec}: unknown option {key!r} "
                              f"(options: {', '.join(_CLI_OPTIONS)})")
        table[_CLI_OPTIONS[key]] = int(value) if value.isdigit() else value
    return table


def load_sources(raw: object, where: str, base_dir: str | None,
                 cli: list[str] | None = None) -> list[SourceConfig]:
    """Every source from the config's ``[[sources]]`` and the ``--source`` flags."""
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise SourceError(f"{where}: sources must be an array of tables ([[sources]])")
    sources = [parse_source(item, f"{where}: sources[{i}]", base_dir) for i, item in enumerate(raw)]
    for spec in cli or []:
        sources.append(parse_source(parse_cli_source(spec), f"--source {spec}", None))
    seen: dict[str, str] = {}
    for src in sources:
        for name in ([src.name or ""] if src.pin else src.buffers):  # a pin's name is set
            if name in seen:
                raise SourceError(f"{src.label}: buffer name {name!r} is also published by "
                                  f"{seen[name]}; topics must be unique (rename the table, or "
                                  "set name = ... for a pin)")
            seen[name] = src.label
    return sources


def _program_path(at: str, program: object, base_dir: str | None) -> str:
    if not isinstance(program, str) or not program:
        raise SourceError(f"{at}: program must be a path to a BPF C file")
    path = program if os.path.isabs(program) or base_dir is None else os.path.join(base_dir, program)
    if not os.path.isfile(path):
        raise SourceError(f"{at}: program {path!r} does not exist")
    return path


def _strings(at: str, key: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SourceError(f"{at}: {key} must be a list of strings")
    return list(value)


def _names(at: str, key: str, value: object) -> list[str]:
    names = _strings(at, key, value)
    for name in names:
        if not _NAME.match(name):
            raise SourceError(f"{at}: {key}: {name!r} is not a C table name")
    if len(set(names)) != len(names):
        raise SourceError(f"{at}: {key} lists a name twice")
    return names


def _int(at: str, key: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SourceError(f"{at}: {key} must be an integer in {lo}..{hi}, not {value!r}")
    return value
