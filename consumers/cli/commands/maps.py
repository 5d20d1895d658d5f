"""``pymap list``, ``get`` and ``top``: what is in the maps, and how fast it changes.

The commands that read maps' contents and rates, with what they share: how a
map is decoded (a ``--layout`` file of the user's, else the daemon's choice)
and progress on stderr while a big map is read.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

import typer

from ...endpoint import DEFAULT_ENDPOINT
from ..options import (
    CurveCertOpt,
    CurveServerOpt,
    EndpointOpt,
    Output,
    OutputOpt,
    TimeoutOpt,
    use_curve,
    valid_glob,
)
from ..running import EXIT_ERROR, EXIT_USAGE, err, fail, out, run, run_async, say, table_out

if TYPE_CHECKING:
    from ...client import Client


def list_(
    pattern: Annotated[str | None, typer.Argument(
        help="Shell glob on map names and pin paths, e.g. 'cilium_*'.")] = None,
    output: OutputOpt = Output.table,
    no_entries: Annotated[bool, typer.Option(
        "--no-entries", help="Skip counting entries (counting dumps every map).")] = False,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    server_key: CurveServerOpt = None,
    client_cert: CurveCertOpt = None,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Every BPF map on the host, like `bpftool map show` and `cilium map list`."""
    use_curve(server_key, client_cert)
    if pattern:
        valid_glob(pattern)

    def main():
        from ... import oneshot
        from .. import render

        waiting: contextlib.AbstractContextManager = contextlib.nullcontext()
        if output is not Output.json and sys.stderr.isatty():
            waiting = err().status("reading maps from the daemon...")
        with waiting:
            maps = oneshot.list_maps(endpoint, pattern, entries=not no_entries, timeout=timeout)
        if output is Output.json:
            import orjson

            sys.stdout.write(orjson.dumps([render.map_json(m) for m in maps]).decode() + "\n")
        else:
            render.print_maps(table_out(), maps, wide=output is Output.wide)
        if pattern and not maps:
            say(f"pymap: no map matches {pattern!r}")
            return EXIT_ERROR

    run(main)


