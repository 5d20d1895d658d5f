"""Follow one or more maps' changes with the pymap client library.

    .venv/bin/python examples/follow_map.py my_map
    .venv/bin/python examples/follow_map.py --endpoint ipc:///tmp/p/pymap.sock 'cilium_*'

Prints the current entries first (``snapshot=True``: as ``added`` lines
marked ``[snapshot]``), then every change the daemon sees, one line each,
until Ctrl-C.  See examples/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import trio

from consumers.client import DEFAULT_ENDPOINT, Client, DaemonError
from consumers.events import Event


def describe(event: Event) -> str:
    """One line per event; keys and values are raw bytes, shown as hex."""
    when = datetime.datetime.fromtimestamp(event.time).strftime("%H:%M:%S.%f")[:-3]
    head = f"{when} {event.map.name} {event.action}"
    if event.action == "updated":
        return f"{head} key={event.key.hex()} {event.old_value.hex()} -> {event.value.hex()}"
    if event.action in ("added", "removed"):
        mark = " [snapshot]" if event.snapshot else ""
        return f"{head} key={event.key.hex()} value={event.value.hex()}{mark}"
    if event.action == "lost":
        return f"{head}: missed {event.missed} events"  # then resynced: snapshot=True
    if event.action == "resync":
        return f"{head} ({event.reason}): the lines after this correct our copy"
    if event.action in ("stalled", "resumed"):  # the daemon went silent / is back
        return f"{when} daemon {event.action}: {event.reason}"
    return f"{head} (map id {event.map.id})"  # map_created, map_removed


async def follow(endpoint: str, names: list[str]) -> None:
    async with Client(endpoint) as client:  # noqa: SIM117 (nested on purpose, as in the docs)
        async with client.events(names, snapshot=True) as stream:
            async for event in stream:
                print(describe(event), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Print a map's entries, then its changes.")
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help="map name, or a glob such as 'cilium_*'")
    parser.add_argument("--endpoint", "-e", default=DEFAULT_ENDPOINT,
                        help=f"the daemon's request endpoint (default: {DEFAULT_ENDPOINT}; "
                             "or set PYMAP_ENDPOINT)")
    args = parser.parse_args()
    try:
        trio.run(follow, args.endpoint, args.names)
    except KeyboardInterrupt:  # Ctrl-C: the async with blocks have closed the sockets
        return 130
    except DaemonError as e:  # no daemon, daemon went silent, refused request, ...
        print(f"follow_map: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into head
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
