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

size: one module on purpose.  It is the protocol: every message class, the
``kind`` table and the tagged unions cattrs dispatches on must agree, and a
reviewer checks a wire change against docs/protocol.md in one place.  Split by
direction, the codec would still import every part and each caller several.
"""

from __future__ import annotations

from typing import Any, TypeGuard, Union, cast

import attrs
import cattrs
import orjson
from cattrs.preconf.orjson import make_converter

SCHEMA_VERSION = 1
REQ_LIMIT = 1 << 63  # a request id is an integer from 0 to REQ_LIMIT - 1


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
    """Dump a map.  With ``snapshot``, the entries are the daemon's watched state and
    ``get_begin.seq`` tells which stream sequence they reflect (snapshot sync); the map
    is watched from then on.  ``reason`` says why a client resyncs, for the daemon's counters."""

    selector: str  # name, id:N, or a pin path
    snapshot: bool = False
    entries: bool = True  # False: only get_begin (metadata, BTF) and get_end
    reason: str = ""  # why a client asks for a snapshot: "", "start", "gap", "epoch"
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class RecentRequest:
    """The recent events the daemon keeps for the maps ``selector`` matches (a glob)."""

    selector: str
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class StatusRequest:
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class GapReport:
    """A subscriber missed ``missed`` events of ``map``: counted in the daemon's status."""

    map: str
    missed: int
    req: int = 0
    v: int = SCHEMA_VERSION


Request = Union[Ping, ListRequest, GetRequest, RecentRequest, StatusRequest, GapReport]

# --- replies (daemon -> client) --------------------------------------------------