def get(
    selector: Annotated[str, typer.Argument(
        help="Map name (full pinned name or kernel name), id:N, or a pin path.")],
    output: OutputOpt = Output.table,
    limit: Annotated[int, typer.Option(
        "--limit", "-n", help="Table rows to show (0: all). JSON always has every entry.")] = 100,
    raw: Annotated[bool, typer.Option("--raw", help="Show hex even where entries decode.")] = False,
    layout_file: Annotated[str | None, typer.Option(
        "--layout", help="TOML file of declared layouts (layouts tables as in the config, or "
        "one layout) to decode with, before the daemon's config.")] = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    server_key: CurveServerOpt = None,
    client_cert: CurveCertOpt = None,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """A map's entries, decoded (declared layout, built-in Cilium decoder, BTF) or as hex."""
    use_curve(server_key, client_cert)
    own_layouts = read_layouts(layout_file) if layout_file else []

    def main():
        from ...dumpread import DumpRequest

        with DumpRequest(endpoint, selector, timeout) as request:
            # Sent first: the daemon reads the map while this process imports what shows it.
            if output is Output.json:
                _print_json(request, own_layouts, layout_file, raw)
            else:
                _print_table(request, own_layouts, layout_file, raw, limit,
                             wide=output is Output.wide)

    run(main)


def _print_json(request, own_layouts: list, layout_file: str | None, raw: bool) -> None:
    """``get -o json``: each chunk rendered and written to the binary stdout as it comes."""
    from ..dumpjson import JsonDumpWriter

    dump = request.begin()
    decoding = _decoding(dump, own_layouts, layout_file, raw)
    sys.stdout.flush()  # nothing is pending there; the dump goes to the bytes beneath
    writer = JsonDumpWriter(dump.map, sys.stdout.buffer, decoding.formatter if decoding else None,
                            decoding.as_json() if decoding else None)
    for chunk in dump.chunks():
        writer.chunk(chunk)
    writer.close()


def _print_table(request, own_layouts: list, layout_file: str | None, raw: bool, limit: int,
                 wide: bool) -> None:
    """``get``: the first ``limit`` entries (0: all) as a table, every entry counted."""
    from .. import render

    dump = request.begin()
    decoding = _decoding(dump, own_layouts, layout_file, raw)
    formatter = decoding.formatter if decoding else None
    rows: list[tuple[bytes, bytes, dict | None]] = []
    m = dump.map
    with _progress(f"reading {m.name}") as progress:
        for chunk in dump.chunks():
            progress.advance(chunk.count)
            for i in range(min(chunk.count, limit - len(rows)) if limit else chunk.count):
                key = chunk.keys[i * m.key_size:(i + 1) * m.key_size]
                value = chunk.values[i * m.value_stride:(i + 1) * m.value_stride]
                rows.append((key, value, formatter(key, value) if formatter else None))
    render.print_entries(table_out(), m, rows, dump.total or 0, raw,
                         decoding.describe() if decoding else "shown as hex (--raw)", wide=wide)


def _decoding(dump, own_layouts: list, layout_file: str | None, raw: bool):
    """How ``get`` (and ``top MAP``) decode a map: a --layout of the user's that matches,
    else the daemon's layout, a built-in decoder or BTF (None with --raw: hex)."""
    from ...decoding import choose_decoding

    layout = next((x for x in own_layouts
                   if x.matches([dump.map.name, dump.map.kernel_name], dump.map.pinned)), None)
    if layout is None:
        if own_layouts:
            say(f"pymap: note: no layout in {layout_file} matches {dump.map.name}; "
                "using the daemon's decoding")
        layout = dump.layout
    return None if raw else choose_decoding(dump.map, dump.btf, layout)


class _Progress:
    """Entries read so far, on stderr, for people waiting on a big map."""

    def __init__(self, status):
        self.status, self.label, self.count = status, "", 0

    def advance(self, n: int) -> None:
        self.count += n
        if self.status is not None:
            self.status.update(f"{self.label}: {self.count:,} entries")


@contextlib.contextmanager
def _progress(label: str):
    if not sys.stderr.isatty():
        yield _Progress(None)
        return
    with err().status(label) as status:
        progress = _Progress(status)
        progress.label = label
        yield progress


def read_layouts(path: str) -> list:
    """``--layout FILE``: [[layouts]] tables, or one layout table (match defaults to "*").

    Checked by the daemon config's own layout loader, so a layout means the same in
    both; its errors are told with the file's name, as a usage error."""
    from watcher.decode.layout import LayoutError, load_layouts
    from watcher.wire.tomlfile import TomlFileError, read_toml

    try:
        data = read_toml(path, "layout file")
    except TomlFileError as e:
        fail(str(e), EXIT_USAGE)
    try:
        return load_layouts(data.get("layouts", [{"match": "*", **data}]))
    except LayoutError as e:
        fail(f"{path}: {e}", EXIT_USAGE)


TOP_EPILOG = (
    "Examples:  pymap top  ·  pymap top 'cilium_*'  ·  pymap top syscounts  ·  "
    "pymap top syscounts --once  ·  pymap top -n 5 -o json.  Keys: q quit, p pause, "
    "s/S and 1-9 sort, r reverse, / filter.")


_TopSelectorOpt = Annotated[str | None, typer.Argument(
    help="A map (name, id:N or pin path): one row per key.  A glob ('cilium_*'): one row "
    "per watched map, and the maps it matches are watched while top runs.  None: every "
    "map the daemon watches.", show_default=False)]
_TopCountOpt = Annotated[int, typer.Option(
    "--count", "-n", min=0, help="Print this many refreshes and exit (plain tables, or "
    "JSON lines with -o json); 0 with stdout not a terminal: until stopped.")]
_TopDelayOpt = Annotated[float, typer.Option(
    "--delay", "-d", min=0.1, metavar="SECONDS", help="Seconds between refreshes.")]
_TopWindowOpt = Annotated[float, typer.Option(
    "--window", "-w", min=0.5, metavar="SECONDS",
    help="top MAP: seconds of events each rate is averaged over.")]
_TopSortOpt = Annotated[str, typer.Option(
    "--sort", metavar="COLUMN", help="Sort by this column (maps: events, added, updated, "
    "removed, name, type, entries, poll_ms, engine, memory; keys: key, changes, value or a "
    "value field).  Default: events per map; the first numeric field, else changes, "
    "per key.")]
_TopFilterOpt = Annotated[str, typer.Option(
    "--filter", metavar="TEXT", help="Only rows whose name (key) contains TEXT.")]
_TopLayoutFileOpt = Annotated[str | None, typer.Option(
    "--layout", help="top MAP: TOML file of declared layouts to decode with, as for get.")
    ]
_TopMaxWaitOpt = Annotated[float | None, typer.Option(
    "--max-wait", min=0, metavar="SECONDS",
    help="When the daemon falls silent, wait at most this long for it to come back, "
    "then exit 1 (default: for ever, like tail -F).")]


def top(
    selector: _TopSelectorOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Print one refresh and exit.")] = False,
    count: _TopCountOpt = 0,
    output: OutputOpt = Output.table,
    delay: _TopDelayOpt = 1.0,
    window: _TopWindowOpt = 5.0,
    sort: _TopSortOpt = "",
    reverse: Annotated[bool, typer.Option("--reverse", help="Smallest first.")] = False,
    filter_: _TopFilterOpt = "",
    raw: Annotated[bool, typer.Option("--raw", help="top MAP: keys and values as hex.")] = False,
    layout_file: _TopLayoutFileOpt = None,
    max_wait: _TopMaxWaitOpt = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    server_key: CurveServerOpt = None,
    client_cert: CurveCertOpt = None,
    timeout: TimeoutOpt = 10.0,
) -> None:
    """Live rates: per watched map (pymap top), or per key of one map (pymap top MAP).

    Full screen in a terminal; with --once, -n N, -o json or stdout not a terminal, N
    refreshes as plain tables or JSON lines.  Rates come from the event stream and the
    daemon's counters, never from re-reading maps.  Holds on through daemon restarts.
    """
    from watcher.wire.globs import is_glob

    use_curve(server_key, client_cert)
    own_layouts = read_layouts(layout_file) if layout_file else []
    per_map = selector is None or is_glob(selector)
    if selector is not None:
        valid_glob(selector)
    if per_map and (raw or layout_file):
        fail("--raw and --layout apply to top MAP (one map), not to a glob", EXIT_USAGE)
    from ..top import MAP_SORTS, Status, View, feed_keys, feed_maps

    if per_map and sort and sort not in MAP_SORTS:
        fail(f"no column {sort!r} to sort maps by; one of: {', '.join(MAP_SORTS)}", EXIT_USAGE)
    view = View(Status(endpoint), by=sort, reverse=reverse, text=filter_, window=window)
    plain = once or count > 0 or output is Output.json or not sys.stdout.isatty()

    async def feed(client: Client) -> None:
        if per_map:
            await feed_maps(client, view, [selector] if selector else [], delay, max_wait)
        else:
            assert selector is not None
            await feed_keys(client, selector, view,
                            lambda dump: _decoding(dump, own_layouts, layout_file, raw), max_wait)

    shown = _TopRun(view, feed, endpoint, timeout, delay)
    try:
        if plain:
            run_async(lambda: shown.printed(1 if once else count, output is Output.json))
        else:
            run(shown.on_screen)
    except ValueError as e:  # a sort column the map does not have
        fail(str(e), EXIT_USAGE)


class _TopRun:
    """How ``top`` shows what ``feed`` gathers: N plain refreshes, or the full screen."""

    def __init__(self, view, feed: Callable[[Client], Awaitable[None]], endpoint: str,
                 timeout: float, delay: float):
        self.view, self.feed, self.delay = view, feed, delay
        self.endpoint, self.timeout = endpoint, timeout

    async def printed(self, count: int, as_json: bool) -> None:
        import trio

        from ...client import Client
        from ...nurseries import one_error
        from ..top import print_refreshes

        with one_error():
            async with (Client(self.endpoint, self.timeout) as client,
                        trio.open_nursery() as nursery):
                nursery.start_soon(self.feed, client)
                await print_refreshes(self.view, count, self.delay, as_json, out(), sys.stdout,
                                      100)
                nursery.cancel_scope.cancel()

    async def screen_feed(self) -> None:
        from ...client import Client
        from ...nurseries import one_error

        with one_error():
            async with Client(self.endpoint, self.timeout) as client:
                await self.feed(client)

    def on_screen(self) -> None:
        from ..topui import run_screen

        run_screen(self.view, self.screen_feed, self.delay)
