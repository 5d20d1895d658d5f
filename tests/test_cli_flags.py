"""The CLI's surface: --version, typer's shell completion, and short flags that mean one
thing across commands (old spellings kept as hidden aliases)."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata

import typer
import typer.core
from conftest import PYMAP

from consumers.cli.app import build_app

# One meaning per short flag, in every command that has it.
MEANING: dict[str, str | set[str]] = {"-c": "--config", "-n": {"--count", "--limit"}, "-e": "--endpoint",
           "-o": "--output", "-f": "--follow"}
HIDDEN_ALIASES = {("events", "-c"): "count_c", ("export", "-n"): "name_n"}


def _options(command):
    for p in command.params:
        if getattr(p, "opts", None) and p.param_type_name == "option":
            yield p


def test_short_flags_mean_one_thing_and_old_ones_stay_hidden():
    root = typer.main.get_command(build_app())
    assert isinstance(root, typer.core.TyperGroup)
    for name, command in root.commands.items():
        for p in _options(command):
            shorts = [o for o in p.opts if len(o) == 2]
            longs = [o for o in p.opts if o.startswith("--")]
            for short in shorts:
                if (name, short) in HIDDEN_ALIASES:
                    assert p.hidden and p.name == HIDDEN_ALIASES[(name, short)], (name, short)
                    continue
                want = MEANING.get(short)
                if want is not None:
                    assert set(longs) <= ({want} if isinstance(want, str) else want), \
                        f"pymap {name}: {short} is {longs}"
    for (name, _short), param in HIDDEN_ALIASES.items():
        assert any(p.name == param and p.hidden for p in _options(root.commands[name])), name


def test_version_and_completion():
    proc = subprocess.run([PYMAP, "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == f"pymap {metadata.version('pymap')}\n"
    env = {**os.environ, "_PYMAP_COMPLETE": "complete_bash", "COMP_WORDS": "pymap events --co",
           "COMP_CWORD": "2"}
    proc = subprocess.run([PYMAP], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0 and proc.stdout.split() == ["--count"], proc
    env.update(COMP_WORDS="pymap li", COMP_CWORD="1")
    proc = subprocess.run([PYMAP], capture_output=True, text=True, timeout=30, env=env)
    assert proc.stdout.split() == ["list"], proc
