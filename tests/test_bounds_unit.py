"""Unit checks of the byte bounds: stream batch sizing, the XPUB high-water mark from a
byte budget, and the subscription gate's per-connection bookkeeping."""

from __future__ import annotations

import os
import socket

from watcher.daemon.config import DaemonConfig
from watcher.daemon.publisher import HEADER_ALLOWANCE, Stream
from watcher.daemon.subgate import SubscriptionGate


def test_batches_fit_the_message_budget():
    stream = Stream(None, "e", 0, 4096, 1.0, message_bytes=64 << 10)  # type: ignore[arg-type]
    step = stream.batch_step(4, 1024)
    assert step * (1 + 4 + 2 * 1024) + HEADER_ALLOWANCE <= 64 << 10
    assert (step + 1) * (1 + 4 + 2 * 1024) + HEADER_ALLOWANCE > 64 << 10
    assert stream.batch_step(4, 4) == 4096  # small events: batch_events decides
    assert stream.batch_step(4, 1 << 20) == 1  # one event always goes


def test_hwm_comes_from_the_byte_budget():
    assert DaemonConfig().stream_sndhwm == 256
    assert DaemonConfig(stream_hwm=10).stream_sndhwm == 10
    assert DaemonConfig(stream_queue_bytes=4096, stream_message_bytes=8192).stream_sndhwm == 1


def test_gate_counts_per_connection_and_cuts():
    a, b = socket.socketpair()
    cut: list[int] = []
    gate = SubscriptionGate(16, 2, None, cut=lambda fd, local: cut.append(fd) or True)
    gate._source_fd = staticmethod(lambda frame: a.fileno())  # type: ignore[method-assign]
    assert gate.admit(b"\x01x") == b"\x01x"
    assert gate.admit(b"\x01x") == b"\x01x"  # the same prefix again is not a new one
    assert gate.admit(b"\x01y") == b"\x01y"
    assert gate.admit(b"\x00y") == b"\x00y"
    assert gate.admit(b"\x01z") == b"\x01z"  # y was unsubscribed: room for z
    assert gate.admit(b"\x01w") is None and cut == [a.fileno()] and gate.refused == 1
    assert gate.admit(b"\x01" + b"v" * 17) is None and gate.refused == 2  # too long
    assert gate.admit(b"\x02junk") is None and gate.refused == 2  # not a subscription
    a.close()
    b.close()
    gate._sweep()
    assert gate.connections() == 0 or os.path.exists(f"/proc/self/fd/{cut[0]}")
