"""The in-kernel change detector: generated programs that emit only what changed.

Owns sizing and generating the per-map programs and walking them
(:mod:`.iterdelta`), where their objects are made (:mod:`.objects`) and the
objects broker, the separate process that creates them (:mod:`.broker`).

Must never write a watched map: every program passes :mod:`..asm.readonly` before
it loads, and the broker is the only process allowed to create programs.
"""
