"""How every ``pymap`` command runs, speaks and fails.

One place for the CLI's conventions, so that no command invents its own:
errors are one line on stderr (``pymap: error: ...``) and a non-zero exit,
never a traceback; notes for people go to stderr; Ctrl-C exits 130 and a
closed pipe (``| head``) exits quietly.  rich and trio are imported only when
a command first needs them, for start-up time (bench/bench_cli.py).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn

import typer

from watcher.wire.globs import GlobError

from ..errors import DaemonError

if TYPE_CHECKING:
    from rich.console import Console

    from .columns import Piped

EXIT_ERROR = 1
EXIT_USAGE = 2


@functools.cache
def out() -> Console:
    """The rich console on stdout, made when a command first prints with it."""
    from rich.console import Console

    return Console()


@functools.cache
def table_out() -> Console | Piped:
    """Where ``list``, ``get`` and ``status`` print their tables: plain columns, without
    importing rich, when stdout is certainly a pipe or a file; else :func:`out`."""
    from .columns import Piped

    return Piped.certainly(sys.stdout) or out()


@functools.cache
def err() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def say(text: str) -> None:
    """One line on stderr for a person (a note, not an error)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    say(f"pymap: error: {message}")
    raise typer.Exit(code)


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
