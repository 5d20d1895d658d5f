"""The options several ``pymap`` commands share, defined once so they mean one thing.

``-e``/``--endpoint``, the CURVE keys, ``--timeout`` and ``-o``/``--output``
read the same, with the same help text and environment variables, in every
command that has them (tests/test_cli_flags.py holds short flags to one
meaning); so do the checks on what a user names a map with (globs, id:N, pin
paths).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Annotated

import typer

from watcher.wire.globs import GlobError, check_glob

from .running import EXIT_USAGE, fail

if TYPE_CHECKING:
    from ..client import Client


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


async def name_of(client: Client, selector: str) -> str:
    """Stream topics are map names: resolve id:N and pin paths to one."""
    if selector.startswith("id:") or selector.startswith("/"):
        info, _ = await client.describe(selector)
        return info.name
    return selector
