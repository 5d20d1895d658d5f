"""Map name globs, as both the daemon and its clients read them.

The syntax is :mod:`fnmatch`'s (``*``, ``?``, ``[abc]``, ``[!abc]``), matched
case-sensitively, with one difference: fnmatch quietly reads a ``[`` that is
never closed as a literal ``[``, so ``'['`` or ``'x[!'`` would match nothing
in ``list`` and, cut at the ``[`` into a subscription prefix, watch every map
on the host.  Here such a pattern is an error (:class:`GlobError`), checked
in one place by the CLI, the client library and the daemon alike.
"""

from __future__ import annotations

GLOB_CHARS = "*?["


class GlobError(ValueError):
    """A pattern that cannot be parsed; the message says where and why, in one line."""


def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in GLOB_CHARS)


def check_glob(pattern: str) -> str:
    """``pattern`` if it parses; raises :class:`GlobError` otherwise."""
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":  # a ] first in the set is a member
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                raise GlobError(f"invalid glob {pattern!r}: the [ at position {i + 1} is never "
                                "closed (a set is [abc] or [!abc]; for a literal [ write [[])")
            i = j
        i += 1
    return pattern


def literal_prefix(pattern: str) -> str:
    """The part of ``pattern`` before its first glob character: every match starts with it."""
    cut = min((i for i, ch in enumerate(pattern) if ch in GLOB_CHARS), default=len(pattern))
    return pattern[:cut]
