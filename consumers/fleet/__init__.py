"""Fleets: every node's map changes through NATS JetStream (docs/fleet.md).

- ``options``: the ``nats://`` URL and its settings (stream, prefix, credentials, TLS).
- ``subjects``: subjects, message ids and headers of one event.
- ``bridge``: nats-py is asyncio-only; it runs in one asyncio loop thread that trio drives.
- ``jetstream``: connecting and making sure the stream exists (asyncio side).
- ``publish``: pipelined, acknowledged publishing of event batches (the exporter's output).
- ``subscribe``: reading the fleet stream with a durable or ephemeral consumer, with acks.
"""
