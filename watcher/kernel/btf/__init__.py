"""BTF as the kernel holds it: objects read by id and cached for their lifetime.

Owns the fetch and the cache (:mod:`.cache`); parsing BTF into types and rendering
values is :mod:`watcher.decode.btf`'s.

Must never load BTF into the kernel (the in-kernel engine's BTF is made by
:mod:`..sys.create`).
"""
