"""BTF as the kernel holds it: blobs read by id, made standalone, and struct offsets.

Owns the fetch (:mod:`.cache`) and the blob format's ABI (:mod:`.blob`: header,
kinds, split BTF).  Parsing BTF into types, rendering values and caching parsed
BTF per map is :mod:`watcher.decode`'s, which imports from here, never the reverse.

Must never load BTF into the kernel (the in-kernel engine's BTF is made by
:mod:`..sys.create`).
"""
