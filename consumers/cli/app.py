"""The ``pymap`` command line: a thin layer over :mod:`consumers.client`.

Every command talks to the daemon through the same client library other
consumers use; only ``daemon`` (which starts it) and ``doctor`` (which checks
the host) reach further.  Errors are one line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated

import trio
import typer
import zmq
from rich.console import Console

from watcher.wire.curve import ClientKeys, CurveError
from watcher.wire.globs import GlobError, check_glob

from ..client import DEFAULT_ENDPOINT, Client, DaemonError
from ..decoding import choose_decoding
from . import render
from .keys import keys_app

app = typer.Typer(
    name="pymap",
    help="Watch eBPF maps: list them, dump them decoded, stream their changes.",
    epilog=("Examples:  pymap list 'cilium_*'  ·  pymap get cilium_ipcache_v2  ·  "
            "pymap events cilium_lxc -f  ·  pymap events 'cilium_policy_*' -f -o json  ·  "
            "pymap doctor.  The daemon (pymap daemon, as root) must be running; "
            "see README.md and docs/."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console()
stderr = Console(stderr=True)


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


def fail(message: str, code: int = EXIT_ERROR) -> None:
    stderr.print(f"pymap: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _curve(server_key: str | None, client_cert: str | None) -> ClientKeys | None:
    """CURVE keys from the flags (or PYMAP_CURVE_* variables), read once, checked early."""
    if server_key is None and client_cert is None:
        return None
    if server_key is None or client_cert is None:
        fail("CURVE needs both --curve-server-key and --curve-client-cert", EXIT_USAGE)
    try:
        return ClientKeys.load(server_key, client_cert)
    except CurveError as e:
        fail(str(e), EXIT_USAGE)
    raise AssertionError("unreachable")


def valid_glob(pattern: str) -> str:
    """``pattern``, or a one-line usage error when it is not a glob that parses."""
    try:
        return check_glob(pattern)
    except GlobError as e:
        fail(str(e), EXIT_USAGE)
        raise  # not reached: fail() exits


def run(fn: Callable[[], Awaitable[int | None]]) -> None:
    """Run an async command; turn daemon errors and Ctrl-C into clean exits."""
    try:
        code = trio.run(fn)
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


app.add_typer(keys_app, name="keys")


@app.command()
def ping(endpoint: EndpointOpt = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 3.0,
         server_key: CurveServerOpt = None, client_cert: CurveCertOpt = None) -> None:
    """Check that the daemon answers; print its version, epoch and uptime."""

    curve = _curve(server_key, client_cert)
    async def main():
        async with Client(endpoint, timeout, curve=curve) as client:
            pong = await client.ping()
        stdout.print(f"pymap daemon {pong.version} at {endpoint}: epoch {pong.epoch}, "
                     f"up {pong.uptime:.0f} s", highlight=False, soft_wrap=True)

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
    if pattern:
        valid_glob(pattern)

    curve = _curve(server_key, client_cert)
    async def main():
        async with Client(endpoint, timeout, curve=curve) as client:
            if output is not Output.json and stderr.is_terminal:
                with stderr.status("reading maps from the daemon..."):
                    maps = await client.list_maps(pattern, entries=not no_entries)
            else:
                maps = await client.list_maps(pattern, entries=not no_entries)
        if output is Output.json:
            import orjson

            sys.stdout.write(orjson.dumps([render.map_json(m) for m in maps]).decode() + "\n")
        else:
            render.print_maps(stdout, maps, wide=output is Output.wide)
        if pattern and not maps:
            stderr.print(f"pymap: no map matches {pattern!r}", highlight=False)
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
    own_layouts = _read_layouts(layout_file) if layout_file else []

    curve = _curve(server_key, client_cert)
    async def main():
        async with (Client(endpoint, timeout, curve=curve) as client,
                    client.get(selector) as dump):
            layout = next((x for x in own_layouts
                           if x.matches([dump.map.name, dump.map.kernel_name], dump.map.pinned)),
                          None)
            if layout is None:
                if own_layouts:
                    stderr.print(f"pymap: note: no layout in {layout_file} matches "
                                 f"{dump.map.name}; using the daemon's decoding",
                                 highlight=False, markup=False)
                layout = dump.layout
            decoding = None if raw else choose_decoding(dump.map, dump.btf, layout)
            formatter = decoding.formatter if decoding else None
            if output is Output.json:
                writer = render.JsonDumpWriter(dump.map, sys.stdout, formatter,
                                               decoding.as_json() if decoding else None)
                async for chunk in dump.chunks():
                    writer.chunk(chunk)
                writer.close()
                return
            rows = []
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
            render.print_entries(stdout, m, rows, dump.total or 0, raw,
                                 decoding.describe() if decoding else "shown as hex (--raw)",
                                 wide=output is Output.wide)

    run(main)


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
    if not stderr.is_terminal:
        yield _Progress(None)
        return
    with stderr.status(label) as status:
        progress = _Progress(status)
        progress.label = label
        yield progress


def _read_layouts(path: str) -> list:
    """``--layout FILE``: [[layouts]] tables, or one layout table (match defaults to "*")."""
    import tomllib

    from watcher.decode.layout import LayoutError, parse_layout

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        fail(f"cannot read layout file {path}: {e.strerror}", EXIT_USAGE)
    except tomllib.TOMLDecodeError as e:
        fail(f"layout file {path} is not valid TOML: {e}", EXIT_USAGE)
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
        "--count", "-c", help="Exit after this many events (0: no limit).")] = 0,
    max_wait: Annotated[float | None, typer.Option(
        "--max-wait", min=0, metavar="SECONDS",
        help="With -f: when the daemon falls silent, wait at most this long for it to "
        "come back, then exit 1 (default: wait for ever, like tail -F).")] = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    server_key: CurveServerOpt = None,
    client_cert: CurveCertOpt = None,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """A map's changes: recent ones, or live with -f (added, updated, removed, ...).

    A follower (-f) holds on like tail -F: if the daemon stops or restarts, it says
    so on stderr, waits, resyncs, and prints what it missed as lost/resync lines.
    """
    from .eventsout import EventPrinter, MapCache

    for selector in selectors:
        valid_glob(selector)

    curve = _curve(server_key, client_cert)
    async def main():
        async with Client(endpoint, timeout, curve=curve) as client:
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

    run(main)


def _say_daemon_state(event, endpoint: str, max_wait: float | None) -> None:
    """A follower's one line on stderr when its daemon falls silent, and when it is back."""
    if event.action == "stalled":
        how_long = "for ever" if max_wait is None else f"up to {max_wait:g} s"
        text = (f"pymap: {event.reason} at {endpoint}; waiting {how_long} for it to come "
                "back (Ctrl-C to stop)")
    else:
        text = f"pymap: the daemon is back ({event.reason}); catching up"
    stderr.print(text, highlight=False, markup=False, soft_wrap=True)


