"""``nats://HOST:4222[,HOST2...]``: records as JetStream messages, acknowledged.

The fleet output (docs/fleet.md).  Subject ``<prefix>.<node>.<map>.<action>``,
message id ``<node>.<epoch>.<seq>`` so JetStream de-duplicates what the
delivery layer resends after a reconnect or what a restarted exporter sends
again, node/map/action in headers, the formatted event as the payload.  The
stream is created if missing (consumers/fleet/jetstream.py has the defaults).
Publishing, the asyncio bridge and the stream live in consumers/fleet; this
module only adapts them to the Output contract.

Options (URL query or ``[[exports]]`` keys): stream, prefix (alias subject),
replicas, max_age, max_bytes, duplicate_window, create, creds, nkey,
tls_ca/tls_cert/tls_key (aliases ca/cert/key, as for syslog+tls),
ack_timeout, connect_timeout, batch (events per message, default 1), linger.

With ``batch`` > 1 the output has a :class:`Grouping`, so the delivery layer
hands it whole messages only and notes pause cuts in the checkpoint
(consumers/export/grouping.py says why).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...fleet.jetstream import FleetError, FleetUnavailable
from ...fleet.options import FleetConfigError, FleetOptions, parse_url
from ...fleet.publish import FleetPublisher
from ..grouping import Grouping
from ..record import ExportRecord
from .base import Output, OutputConfigError, OutputUnavailable

# [[exports]] keys shared with syslog+tls (ca, cert, key) and h8's "subject" -> URL query names
QUERY_ALIASES = {"ca": "tls_ca", "cert": "tls_cert", "key": "tls_key", "subject": "prefix"}


def fleet_options(url: str, options: Mapping[str, Any]) -> FleetOptions:
    """The URL's settings, overridden by config-file options (strings parsed as in URLs)."""
    query = "&".join(f"{k}={v}" for k, v in _as_query(options).items())
    sep = "&" if "?" in url else "?"
    try:
        return parse_url(url + (sep + query if query else ""))
    except FleetConfigError as e:
        raise OutputConfigError(str(e)) from None


def _as_query(options: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in options.items():
        key = QUERY_ALIASES.get(key, key)
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[key] = str(value)
    return out


class NatsOutput(Output):
    schemes = ("nats",)

    def __init__(self, url: str, options: Mapping[str, Any] | None = None):
        super().__init__(url, options)
        self.fleet = fleet_options(url, self.options)
        if self.fleet.batch > 1:
            self.grouping = Grouping(self.fleet.batch, self.fleet.linger)
        self._publisher: FleetPublisher | None = None
        self.duplicates = 0  # re-sends JetStream recognised by message id

    async def open(self) -> None:
        publisher = FleetPublisher(self.fleet, grouping=self.grouping)
        try:
            await publisher.open()
        except (FleetUnavailable, FleetError) as e:
            raise OutputUnavailable(str(e)) from None
        self._publisher = publisher

    async def send(self, batch: Sequence[ExportRecord]) -> None:
        if self._publisher is None:
            raise OutputUnavailable("nats: not connected")
        try:
            result = await self._publisher.publish(batch)
        except (FleetUnavailable, FleetError) as e:
            raise OutputUnavailable(str(e)) from None
        self.duplicates += result.duplicates

    async def aclose(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.aclose()

    def describe(self) -> str:
        return f"nats://{','.join(s.split('@')[-1].split('://')[-1] for s in self.fleet.servers)}" \
               f" stream {self.fleet.stream}"
