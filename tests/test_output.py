"""Output for people at any width: plain unwrapped columns when piped, tables that never
cut a name, id or path in a terminal, ``-o wide``; booleans alike in ``get`` and
``events``.  The table logic in-process; ``list`` and ``status`` end to end."""

from __future__ import annotations

import io
import json
import os

import pytest
from rich.console import Console
from support.events import FAST, wait_until
from support.kernel import token

from consumers.cli.columns import Column, print_table
from consumers.cli.eventsout import event_line
from consumers.cli.render import print_entries
from watcher.wire.schema import MapInfo

LONG = "cilium_lb4_services_v2_with_a_very_long_name"
PATH = "/sys/fs/bpf/tc/globals/a/deep/directory/" + LONG
COLUMNS = (Column("ID", right=True, keep=True), Column("Name", keep=True),
           Column("Type", drop=2), Column("Memlock", right=True, drop=3),
           Column("Pinned", keep=True), Column("Held by", drop=4),
           Column("Kernel name", wide=True))
ROWS = [("7", LONG, "hash", "2.3KiB", [PATH, PATH + "_2"], "cilium-agent(42)", "cilium_lb4_serv"),
        ("12345", "short", "percpu_array", "-", [], "", "short")]


def render(terminal: bool, width: int, wide: bool = False) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal, color_system=None)
    print_table(console, COLUMNS, ROWS, title="2 BPF maps" if terminal else None, wide=wide)
    return out.getvalue()


@pytest.mark.parametrize("width", [40, 80, 200])
def test_piped_is_plain_columns_one_line_per_row(width):
    lines = render(terminal=False, width=width).splitlines()
    assert lines[0].split() == ["ID", "NAME", "TYPE", "MEMLOCK", "PINNED", "HELD_BY"]
    assert len(lines) == 1 + len(ROWS)  # no title, no wrapping, whatever the width
    assert lines[1].split() == ["7", LONG, "hash", "2.3KiB", f"{PATH},{PATH}_2",
                                "cilium-agent(42)"]
    assert lines[2].split() == ["12345", "short", "percpu_array", "-", "-", "-"]
    # Aligned: every column starts at the same offset on every line.
    assert len({line.index(word) for line, word in zip(lines, ("NAME", LONG, "short"))}) == 1


def test_piped_wide_adds_columns():
    lines = render(terminal=False, width=80, wide=True).splitlines()
    assert lines[0].split()[-1] == "KERNEL_NAME" and lines[1].split()[-1] == "cilium_lb4_serv"


def test_terminal_keeps_names_and_paths_whole_and_drops_the_rest_first():
    wide_enough = render(terminal=True, width=250)
    assert "Held by" in wide_enough and "Memlock" in wide_enough and "Type" in wide_enough
    for width in (80, 120, 150):
        text = render(terminal=True, width=width)
        assert LONG in text and PATH in text and PATH + "_2" in text and "12345" in text
        assert "…" not in text
    # Narrower terminals lose the least important columns first: Held by, then Memlock.
    full = max(len(line) for line in wide_enough.splitlines()[1:])
    short_of_full = render(terminal=True, width=full - 1)
    assert "Held by" not in short_of_full and "Memlock" in short_of_full
    assert LONG in short_of_full and max(map(len, short_of_full.splitlines())) <= full - 1
    at_80 = render(terminal=True, width=80)
    assert all(h not in at_80 for h in ("Held by", "Memlock", "Type"))
    # -o wide keeps every column, even when the lines get longer than the terminal.
    wide = render(terminal=True, width=80, wide=True)
    assert all(h in wide for h in ("Held by", "Memlock", "Type", "Kernel name"))
    assert LONG in wide and PATH in wide


