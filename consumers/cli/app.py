"""The ``pymap`` command line: a thin layer over the client library.

Every command talks to the daemon through the same client library other
consumers use (:mod:`consumers.oneshot` for one request and one reply,
:mod:`consumers.client` for the rest); only ``daemon`` (which starts it) and
``doctor`` (which checks the host) reach further.  Errors are one line on
stderr and a non-zero exit, never a traceback.

Each command imports what it needs when it runs (trio, rich, decoders,
numpy through the daemon), so ``pymap ping`` starts in a fraction of the time
``pymap daemon`` takes: see bench/bench_cli.py.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from watcher.wire.globs import GlobError, check_glob

from .. import oneshot
from ..endpoint import DEFAULT_ENDPOINT
from ..errors import DaemonError
from .keys import keys_app

if TYPE_CHECKING:
    from rich.console import Console

    from ..client import Client

_APP_SETTINGS: dict = dict(
    name="pymap",
    help="Watch eBPF maps: list them, dump them decoded, stream their changes.",
    epilog=("Examples:  pymap list 'cilium_*'  ·  pymap get cilium_ipcache_v2  ·  "
            "pymap events cilium_lxc -f  ·  pymap events 'cilium_policy_*' -f -o json  ·  "
            "pymap doctor.  The daemon (pymap daemon, as root) must be running; "
            "see README.md and docs/."),
    no_args_is_help=True,
    # typer's own: pymap --install-completion (bash, zsh, fish, PowerShell).
    add_completion=True,
    pretty_exceptions_enable=False,
)
app = typer.Typer(**_APP_SETTINGS)


def _print_version(value: bool) -> None:
    if value:
        from importlib import metadata

        typer.echo(f"pymap {metadata.version('pymap')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print pymap's version and exit.")] = False,
) -> None:
    pass


@functools.cache
def out() -> Console:
    """The rich console on stdout, made when a command first prints with it."""
    from rich.console import Console

    return Console()


@functools.cache
def err() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def say(text: str) -> None:
    """One line on stderr for a person (a note, not an error)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class Output(enum.StrEnum):
    table = "table"
    wide = "wide"
    json = "json"


EndpointOpt = Annotated[str, typer.Option("--endpoint", "-e", envvar="PYMAP_ENDPOINT",
                                          help="Daemon request endpoint (ipc:// or tcp://).")]
CurveServerOpt = Annotated[str | None, typer.Option(
    "--curve-server-key", envvar="PYMAP_CURVE_SERVER_KEY",
    help="tcp:// only: the daemon's public key (its .key file, or the 40-character text).")]
