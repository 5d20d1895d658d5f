"""eBPF instructions: built in Python, decoded, and checked read-only before loading.

Owns the instruction encoding and the one decoder of raw programs
(:mod:`.instruction`), the helper ids (:mod:`.helpers`), the assembler with its
labels for jumps and callbacks (:mod:`.assembler`) and the read-only check every
program pymap loads passes first (:mod:`.readonly`).

Must never issue a syscall: programs are bytes here; loading them is :mod:`..sys`'s.
"""
