"""Where one event goes in JetStream: subject, message id and headers.

Subjects are ``<prefix>.<node>.<map>.<action>``.  NATS splits subjects on ``.``
and reserves ``*`` and ``>``, so every name becomes one safe token; the real
names travel in headers, which is what consumers read.  The message id
``<node>.<epoch>.<seq>`` names an event uniquely across daemon restarts (a new
epoch per start), so JetStream drops an exporter's re-sends within the stream's
duplicate window.

A batched message (``batch=N``) packs consecutive events of one map and one
action, one per line; its id is ``<node>.<epoch>.<first>-<last>`` and
``Pymap-Count``, ``Pymap-First`` and ``Pymap-Last`` say what it holds.
"""

from __future__ import annotations

import hashlib
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


def msg_id(node: str, epoch: str, seq: int, payload: bytes = b"", time: float = 0.0) -> str:
    """``<node>.<epoch>.<seq>``; records the exporter made itself (seq 0: snapshot rows,
    lost, resync, dropped) add a digest of their content, so two of them never collide
    while a resent one is still recognised."""
    if seq:
        return f"{node}.{epoch}.{seq}"
    digest = hashlib.blake2b(payload + repr(time).encode(), digest_size=8).hexdigest()
    return f"{node}.{epoch}.0.{digest}"


def headers(node: str, map_name: str, action: str, epoch: str, seq: int, time: float,
            payload: bytes = b"") -> dict[str, str]:
    # Few headers: nats-py validates and encodes each one per message (the publisher's
    # main cost); epoch and seq are read back from the message id (parse_msg_id).
    return {MSG_ID: msg_id(node, epoch, seq, payload, time), HEADER_NODE: node,
            HEADER_MAP: map_name, HEADER_ACTION: action, HEADER_TIME: repr(time)}


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
