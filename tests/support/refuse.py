"""Run a command as if the kernel refused some facilities: the degradation harness.

    python -m support.refuse RULE[,RULE...] -- COMMAND [ARGS...]

A rule is ``bpf:COMMAND=ERRNO`` (one bpf() command, e.g. ``bpf:BPF_PROG_LOAD=EPERM``)
or ``SYSCALL=ERRNO`` (``perf_event_open=EACCES``; ``setrlimit=EPERM`` also refuses
``prlimit64`` calls that set a limit, which is how glibc's setrlimit reaches the
kernel).  A seccomp filter made with libseccomp answers those calls with the errno,
as a kernel without the facility (or one whose policy refuses it) would; then the
command is exec'd, and the filter holds for it and every process it starts (the
objects broker included).  Used by tests/test_degrade.py only.
"""

from __future__ import annotations

import errno
import os
import sys

from watcher.kernel.sys.seccomp import _binding, command_number


def parse(spec: str) -> list[tuple[str, int | None, int]]:
    """``(syscall, bpf command number or None, errno)`` per rule."""
    rules: list[tuple[str, int | None, int]] = []
    for rule in spec.split(","):
        what, _, err = rule.partition("=")
        number = getattr(errno, err, None)
        if not what or number is None:
            raise SystemExit(f"refuse: bad rule {rule!r} (want bpf:CMD=ERRNO or SYSCALL=ERRNO)")
        if what.startswith("bpf:"):
            rules.append(("bpf", command_number(what[4:]), number))
        else:
            rules.append((what, None, number))
    return rules


def install(rules: list[tuple[str, int | None, int]]) -> None:
    seccomp = _binding()
    flt = seccomp.SyscallFilter(seccomp.ALLOW)
    for syscall, command, err in rules:
        action = seccomp.ERRNO(err)
        if command is not None:  # the kernel reads the command's low 32 bits
            flt.add_rule(action, syscall, seccomp.Arg(0, seccomp.MASKED_EQ, 0xFFFFFFFF, command))
        elif syscall == "setrlimit":
            flt.add_rule(action, "setrlimit")
            flt.add_rule(action, "prlimit64", seccomp.Arg(2, seccomp.NE, 0))
        else:
            flt.add_rule(action, syscall)
    flt.load()


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit(__doc__)
    install(parse(argv[0]))
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
