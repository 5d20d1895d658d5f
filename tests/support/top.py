"""Helpers for the ``pymap top`` tests (no tests here): a paced counter writer and a
``pymap top`` run in tmux, read back with ``capture-pane``.

Plain Python, no pytest: bench/bench_top.py uses the writer too.
"""

from __future__ import annotations

import contextlib
import shlex
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

TOP_LAYOUT = """
[[layouts]]
match = "{name}"
key = [ {{ name = "id", type = "u32" }} ]
value = [ {{ name = "calls", type = "u64" }} ]
"""


class CounterWriter:
    """A thread incrementing u64 counters (u32 keys) of a map, key ``k`` ``rates[k]``
    times a second, for at most ``seconds``; ``counts`` and ``rate()`` are the truth."""

    def __init__(self, fd: int, rates: dict[int, float], seconds: float):
        self.fd, self.rates, self.seconds = fd, rates, seconds
        self.counts = dict.fromkeys(rates, 0)
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counter-writer", daemon=True)

    def _run(self) -> None:
        from watcher.kernel.sys import syscall

        self.started = time.monotonic()
        due = dict.fromkeys(self.rates, self.started)
        end = self.started + self.seconds
        while not self._stop.is_set():
            key = min(due, key=due.__getitem__)
            when = due[key]
            if when > end:
                return
            pause = when - time.monotonic()
            if pause > 0 and self._stop.wait(pause):
                return
            self.counts[key] += 1
            syscall.map_update_elem(self.fd, struct.pack("I", key),
                                    struct.pack("Q", self.counts[key]))
            due[key] = when + 1 / self.rates[key]

    def rate(self, key: int) -> float:
        """Writes per second so far, as paced (the pacing is exact unless the machine lags)."""
        elapsed = time.monotonic() - self.started
        return self.counts[key] / elapsed if elapsed > 0 else 0.0

    def __enter__(self) -> CounterWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Tmux:
    """``pymap top ...`` in a detached tmux session of a given size; killed on exit."""

    def __init__(self, argv: list[str], env: dict[str, str], width: int = 80, height: int = 30):
        self.name = f"pymap-top-{uuid.uuid4().hex[:8]}"
        command = " ".join(shlex.quote(a) for a in argv)
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # remain-on-exit: a crash stays on the screen for the assertion message
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width),
                        "-y", str(height), f"env {exports} TERM=xterm-256color {command}"],
                       check=True)
        subprocess.run(["tmux", "set-option", "-t", self.name, "remain-on-exit", "on"],
                       check=True, capture_output=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], check=True,
                              capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def resize(self, width: int, height: int) -> None:
        subprocess.run(["tmux", "resize-window", "-t", self.name, "-x", str(width), "-y",
                        str(height)], check=True)

    def dead(self) -> bool:
        """The command in the pane has exited."""
        out = subprocess.run(["tmux", "display-message", "-p", "-t", self.name,
                              "#{pane_dead}"], capture_output=True, text=True)
        return out.returncode != 0 or out.stdout.strip() == "1"

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@contextlib.contextmanager
def tmux_top(argv: list[str], env: dict[str, str], width: int = 80,
             height: int = 30) -> Iterator[Tmux]:
    session = Tmux(argv, env, width, height)
    try:
        yield session
    finally:
        session.kill()


def rate_of(screen: str, name: str) -> float | None:
    """The first figure after ``name`` on its row of a captured table (k/M expanded)."""
    for line in screen.splitlines():
        cells = [c.strip() for c in line.replace("│", "|").replace("┃", "|").split("|")]
        cells = [c for c in cells if c]
        if cells and cells[0] == name and len(cells) > 1:
            return parse_rate(cells[1])
    return None


def parse_rate(text: str) -> float | None:
    scale = {"k": 1e3, "M": 1e6}.get(text[-1:], 1.0)
    try:
        return float(text.rstrip("kM")) * scale
    except ValueError:
        return None
