"""``pymap events``: a map's changes, recent or followed, from one daemon or the fleet.

A follower (``-f``) is a :class:`consumers.subscriber.EventStream` printed line
by line; without ``-f`` the daemon's recent-events ring (or a snapshot) is
printed once; with ``--fleet`` the events come from NATS JetStream instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ...endpoint import DEFAULT_ENDPOINT
from ..options import (
    CurveCertOpt,
    CurveServerOpt,
    EndpointOpt,
    Output,
    OutputOpt,
    TimeoutOpt,
    name_of,
    use_curve,
    valid_glob,
)
from ..running import EXIT_USAGE, fail, run_async, say

if TYPE_CHECKING:
    from ...client import Client


_SelectorsOpt = Annotated[list[str], typer.Argument(
    help="Map names or globs ('cilium_policy_*'); id:N and pin paths work too.")]
_SnapshotOpt = Annotated[bool, typer.Option(
    "--snapshot", help="First print current entries as 'added' lines (full state).")]
_CountOpt = Annotated[int, typer.Option(
    "--count", "-n", help="Exit after this many events (0: no limit).")]
_MaxWaitOpt = Annotated[float | None, typer.Option(
    "--max-wait", min=0, metavar="SECONDS",
    help="With -f: when the daemon falls silent, wait at most this long for it to "
    "come back, then exit 1 (default: wait for ever, like tail -F).")]
_FleetOpt = Annotated[str | None, typer.Option(
    "--fleet", metavar="URL", envvar="PYMAP_FLEET",
    help="Read every node's events from NATS JetStream (nats://HOST:4222[,...]; "
    "see docs/fleet.md) instead of the local daemon.")]
_NodeOpt = Annotated[str | None, typer.Option(
    "--node", metavar="GLOB", help="With --fleet: only nodes matching this glob.")]
_SinceOpt = Annotated[str | None, typer.Option(
    "--since", metavar="DURATION",
    help="With --fleet: replay from this long ago (90s, 15m, 2h, 7d).")]
_DurableOpt = Annotated[str | None, typer.Option(
    "--durable", metavar="NAME",
    help="With --fleet: a durable consumer that resumes where it left off.")]


def events(
    selectors: _SelectorsOpt,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until Ctrl-C.")] = False,
    snapshot: _SnapshotOpt = False,
    output: OutputOpt = Output.table,
    raw: Annotated[bool, typer.Option("--raw", help="No decoding, hex only.")] = False,
    count: _CountOpt = 0,
    count_c: Annotated[int | None, typer.Option("-c", hidden=True)] = None,  # before 0.2
    max_wait: _MaxWaitOpt = None,
    fleet: _FleetOpt = None,
    node: _NodeOpt = None,
    since: _SinceOpt = None,
    durable: _DurableOpt = None,
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
    from ...eventjson import MapCache
    from ..eventsout import EventPrinter

    for selector in selectors:
        valid_glob(selector)
    if fleet is not None:
        return _fleet_events(fleet, selectors, node, since, durable, follow, count,
                             output is Output.json)
    if node or since or durable:
        fail("--node, --since and --durable need --fleet", EXIT_USAGE)

    async def main():
        from ...client import Client

        async with Client(endpoint, timeout) as client:
            names = [await name_of(client, s) for s in selectors]
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
    from ...fleet.jetstream import FleetError, FleetUnavailable
    from ...fleet.options import FleetConfigError, parse_duration, parse_url
    from ...fleet.subscribe import FleetSubscription
    from ..fleetout import FleetPrinter

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


async def _print_recent(client: Client, names: list[str], printer, snapshot: bool) -> int | None:
    from ...events import events_of
    from ...subscriber import snapshot_events

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
