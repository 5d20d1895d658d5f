"""The ``pymap`` command line: a thin layer over the client library.

Every command talks to the daemon through the same client library other
consumers use (:mod:`consumers.oneshot` for one request and one reply,
:mod:`consumers.client` for the rest); only ``daemon`` (which starts it) and
``doctor`` (which checks the host) reach further.  Errors are one line on
stderr and a non-zero exit, never a traceback.

This module only assembles the typer app from the commands in
consumers/cli/commands/, in the order ``--help`` lists them, and runs it.
Each command imports what it needs when it runs (trio, rich, decoders,
numpy through the daemon), so ``pymap ping`` starts in a fraction of the time
``pymap daemon`` takes: see bench/bench_cli.py.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .commands import daemon, events, export, maps
from .commands.keys import keys_app

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


app.add_typer(keys_app, name="keys")
app.command()(daemon.ping)
app.command("list")(maps.list_)
app.command()(maps.get)
app.command()(events.events)
app.command(epilog=maps.TOP_EPILOG)(maps.top)
app.command(epilog=export.EXPORT_EPILOG)(export.export)
app.command()(daemon.status)
app.command()(daemon.daemon)
app.command()(daemon.doctor)


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
