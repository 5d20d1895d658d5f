"""The lowest layer: syscalls through ctypes, and facts about the running kernel.

Owns ``bpf(2)`` (:mod:`.syscall`, the one syscall table and its attr structs, and
:mod:`.create`, the commands that create objects), ``perf_event_open(2)``
(:mod:`.perfevent`), ``mmap(2)`` (:mod:`.mapping`), ``prctl(2)`` for the process's
name (:mod:`.process`), the CPU lists, the capability table and the seccomp filter
on ``bpf(2)`` commands.

Must never decide policy (which map to watch, which engine to use) nor keep state
beyond the file descriptors it returns; callers own those.
"""
