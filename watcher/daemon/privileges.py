"""What the daemon may do to the kernel: its capabilities, and the bpf commands it keeps.

One source of truth for both, so the systemd unit, the Kubernetes DaemonSet
(``examples/``) and ``docs/operations.md`` can be checked against it by tests.

* :data:`~watcher.kernel.sys.capabilities.CAPABILITIES`: the capability set a
  non-root daemon runs with, each with the calls that need it (measured on Linux
  6.18, see docs/internals.md#which-call-needs-which-capability).  :func:`check_capabilities` refuses to start without a required one, naming
  it, and logs one line per optional one that is missing.
* :func:`allowed_bpf_commands`: the bpf(2) commands left to the daemon once
  start-up is over, and :func:`harden`, which installs the seccomp filter
  (:mod:`watcher.kernel.sys.seccomp`) that enforces them.
"""

from __future__ import annotations

import logging

from watcher.kernel.features.checks import parse_capeff
from watcher.kernel.features.probe import Features
from watcher.kernel.sys import seccomp
from watcher.kernel.sys.capabilities import CAPABILITIES, Capability

from .config import Config, ConfigError

log = logging.getLogger("pymap.daemon")

__all__ = ["CAPABILITIES", "Capability", "PrivilegeError", "check_capabilities", "harden",
           "allowed_bpf_commands", "READ_COMMANDS", "KERNEL_DELTA_COMMANDS", "WRITE_COMMANDS"]


# The commands the daemon reads with (watcher/kernel/maps/find.py, dump.py, btf.py).
READ_COMMANDS = (
    "BPF_MAP_GET_NEXT_ID", "BPF_MAP_GET_FD_BY_ID", "BPF_OBJ_GET", "BPF_OBJ_GET_INFO_BY_FD",
    "BPF_BTF_GET_FD_BY_ID", "BPF_MAP_LOOKUP_ELEM", "BPF_MAP_GET_NEXT_KEY",
    "BPF_MAP_LOOKUP_BATCH",
)
# What the in-kernel delta engine (watch.kernel_delta; watcher/kernel/kdelta/) adds
# in the daemon's process: running objects that already exist.  It creates nothing here:
# its maps, BTF and programs come from the objects broker (watcher/kernel/kdelta/broker.py), a
# process of its own that checks every program (writes only to the maps it made for the
# same engine) before loading it, so BPF_MAP_CREATE, BPF_BTF_LOAD and BPF_PROG_LOAD stay
# refused here, and with them any program that could write a watched map or issue bpf()
# commands from inside the kernel (docs/internals.md, "Which bpf command is allowed where").  The engine's
# own writes (state, shadow) are those checked programs, run by BPF_PROG_TEST_RUN.
KERNEL_DELTA_COMMANDS = (
    "BPF_LINK_CREATE",    # a bpf_map_elem iterator over one map (first walk, per-CPU maps)
    "BPF_ITER_CREATE",    # one run of that iterator (read() it)
    "BPF_PROG_TEST_RUN",  # one run of a for_each walk, a sweep, or a writer program
)
# Of those, what only the iterator route needs: left out where the host refuses iterators.
ITERATOR_COMMANDS = ("BPF_LINK_CREATE", "BPF_ITER_CREATE")
# Refused in every configuration, engine on or off (tests/test_seccomp.py).
WRITE_COMMANDS = (
    "BPF_MAP_UPDATE_ELEM", "BPF_MAP_DELETE_ELEM", "BPF_MAP_UPDATE_BATCH", "BPF_MAP_DELETE_BATCH",
    "BPF_MAP_LOOKUP_AND_DELETE_ELEM", "BPF_MAP_LOOKUP_AND_DELETE_BATCH", "BPF_MAP_FREEZE",
    "BPF_OBJ_PIN",
)


class PrivilegeError(ConfigError):
    """The daemon lacks a capability it cannot work without; it does not start."""


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as f:
        capeff = parse_capeff(f.read())
    if capeff is None:
        raise PrivilegeError(f"cannot read the effective capabilities (no CapEff in {status_path})")
    return capeff


def missing_capabilities(capeff: int) -> list[Capability]:
    return [cap for cap in CAPABILITIES if not capeff >> cap.number & 1]


def check_capabilities(capeff: int | None = None) -> None:
    """Refuse to start without a required capability; one log line per missing optional one."""
    missing = missing_capabilities(effective_capabilities() if capeff is None else capeff)
    for cap in missing:
        if cap.required:
            raise PrivilegeError(f"missing capability {cap.name}, needed for {cap.needed_for}; "
                                 f"run as root or grant it (docs/operations.md)")
    for cap in missing:
        log.warning("without %s: no %s", cap.name, cap.needed_for)


def kernel_delta_enabled(config: Config) -> bool:
    # The in-kernel engine's switch (watch.kernel_delta, "auto" or "off") where it exists.
    return getattr(config.watch, "kernel_delta", "off") != "off"


def allowed_bpf_commands(config: Config, features: Features) -> tuple[str, ...]:
    """The reads, and what the in-kernel engine runs on the routes this host allows
    (``features``, the daemon's probe): none of it where the engine cannot run, and no
    iterator commands where the host refuses iterators (the for_each only route)."""
    if not kernel_delta_enabled(config):
        return READ_COMMANDS
    # Imported here: a daemon with the engine off never loads the program builders.
    from watcher.kernel.kdelta.sizing import routes as kernel_routes

    each, iterators, _ = kernel_routes(features)
    if not (each or iterators):
        return READ_COMMANDS
    if iterators:
        return READ_COMMANDS + KERNEL_DELTA_COMMANDS
    return READ_COMMANDS + tuple(c for c in KERNEL_DELTA_COMMANDS if c not in ITERATOR_COMMANDS)


def harden(config: Config, features: Features) -> None:
    """Install the seccomp filter once start-up is done (``[daemon] seccomp``).

    Called after event sources' programs are loaded and their rings installed:
    from here on, bpf() is limited to :func:`allowed_bpf_commands`.
    """
    if not config.daemon.seccomp:
        log.warning("seccomp filter off (daemon.seccomp = false): bpf() is not restricted")
        return
    commands = allowed_bpf_commands(config, features)
    try:
        seccomp.install(commands)
    except seccomp.SeccompUnavailable as e:
        log.warning("seccomp filter NOT installed: %s", e)
        return
    except OSError as e:
        log.warning("seccomp filter NOT installed: the kernel refused it: %s", e)
        return
    log.info("seccomp filter installed: bpf() allows only %s; never an update, delete, "
             "create or load%s", ", ".join(c.removeprefix("BPF_") for c in commands),
             " (the in-kernel engine's objects come from the objects broker)"
             if kernel_delta_enabled(config) else "")