@attrs.define
class Pong:
    version: str
    epoch: str
    uptime: float
    events_endpoint: str = ""  # where the event stream is published
    # The asker's view's topic namespace ("v<hash>:"), when an access rule restricts what it
    # sees: its subscriptions take effect only with it in front ("" : unrestricted).
    stream_prefix: str = ""
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class ListReply:
    maps: list[MapInfo]
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class GetBegin:
    """Starts a get stream; a BTF blob follows as frame 2 when ``btf`` is true.

    ``layout``: the config's declared layout for this map (the first ``[[layouts]]``
    entry whose ``match`` fits it, validated and normalised), for clients to decode
    entries with; None when no layout is declared for it.
    """

    map: MapInfo
    btf: bool = False
    seq: int | None = None  # snapshot gets: the last topic_seq this state includes
    epoch: str = ""
    layout: dict | None = None
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
    ``permission``, ``vanished``, ``internal``, ``busy`` (too many requests in flight),
    ``dropped`` (earlier replies to this client were dropped; sent with ``req`` 0).
    """

    code: str
    message: str
    candidates: list[MapInfo] = attrs.Factory(list)
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class Ack:
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class RecentEnd:
    """Ends a recent-events reply (its events came as ``events`` messages before it)."""

    events: int
    watched: list[str] = attrs.Factory(list)  # names of matching maps being watched
    req: int = 0
    v: int = SCHEMA_VERSION


@attrs.define
class WatchStatus:
    id: int
    name: str
    type: str
    entries: int
    interval: float
    polls: int
    last_poll_ms: float
    max_poll_ms: float
    events: int
    state_bytes: int
    reason: str  # why it is watched: "subscribed", "always", "lingering", "snapshot"
    # which delta engine polls it and why ("in-kernel: ...", "user-space: ...")
    engine: str = ""
    kernel_bytes: int = 0  # kernel memory (memlock) of its in-kernel shadow maps
    added: int = 0  # ``events`` by action, since watched (pymap top's per-map rates)
    updated: int = 0
    removed: int = 0


@attrs.define
class SourceStatus:
    """One event source buffer: what it delivered and lost since the daemon started.

    ``lost`` is the perf ring's lost-sample count, or for a ring buffer the
    total of its ``drops_map`` counter (the kernel reports no ring buffer loss).
    """

    name: str  # the buffer's name, which is its topic
    kind: str  # "ringbuf" or "perf"
    origin: str  # the program file (bcc) or pin path it came from
    map_id: int
    records: int = 0
    lost: int = 0
    bytes: int = 0
    wakeups: int = 0
    reads: int = 0  # read slices (a wakeup with a long burst takes several)
    max_read_ms: float = 0.0
    drops_map: str = ""
    maps: list[str] = attrs.Factory(list)  # the program's other maps, watchable by name


@attrs.define
class FacilityStatus:
    """One kernel facility as the daemon's start-up probe found it (docs/troubleshooting.md):
    ``state`` is ``available`` or ``refused``; when refused, ``error`` is the errno name and
    ``degrades`` what pymap does instead."""

    name: str
    title: str
    state: str
    detail: str = ""
    error: str = ""
    degrades: str = ""
    fix: str = ""


@attrs.define
class StatusReply:
    version: str
    epoch: str
    uptime: float
    seq: int
    messages_published: int
    events_published: int
    subscriptions: dict[str, int]  # topic prefix held by subscribers -> subscribe requests seen
    drops_reported: int  # events subscribers reported missing (gaps)
    resyncs: int
    poll_errors: int
    watched: list[WatchStatus]
    sources: list[SourceStatus] = attrs.Factory(list)  # event sources (buffers); see docs/sources.md
    # Bounds under abuse (docs/operations.md): requests refused `busy`, replies that
    # could not be queued, subscriber connections cut for bad subscriptions.
    requests_refused: int = 0
    replies_dropped: int = 0
    subscriptions_refused: int = 0
    # How new maps are learned of: "tracepoint", or "poll (...why)"; creations the
    # kernel reported, and those that could not be reported, by reason (docs/operations.md).
    discovery: str = ""
    creations_seen: int = 0
    creations_missed: dict[str, int] = attrs.Factory(dict)
    # The daemon's queue to ZeroMQ, shared by all subscribers and bounded in bytes by
    # making polls and buffer reads wait (docs/operations.md): bytes queued, waits.
    stream_queued_bytes: int = 0
    publish_waits: int = 0
    facilities: list[FacilityStatus] = attrs.Factory(list)  # the host probe, at start-up
    req: int = 0
    v: int = SCHEMA_VERSION


# --- the stream (daemon PUB -> subscribers) --------------------------------------


@attrs.define
class MapRef:
    id: int
    name: str


@attrs.define
class EventBatch:
    """``count`` entry events of one map.

    They are numbered ``seq`` .. ``seq + count - 1`` in the daemon-wide
    sequence (total order across maps) and ``topic_seq`` .. ``topic_seq +
    count - 1`` on their topic: a subscriber whose next ``topic_seq`` is not
    one more than the last it saw has missed exactly the difference.
    Frames after the header: actions (1 byte per event: 0 added, 1 updated,
    2 removed), keys, values, old values — each back to back, ``key_size`` and
    ``value_stride`` bytes per event.
    """

    epoch: str
    seq: int
    count: int
    topic_seq: int
    time: float  # unix seconds of the poll that found the changes
    map: MapRef
    key_size: int
    value_stride: int
    req: int = 0  # 0 on the stream; a ``recent`` replay carries the request's ``req``
    v: int = SCHEMA_VERSION


@attrs.define
class MapEvent:
    """A map appeared (``map_created``) or disappeared (``map_removed``); one sequence number."""

    epoch: str
    seq: int
    topic_seq: int
    time: float
    action: str
    map: MapInfo
    req: int = 0  # 0 on the stream; a ``recent`` replay carries the request's ``req``
    v: int = SCHEMA_VERSION


@attrs.define
class Heartbeat:
    """Sent every ``heartbeat_interval`` and right after a new subscription.

    ``topics`` maps each watched topic name to its last ``topic_seq``, so a
    subscriber can notice that it missed the tail of a quiet topic.
    """

    epoch: str
    seq: int
    time: float
    interval: float
    topics: dict[str, int] = attrs.Factory(dict)
    v: int = SCHEMA_VERSION


@attrs.define
class RecordBatch:
    """``count`` records read from one buffer (ring buffer or perf event array) at once.

    Numbered like an ``events`` batch: ``seq`` .. ``seq + count - 1`` daemon-wide,
    ``topic_seq`` .. ``topic_seq + count - 1`` on the buffer's topic
    (``map:<buffer name>\\0``).  Frames after the header: the record lengths
    (one little-endian u32 per record), then the records back to back.
    ``layout``: how to decode a record (the declared layout vocabulary, as in
    ``get_begin.layout``, with the fields under ``value``), or None: hex only.
    """

    epoch: str
    seq: int
    count: int
    topic_seq: int
    time: float  # unix seconds of the read
    map: MapRef  # the buffer: its map id and name
    layout: dict | None = None
    req: int = 0  # 0 on the stream; a ``recent`` replay carries the request's ``req``
    v: int = SCHEMA_VERSION


@attrs.define
class LostRecords:
    """Records of a buffer that never reached pymap; one sequence number.

    ``reason``: ``perf`` (the kernel's lost-sample count for a full perf ring) or
    ``producer`` (the program's own count of failed ring buffer reserves, read
    from the source's ``drops_map``).
    """

    epoch: str
    seq: int
    topic_seq: int
    time: float
    map: MapRef
    lost: int
    reason: str = "perf"
    req: int = 0  # 0 on the stream; a ``recent`` replay carries the request's ``req``
    v: int = SCHEMA_VERSION


Reply = Union[Pong, ListReply, GetBegin, GetChunk, GetEnd, ErrorReply, RecentEnd, StatusReply,
              Ack]
Stream = Union[EventBatch, MapEvent, Heartbeat, RecordBatch, LostRecords]
Message = Union[Request, Reply, Stream]

# Topic frames: "map:<name>\0" for a map's events (subscribe to "map:<prefix>" for a
# family of maps, "map:<name>\0" for exactly one), "hb" for heartbeats.
MAP_TOPIC_PREFIX = b"map:"
HEARTBEAT_TOPIC = b"hb"


def map_topic(name: str) -> bytes:
    return MAP_TOPIC_PREFIX + name.encode() + b"\0"


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
    RecentRequest: "recent",
    StatusRequest: "status",
    GapReport: "gap_report",
    Ack: "ack",
    RecentEnd: "recent_end",
    StatusReply: "status_reply",
    EventBatch: "events",
    MapEvent: "map_event",
    Heartbeat: "heartbeat",
    RecordBatch: "records",
    LostRecords: "lost",
}

converter = make_converter()


def _strict(kind: type):
    """Refuse what JSON would otherwise be coerced from: "1", true or 1.5 as an int, [..] as a str."""

    def structure(value, _type):
        if type(value) is not kind and not (kind is float and type(value) is int):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    return structure


for _kind in (int, str, bool, float):
    converter.register_structure_hook(_kind, _strict(_kind))

# The "kind" tag, dispatched here rather than by cattrs.strategies.configure_tagged_union:
# that strategy builds the hooks of every message class when this module is imported
# (most of its import time, and so of every short CLI command: bench/bench_cli.py);
# here cattrs builds and caches a class's hooks the first time its kind is seen.
_CLASSES = {kind: cls for cls, kind in KINDS.items()}


def _structure_message(data, _type):
    return converter.structure(data, _CLASSES[data["kind"]])  # KeyError: no or unknown kind


def _unstructure_message(message) -> dict:
    data = converter.unstructure(message, type(message))
    data["kind"] = KINDS[type(message)]
    return data


converter.register_structure_hook(Message, _structure_message)
converter.register_unstructure_hook(Message, _unstructure_message)


def encode(message) -> bytes:
    """One message as the JSON bytes of its first frame."""
    return converter.dumps(message, Message)


def decode(data: bytes):
    """Parse a first frame; any problem becomes one :class:`WireError`."""
    try:
        message = converter.loads(data, cast(Any, Message))  # a Union: cattrs takes it
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as e:
        raise WireError(_describe(data, e)) from None
    return message


def _describe(data: bytes, error: Exception) -> str:
    if isinstance(error, cattrs.BaseValidationError):
        inner = "; ".join(str(x) for x in error.exceptions[:3])
        return f"invalid message: {inner}"
    return f"invalid message: {error}"


def valid_req(req: object) -> TypeGuard[int]:
    return type(req) is int and 0 <= req < REQ_LIMIT


def request_id(data: bytes) -> int:
    """The ``req`` of a first frame that fails the schema, when it can still be read.

    So the ``bad_request`` answer reaches a client that matches replies by
    ``req``: it is 0 only when the frame is not a JSON object, or its ``req``
    is missing or not an integer from 0 to 2**63-1 (docs/protocol.md, Framing).
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return 0
    req = obj.get("req") if isinstance(obj, dict) else None
    return req if valid_req(req) else 0
