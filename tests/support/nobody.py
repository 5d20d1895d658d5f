"""Running ``pymap`` as an unprivileged user, wherever the checkout lives.

A checkout in a private directory (a 0700 home, ``mktemp -d``) is unreadable for
``nobody``, so its ``.venv/bin/pymap`` cannot run as ``nobody``, and the checkout's
permissions must not be loosened to make it.  Instead the tests that run as
``nobody`` use a world-readable copy of what the command needs, made once per
session in the system's temporary directory and removed at the end: a venv
without pip on the same base interpreter, pymap's own packages, and the installed
files of its runtime dependencies (as the installed metadata lists them, so the
copy is what ``pip install pymap`` would give, not a guess).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import cast

REPO = Path(__file__).resolve().parent.parent.parent
PACKAGES = ("watcher", "consumers")  # pymap's own, copied from the checkout


def _runtime_distributions(root: str = "pymap") -> list[metadata.Distribution]:
    """``root``'s installed dependencies, transitively, without extras."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a marker-only dependency (colorama on Windows, ...)
        seen[name] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                name_match = re.match(r"[A-Za-z0-9_.-]+", req)
                assert name_match is not None, req
                todo.append(name_match.group(0))
    seen.pop(re.sub(r"[-_.]+", "-", root).lower())
    return list(seen.values())


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(0o755 if os.access(src, os.X_OK) else 0o644)


def build(dest: Path) -> Path:
    """A world-readable venv under ``dest`` that runs pymap; returns its ``pymap``."""
    dest.chmod(0o755)
    venv = dest / "venv"
    # sys._base_executable: the interpreter under this venv, as venv itself finds it.
    base = sys._base_executable  # type: ignore[attr-defined]  # noqa: SLF001 (no public name)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)],
                   check=True, capture_output=True)
    site_dir = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    here = Path(sysconfig.get_path("purelib"))
    for dist in _runtime_distributions():
        for rel in dist.files or []:
            src = Path(cast(Path, dist.locate_file(rel))).resolve()  # a Path for files on disk
            if src.is_relative_to(here) and "__pycache__" not in src.parts and src.is_file():
                _copy_file(src, site_dir / src.relative_to(here))
    for package in PACKAGES:
        for src in (REPO / package).rglob("*.py"):
            _copy_file(src, site_dir / src.relative_to(REPO))
    # Links to Debian's python3-bpfcc and python3-seccomp (scripts/setup.sh).
    for linked in [here / "bcc", *here.glob("seccomp.*.so")]:
        if linked.is_symlink():
            (site_dir / linked.name).symlink_to(os.readlink(linked))
    pymap = venv / "bin" / "pymap"
    pymap.write_text(f"#!{venv}/bin/python\nfrom consumers.cli.app import main\nmain()\n")
    pymap.chmod(0o755)
    for path in [dest, *dest.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    return pymap


def make_runtime() -> tuple[Path, Path]:
    """(temporary directory to remove, its pymap launcher)."""
    dest = Path(tempfile.mkdtemp(prefix="pymap-nobody-"))
    try:
        return dest, build(dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
