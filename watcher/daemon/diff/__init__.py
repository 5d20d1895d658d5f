"""Change detection: how a watched map's new state becomes ``added``, ``updated``
and ``removed`` events.

Owns both engines' daemon side: the user-space diff of two dumps
(:mod:`.userspace`), the in-kernel engine's choice per map and the patching of
its kept state from a kernel walk (:mod:`.inkernel`), and what they share
(:mod:`.core`): the kept state, the delta, the one :func:`assemble`, the one key
dtype and the one first-poll rule.  The kernel half of the in-kernel engine
(programs, walks, the objects broker) lives in :mod:`watcher.kernel.kdelta`.

Must never: open or read maps itself (the engine hands it dumps, or a walker an
fd), publish (it returns deltas; the engine publishes them), or keep a map's
state between polls (the engine keeps each map's snapshot and hands it back; the
in-kernel walker keeps only its kernel objects).  Both engines must make the same events from the same changes:
``tests/test_kdelta.py`` checks them against each other, ``tests/test_delta.py``
the user-space one against a brute-force diff.
"""

from .core import (
    Action,
    Delta,
    EngineSnapshot,
    Patch,
    assemble,
    first_poll_is_silent,
    key_dtype,
    snapshot_as_added,
)
from .inkernel import KernelDelta, choose_engine, start_broker, supervise
from .userspace import changes, diff, poll_changes

__all__ = [
    "Action", "Delta", "EngineSnapshot", "KernelDelta", "Patch", "assemble", "changes", "choose_engine",
    "diff", "first_poll_is_silent", "key_dtype", "poll_changes", "snapshot_as_added", "start_broker",
    "supervise",
]
