"""RFC 5424 syslog over UDP (RFC 5426), TCP with octet counting (RFC 6587) and TLS (RFC 5425).

Each record becomes one message::

    <134>1 2026-11-28T15:00:00.123456Z HOST pymap PID added [pymap@32473
    id="HOST.EPOCH.42" map="cilium_lxc" action="added" seq="42" epoch="EPOCH"] PAYLOAD

Facility local0, severity informational (warning for lost/dropped records).
The event id (record.event_id) is the structured-data parameter ``id``, not the
MSGID: RFC 5424 limits MSGID to 32 characters and an id holds the node name.
The SD-ID uses the private enterprise number 32473, which RFC 5612 reserves for
documentation and examples; a site that owns a number can set ``sd_id``.

Over a stream, a message whose receiver vanished may sit acknowledged in the
kernel's socket buffer and be lost with the connection.  So the stream outputs
look for the peer's close before each batch, and after a reconnect resend the
batch before the failed one too: a duplicate is allowed, a hole is not.

Options: ``sd_id`` (default ``pymap@32473``), ``app_name`` (``pymap``),
``facility`` (number, 16 = local0); TLS: ``ca`` (CA file to verify the server
against; system CAs if unset), ``cert``/``key`` (client certificate),
``server_name`` (name to verify, default the URL's host).
"""

from __future__ import annotations

import datetime
import os
import select
import socket
import ssl
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

import trio

from ..record import ExportRecord
from .base import Output, OutputConfigError, OutputUnavailable

DEFAULT_SD_ID = "pymap@32473"
SEV_INFO, SEV_WARNING = 6, 4
MAX_UDP_PAYLOAD = 65507


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _printable(value: str, limit: int) -> str:
    """RFC 5424 header fields: PRINTUSASCII only, '-' when empty."""
    text = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return text or "-"


class SyslogFramer:
    """Builds RFC 5424 messages from records."""

    def __init__(self, options: Mapping[str, Any]):
        self.sd_id = str(options.get("sd_id", DEFAULT_SD_ID))
        self.app = _printable(str(options.get("app_name", "pymap")), 48)
        self.facility = int(options.get("facility", 16))
        self.procid = str(os.getpid())
        self._stamp_cache: tuple[float, str] = (-1.0, "")
        self._heads: dict[tuple, bytes] = {}

    def _stamp(self, t: float) -> str:
        if t == self._stamp_cache[0]:
            return self._stamp_cache[1]
        text = datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(
            timespec="microseconds").replace("+00:00", "Z")
        self._stamp_cache = (t, text)
        return text

    def message(self, r: ExportRecord) -> bytes:
        key = (r.time, r.node, r.action, r.map, r.epoch)
        head = self._heads.get(key)
        if head is None:  # once per poll, map and action: a whole batch shares it
            if len(self._heads) > 64:
                self._heads.clear()
            head = self._heads[key] = self._head(r)
        return head % (_sd_escape(r.id).encode(), r.seq, r.payload)

    def _head(self, r: ExportRecord) -> bytes:
        """The message up to the payload as a ``bytes %`` pattern of (id, seq, payload)."""
        sev = SEV_WARNING if r.action in ("lost", "dropped") else SEV_INFO
        sd = (f'[{self.sd_id} id="\x01" map="{_sd_escape(r.map)}" '
              f'action="{_sd_escape(r.action)}" seq="\x00" epoch="{_sd_escape(r.epoch)}"]')
        head = (f"<{self.facility * 8 + sev}>1 {self._stamp(r.time)} {_printable(r.node, 255)} "
                f"{self.app} {self.procid} {_printable(r.action, 32)} {sd} ")
        return (head.encode().replace(b"%", b"%%").replace(b"\x01", b"%s")
                .replace(b"\x00", b"%d") + b"%s")


