"""Event-source programs users hand to pymap, compiled and loaded by bcc.

Owns compiling a source's C with bcc, attaching it by convention and finding its
buffers and maps (:mod:`.bccload`).

Must never load pymap's own engine programs; those are :mod:`..kdelta`'s.
"""
