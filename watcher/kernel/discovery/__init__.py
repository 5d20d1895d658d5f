"""Learning about new maps from the kernel rather than by polling ids.

Owns the ``bpf(2)`` syscall-tracepoint watcher (:mod:`.mapwatch`), which sees a map
that lives less than one poll interval.  Hosts that refuse tracing programs poll
instead; that choice is :mod:`watcher.daemon.discovery`'s, made from the feature probe.

Must never attach to anything but the two ``syscalls:sys_*_bpf`` tracepoints.
"""
