"""The wire schema: every message pymap's daemon and its clients exchange.

One module, so the protocol has one definition.  Messages are attrs classes;
on the wire each is one JSON object (serialised by cattrs with orjson) in the
first frame of a ZeroMQ multipart message, tagged by ``kind`` and carrying the
schema version ``v``.  Bulk data (dumped entries, BTF blobs) rides in the
frames after it as raw bytes, so a million entries never become a million
JSON objects on the daemon's side.

Compatibility rules (see docs/protocol.md):
- ``v`` changes only for incompatible changes; a daemon answers a request of
  another major version with an ``error`` of code ``version``.
- Unknown fields are ignored when structuring, so an older client can read a
  newer daemon's replies; new fields always have defaults.
"""

from __future__ import annotations

from typing import Union

import attrs
import cattrs
from cattrs.preconf.orjson import make_converter
from cattrs.strategies import configure_tagged_union

SCHEMA_VERSION = 1


class WireError(ValueError):
    """A message that is not valid pymap protocol."""


# --- shared records ------------------------------------------------------------


@attrs.define
class Holder:
    pid: int
    comm: str


@attrs.define
class MapInfo:
    """One map, as ``list`` and ``get`` describe it."""

    id: int
    name: str
    type: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    kernel_name: str = ""
    btf_id: int = 0
    btf_key_type_id: int = 0
    btf_value_type_id: int = 0
    memlock: int | None = None
    frozen: bool = False
    pinned: list[str] = attrs.Factory(list)
    entries: int | None = None  # counted while dumping; None: the type holds no entries
    holders: list[Holder] = attrs.Factory(list)
    percpu: bool = False
    value_stride: int = 0  # bytes per value in get chunks (per-CPU: all CPUs' slots)
    ncpus: int = 1
    dumpable: bool = True
    not_dumpable_reason: str = ""


# --- requests (client -> daemon) -------------------------------------------------


@attrs.define
class Ping:
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class ListRequest:
    pattern: str | None = None  # shell glob on names and pin paths
    entries: bool = True  # count entries (costs a dump of each map)
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class GetRequest:
    selector: str  # name, id:N, or a pin path
    req: int = 0
    v: int = SCHEMA_VERSION


Request = Union[Ping, ListRequest, GetRequest]

# --- replies (daemon -> client) --------------------------------------------------


@attrs.define
class Pong:
    version: str
    epoch: str
    uptime: float
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class ListReply:
    maps: list[MapInfo]
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class GetBegin:
    """Starts a get stream; a BTF blob follows as frame 2 when ``btf`` is true."""

    map: MapInfo
    btf: bool = False
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class GetChunk:
    """``count`` entries; frame 2 holds the keys, frame 3 the values, back to back."""

    count: int
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class GetEnd:
    entries: int
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class ErrorReply:
    """A request failed.  ``code`` is stable and machine-readable:

    ``bad_request``, ``version``, ``not_found``, ``ambiguous``, ``not_dumpable``,
    ``permission``, ``vanished``, ``internal``.
    """

    code: str
    message: str
    candidates: list[MapInfo] = attrs.Factory(list)
    req: int = 0
    v: int = SCHEMA_VERSION


Reply = Union[Pong, ListReply, GetBegin, GetChunk, GetEnd, ErrorReply]
Message = Union[Request, Reply]

KINDS: dict[type, str] = {
    Ping: "ping",
    ListRequest: "list",
    GetRequest: "get",
    Pong: "pong",
    ListReply: "list_reply",
    GetBegin: "get_begin",
    GetChunk: "get_chunk",
    GetEnd: "get_end",
    ErrorReply: "error",
}

converter = make_converter()
configure_tagged_union(Message, converter, tag_generator=KINDS.__getitem__, tag_name="kind")


def encode(message) -> bytes:
    """One message as the JSON bytes of its first frame."""
    return converter.dumps(message, Message)


def decode(data: bytes):
    """Parse a first frame; any problem becomes one :class:`WireError`."""
    try:
        message = converter.loads(data, Message)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as e:
        raise WireError(_describe(data, e)) from None
    return message


def _describe(data: bytes, error: Exception) -> str:
    if isinstance(error, cattrs.BaseValidationError):
        inner = "; ".join(str(x) for x in error.exceptions[:3])
        return f"invalid message: {inner}"
    return f"invalid message: {error}"
