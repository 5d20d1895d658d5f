"""``pymap export``: the command that feeds a SIEM (consumers/export does the work).

It only turns flags, or the ``[[exports]]`` tables of a TOML file, into
export specs, checks them before anything connects, and runs them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ...endpoint import DEFAULT_ENDPOINT
from ..options import EndpointOpt, TimeoutOpt, name_of, valid_glob
from ..running import EXIT_ERROR, EXIT_USAGE, fail, run_async, say

EXPORT_EPILOG = (
    "Examples:  pymap export 'cilium_*' --format ecs --to syslog+tcp://127.0.0.1:601  ·  "
    "pymap export 'cilium_policy_*' --format ocsf --to file:///var/log/pymap/policy.json "
    "--state-file /var/lib/pymap/policy.state  ·  pymap export -c /etc/pymap/export.toml "
    "--name siem.  See docs/export.md.")


_SelectorsOpt = Annotated[list[str] | None, typer.Argument(
    help="Maps and event sources: names, globs ('cilium_*'), id:N, pin paths.",
    show_default=False)]
_ToOpt = Annotated[str, typer.Option(
    "--to", "-t", metavar="URL",
    help="Destination: - (stdout), file:///PATH[?max_bytes=N&backups=N&mode=0600], "
    "syslog+udp://HOST:PORT, syslog+tcp://HOST:PORT (octet counting), "
    "syslog+tls://HOST:PORT[?ca=FILE&cert=FILE&key=FILE], "
    "nats://HOST:4222[,HOST2...][?stream=S&creds=FILE&tls_ca=FILE] (docs/fleet.md).")]
_FormatOpt = Annotated[str, typer.Option(
    "--format", "-F", help="json (pymap's event lines), ecs (Elastic Common Schema 8), "
    "ocsf (OCSF 1.3 Kernel Activity), cef (ArcSight CEF).")]
_ActionOpt = Annotated[list[str] | None, typer.Option(
    "--action", "-a", help="Export only these actions (repeatable): added, updated, "
    "removed, map_created, map_removed, record. lost/resync/dropped always pass.",
    show_default=False)]
_ExcludeOpt = Annotated[list[str] | None, typer.Option(
    "--exclude", "-x", metavar="GLOB", help="Leave out maps whose name matches (repeatable).",
    show_default=False)]
_RateOpt = Annotated[float | None, typer.Option(
    "--rate", min=0.001, metavar="EVENTS/S",
    help="At most this many events per second; the rest are counted and exported "
    "as 'dropped' records.")]
_BufferOpt = Annotated[int, typer.Option(
    "--buffer", metavar="BYTES", min=65536,
    help="Bytes held while the destination is slow or down; beyond it events are "
    "dropped, counted, and reported when it is back.")]
_StateFileOpt = Annotated[str | None, typer.Option(
    "--state-file", "-s", metavar="PATH",
    help="Checkpoint of the last delivered event: a restart resumes after it "
    "(from the daemon's recent events, else a fresh snapshot and a resync record).")]
_NodeNameOpt = Annotated[str | None, typer.Option(
    "--node-name", metavar="NAME", envvar="PYMAP_NODE_NAME",
    help="This node's name in the records and NATS subjects (default: the host name).")
    ]
_ConfigOpt = Annotated[str | None, typer.Option(
    "--config", "-c", metavar="TOML", help="Read exporters from the exports tables of a TOML file "
    "instead of flags (docs/export.md).")]
_NameOpt = Annotated[str | None, typer.Option(
    "--name", help="With -c: run only the exports table of this name.")]
_MetricsOpt = Annotated[str | None, typer.Option(
    "--metrics", metavar="HOST:PORT", envvar="PYMAP_EXPORT_METRICS",
    help="Serve Prometheus metrics (delivered, dropped, buffer, lag, checkpoint age, "
    "reconnects) on http://HOST:PORT/metrics.")]


def export(
    selectors: _SelectorsOpt = None,
    to: _ToOpt = "-",
    format_: _FormatOpt = "json",
    action: _ActionOpt = None,
    exclude: _ExcludeOpt = None,
    rate: _RateOpt = None,
    buffer: _BufferOpt = 64 * 1024 * 1024,
    state_file: _StateFileOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="No decoding, hex only.")] = False,
    node_name: _NodeNameOpt = None,
    config: _ConfigOpt = None,
    name: _NameOpt = None,
    name_n: Annotated[str | None, typer.Option("-n", hidden=True)] = None,  # before 0.2
    metrics: _MetricsOpt = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Feed a SIEM: map changes as ECS, OCSF, CEF or JSON to stdout, a file or syslog.

    Runs until SIGTERM/SIGINT, then flushes for up to 5 s. A daemon restart or stall is waited for (like tail -F) and written out as resync/lost records; a destination that is down is retried with backoff while events are buffered in memory (--buffer); what does not fit is counted and written out as a 'dropped' record when it is back.
    """
    name = name if name_n is None else name_n
    from ...export.checkpoint import CheckpointError
    from ...export.exporter import ExportConfigError, ExportSpec
    from ...export.outputs import OutputConfigError
    from ...export.runner import run_exports

    try:
        if config:
            specs = _specs_from_config(config, name, selectors)
        else:
            if not selectors:
                fail("give at least one map name or glob (or -c CONFIG)", EXIT_USAGE)
            specs = [ExportSpec(list(selectors or []), to=to, format=format_,
                                actions=list(action or []), exclude=list(exclude or []),
                                rate=rate, buffer_bytes=buffer, state_file=state_file,
                                decode=not raw, node=node_name or "")]
        _check(specs)
    except (ExportConfigError, OutputConfigError) as e:
        fail(str(e), EXIT_USAGE)

    async def main():
        from ...client import Client

        async with Client(endpoint, timeout) as client:
            for spec in specs:
                spec.selectors = [await name_of(client, s) for s in spec.selectors]
        await run_exports(specs, endpoint, timeout, say, metrics=metrics)

    try:
        run_async(main)
    except (OutputConfigError, CheckpointError, ExportConfigError) as e:
        fail(str(e), EXIT_USAGE if not isinstance(e, CheckpointError) else EXIT_ERROR)
    except OSError as e:  # --metrics: the port is taken, or not an address
        fail(str(e))


def _specs_from_config(config: str, name: str | None, selectors: list[str] | None) -> list:
    """``-c CONFIG [--name NAME]``: the exports tables of the file (or the one named)."""
    from ...export import config as export_config

    if selectors:
        fail("give maps either as arguments or in the config file, not both", EXIT_USAGE)
    specs = export_config.load(config)
    if name is not None:
        specs = [s for s in specs if s.name == name]
        if not specs:
            fail(f"config {config}: no [[exports]] table named {name!r}", EXIT_USAGE)
    return specs


def _check(specs: list) -> None:
    """Every spec's selectors, options and destination, before anything connects."""
    from ...export.outputs import make_output

    for spec in specs:
        for sel in spec.selectors:
            if not (sel.startswith("id:") or sel.startswith("/")):
                valid_glob(sel)
        spec.check()
        make_output(spec.to, spec.options)  # a bad URL or option fails here, before connecting