async def test_booleans_print_alike_in_get_and_events():
    info = MapInfo(id=3, name="flags", type="hash", key_size=4, value_size=1, max_entries=4,
                   flags=0, value_stride=1)
    formatted = {"key": 1, "value": True}
    out = io.StringIO()
    print_entries(Console(file=out, width=120), info, [(b"\1\0\0\0", b"\1", formatted)], 1,
                  raw=False, decoder="decoded by BTF")
    row = out.getvalue().splitlines()[2]
    assert row.split() == ["1", "true"]
    line = event_line({"time": "2026-01-01T00:00:00.000000Z", "seq": 1,
                               "map": {"id": 3, "name": "flags"}, "action": "added",
                               "key": "01000000", "value": "01", "formatted": formatted})
    assert line.endswith("1 = true") and "True" not in line


# --- end to end ---------------------------------------------------------------------------


def _cli(daemon, *args: str, terminal: bool = False) -> str:
    """``pymap ARGS`` at 80 columns, piped or (``terminal``) rendered as for a terminal."""
    env = {**os.environ, "PYMAP_ENDPOINT": daemon.endpoint, "COLUMNS": "80"}
    env.pop("TTY_COMPATIBLE", None)
    if terminal:
        env.update(TTY_COMPATIBLE="1", NO_COLOR="1")  # rich renders as for a tty
    import subprocess

    from conftest import PYMAP

    proc = subprocess.run([PYMAP, *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _imported(daemon, *args: str) -> set[str]:
    """The modules a piped ``pymap ARGS`` imports (python's -X importtime, on stderr)."""
    import subprocess

    from conftest import PYMAP

    env = {**os.environ, "PYMAP_ENDPOINT": daemon.endpoint, "PYTHONPROFILEIMPORTTIME": "1"}
    env.pop("TTY_COMPATIBLE", None)
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run([PYMAP, *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    modules = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:")}
    assert "consumers.cli.app" in modules, proc.stderr[-500:]  # the profile is there
    return modules


@pytest.mark.kernel
def test_list_and_status_piped_at_80_columns(daemon_factory, maps, bpffs_dir):
    tag = token()
    deep = bpffs_dir / "tc" / "globals"
    deep.mkdir(parents=True)
    names = [f"cilium_ipcache_v2_{tag}", f"cilium_policy_v2_00421_{tag}",
             f"cilium_lb4_services_v2_{tag}_with_a_long_name"]
    for name in names:
        maps.create("hash", 4, 8, 16, name=name[:15], pin=deep / name)
    d = daemon_factory(*FAST, "--always", f"cilium_*_{tag}*")

    listed = _cli(d, "list", f"cilium_*{tag}*").splitlines()
    assert listed[0].split()[:3] == ["ID", "NAME", "TYPE"]
    assert len(listed) == 1 + len(names)  # the header, then one line per map
    for name in names:
        line = next(x for x in listed if name in x.split())
        assert str(deep / name) in line.split()

    def watched():
        st = json.loads(_cli(d, "status", "-o", "json"))
        return len([w for w in st["watched"] if tag in w["name"]]) == len(names)

    wait_until(watched, "the daemon to watch the maps")
    status = _cli(d, "status").splitlines()
    assert status[0].startswith("pymap ") and "epoch" in status[0]
    header = next(i for i, x in enumerate(status) if x.split()[:2] == ["ID", "NAME"])
    rows = [x for x in status[header + 1:] if tag in x]
    assert len(rows) == len(names)
    assert sorted(r.split()[1] for r in rows) == sorted(names)
    assert "…" not in "\n".join(status)
    # Piped, neither imports rich (a third of their start-up: bench/bench_cli.py).
    for args in (("list", f"cilium_*{tag}*"), ("status",)):
        assert not {m for m in _imported(d, *args) if m == "rich" or m.startswith("rich.")}, args

    # In an 80-column terminal: a table, still one row per map with whole names.
    table = _cli(d, "status", terminal=True)
    assert "┃" in table and "…" not in table
    for name in names:
        assert sum(name in line for line in table.splitlines()) == 1, (name, table)
    for name in names:
        assert any(str(deep / name) in line
                   for line in _cli(d, "list", f"cilium_*{tag}*", terminal=True).splitlines())