CurveCertOpt = Annotated[str | None, typer.Option(
    "--curve-client-cert", envvar="PYMAP_CURVE_CLIENT_CERT",
    help="tcp:// only: this client's secret certificate (NAME.key_secret, see: pymap keys).")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the daemon.")]
OutputOpt = Annotated[Output, typer.Option(
    "--output", "-o", help="table for people (plain columns when piped), wide for every "
    "column, json for machines.")]

EXIT_ERROR = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    say(f"pymap: error: {message}")
    raise typer.Exit(code)


def use_curve(server_key: str | None, client_cert: str | None) -> None:
    """CURVE keys from the flags (or PYMAP_CURVE_* variables) for every tcp:// socket."""
    if server_key is None and client_cert is None:
        return
    if not server_key or not client_cert:
        fail("CURVE needs both --curve-server-key and --curve-client-cert", EXIT_USAGE)
    from watcher.wire.curve import ClientKeys, CurveError

    from ..endpoint import use_curve as use

    try:
        use(ClientKeys.load(server_key, client_cert))
    except CurveError as e:
        fail(str(e), EXIT_USAGE)


def valid_glob(pattern: str) -> str:
    """``pattern``, or a one-line usage error when it is not a glob that parses."""
    try:
        return check_glob(pattern)
    except GlobError as e:
        fail(str(e), EXIT_USAGE)


def run(fn: Callable[[], int | None]) -> None:
    """Run a command; turn daemon errors and Ctrl-C into clean exits."""
    try:
        code = fn()
    except GlobError as e:
        fail(str(e), EXIT_USAGE)
    except DaemonError as e:
        message = str(e)
        if e.candidates:
            message += "\n" + "\n".join(
                f"  id:{c.id}  {c.name}  {c.type}  {' '.join(c.pinned) or '(not pinned)'}"
                for c in e.candidates)
        fail(message)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except BrokenPipeError:
        sys.stderr.close()  # reader went away (| head): not an error worth a line
        raise typer.Exit(0) from None
    if code:
        raise typer.Exit(code)


def run_async(fn: Callable[[], Awaitable[int | None]]) -> None:
    """Run an async command (the client library's async API) as :func:`run` does."""
    import trio

    run(lambda: trio.run(fn))


app.add_typer(keys_app, name="keys")


@app.command()
def ping(endpoint: EndpointOpt = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 3.0,
         server_key: CurveServerOpt = None, client_cert: CurveCertOpt = None) -> None:
    """Check that the daemon answers; print its version, epoch and uptime."""
    use_curve(server_key, client_cert)

    def main():
        pong = oneshot.ping(endpoint, timeout)
        sys.stdout.write(f"pymap daemon {pong.version} at {endpoint}: epoch {pong.epoch}, "
                         f"up {pong.uptime:.0f} s\n")

    run(main)


@app.command("list")
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
        from . import render

        waiting: contextlib.AbstractContextManager = contextlib.nullcontext()
        if output is not Output.json and sys.stderr.isatty():
            waiting = err().status("reading maps from the daemon...")
        with waiting:
            maps = oneshot.list_maps(endpoint, pattern, entries=not no_entries, timeout=timeout)
        if output is Output.json:
            import orjson

            sys.stdout.write(orjson.dumps([render.map_json(m) for m in maps]).decode() + "\n")
        else:
            render.print_maps(out(), maps, wide=output is Output.wide)
        if pattern and not maps:
            say(f"pymap: no map matches {pattern!r}")
            return EXIT_ERROR

    run(main)


@app.command()
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
    own_layouts = _read_layouts(layout_file) if layout_file else []

    async def main():
        from ..client import Client
        from . import render

        async with Client(endpoint, timeout) as client, client.get(selector) as dump:
            decoding = _decoding(dump, own_layouts, layout_file, raw)
            formatter = decoding.formatter if decoding else None
            if output is Output.json:
                writer = render.JsonDumpWriter(dump.map, sys.stdout, formatter,
                                               decoding.as_json() if decoding else None)
                async for chunk in dump.chunks():
                    writer.chunk(chunk)
                writer.close()
                return
            rows: list[tuple[bytes, bytes, dict | None]] = []
            m = dump.map
            with _progress(f"reading {m.name}") as progress:
                async for chunk in dump.chunks():
                    progress.advance(chunk.count)
                    for i in range(chunk.count):
                        if limit and len(rows) >= limit:
                            break
                        key = chunk.keys[i * m.key_size:(i + 1) * m.key_size]
                        value = chunk.values[i * m.value_stride:(i + 1) * m.value_stride]
                        rows.append((key, value, formatter(key, value) if formatter else None))
            render.print_entries(out(), m, rows, dump.total or 0, raw,
                                 decoding.describe() if decoding else "shown as hex (--raw)",
                                 wide=output is Output.wide)

    run_async(main)


def _decoding(dump, own_layouts: list, layout_file: str | None, raw: bool):
    """How ``get`` (and ``top MAP``) decode a map: a --layout of the user's that matches,
    else the daemon's layout, a built-in decoder or BTF (None with --raw: hex)."""
    from ..decoding import choose_decoding

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


def _read_layouts(path: str) -> list:
    """``--layout FILE``: [[layouts]] tables, or one layout table (match defaults to "*")."""
    from watcher.decode.layout import LayoutError, parse_layout
    from watcher.wire.tomlfile import TomlFileError, read_toml

    try:
        data = read_toml(path, "layout file")
    except TomlFileError as e:
        fail(str(e), EXIT_USAGE)
    raw = data.get("layouts", [{"match": "*", **data}])
    if not isinstance(raw, list):
        fail(f"{path}: layouts must be an array of tables ([[layouts]])", EXIT_USAGE)
    try:
        return [parse_layout(item, i) for i, item in enumerate(raw)]
    except LayoutError as e:
        fail(f"{path}: {e}", EXIT_USAGE)


@app.command()
def events(
    selectors: Annotated[list[str], typer.Argument(
        help="Map names or globs ('cilium_policy_*'); id:N and pin paths work too.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until Ctrl-C.")] = False,
    snapshot: Annotated[bool, typer.Option(
        "--snapshot", help="First print current entries as 'added' lines (full state).")] = False,
    output: OutputOpt = Output.table,
    raw: Annotated[bool, typer.Option("--raw", help="No decoding, hex only.")] = False,
    count: Annotated[int, typer.Option(
        "--count", "-n", help="Exit after this many events (0: no limit).")] = 0,
    count_c: Annotated[int | None, typer.Option("-c", hidden=True)] = None,  # before 0.2
    max_wait: Annotated[float | None, typer.Option(
        "--max-wait", min=0, metavar="SECONDS",
        help="With -f: when the daemon falls silent, wait at most this long for it to "
        "come back, then exit 1 (default: wait for ever, like tail -F).")] = None,
    fleet: Annotated[str | None, typer.Option(
        "--fleet", metavar="URL", envvar="PYMAP_FLEET",
        help="Read every node's events from NATS JetStream (nats://HOST:4222[,...]; "
        "see docs/fleet.md) instead of the local daemon.")] = None,
    node: Annotated[str | None, typer.Option(
        "--node", metavar="GLOB", help="With --fleet: only nodes matching this glob.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="DURATION",
        help="With --fleet: replay from this long ago (90s, 15m, 2h, 7d).")] = None,
    durable: Annotated[str | None, typer.Option(
        "--durable", metavar="NAME",
        help="With --fleet: a durable consumer that resumes where it left off.")] = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    server_key: CurveServerOpt = None,
    client_cert: CurveCertOpt = None,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """A map's changes: recent ones, or live with -f (added, updated, removed, ...).

    A follower (-f) holds on like tail -F: if the daemon stops or restarts, it says
    so on stderr, waits, resyncs, and prints what it missed as lost/resync lines.
    With --fleet, the same for every node publishing to NATS (pymap export --to nats://).
    """
    count = count if count_c is None else count_c
    use_curve(server_key, client_cert)
    from ..eventjson import MapCache
    from .eventsout import EventPrinter

    for selector in selectors:
        valid_glob(selector)
    if fleet is not None:
        return _fleet_events(fleet, selectors, node, since, durable, follow, count,
                             output is Output.json)
    if node or since or durable:
        fail("--node, --since and --durable need --fleet", EXIT_USAGE)

    async def main():
        from ..client import Client

        async with Client(endpoint, timeout) as client:
            names = [await _name_of(client, s) for s in selectors]
            printer = EventPrinter(MapCache(client, decode=not raw), output is Output.json)
            if not follow:
                return await _print_recent(client, names, printer, snapshot)
            async with client.events(names, snapshot=snapshot, max_wait=max_wait) as stream:
                async for event in stream:
                    if event.action in ("stalled", "resumed"):
                        _say_daemon_state(event, endpoint, max_wait)
                        continue
                    await printer.print(event)
                    if count and printer.count >= count:
                        return

    run_async(main)


def _say_daemon_state(event, endpoint: str, max_wait: float | None) -> None:
    """A follower's one line on stderr when its daemon falls silent, and when it is back."""
    if event.action == "stalled":
        how_long = "for ever" if max_wait is None else f"up to {max_wait:g} s"
        say(f"pymap: {event.reason} at {endpoint}; waiting {how_long} for it to come back "
            "(Ctrl-C to stop)")
    else:
        say(f"pymap: the daemon is back ({event.reason}); catching up")


def _fleet_events(url: str, selectors: list[str], node: str | None, since: str | None,
                  durable: str | None, follow: bool, count: int, as_json: bool) -> None:
    """``events --fleet``: a JetStream consumer on the fleet stream, printed per node."""
    from ..fleet.jetstream import FleetError, FleetUnavailable
    from ..fleet.options import FleetConfigError, parse_duration, parse_url
    from ..fleet.subscribe import FleetSubscription
    from .fleetout import FleetPrinter

    try:
        options = parse_url(url)
        since_s = parse_duration(since) if since else None
    except FleetConfigError as e:
        fail(str(e), EXIT_USAGE)

    async def main():
        printer = FleetPrinter(as_json)
        async with FleetSubscription(options, selectors, node_glob=node, since=since_s,
                                     follow=follow, durable=durable,
                                     on_notice=lambda t: say(f"pymap: fleet: {t}")) as sub:
            try:
                async for message in sub:
                    printer.print(message)
                    if count and printer.count >= count:
                        return
            finally:
                if sub.duplicates:
                    say(f"pymap: fleet: {sub.duplicates} duplicate event(s) dropped (re-sent "
                        "by a restarted exporter and stored twice; docs/fleet.md)")

    try:
        run_async(main)
    except (FleetError, FleetUnavailable) as e:
        fail(str(e))


async def _name_of(client: Client, selector: str) -> str:
    """Stream topics are map names: resolve id:N and pin paths to one."""
    if selector.startswith("id:") or selector.startswith("/"):
        info, _ = await client.describe(selector)
        return info.name
    return selector


async def _print_recent(client: Client, names: list[str], printer, snapshot: bool) -> int | None:
    from ..events import events_of
    from ..subscriber import snapshot_events

    if snapshot:
        for event in await snapshot_events(client, names):
            await printer.print(event)
        return None
    for name in names:
        messages, end = await client.recent(name)
        for message, frames in messages:
            for event in events_of(message, frames):
                await printer.print(event)
        if not end.watched:
            say(f"pymap: {name} is not being watched, so the daemon has no recent events "
                "for it; follow it with -f (or list it under watch.always)")
    return None


@app.command(epilog=(
    "Examples:  pymap top  ·  pymap top 'cilium_*'  ·  pymap top syscounts  ·  "
    "pymap top syscounts --once  ·  pymap top -n 5 -o json.  Keys: q quit, p pause, "
    "s/S and 1-9 sort, r reverse, / filter."))
def top(
    selector: Annotated[str | None, typer.Argument(
        help="A map (name, id:N or pin path): one row per key.  A glob ('cilium_*'): one row "
        "per watched map, and the maps it matches are watched while top runs.  None: every "
        "map the daemon watches.", show_default=False)] = None,
    once: Annotated[bool, typer.Option("--once", help="Print one refresh and exit.")] = False,
    count: Annotated[int, typer.Option(
        "--count", "-n", min=0, help="Print this many refreshes and exit (plain tables, or "
        "JSON lines with -o json); 0 with stdout not a terminal: until stopped.")] = 0,
    output: OutputOpt = Output.table,
    delay: Annotated[float, typer.Option(
        "--delay", "-d", min=0.1, metavar="SECONDS", help="Seconds between refreshes.")] = 1.0,
    window: Annotated[float, typer.Option(
        "--window", "-w", min=0.5, metavar="SECONDS",
        help="top MAP: seconds of events each rate is averaged over.")] = 5.0,
    sort: Annotated[str, typer.Option(
        "--sort", metavar="COLUMN", help="Sort by this column (maps: events, added, updated, "
        "removed, name, type, entries, poll_ms, engine, memory; keys: key, changes, value or a "
        "value field).  Default: events per map; the first numeric field, else changes, "
        "per key.")] = "",
    reverse: Annotated[bool, typer.Option("--reverse", help="Smallest first.")] = False,
    filter_: Annotated[str, typer.Option(
        "--filter", metavar="TEXT", help="Only rows whose name (key) contains TEXT.")] = "",
    raw: Annotated[bool, typer.Option("--raw", help="top MAP: keys and values as hex.")] = False,
    layout_file: Annotated[str | None, typer.Option(
        "--layout", help="top MAP: TOML file of declared layouts to decode with, as for get.")
    ] = None,
    max_wait: Annotated[float | None, typer.Option(
        "--max-wait", min=0, metavar="SECONDS",
        help="When the daemon falls silent, wait at most this long for it to come back, "
        "then exit 1 (default: for ever, like tail -F).")] = None,
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
    own_layouts = _read_layouts(layout_file) if layout_file else []
    per_map = selector is None or is_glob(selector)
    if selector is not None:
        valid_glob(selector)
    if per_map and (raw or layout_file):
        fail("--raw and --layout apply to top MAP (one map), not to a glob", EXIT_USAGE)
    from .top import MAP_SORTS, Status, View, feed_keys, feed_maps, print_refreshes

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

    async def printed() -> None:
        import trio

        from ..client import Client
        from ..nurseries import one_error

        with one_error():
            async with Client(endpoint, timeout) as client, trio.open_nursery() as nursery:
                nursery.start_soon(feed, client)
                await print_refreshes(view, 1 if once else count, delay, output is Output.json,
                                      out(), sys.stdout, 100)
                nursery.cancel_scope.cancel()

    async def screen_feed() -> None:
        from ..client import Client
        from ..nurseries import one_error

        with one_error():
            async with Client(endpoint, timeout) as client:
                await feed(client)

    def on_screen() -> None:
        from .topui import run_screen

        run_screen(view, screen_feed, delay)

    try:
        run_async(printed) if plain else run(on_screen)
    except ValueError as e:  # a sort column the map does not have
        fail(str(e), EXIT_USAGE)


@app.command(epilog=(
    "Examples:  pymap export 'cilium_*' --format ecs --to syslog+tcp://127.0.0.1:601  ·  "
    "pymap export 'cilium_policy_*' --format ocsf --to file:///var/log/pymap/policy.json "
    "--state-file /var/lib/pymap/policy.state  ·  pymap export -c /etc/pymap/export.toml "
    "--name siem.  See docs/export.md."))
def export(
    selectors: Annotated[list[str] | None, typer.Argument(
        help="Maps and event sources: names, globs ('cilium_*'), id:N, pin paths.",
        show_default=False)] = None,
    to: Annotated[str, typer.Option(
        "--to", "-t", metavar="URL",
        help="Destination: - (stdout), file:///PATH[?max_bytes=N&backups=N&mode=0600], "
        "syslog+udp://HOST:PORT, syslog+tcp://HOST:PORT (octet counting), "
        "syslog+tls://HOST:PORT[?ca=FILE&cert=FILE&key=FILE], "
        "nats://HOST:4222[,HOST2...][?stream=S&creds=FILE&tls_ca=FILE] (docs/fleet.md).")] = "-",
    format_: Annotated[str, typer.Option(
        "--format", "-F", help="json (pymap's event lines), ecs (Elastic Common Schema 8), "
        "ocsf (OCSF 1.3 Kernel Activity), cef (ArcSight CEF).")] = "json",
    action: Annotated[list[str] | None, typer.Option(
        "--action", "-a", help="Export only these actions (repeatable): added, updated, "
        "removed, map_created, map_removed, record. lost/resync/dropped always pass.",
        show_default=False)] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", "-x", metavar="GLOB", help="Leave out maps whose name matches (repeatable).",
        show_default=False)] = None,
    rate: Annotated[float | None, typer.Option(
        "--rate", min=0.001, metavar="EVENTS/S",
        help="At most this many events per second; the rest are counted and exported "
        "as 'dropped' records.")] = None,
    buffer: Annotated[int, typer.Option(
        "--buffer", metavar="BYTES", min=65536,
        help="Bytes held while the destination is slow or down; beyond it events are "
        "dropped, counted, and reported when it is back.")] = 64 * 1024 * 1024,
    state_file: Annotated[str | None, typer.Option(
        "--state-file", "-s", metavar="PATH",
        help="Checkpoint of the last delivered event: a restart resumes after it "
        "(from the daemon's recent events, else a fresh snapshot and a resync record).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="No decoding, hex only.")] = False,
    node_name: Annotated[str | None, typer.Option(
        "--node-name", metavar="NAME", envvar="PYMAP_NODE_NAME",
        help="This node's name in the records and NATS subjects (default: the host name).")
    ] = None,
    config: Annotated[str | None, typer.Option(
        "--config", "-c", metavar="TOML", help="Read exporters from the exports tables of a TOML file "
        "instead of flags (docs/export.md).")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="With -c: run only the exports table of this name.")] = None,
    name_n: Annotated[str | None, typer.Option("-n", hidden=True)] = None,  # before 0.2
    metrics: Annotated[str | None, typer.Option(
        "--metrics", metavar="HOST:PORT", envvar="PYMAP_EXPORT_METRICS",
        help="Serve Prometheus metrics (delivered, dropped, buffer, lag, checkpoint age, "
        "reconnects) on http://HOST:PORT/metrics.")] = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Feed a SIEM: map changes as ECS, OCSF, CEF or JSON to stdout, a file or syslog.

    Runs until SIGTERM/SIGINT, then flushes for up to 5 s. A daemon restart or stall is waited for (like tail -F) and written out as resync/lost records; a destination that is down is retried with backoff while events are buffered in memory (--buffer); what does not fit is counted and written out as a 'dropped' record when it is back.
    """
    name = name if name_n is None else name_n
    from ..export import config as export_config
    from ..export.checkpoint import CheckpointError
    from ..export.exporter import ExportConfigError, ExportSpec
    from ..export.outputs import OutputConfigError, make_output
    from ..export.runner import run_exports

    try:
        if config:
            if selectors:
                fail("give maps either as arguments or in the config file, not both", EXIT_USAGE)
            specs = export_config.load(config)
            if name is not None:
                specs = [s for s in specs if s.name == name]
                if not specs:
                    fail(f"config {config}: no [[exports]] table named {name!r}", EXIT_USAGE)
        else:
            if not selectors:
                fail("give at least one map name or glob (or -c CONFIG)", EXIT_USAGE)
            specs = [ExportSpec(list(selectors or []), to=to, format=format_,
                                actions=list(action or []), exclude=list(exclude or []),
                                rate=rate, buffer_bytes=buffer, state_file=state_file,
                                decode=not raw, node=node_name or "")]
        for spec in specs:
            for sel in spec.selectors:
                if not (sel.startswith("id:") or sel.startswith("/")):
                    valid_glob(sel)
            spec.check()
            make_output(spec.to, spec.options)  # a bad URL or option fails here, before connecting
    except (ExportConfigError, OutputConfigError) as e:
        fail(str(e), EXIT_USAGE)

    async def main():
        from ..client import Client

        async with Client(endpoint, timeout) as client:
            for spec in specs:
                spec.selectors = [await _name_of(client, s) for s in spec.selectors]
        await run_exports(specs, endpoint, timeout, say, metrics=metrics)

    try:
        run_async(main)
    except (OutputConfigError, CheckpointError, ExportConfigError) as e:
        fail(str(e), EXIT_USAGE if not isinstance(e, CheckpointError) else EXIT_ERROR)
    except OSError as e:  # --metrics: the port is taken, or not an address
        fail(str(e))


@app.command()
def status(
    output: OutputOpt = Output.table,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    server_key: CurveServerOpt = None,
    client_cert: CurveCertOpt = None,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """The daemon's epoch, uptime, watched maps, poll timings, subscribers, events and drops."""
    use_curve(server_key, client_cert)

    def main():
        st = oneshot.status(endpoint, timeout)
        if output is Output.json:
            import orjson

            from watcher.wire.schema import converter

            data = converter.unstructure(st)
            data.pop("req", None)
            sys.stdout.write(orjson.dumps(data).decode() + "\n")
            return
        from . import render

        render.print_status(out(), st, wide=output is Output.wide)

    run(main)


@app.command()
def daemon(
    config: Annotated[str | None, typer.Option(
        "--config", "-c", help="TOML config file (default: /etc/pymap/pymap.toml if present).")] = None,
    endpoint: Annotated[str | None, typer.Option(
        "--endpoint", "-e", help="Request endpoint (overrides daemon.endpoint).")] = None,
    events_endpoint: Annotated[str | None, typer.Option(
        help="Event stream endpoint (overrides daemon.events_endpoint).")] = None,
    interval: Annotated[float | None, typer.Option(
        help="Seconds between polls of a watched map (overrides watch.interval).")] = None,
    always: Annotated[list[str] | None, typer.Option(
        help="Map name glob to watch even without subscribers; repeatable (watch.always).")] = None,
    socket_mode: Annotated[str | None, typer.Option(
        help="Octal mode of ipc:// socket files, e.g. 0660 (overrides daemon.socket_mode).")] = None,
    socket_group: Annotated[str | None, typer.Option(
        help="Group owning ipc:// socket files (overrides daemon.socket_group).")] = None,
    bpffs: Annotated[list[str] | None, typer.Option(
        help="bpffs directory to search for pins; repeatable (overrides daemon.bpffs).")] = None,
    log_level: Annotated[str | None, typer.Option(
        help="debug, info, warning or error (overrides daemon.log_level).")] = None,
    log_format: Annotated[str | None, typer.Option(
        help="text, or json: one JSON object per line (overrides daemon.log_format).")] = None,
    source: Annotated[list[str] | None, typer.Option(
        "--source", help="Event source: FILE.c[:buf1,buf2] (load with bcc, publish those "
        "buffers; default all) or a pinned buffer's path; repeatable, added to "
        "[[sources]] (docs/sources.md).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Any config key: SECTION.KEY=VALUE, VALUE in TOML syntax (e.g. "
        "daemon.stream_hwm=1000, watch.linger=60, 'watch.always=[\"cilium_*\"]'); "
        "repeatable, applied after the file and the other flags.")] = None,
) -> None:
    """Run the pymap daemon (as root) until SIGINT or SIGTERM; SIGHUP reloads the config."""
    import trio
    import zmq

    from watcher.daemon import main as daemon_main
    from watcher.daemon.config import ConfigError, load_config

    mode = None
    if socket_mode is not None:
        try:
            mode = int(socket_mode, 8)
        except ValueError:
            fail(f"--socket-mode {socket_mode!r} is not an octal mode", EXIT_USAGE)
    overrides = {"endpoint": endpoint, "events_endpoint": events_endpoint, "socket_mode": mode,
                 "socket_group": socket_group, "bpffs": bpffs or None, "log_level": log_level,
                 "log_format": log_format}
    watch_overrides = {"interval": interval, "always": always or None}

    def load():  # again on SIGHUP, with the same flags on top of the file
        return load_config(config, overrides, watch_overrides, sources=source or None,
                           settings=set_ or None)

    try:
        conf = load()
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)
    daemon_main.setup_logging(conf.daemon.log_level, conf.daemon.log_format)
    try:
        trio.run(functools.partial(daemon_main.run, conf, reload=load))
    except ConfigError as e:
        fail(str(e))
    except PermissionError as e:
        fail(f"{e.filename or ''}: permission denied (run the daemon as root, or see "
             "docs/operations.md for the capabilities and directories it needs)")
    except zmq.ZMQError as e:
        fail(f"cannot start: {e}")
    except OSError as e:
        fail(f"cannot start: {e}")
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def doctor(endpoint: EndpointOpt = DEFAULT_ENDPOINT) -> None:
    """Check this host's prerequisites, each with its fix."""
    from .doctor import run_checks

    raise typer.Exit(run_checks(out(), endpoint))


def _command_name(info: typer.models.CommandInfo) -> str:
    if info.name:
        return info.name
    assert info.callback is not None
    return info.callback.__name__.lower().replace("_", "-")


def _only_the_named_command(args: list[str]) -> typer.Typer:
    """The app to run for ``args``: just the command they name, when they name one.

    Typer turns every command's signature into click parameters before it
    dispatches (about 25 ms for pymap's commands, a quarter of ``pymap ping``);
    a run needs one, as with click's lazily loaded subcommands.  No command,
    ``--help`` or an unknown name get the whole app and its usual messages.
    """
    name = args[0] if args else ""
    commands = [c for c in app.registered_commands if _command_name(c) == name]
    groups = [g for g in app.registered_groups if g.name == name]
    if not commands and not groups:
        return app
    lean = typer.Typer(**_APP_SETTINGS)
    lean.registered_commands = commands
    lean.registered_groups = groups
    # With a callback it stays a group, so the command's name is still expected.
    lean.callback()(lambda: None)
    return lean


def main() -> None:
    _only_the_named_command(sys.argv[1:])()
