"""Everything that talks to a pymap daemon: the library, the CLI, the exporters, the fleet.

Owns the request client (:mod:`.client`, :mod:`.oneshot`, :mod:`.dumpread`), the event stream a subscriber
reads (:mod:`.subscriber` for the sockets and holding on, :mod:`.events` for the event
model, :mod:`.gaps` for sequence tracking, :mod:`.snapshot` and :mod:`.startpolicy` for
the Clone pattern's sync), record batches (:mod:`.recordsets`), selectors
(:mod:`.selection`), ``pymap top``'s models (:mod:`.top`, :mod:`.topkeys`), and the
packages :mod:`.cli`, :mod:`.export` and :mod:`.fleet`.

Must never touch the kernel: everything comes from the daemon over :mod:`watcher.wire`.
"""
