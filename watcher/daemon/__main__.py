"""``python -m watcher.daemon OPTIONS``: the daemon's process, as ``pymap daemon`` hands it over.

Why a second entry point: ``pymap daemon`` parses its flags with typer (the one
definition of every option, its help and its errors), and a process that has
imported typer, click and the CLI's modules carries them for its whole life
(issue 20: the daemon's resident memory is mostly its modules).  So the command
parses, then ``exec``\\ s this module with the parsed flags as one JSON object:
same pid (systemd, podman and DaemonSet pods see one process), same stdio, and
signals that were ignored stay ignored.  Everything after the parse happens
here: the config is loaded (flags over the file), errors are one line
``pymap: error: ...`` and the exit statuses are the CLI's (2: a bad flag or
config, 1: a start that failed, 130: interrupted).

Not a command line for people: the JSON's keys are ``pymap daemon``'s options
(:func:`consumers.cli.commands.daemon.daemon`), and that command is the way to run it.
"""

from __future__ import annotations

import functools
import json
import sys

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    sys.stderr.write(f"pymap: error: {message}\n")
    sys.stderr.flush()
    return code


PROCESS_NAME = "pymap-daemon"


def main(argv: list[str]) -> int:
    """Run the daemon from ``pymap daemon``'s parsed options (``argv[1]``, JSON)."""
    if len(argv) != 2:
        return _fail("usage: pymap daemon [OPTIONS] (this module is what it runs)", EXIT_USAGE)
    opts = json.loads(argv[1])
    # After the exec the process would be called "python": it is "pymap-daemon" in ps, top
    # and pgrep, and a name of its own, so that `pkill -HUP pymap-daemon` reloads the
    # daemon and hangs up no `pymap events -f` (whose name is "pymap").
    from watcher.kernel.sys.process import set_name

    set_name(PROCESS_NAME)
    try:
        return _run(opts)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _run(opts: dict) -> int:
    import trio
    import zmq

    from . import main as daemon_main
    from .config import ConfigError, load_config

    mode = None
    if opts["socket_mode"] is not None:
        try:
            mode = int(opts["socket_mode"], 8)
        except ValueError:
            return _fail(f"--socket-mode {opts['socket_mode']!r} is not an octal mode", EXIT_USAGE)
    overrides = {"endpoint": opts["endpoint"], "events_endpoint": opts["events_endpoint"],
                 "socket_mode": mode, "socket_group": opts["socket_group"],
                 "bpffs": opts["bpffs"] or None, "log_level": opts["log_level"],
                 "log_format": opts["log_format"]}
    watch_overrides = {"interval": opts["interval"], "always": opts["always"] or None}

    def load():  # again on SIGHUP, with the same flags on top of the file
        return load_config(opts["config"], overrides, watch_overrides,
                           sources=opts["source"] or None, settings=opts["set"] or None)

    try:
        conf = load()
    except ConfigError as e:
        return _fail(str(e), EXIT_USAGE)
    daemon_main.setup_logging(conf.daemon.log_level, conf.daemon.log_format)
    try:
        trio.run(functools.partial(daemon_main.run, conf, reload=load))
    except ConfigError as e:
        return _fail(str(e))
    except PermissionError as e:
        return _fail(f"{e.filename or ''}: permission denied (run the daemon as root, or see "
                     "docs/operations.md for the capabilities and directories it needs)")
    except (zmq.ZMQError, OSError) as e:
        return _fail(f"cannot start: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
