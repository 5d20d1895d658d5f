"""The ``pymap`` command line: a thin layer over the client library.

Every command talks to the daemon through the same client library other
consumers use (:mod:`consumers.oneshot` for one request and one reply,
:mod:`consumers.client` for the rest); only ``daemon`` (which starts it) and
``doctor`` (which checks the host) reach further.  Errors are one line on
stderr and a non-zero exit, never a traceback.

This module only assembles the typer app from the commands in
consumers/cli/commands/, in the order ``--help`` lists them, and runs it.
A run imports only the module of the command it names (``pymap ping``: not
``maps``, ``events`` or ``export``), and each command imports what it needs
when it runs (zmq, the wire schema, trio, rich, decoders), so ``pymap ping``
starts in a fraction of the time ``pymap daemon`` takes: see bench/bench_cli.py.

Why typer stays, even on the hot path (``ping``, ``status``, ``list``): the
command functions' signatures are the one definition of every option, its help
and its environment variable.  A typer-free fast path would need a second
parser for those commands that can drift from typer's; dispatching through
click directly would mean using typer's vendored copy of it (``typer._click``,
private) or adding click and re-declaring every option.  And it would not
reach issue 20's target of 4x ``python -c pass``: measured interleaved on the
bench's machine (best of 20), ``import zmq, attrs, cattrs`` alone is 6.4x,
``consumers.oneshot.ping`` without typer 8.6x, ``pymap ping`` 11.0x.  The
libraries the protocol is defined with, not the parser, set the floor.
``pymap --help`` (14x there) is typer's rich help: ``typer.rich_utils``
imports rich's markdown (markdown_it) and syntax (pygments) modules, most of
its time, and no other renderer prints the same bytes.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated, NoReturn

import typer

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

# Every command, in --help's order: name -> (module in consumers/cli/commands/, the
# command's function, the module's constant that is its epilog, or None).  Names only,
# so that a run imports just the module of the command it names.
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "ping": ("daemon", "ping", None),
    "list": ("maps", "list_", None),
    "get": ("maps", "get", None),
    "events": ("events", "events", None),
    "top": ("maps", "top", "TOP_EPILOG"),
    "export": ("export", "export", "EXPORT_EPILOG"),
    "status": ("daemon", "status", None),
    "daemon": ("daemon", "daemon", None),
    "doctor": ("daemon", "doctor", None),
}
# Sub-apps (typer groups): name -> (module, the module's typer app).
GROUPS: dict[str, tuple[str, str]] = {"keys": ("keys", "keys_app")}


def _print_version(value: bool) -> None:
    if value:
        from importlib import metadata

        typer.echo(f"pymap {metadata.version('pymap')}")
        raise typer.Exit()


def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print pymap's version and exit.")] = False,
) -> None:
    pass


def _module(name: str):
    return importlib.import_module(f"{__package__}.commands.{name}")


def build_app(names: list[str] | None = None) -> typer.Typer:
    """The typer app with the commands and groups ``names`` (all of them: None).

    Typer turns every command's signature into click parameters before it
    dispatches, and the commands' modules must be imported for that; a run
    needs one, as with click's lazily loaded subcommands.
    """
    app = typer.Typer(**_APP_SETTINGS)
    app.callback()(_root)  # with a callback it stays a group, even with one command
    for name, (module, attr) in GROUPS.items():
        if names is None or name in names:
            app.add_typer(getattr(_module(module), attr), name=name)
    for name, (module, attr, epilog) in COMMANDS.items():
        if names is None or name in names:
            mod = _module(module)
            settings = {"epilog": getattr(mod, epilog)} if epilog else {}
            app.command(name, **settings)(getattr(mod, attr))
    return app


def _app_for(args: list[str]) -> typer.Typer:
    """The app to run for ``args``: just the command they name, when they name one.

    No command, ``--help``, ``--version`` or an unknown name get the whole app
    and its usual messages.
    """
    name = args[0] if args else ""
    return build_app([name] if name in COMMANDS or name in GROUPS else None)


def main() -> NoReturn:
    """``pymap``: run the command ``sys.argv`` names, then leave at once (:func:`leave`)."""
    try:
        _app_for(sys.argv[1:])()  # click's standalone mode ends in SystemExit
    except SystemExit as e:
        leave(e.code)
    leave(0)


def leave(code: object) -> NoReturn:
    """Exit with ``code`` (as ``SystemExit`` reads it) without tearing the interpreter down.

    Why: once a command has returned, its work is done and its output written; what
    Python's shutdown does next is free every module's objects one by one, 30 to 40 ms
    on this project's VMs, a quarter of ``pymap ping`` and as much as its request and
    reply (bench/bench_cli.py), for memory the kernel takes back at once.  So the
    process ends here, the way Instagram's servers skip the same teardown.  Nothing is
    lost by it: every command closes what it opened (outputs, sockets, clients) in its
    own ``with`` and ``finally`` before it returns; the standard streams are flushed
    here, and logging's handlers too.  Other exit hooks are not run; pymap registers
    none, and a library's that matter (zmq, trio) only free memory.
    """
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("text"): Python prints the text and exits 1
        sys.stderr.write(f"{code}\n")
        status = 1
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # the reader went away (| head), or it is closed
        pass
    try:
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(status)
