"""Where one event goes in JetStream: subject, message id and headers.

Subjects are ``<prefix>.<node>.<map>.<action>``.  NATS splits subjects on ``.``
and reserves ``*`` and ``>``, so every name becomes one safe token; the real
names travel in headers, which is what consumers read.  A one-event message's
id is the event's id (consumers/export/record.py: ``<node>.<epoch>.<seq>``, unique
across daemon restarts since the epoch is new at each start), so JetStream drops
an exporter's re-sends within the stream's duplicate window.

A batched message (``batch=N``) packs consecutive events of one map and one
action, one per line; its id is ``<node>.<epoch>.<first>-<last>`` and
``Pymap-Count``, ``Pymap-First`` and ``Pymap-Last`` say what it holds.
"""

from __future__ import annotations

import re

HEADER_NODE = "Pymap-Node"
HEADER_MAP = "Pymap-Map"
HEADER_ACTION = "Pymap-Action"
HEADER_TIME = "Pymap-Time"  # event time at the node (a batch's first), seconds since the epoch
HEADER_COUNT = "Pymap-Count"  # events in a batched message (absent: one)
HEADER_FIRST = "Pymap-First"  # seq of a batched message's first event
HEADER_LAST = "Pymap-Last"  # ... and of its last
MSG_ID = "Nats-Msg-Id"

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_PREFIX = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def token(name: str) -> str:
    """``name`` as one subject token: anything but letters, digits, ``_`` and ``-`` → ``_``."""
    return _UNSAFE.sub("_", name) or "_"


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise ValueError(f"subject prefix {prefix!r}: use dot-separated tokens of letters, "
                         "digits, '_' and '-'")
    return prefix


def subject(prefix: str, node: str, map_name: str, action: str) -> str:
    return f"{prefix}.{token(node)}.{token(map_name)}.{token(action)}"


def headers(event_id: str, node: str, map_name: str, action: str, time: float
            ) -> dict[str, str]:
    """A one-event message's headers; its message id is the event id (record.event_id)."""
    # Few headers: nats-py validates and encodes each one per message (the publisher's
    # main cost); epoch and seq are read back from the message id (parse_msg_id).
    return {MSG_ID: event_id, HEADER_NODE: node, HEADER_MAP: map_name, HEADER_ACTION: action,
            HEADER_TIME: repr(time)}


def batch_headers(node: str, map_name: str, action: str, epoch: str, first: int, last: int,
                  time: float) -> dict[str, str]:
    """Headers of a message packing events ``first``..``last`` (consecutive seqs)."""
    return {MSG_ID: f"{node}.{epoch}.{first}-{last}", HEADER_NODE: node, HEADER_MAP: map_name,
            HEADER_ACTION: action, HEADER_TIME: repr(time), HEADER_COUNT: str(last - first + 1),
            HEADER_FIRST: str(first), HEADER_LAST: str(last)}


def parse_msg_id(node: str, mid: str) -> tuple[str, int]:
    """(epoch, seq) from a message id of ``node`` (node names may contain dots); a
    batched message's seq is its first event's."""
    rest = mid[len(node) + 1:] if mid.startswith(node + ".") else mid
    epoch, _, seq = rest.partition(".")
    seq = seq.partition(".")[0].partition("-")[0]
    return epoch, int(seq) if seq.isdigit() else 0


GLOB_CHARS = "*?["


STREAM_WIDE = token("")  # the map token of records about a node's stream (dropped, lost, ...)


def filter_subjects(prefix: str, node_glob: str | None, map_glob: str | None) -> list[str]:
    """The narrowest JetStream filters for a node glob and a map glob.

    Subject wildcards match whole tokens only, so a glob such as ``web-*`` becomes
    ``*`` here and the exact match is left to the reader (fnmatch on the headers).
    A map's filter comes with the node's stream-wide subject, so its reader also
    sees the exporter's ``dropped``/``lost``/``resync`` records.
    """
    def part(glob: str | None) -> str:
        if not glob or any(c in glob for c in GLOB_CHARS):
            return "*"
        return token(glob)

    node, map_part = part(node_glob), part(map_glob)
    if map_part == "*":
        return [f"{prefix}.{node}.*.*"]
    return [f"{prefix}.{node}.{map_part}.*", f"{prefix}.{node}.{STREAM_WIDE}.*"]
