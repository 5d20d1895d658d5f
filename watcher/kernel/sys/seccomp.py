"""A seccomp filter on ``bpf(2)`` commands: the kernel's second wall against writes.

The first wall is that every watched map is opened ``BPF_F_RDONLY``.  This one
does not depend on pymap's own code being right: once installed, ``bpf()``
with any command outside the allowed set fails with ``EPERM`` in every thread
of the process, whatever fd or flags the call carries, and nothing can remove
the filter again.

Built with libseccomp's Python binding (Debian's ``python3-seccomp``), not
hand-written BPF bytecode.  The filter allows everything except:

* ``bpf()`` whose command (argument 0) is not in the allowed set.  The
  command is compared as the full 64-bit register: the kernel reads only its
  low 32 bits, so a command with high bits set is refused outright rather than
  compared as the low half (which would let ``(1 << 32) | UPDATE`` through);
  commands newer than this table are refused too;
* ``ptrace``, ``process_vm_readv`` and ``process_vm_writev``: the daemon may
  hold ``CAP_SYS_PTRACE`` to read other processes' ``/proc/PID/fd`` (map
  holders), and must never use it for anything else.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

# enum bpf_cmd in include/uapi/linux/bpf.h (Linux 6.18), by number.
BPF_COMMANDS = (
    "BPF_MAP_CREATE", "BPF_MAP_LOOKUP_ELEM", "BPF_MAP_UPDATE_ELEM", "BPF_MAP_DELETE_ELEM",
    "BPF_MAP_GET_NEXT_KEY", "BPF_PROG_LOAD", "BPF_OBJ_PIN", "BPF_OBJ_GET",
    "BPF_PROG_ATTACH", "BPF_PROG_DETACH", "BPF_PROG_TEST_RUN", "BPF_PROG_GET_NEXT_ID",
    "BPF_MAP_GET_NEXT_ID", "BPF_PROG_GET_FD_BY_ID", "BPF_MAP_GET_FD_BY_ID",
    "BPF_OBJ_GET_INFO_BY_FD", "BPF_PROG_QUERY", "BPF_RAW_TRACEPOINT_OPEN", "BPF_BTF_LOAD",
    "BPF_BTF_GET_FD_BY_ID", "BPF_TASK_FD_QUERY", "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
    "BPF_MAP_FREEZE", "BPF_BTF_GET_NEXT_ID", "BPF_MAP_LOOKUP_BATCH",
    "BPF_MAP_LOOKUP_AND_DELETE_BATCH", "BPF_MAP_UPDATE_BATCH", "BPF_MAP_DELETE_BATCH",
    "BPF_LINK_CREATE", "BPF_LINK_UPDATE", "BPF_LINK_GET_FD_BY_ID", "BPF_LINK_GET_NEXT_ID",
    "BPF_ENABLE_STATS", "BPF_ITER_CREATE", "BPF_LINK_DETACH", "BPF_PROG_BIND_MAP",
    "BPF_TOKEN_CREATE", "BPF_PROG_STREAM_READ_BY_FD",
)
BPF_COMMAND_NUMBERS = {name: number for number, name in enumerate(BPF_COMMANDS)}

# Never needed after start-up, and the way CAP_SYS_PTRACE could be abused.
DENIED_SYSCALLS = ("ptrace", "process_vm_readv", "process_vm_writev")


class SeccompUnavailable(RuntimeError):
    """libseccomp's Python binding does not import (``python3-seccomp`` missing)."""


def _binding():
    try:
        import seccomp as libseccomp  # python3-seccomp (C; no stubs: see [tool.mypy])
    except ImportError as e:
        raise SeccompUnavailable(
            f"libseccomp's Python binding does not import ({e}); install python3-seccomp "
            "and run scripts/setup.sh, which links it into .venv") from None
    return libseccomp


def command_number(name: str) -> int:
    try:
        return BPF_COMMAND_NUMBERS[name]
    except KeyError:
        raise ValueError(f"unknown bpf command {name!r}") from None


def install(allowed_bpf_commands: Iterable[str]) -> None:
    """Install the filter on every thread of this process; irreversible.

    ``allowed_bpf_commands`` are names from :data:`BPF_COMMANDS`; every other
    command fails with ``EPERM``.  Raises :class:`SeccompUnavailable` without
    the binding, ``OSError`` if the kernel refuses the filter.
    """
    libseccomp = _binding()
    allowed = {command_number(name) for name in allowed_bpf_commands}
    refuse = libseccomp.ERRNO(errno.EPERM)
    flt = libseccomp.SyscallFilter(defaction=libseccomp.ALLOW)
    # Every thread, including ZeroMQ's I/O threads and trio's workers started earlier.
    flt.set_attr(libseccomp.Attr.CTL_TSYNC, 1)
    for number in range(len(BPF_COMMANDS)):
        if number not in allowed:
            flt.add_rule(refuse, "bpf", libseccomp.Arg(0, libseccomp.EQ, number))
    # Unsigned 64-bit: also every value with high bits set (see the module docstring).
    flt.add_rule(refuse, "bpf", libseccomp.Arg(0, libseccomp.GE, len(BPF_COMMANDS)))
    for name in DENIED_SYSCALLS:
        flt.add_rule(refuse, name)
    flt.load()


def install_allow_list(syscalls: Iterable[str], bpf_commands: Iterable[str]) -> None:
    """The objects broker's filter (:mod:`..kdelta.broker`): only ``syscalls``, and ``bpf()`` only
    with ``bpf_commands``; everything else fails with ``EPERM``.  This thread only (the
    broker has one); irreversible."""
    libseccomp = _binding()
    flt = libseccomp.SyscallFilter(defaction=libseccomp.ERRNO(errno.EPERM))
    for name in syscalls:
        flt.add_rule(libseccomp.ALLOW, name)
    for name in bpf_commands:
        flt.add_rule(libseccomp.ALLOW, "bpf", libseccomp.Arg(0, libseccomp.EQ,
                                                             command_number(name)))
    flt.load()
