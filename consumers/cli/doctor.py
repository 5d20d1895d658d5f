"""``pymap doctor``: check this host and the daemon, and say how to fix each problem.

The host checks live in :mod:`watcher.kernel.features.checks` (they touch the kernel);
the daemon check is a ``ping`` through the client library, like any consumer.
The second table is the feature probe (:mod:`watcher.kernel.features.probe`, the one
the daemon runs at start): each kernel facility, available or refused with its
errno, what pymap does instead, and the fix.  A refused facility degrades, it
does not fail: the exit code follows the checks alone.
Every check runs, even after a failure, so one run shows every problem.
Failures of required checks make the exit code 1; optional ones (bcc,
kernel headers, tracefs, ...) are warnings.  Never a traceback.
"""

from __future__ import annotations

import trio
from rich.console import Console
from rich.table import Table
from rich.text import Text

from watcher.kernel.features.checks import Check, host_checks
from watcher.kernel.features.probe import Features, probe

from ..client import DEFAULT_ENDPOINT, Client, DaemonError, DaemonUnavailable

PING_TIMEOUT = 2.0


def _start_fix(endpoint: str) -> str:
    if endpoint == DEFAULT_ENDPOINT:
        return "start it: pymap daemon"
    return f"start it: pymap daemon -e {endpoint}"


def daemon_check(endpoint: str, timeout: float = PING_TIMEOUT) -> Check:
    """Ping the daemon at ``endpoint``: the CLI's other commands all need it."""
    name = "daemon"

    if not endpoint.startswith(("ipc://", "tcp://")):
        return Check(name, False, f"{endpoint!r} is not a pymap endpoint",
                     "give ipc://PATH or tcp://HOST:PORT (as the daemon's -e)")

    async def ping():
        client = Client(endpoint, timeout=timeout)
        try:
            async with client:
                return await client.ping()
        finally:
            # Also when entering failed halfway (connect refused the endpoint): a ZeroMQ
            # context left to the garbage collector can hang the process in term().
            await client.__aexit__(None, None, None)

    try:
        pong = trio.run(ping)
    except DaemonUnavailable as e:
        message = str(e).removesuffix(" (start it with: pymap daemon)")
        if "permission denied" in message:
            fix = "run as root, or as a member of the daemon's socket_group"
        elif message.startswith("cannot connect"):
            fix = "check the endpoint (ipc://PATH or tcp://HOST:PORT)"
        else:
            fix = _start_fix(endpoint)
        return Check(name, False, message, fix)
    except DaemonError as e:
        fix = ("use the same pymap version for the CLI and the daemon" if e.code == "version"
               else "check the daemon's log (stderr)")
        return Check(name, False, f"{endpoint} answered with an error ({e.code}): {e}", fix)
    except Exception as e:  # noqa: BLE001 - e.g. a malformed endpoint refused by ZeroMQ
        return Check(name, False, f"cannot reach {endpoint}: {type(e).__name__}: {e}",
                     f"check the endpoint (ipc://PATH or tcp://HOST:PORT); {_start_fix(endpoint)}")
    events = f", events on {pong.events_endpoint}" if pong.events_endpoint else ""
    return Check(name, True, f"pymap {pong.version} at {endpoint}{events}: epoch {pong.epoch}, "
                 f"up {pong.uptime:.0f} s")


def _status(check: Check) -> Text:
    if check.ok:
        return Text("ok", style="green")
    if check.required:
        return Text("FAIL", style="bold red")
    return Text("warn", style="yellow")


def render(checks: list[Check]) -> Table:
    table = Table(title="pymap doctor", title_justify="left")
    table.add_column("Check", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Detail", overflow="fold")
    table.add_column("Fix", overflow="fold")
    for c in checks:
        # Text, not str: details quote paths and errors that rich would read as markup.
        table.add_row(Text(c.name), _status(c), Text(c.detail), Text(c.fix))
    return table


def render_facilities(features: Features) -> Table:
    table = Table(title="kernel facilities (what this host lets pymap use)",
                  title_justify="left")
    table.add_column("Facility", no_wrap=True)
    table.add_column("State", no_wrap=True)
    table.add_column("Errno", no_wrap=True)
    table.add_column("Detail, or what pymap does instead", overflow="fold")
    table.add_column("Fix", overflow="fold")
    for f in features.facilities:
        state = (Text(f.state) if f.state == "info" else Text("ok", style="green")
                 if f.available else Text("refused", style="yellow"))
        text = f.detail if f.available else f"{f.degrades} ({f.detail})"
        table.add_row(Text(f.title), state, Text(f.error), Text(text), Text(f.fix))
    return table


def exit_code(checks: list[Check]) -> int:
    return 1 if any(not c.ok and c.required for c in checks) else 0


def summary(checks: list[Check]) -> str:
    failed = [c.name for c in checks if not c.ok and c.required]
    warned = [c.name for c in checks if not c.ok and not c.required]
    if failed:
        text = f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}"
    elif warned:
        text = "every required check passed"
    else:
        text = f"all {len(checks)} checks passed"
    if warned:
        text += f"; {len(warned)} warning{'s' if len(warned) > 1 else ''}: {', '.join(warned)}"
    return text


def source_checks(endpoint: str, timeout: float = PING_TIMEOUT) -> list[Check]:
    """Caveats of the daemon's event sources: shared or replaced readers, invisible loss.

    Warnings, not failures: the daemon works, but another tool may not.
    """

    async def status():
        async with Client(endpoint, timeout=timeout) as client:
            return await client.status()

    try:
        sources = trio.run(status).sources
    except DaemonError:
        return []  # the daemon check already says what is wrong
    checks = []
    for src in sources:
        name = f"source {src.name}"
        attached = not src.origin.endswith(".c")
        if attached and src.kind == "perf":
            checks.append(Check(name, False, f"perf event array {src.origin}: pymap installed its "
                                "own per-CPU rings, so any other reader gets nothing now",
                                "let other tools subscribe to pymap instead", required=False))
        elif attached:
            checks.append(Check(name, False, f"ring buffer {src.origin}: consumers compete, so "
                                "records are split between pymap and any other reader",
                                "have one reader (pymap) and subscribe to it", required=False))
        if src.kind == "ringbuf" and not src.drops_map:
            checks.append(Check(name, False, "ring buffer loss is invisible: the kernel reports "
                                "none", "count failed reserves in a map and name it as drops_map",
                                required=False))
    return checks


def run_checks(console: Console, endpoint: str) -> int:
    """Run every check, print the table and a summary; 0 if the daemon has all it needs."""
    try:
        daemon = daemon_check(endpoint)
        checks = [*host_checks(), daemon, *(source_checks(endpoint) if daemon.ok else [])]
        features = probe()
    except KeyboardInterrupt:
        return 130
    console.print(render(checks))
    console.print(render_facilities(features))
    console.print(Text(summary(checks)))
    return exit_code(checks)
