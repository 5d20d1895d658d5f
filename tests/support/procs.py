"""Stopping the processes tests and benchmarks start: politely, then surely, never leaked.

Plain Python, no pytest: bench/_common.py imports it too.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess


def close_quietly(*files: object) -> None:
    """Close each of ``files`` that is a file (pipes, logs; None and DEVNULL are skipped)."""
    for f in files:
        close = getattr(f, "close", None)
        if close is not None:
            with contextlib.suppress(OSError):
                close()


def stop(proc: subprocess.Popen, timeout: float = 15, *files: object,
         sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` if ``proc`` still runs, wait ``timeout`` s, SIGKILL if it did not end,
    reap it, then close ``files`` (its pipes, its log).  Returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    close_quietly(*files)
    return proc.returncode
