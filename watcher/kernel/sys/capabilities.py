"""The capabilities pymap's daemon runs with, and which kernel call needs each.

A fact about the kernel, measured on Linux 6.18 by running each call as a
non-root user with one capability set at a time (the table in
docs/operations.md).  The one list: the daemon's start-up check
(:mod:`watcher.daemon.privileges`), ``pymap doctor``, the systemd unit and the
Kubernetes DaemonSet in ``examples/`` all follow it, and tests compare them.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Capability:
    name: str  # as in capabilities(7); systemd and setpriv take it in this form too
    number: int  # include/uapi/linux/capability.h
    required: bool  # the daemon refuses to start without it
    needed_for: str


CAPABILITIES = (
    Capability("CAP_SYS_ADMIN", 21, True,
               "listing and opening every map by id (BPF_MAP_GET_NEXT_ID, "
               "BPF_MAP_GET_FD_BY_ID) and reading map BTF (BPF_BTF_GET_FD_BY_ID)"),
    Capability("CAP_BPF", 39, False,
               "creating maps and loading programs: event sources' bcc programs, "
               "the in-kernel delta engine's shadow maps and iterators"),
    Capability("CAP_PERFMON", 38, False,
               "perf rings for perf event arrays (perf_event_open), tracing programs "
               "of event sources and of map discovery (bpf syscall tracepoints)"),
    Capability("CAP_DAC_READ_SEARCH", 2, False,
               "opening pins the daemon's user cannot read (root's pins are 0600) and "
               "tracefs (0700) for bcc sources"),
    Capability("CAP_SYS_PTRACE", 19, False,
               "the holders of a map: other users' /proc/PID/fd and fdinfo"),
)
