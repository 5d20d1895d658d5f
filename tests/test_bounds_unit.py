"""Unit checks of the byte bounds: stream batch sizing, the XPUB high-water mark from a
byte budget, and the subscription gate's per-connection bookkeeping."""

from __future__ import annotations

import os
import socket

from watcher.daemon.access import Policy, View
from watcher.daemon.config import AccessConfig, AccessRule, DaemonConfig
from watcher.daemon.publisher import HEADER_ALLOWANCE, PublishedStream
from watcher.daemon.subgate import SubscriptionGate


def test_batches_fit_the_message_budget():
    stream = PublishedStream(None, "e", 0, 4096, 1.0, message_bytes=64 << 10)  # type: ignore[arg-type]
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
    gate = SubscriptionGate(16, 2, None, cut=lambda fd, local: cut.append(fd) or True)  # type: ignore[func-returns-value]
    gate._source_fd = staticmethod(lambda frame: a.fileno())  # type: ignore[method-assign]  # noqa: SLF001 (stubbed hook)
    assert gate.admit(b"\x01x") == [b"\x01x"]  # the engine's demand: x is held now
    assert gate.admit(b"\x01x") == []  # the same prefix again is not a new one
    assert gate.admit(b"\x01y") == [b"\x01y"]
    assert gate.admit(b"\x00y") == [b"\x00y"]
    assert gate.admit(b"\x01z") == [b"\x01z"]  # y was unsubscribed: room for z
    # One too many: the connection is cut, and its topics leave the demand at once.
    assert gate.admit(b"\x01w") == [b"\x00x", b"\x00z"]
    assert cut == [a.fileno()] and gate.refused == 1
    assert gate.admit(b"\x01" + b"v" * 17) == [] and gate.refused == 2  # too long
    assert gate.admit(b"\x02junk") == [] and gate.refused == 2  # not a subscription
    assert gate.admit(b"\x01") == [b"\x01map:", b"\x01hb"]  # "": every map and heartbeats
    assert gate.admit(b"\x01hb") == []  # already applied for this connection
    assert gate.admit(b"\x00") == [b"\x00map:"]  # hb is still held through the explicit "hb"
    assert gate.admit(b"\x00hb") == [b"\x00hb"]
    a.close()
    b.close()
    gate._sweep()  # noqa: SLF001 (stubbed hook)
    assert gate.connections() == 0 or os.path.exists(f"/proc/self/fd/{cut[0]}")


def test_gate_keeps_a_restricted_peer_inside_its_namespace():
    """A peer an access rule restricts gets only subscriptions in its view's namespace
    applied: map:, "" and another view's namespace are counted and not applied."""
    a, b = socket.socketpair()
    policy = Policy(AccessConfig(rules=[AccessRule(clients=["alice"], allow=["acl_*"]),
                                        AccessRule(clients=["bob"], allow=["b_*"])]))
    views = policy.views()
    alice = View(("acl_*",), ())
    assert set(views) == {alice.namespace, View(("b_*",), ()).namespace}
    gate = SubscriptionGate(1024, 10, None, policy=policy)
    gate._source_fd = staticmethod(lambda frame: a.fileno())  # type: ignore[method-assign]  # noqa: SLF001 (stubbed hook)
    gate._identity = staticmethod(lambda frame: ("alice", "10.0.0.1"))  # type: ignore[method-assign]  # noqa: SLF001 (stubbed hook)
    ns = alice.namespace
    for outside in (b"map:", b"", b"hb", (set(views) - {ns}).pop() + b"map:"):
        assert gate.admit(b"\x01" + outside) == []
    assert gate.outside_view == 4
    assert gate.admit(b"\x01" + ns + b"map:acl_") == [b"\x01" + ns + b"map:acl_"]
    # A reload that changes alice's view cuts her connection; an unchanged one does not.
    cut: list[int] = []
    gate._cut = lambda fd, local: cut.append(fd) or True  # type: ignore[func-returns-value]  # noqa: SLF001 (stubbed hook)
    gate.reconfigure(Policy(AccessConfig(rules=[AccessRule(clients=["alice"], allow=["acl_*"])])))
    assert cut == [] and gate.connections() == 1
    gate.reconfigure(Policy(AccessConfig(rules=[AccessRule(clients=["alice"], allow=["x*"])])))
    assert cut == [a.fileno()] and gate.connections() == 0 and gate.view_changed == 1
    a.close()
    b.close()
