"""``pymap daemon``, and the commands about the daemon itself: ``ping``, ``status``, ``doctor``.

``daemon`` is the only command that runs watcher code: it parses its flags, then
becomes the daemon's process (``python -m watcher.daemon``, same pid); ``doctor``
checks the host it would run on.
"""

from __future__ import annotations

import sys
from typing import Annotated

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
)
from ..running import fail, out, run, table_out


def ping(endpoint: EndpointOpt = DEFAULT_ENDPOINT, timeout: TimeoutOpt = 3.0,
         server_key: CurveServerOpt = None, client_cert: CurveCertOpt = None) -> None:
    """Check that the daemon answers; print its version, epoch and uptime."""
    use_curve(server_key, client_cert)

    def main():
        from ... import oneshot

        pong = oneshot.ping(endpoint, timeout)
        sys.stdout.write(f"pymap daemon {pong.version} at {endpoint}: epoch {pong.epoch}, "
                         f"up {pong.uptime:.0f} s\n")

    run(main)


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
        from ... import oneshot

        st = oneshot.status(endpoint, timeout)
        if output is Output.json:
            import orjson

            from watcher.wire.schema import converter

            data = converter.unstructure(st)
            data.pop("req", None)
            sys.stdout.write(orjson.dumps(data).decode() + "\n")
            return
        from .. import render

        render.print_status(table_out(), st, wide=output is Output.wide)

    run(main)


_ConfigOpt = Annotated[str | None, typer.Option(
    "--config", "-c", help="TOML config file (default: /etc/pymap/pymap.toml if present).")]
_EndpointOpt = Annotated[str | None, typer.Option(
    "--endpoint", "-e", help="Request endpoint (overrides daemon.endpoint).")]
_EventsEndpointOpt = Annotated[str | None, typer.Option(
    help="Event stream endpoint (overrides daemon.events_endpoint).")]
_IntervalOpt = Annotated[float | None, typer.Option(
    help="Seconds between polls of a watched map (overrides watch.interval).")]
_AlwaysOpt = Annotated[list[str] | None, typer.Option(
    help="Map name glob to watch even without subscribers; repeatable (watch.always).")]
_SocketModeOpt = Annotated[str | None, typer.Option(
    help="Octal mode of ipc:// socket files, e.g. 0660 (overrides daemon.socket_mode).")]
_SocketGroupOpt = Annotated[str | None, typer.Option(
    help="Group owning ipc:// socket files (overrides daemon.socket_group).")]
_BpffsOpt = Annotated[list[str] | None, typer.Option(
    help="bpffs directory to search for pins; repeatable (overrides daemon.bpffs).")]
_LogLevelOpt = Annotated[str | None, typer.Option(
    help="debug, info, warning or error (overrides daemon.log_level).")]
_LogFormatOpt = Annotated[str | None, typer.Option(
    help="text, or json: one JSON object per line (overrides daemon.log_format).")]
_SourceOpt = Annotated[list[str] | None, typer.Option(
    "--source", help="Event source: FILE.c[:buf1,buf2] (load with bcc, publish those "
    "buffers; default all) or a pinned buffer's path; repeatable, added to "
    "[[sources]] (docs/sources.md).")]
_SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Any config key: SECTION.KEY=VALUE, VALUE in TOML syntax (e.g. "
    "daemon.stream_hwm=1000, watch.linger=60, 'watch.always=[\"cilium_*\"]'); "
    "repeatable, applied after the file and the other flags.")]


def daemon(
    config: _ConfigOpt = None,
    endpoint: _EndpointOpt = None,
    events_endpoint: _EventsEndpointOpt = None,
    interval: _IntervalOpt = None,
    always: _AlwaysOpt = None,
    socket_mode: _SocketModeOpt = None,
    socket_group: _SocketGroupOpt = None,
    bpffs: _BpffsOpt = None,
    log_level: _LogLevelOpt = None,
    log_format: _LogFormatOpt = None,
    source: _SourceOpt = None,
    set_: _SetOpt = None,
) -> None:
    """Run the pymap daemon (as root) until SIGINT or SIGTERM; SIGHUP reloads the config."""
    # typer has parsed the flags; the daemon runs in a process that never imported typer,
    # click or this package (watcher/daemon/__main__.py says why): same pid, same stdio.
    import json
    import os

    import watcher

    options = {"config": config, "endpoint": endpoint, "events_endpoint": events_endpoint,
               "interval": interval, "always": always, "socket_mode": socket_mode,
               "socket_group": socket_group, "bpffs": bpffs, "log_level": log_level,
               "log_format": log_format, "source": source, "set": set_}
    root = os.path.dirname(os.path.dirname(os.path.abspath(watcher.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    sys.stdout.flush()
    sys.stderr.flush()
    # -P: no working directory on sys.path (a root process must not import from it).
    try:
        os.execve(sys.executable, [sys.executable, "-P", "-m", "watcher.daemon",
                                   json.dumps(options)], env)
    except OSError as e:
        fail(f"cannot start: {sys.executable}: {e.strerror or e}")


def doctor(endpoint: EndpointOpt = DEFAULT_ENDPOINT) -> None:
    """Check this host's prerequisites, each with its fix."""
    from ..doctor import run_checks

    raise typer.Exit(run_checks(out(), endpoint))
