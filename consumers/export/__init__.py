"""``pymap export``: the event stream, in a SIEM's schema, delivered to a destination.

Layers (docs/export.md): ``formats`` turn stream events into :class:`ExportRecord`
bytes; ``outputs`` carry batches of records to a destination; ``delivery`` sits
between the two with a bounded buffer, reconnects and drop accounting;
``checkpoint`` remembers the last delivered (epoch, seq) across restarts.
"""
