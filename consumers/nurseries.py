"""One error out of a nursery, for commands that report errors as one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio


@contextlib.contextmanager
def one_error() -> Iterator[None]:
    """Tasks fail alone: re-raise the first real error out of a nursery's group (nested
    groups flattened, Cancelled last), so the CLI reports it as one line."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        raise (real or leaves)[0] from None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out
