"""The ``[[sources]]`` config tables and ``pymap daemon --source``: event sources.

A source is a BPF program pymap loads with bcc (``program = "x.c"``) and
whose ring buffers / perf event arrays it publishes, or one pinned buffer it
attaches to (``pin = "/sys/fs/bpf/..."``).  Structured by the config's one
converter (watcher/wire/tables.py) with the validators here, at config load,
so a typo stops the daemon with one line naming the source and the key,
before anything is compiled or attached.  Whether a program file exists is
asked later, when the config is resolved for use.  See docs/sources.md.
"""

from __future__ import annotations

import os
import re

import attrs
from cattrs.gen import override

from ..decode.layout import LayoutError, parse_layout
from ..wire.tables import TableError, converter, label, structure, table_hook

KINDS = ("ringbuf", "perf")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SourceError(TableError):
    """A source table that cannot be used; the message names the source and the key."""


def _names(_inst: SourceConfig, attribute: attrs.Attribute, names: list[str]) -> None:
    for name in names:
        if not _NAME.match(name):
            raise SourceError(f"{attribute.name}: {name!r} is not a C table name")
    if len(set(names)) != len(names):
        raise SourceError(f"{attribute.name} lists a name twice")


def _int_in(lo: int, hi: int):
    def check(_inst: SourceConfig, attribute: attrs.Attribute, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise SourceError(f"{attribute.name} must be an integer in {lo}..{hi}, not {value!r}")
    return check


def _nonempty(what: str, longest: int):
    def check(_inst: SourceConfig, attribute: attrs.Attribute, value: str | None) -> None:
        if value is not None and (not value or "\0" in value or len(value) > longest):
            raise SourceError(f"{attribute.name} must be {what}")
    return check


def _pin(_inst: SourceConfig, _attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not value.startswith("/"):
        raise SourceError("pin must be an absolute path under bpffs")


def _kind(_inst: SourceConfig, _attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and value not in KINDS:
        raise SourceError(f"kind must be \"ringbuf\" or \"perf\", not {value!r}")


def _page_cnt(_inst: SourceConfig, attribute: attrs.Attribute, value: int) -> None:
    _int_in(1, 1 << 16)(_inst, attribute, value)
    if value & (value - 1):
        raise SourceError(f"page_cnt must be a power of two, not {value}")


def _flush(_inst: SourceConfig, _attribute: attrs.Attribute, value: float) -> None:
    if not 0 < value <= 60:
        raise SourceError("flush_interval must be a number of seconds in (0, 60]")


@attrs.define
class SourceConfig:
    # A BPF C file loaded with bcc; its tracepoints attach as bcc attaches them.
    program: str | None = attrs.field(default=None,
                                      validator=_nonempty("a path to a BPF C file", 4096))
    # Ring buffers / perf event arrays of the program to publish (empty: all of them).
    buffers: list[str] = attrs.field(factory=list, validator=_names)
    # Extra compiler flags for bcc (-DNAME=1, -I...).
    cflags: list[str] = attrs.Factory(list)
    # Or: a pinned ring buffer or perf event array to attach to.
    pin: str | None = attrs.field(default=None, validator=_pin)
    # "ringbuf" or "perf": checked against the pinned map's type (default: its type).
    kind: str | None = attrs.field(default=None, validator=_kind)
    # Topic name of a pinned buffer (default: the pin file's name).
    name: str | None = attrs.field(default=None, validator=_nonempty("a non-empty string", 255))
    # Record layout (declared layout vocabulary), normalised: {"match", "value", "value_size"}.
    # Written in the table as the list of value fields.
    layout: dict | None = None
    # Records per read slice: a burst is read in slices of this many, yielding in between.
    read_slice: int = attrs.field(default=8192, validator=_int_in(1, 1 << 20))
    # Perf event arrays: data pages per CPU ring (power of two) and samples per wakeup.
    page_cnt: int = attrs.field(default=64, validator=_page_cnt)
    wakeup_events: int = attrs.field(default=1, validator=_int_in(1, 1 << 20))
    # Perf with wakeup_events > 1: drain at least this often (seconds) so records never wait.
    flush_interval: float = attrs.field(default=0.1, validator=_flush)
    # A counter map (program: table name; pin: pin path) where the producer counts
    # records it failed to write; its total is reported as the buffer's loss.
    drops_map: str | None = None

    def __attrs_post_init__(self) -> None:
        """The rules between keys: a program or a pin, and what each may have."""
        if (self.program is None) == (self.pin is None):
            raise SourceError("set exactly one of program = \"file.c\" or pin = \"/sys/fs/bpf/...\"")
        if self.program is not None:
            self._check_program()
        else:
            self._check_pin()
        if self.layout is not None:
            try:
                self.layout = parse_layout({**self.layout, "match": self.name or self.label}).spec
            except LayoutError as e:
                raise SourceError(f"layout: {e}") from None

    def _check_program(self) -> None:
        for key in ("kind", "name"):
            if getattr(self, key) is not None:
                raise SourceError(f"{key} is for pinned buffers; a program's buffers are "
                                  "named by their tables")
        if self.drops_map is not None and not _NAME.match(self.drops_map):
            raise SourceError(f"drops_map: {self.drops_map!r} is not a C table name")

    def _check_pin(self) -> None:
        assert self.pin is not None
        for key in ("buffers", "cflags"):
            if getattr(self, key):
                raise SourceError(f"{key} is for programs; a pin is one buffer")
        if self.name is None:
            self.name = os.path.basename(self.pin.rstrip("/"))
            if not self.name:
                raise SourceError("name must be a non-empty string")
        if self.drops_map is not None and not self.drops_map.startswith("/"):
            raise SourceError("drops_map of a pinned buffer is the counter map's pin path")

    @property
    def label(self) -> str:
        return self.program or self.pin or "?"


def _structure_record_layout(value: object, _type: object) -> dict:
    # A source's layout is its value fields; held as a layout table until checked.
    if not isinstance(value, list):
        raise SourceError("layout must be a list of value fields ({ name = ..., type = ... })")
    return {"value": value}


converter.register_structure_hook(SourceConfig, table_hook(
    SourceConfig, converter, layout=override(struct_hook=_structure_record_layout)))


def parse_source(raw: object, where: str, base_dir: str | None = None) -> SourceConfig:
    """Validate one source table; ``base_dir`` resolves relative program paths."""
    src = structure(raw, SourceConfig, where + label(raw), SourceError)
    return with_base_dir(src, base_dir)


def with_base_dir(src: SourceConfig, base_dir: str | None) -> SourceConfig:
    """``src`` with its program path relative to ``base_dir`` (the config file's directory)."""
    if src.program is None or base_dir is None or os.path.isabs(src.program):
        return src
    return attrs.evolve(src, program=os.path.join(base_dir, src.program))


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


def cli_sources(specs: list[str]) -> list[SourceConfig]:
    """The ``--source`` flags as sources (relative programs: from the working directory)."""
    return [parse_source(parse_cli_source(spec), f"--source {spec}", None) for spec in specs]


def check_topics(sources: list[SourceConfig]) -> None:
    """Every buffer publishes under its own topic: two with one name are refused."""
    seen: dict[str, str] = {}
    for src in sources:
        for name in ([src.name or ""] if src.pin else src.buffers):  # a pin's name is set
            if name in seen:
                raise SourceError(f"{src.label}: buffer name {name!r} is also published by "
                                  f"{seen[name]}; topics must be unique (rename the table, or "
                                  "set name = ... for a pin)")
            seen[name] = src.label


def check_programs(sources: list[SourceConfig]) -> None:
    """Each program file exists: the host is asked at resolve, not while validating."""
    for src in sources:
        if src.program is not None and not os.path.isfile(src.program):
            raise SourceError(f"program {src.program!r} does not exist")
