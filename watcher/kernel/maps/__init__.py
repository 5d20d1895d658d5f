"""BPF maps: finding them (ids, pins, metadata), their kinds, and reading their entries.

Owns :class:`~.find.MapHandle` (one fd per handle, always opened read-only),
the table of map kinds and how each can be read (:mod:`.kinds`), chunked batch
dumps (:mod:`.dump`) and counter-map sums (:mod:`.counters`).

Must never write a map: every fd it opens is ``BPF_F_RDONLY``.
"""
