"""eBPF instructions: built in Python, decoded, and checked read-only before loading.

Owns the instruction encoding (:mod:`.assembler`) and the read-only check every
program pymap loads passes first (:mod:`.readonly`).

Must never issue a syscall: programs are bytes here; loading them is :mod:`..sys`'s.
"""
