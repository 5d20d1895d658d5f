"""The ``nats://`` URL of a fleet: servers, stream, subject prefix, credentials, TLS.

One URL carries everything, so ``pymap export --to`` and ``pymap events --fleet``
take the same string::

    nats://h1:4222,h2:4222,h3:4222?stream=PYMAP&prefix=pymap&replicas=3
        &max_age=7d&max_bytes=10GiB&duplicate_window=2m
        &creds=/etc/pymap/fleet.creds&tls_ca=/etc/pymap/nats-ca.pem&batch=256

``batch=N`` packs up to N consecutive events of one map and action into one
JetStream message (docs/fleet.md, "Batched messages"); the default, 1, sends
one message per event.

``tls://`` instead of ``nats://`` requires TLS.  Credentials follow the NATS
ecosystem: a ``.creds`` file (JWT + nkey seed, as ``nsc`` writes them), a bare
nkey seed file, or ``user:password@`` in the URL; ``tls_ca`` verifies the
server, ``tls_cert``/``tls_key`` present a client certificate.
"""

from __future__ import annotations

import re
import ssl
import urllib.parse
from typing import Any

import attrs

from .subjects import check_prefix

DEFAULT_STREAM = "PYMAP"
DEFAULT_PREFIX = "pymap"
DEFAULT_MAX_AGE = 7 * 86400.0
DEFAULT_MAX_BYTES = 10 * 2**30
DEFAULT_DUPLICATE_WINDOW = 120.0  # JetStream's own default; each id in the window costs memory
MAX_BATCH = 1000  # events per message: 1000 x ~1 KB stays below NATS' default 1 MB max_payload
DEFAULT_LINGER = 0.05  # seconds a batched message may wait for more events (adds latency)
MAX_LINGER = 5.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZES = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


class FleetConfigError(ValueError):
    """A fleet URL or option that cannot work, said in one line."""


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d``, ``1w`` → seconds (compound: ``1h30m``)."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise FleetConfigError(f"duration {text!r}: use e.g. 90s, 15m, 2h, 7d")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_size(text: str) -> int:
    """``1048576``, ``512MB``, ``10GiB`` → bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip().lower())
    if not m or m.group(2) not in _SIZES:
        raise FleetConfigError(f"size {text!r}: use e.g. 512MB, 10GiB")
    return int(float(m.group(1)) * _SIZES[m.group(2)])


@attrs.frozen
class FleetOptions:
    servers: tuple[str, ...]
    stream: str = DEFAULT_STREAM
    prefix: str = DEFAULT_PREFIX
    create_stream: bool = True
    replicas: int = 1
    max_age: float = DEFAULT_MAX_AGE
    max_bytes: int = DEFAULT_MAX_BYTES
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW
    creds: str | None = None
    nkey: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_required: bool = False
    connect_timeout: float = 5.0
    ack_timeout: float = 10.0
    batch: int = 1
    linger: float = DEFAULT_LINGER

    @property
    def subjects(self) -> list[str]:
        return [f"{self.prefix}.>"]

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_required or self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (credentials, TLS, reconnect forever)."""
        kw: dict[str, Any] = {"servers": list(self.servers), "connect_timeout": self.connect_timeout,
                              "allow_reconnect": True, "max_reconnect_attempts": -1,
                              "reconnect_time_wait": 1}
        if self.creds:
            kw["user_credentials"] = self.creds
        if self.nkey:
            kw["nkeys_seed"] = self.nkey
        if (tls := self.tls_context()) is not None:
            kw["tls"] = tls
        return kw


_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_FIELDS: dict[str, Any] = {
    "stream": str, "prefix": check_prefix, "replicas": int, "max_age": parse_duration,
    "max_bytes": parse_size, "duplicate_window": parse_duration, "creds": str, "nkey": str,
    "tls_ca": str, "tls_cert": str, "tls_key": str, "ack_timeout": parse_duration,
    "connect_timeout": parse_duration, "batch": int, "linger": parse_duration,
    "create": lambda v: _BOOL[v.lower()],
}


def parse_url(url: str, **overrides: Any) -> FleetOptions:
    """A ``nats://`` or ``tls://`` URL (hosts comma-separated) → FleetOptions.

    Replicas default to 3 when the URL lists three or more servers (a cluster),
    otherwise 1.  ``overrides`` (keyword names as in FleetOptions) win over the query.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("nats", "tls"):
        raise FleetConfigError(f"{url!r}: a fleet URL starts with nats:// or tls://")
    hosts = [h for h in parts.netloc.split(",") if h]
    if not hosts:
        raise FleetConfigError(f"{url!r}: no server (nats://HOST:4222[,HOST2:4222...])")
    userinfo = ""
    if "@" in hosts[0]:  # user:password@ applies to every server listed
        userinfo, hosts[0] = hosts[0].rsplit("@", 1)
        userinfo += "@"
    servers = tuple(f"{parts.scheme}://{userinfo}{h if ':' in h else h + ':4222'}"
                    for h in hosts)
    kw: dict[str, Any] = {"servers": servers, "replicas": 3 if len(servers) >= 3 else 1,
                          "tls_required": parts.scheme == "tls"}
    for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if key not in _FIELDS:
            raise FleetConfigError(f"{url!r}: unknown option {key!r} (known: "
                                   f"{', '.join(sorted(_FIELDS))})")
        try:
            value = _FIELDS[key](values[-1])
        except (ValueError, KeyError) as e:
            raise FleetConfigError(f"{url!r}: option {key}={values[-1]!r}: {e}") from None
        kw["create_stream" if key == "create" else key] = value
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if not 1 <= kw["replicas"] <= 5:
        raise FleetConfigError(f"replicas={kw['replicas']}: JetStream allows 1 to 5")
    if not 1 <= kw.get("batch", 1) <= MAX_BATCH:
        raise FleetConfigError(f"batch={kw['batch']}: events per message, 1 to {MAX_BATCH}")
    if not 0 <= kw.get("linger", DEFAULT_LINGER) <= MAX_LINGER:
        raise FleetConfigError(f"linger={kw['linger']:g}s: 0 to {MAX_LINGER:g} s")
    return FleetOptions(**kw)