async def _name_of(client: Client, selector: str) -> str:
    """Stream topics are map names: resolve id:N and pin paths to one."""
    if selector.startswith("id:") or selector.startswith("/"):
        info, _ = await client.describe(selector)
        return info.name
    return selector


async def _print_recent(client: Client, names: list[str], printer, snapshot: bool) -> int | None:
    from ..subscriber import EventStream, events_of

    if snapshot:
        for event in await EventStream(client, names, snapshot=True).read_snapshot():
            await printer.print(event)
        return None
    for name in names:
        messages, end = await client.recent(name)
        for message, frames in messages:
            for event in events_of(message, frames):
                await printer.print(event)
        if not end.watched:
            stderr.print(f"pymap: {name} is not being watched, so the daemon has no recent "
                         "events for it; follow it with -f (or list it under watch.always)",
                         highlight=False, markup=False)
    return None


@app.command()
def status(
    output: OutputOpt = Output.table,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    server_key: CurveServerOpt = None,
    client_cert: CurveCertOpt = None,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """The daemon's epoch, uptime, watched maps, poll timings, subscribers, events and drops."""

    curve = _curve(server_key, client_cert)
    async def main():
        async with Client(endpoint, timeout, curve=curve) as client:
            st = await client.status()
        if output is Output.json:
            import orjson

            from watcher.wire.schema import converter

            data = converter.unstructure(st)
            data.pop("req", None)
            sys.stdout.write(orjson.dumps(data).decode() + "\n")
            return
        render.print_status(stdout, st, wide=output is Output.wide)

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
        fail(f"{e.filename or ''}: permission denied (the daemon must run as root)")
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

    raise typer.Exit(run_checks(stdout, endpoint))


def main() -> None:
    app()
