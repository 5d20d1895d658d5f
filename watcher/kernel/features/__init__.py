"""What this host's kernel lets pymap do: the one feature probe and doctor's checks.

Owns the probe run once per daemon start (:mod:`.probe`: each facility's state,
errno, what pymap does instead and the fix) and ``pymap doctor``'s host checks
(:mod:`.checks`).  ``python -m watcher.kernel.features`` prints the probe as JSON lines.

Must never change the host: each probe does the smallest real thing and undoes it.
"""
