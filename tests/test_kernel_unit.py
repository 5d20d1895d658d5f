"""Kernel-layer helpers that need no kernel: CPU lists, the map handle's close-once rule."""

from __future__ import annotations

import os

import pytest
from support.catalog import record

from watcher.kernel.maps.find import MapHandle
from watcher.kernel.sys.abi import percpu_slot
from watcher.kernel.sys.cpus import parse_cpu_list


def test_cpu_lists_as_the_kernel_writes_them():
    assert parse_cpu_list("0-3,6\n") == [0, 1, 2, 3, 6]
    assert parse_cpu_list("0") == [0]
    assert parse_cpu_list("") == []
    assert parse_cpu_list("2,4-5") == [2, 4, 5]


def test_percpu_slot_rounds_up_to_8():
    assert [percpu_slot(n) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]


def test_map_handle_closes_its_fd_exactly_once():
    r, w = os.pipe()
    os.close(w)
    handle = MapHandle(r, record(1, "m"))
    with handle as h:
        assert h.fd == r and not h.closed
    assert handle.closed
    with pytest.raises(OSError):
        os.fstat(r)  # closed (a reused number would be someone else's fd)
    handle.close()  # idempotent: no second close of a number that may be reused
    with pytest.raises(ValueError, match="closed"):
        _ = handle.fd
    assert "closed" in repr(handle)


def test_the_kernel_layer_imports_nothing_above_it():
    """watcher.kernel is the floor: decode, wire, daemon and consumers import it, never
    the reverse (lazy imports inside functions included)."""
    import ast
    import pathlib

    import watcher.kernel

    above = ("watcher.decode", "watcher.wire", "watcher.daemon", "consumers")
    root = pathlib.Path(watcher.kernel.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and
                     not node.level else [])
            found += [f"{path.relative_to(root)}: {name}" for name in names
                      if name.startswith(above)]
    assert not found
