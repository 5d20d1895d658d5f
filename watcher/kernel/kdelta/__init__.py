"""The in-kernel change detector: generated programs that emit only what changed.

Owns what a map may cost and which maps qualify (:mod:`.sizing`), generating the
per-map walk programs (:mod:`.programs`) and the programs that write pymap's own
maps (:mod:`.writers`), walking a map with them (:mod:`.walker`), where their
objects are made (:mod:`.objects`) and the objects broker, the separate process
that creates them (:mod:`.broker`).

Must never write a watched map: every program passes :mod:`..asm.readonly` before
it loads, and the broker is the only process allowed to create programs.
"""