class SyslogUDPOutput(Output):
    """One datagram per message; UDP cannot tell delivery, so only local errors count."""

    schemes = ("syslog+udp",)

    def __init__(self, url: str, options: Mapping[str, Any] | None = None):
        super().__init__(url, options)
        self.options = dict(parse_qsl(self.parts.query)) | self.options
        self.address = self.host_port(514)
        self.framer = SyslogFramer(self.options)
        self._sock: trio.socket.SocketType | None = None

    async def open(self) -> None:
        try:
            host, port = self.address
            info = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, _, _, _, addr = info[0]
            self._sock = trio.socket.socket(family, socket.SOCK_DGRAM)
            await self._sock.connect(addr)
        except OSError as e:
            raise OutputUnavailable(f"{self.describe()}: {e}") from None

    async def send(self, batch: Sequence[ExportRecord]) -> None:
        assert self._sock is not None
        try:
            for r in batch:
                await self._sock.send(self.framer.message(r)[:MAX_UDP_PAYLOAD])
        except OSError as e:  # ECONNREFUSED from an earlier ICMP port unreachable
            raise OutputUnavailable(f"{self.describe()}: {e}") from None

    async def aclose(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SyslogTCPOutput(Output):
    """Octet-counted RFC 5424 over TCP (RFC 6587 section 3.4.1)."""

    schemes = ("syslog+tcp",)
    default_port = 601

    def __init__(self, url: str, options: Mapping[str, Any] | None = None):
        super().__init__(url, options)
        self.options = dict(parse_qsl(self.parts.query)) | self.options
        self.address = self.host_port(self.default_port)
        self.framer = SyslogFramer(self.options)
        self._stream: trio.abc.Stream | None = None
        self._last: bytes = b""  # the last batch sent: resent after a reconnect
        self._resend = False

    async def _connect(self) -> trio.abc.Stream:
        return await trio.open_tcp_stream(*self.address)

    async def open(self) -> None:
        try:
            with trio.fail_after(10):
                self._stream = await self._connect()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as e:
            raise OutputUnavailable(f"{self.describe()}: {e or 'connect timed out'}") from None

    def _fileno(self) -> int | None:
        inner = getattr(self._stream, "transport_stream", self._stream)
        sock = getattr(inner, "socket", None)
        return sock.fileno() if sock is not None else None

    def _peer_closed(self) -> bool:
        """Whether the receiver closed its end (its FIN or RST is waiting for us).

        Syslog receivers never send, so a hang-up flag is the only news there can be."""
        fd = self._fileno()
        if fd is None or fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    async def send(self, batch: Sequence[ExportRecord]) -> None:
        assert self._stream is not None
        frame = self.framer.message
        parts = []
        for r in batch:
            m = frame(r)
            parts.append(b"%d " % len(m))
            parts.append(m)
        data = b"".join(parts)
        if self._peer_closed():
            self._resend = True
            raise OutputUnavailable(f"{self.describe()}: receiver closed the connection")
        out = self._last + data if self._resend else data
        try:
            with trio.fail_after(30):
                await self._stream.send_all(out)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.TooSlowError, ssl.SSLError) as e:
            self._resend = True
            raise OutputUnavailable(f"{self.describe()}: {e or 'send timed out'}") from None
        self._resend = False
        self._last = data

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await stream.aclose()
                except (OSError, trio.BrokenResourceError, ssl.SSLError):
                    pass


class SyslogTLSOutput(SyslogTCPOutput):
    """RFC 5425: the same octet-counted frames inside TLS (default port 6514)."""

    schemes = ("syslog+tls",)
    default_port = 6514

    def __init__(self, url: str, options: Mapping[str, Any] | None = None):
        super().__init__(url, options)
        try:
            self.context = ssl.create_default_context(cafile=self.options.get("ca"))
            if self.options.get("cert"):
                self.context.load_cert_chain(self.options["cert"], self.options.get("key"))
        except (OSError, ssl.SSLError) as e:
            raise OutputConfigError(f"{url}: TLS setup: {e}") from None
        self.server_name = self.options.get("server_name") or self.address[0]

    async def _connect(self) -> trio.abc.Stream:
        tcp = await trio.open_tcp_stream(*self.address)
        stream = trio.SSLStream(tcp, self.context, server_hostname=self.server_name)
        try:
            await stream.do_handshake()  # here, so a bad certificate is a failed open
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return stream
