"""The package graph of ``watcher`` and ``consumers``: no import cycles, no import upward.

Why a test: the floors (kernel -> decode/wire -> daemon -> consumers, see
docs/architecture.md) are what lets a newcomer know what a module may touch, and a
cycle or an upward import creeps in one harmless-looking line at a time.  Review
does not catch them; a graph does.

The graph is built statically with :mod:`ast` from the source files, never by
importing them, so a module that only runs on a BPF-capable host is still checked.
Every ``import`` counts wherever it stands -- at module level, inside a function
(the lazy imports that keep the CLI fast), or under ``TYPE_CHECKING`` -- because each
is still a dependency a reader must know about.  An edge goes to the module named;
the parent packages Python also runs on the way are not edges, or every module would
sit in a cycle with its own package's ``__init__``.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Set
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("watcher", "consumers")

Graph = Mapping[str, frozenset[str]]

# The floors, lowest first.  A module may import its own floor and any floor below.
FLOORS: dict[str, int] = {
    "watcher.kernel": 0,
    "watcher.decode": 1,
    "watcher.wire": 1,
    "watcher.daemon": 2,
    "consumers": 3,
}


def module_name(path: Path, repo: Path = REPO) -> str:
    """``watcher/kernel/maps/find.py`` -> ``watcher.kernel.maps.find``; a package's
    ``__init__.py`` is the package itself."""
    parts = list(path.relative_to(repo).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(repo: Path = REPO) -> dict[str, Path]:
    """Every module under the roots, by dotted name."""
    files: dict[str, Path] = {}
    for root in ROOTS:
        for path in sorted((repo / root).rglob("*.py")):
            files[module_name(path, repo)] = path
    return files


def _package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def _resolve(name: str, known: Set[str]) -> str | None:
    """The longest known module that ``name`` is or lies inside, if any."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, source: str, is_package: bool, known: Set[str]) -> set[str]:
    """The known modules that ``module``'s source imports, relative imports resolved.

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
    ``pkg``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            wanted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module, is_package)
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            wanted = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in wanted:
            target = _resolve(name, known)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(repo: Path = REPO) -> dict[str, frozenset[str]]:
    """Module -> the modules of ``watcher`` and ``consumers`` it imports."""
    files = source_files(repo)
    known = set(files)
    return {
        module: frozenset(imports_of(module, path.read_text(), path.name == "__init__.py", known))
        for module, path in files.items()
    }


def strongly_connected(graph: Graph) -> list[frozenset[str]]:
    """The groups of more than one module that all reach each other (Tarjan): each
    is one knot of import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[frozenset[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the ~130 modules
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle per knot, as a path that starts and ends at the same module, sorted
    for stable output."""
    return sorted(_cycle_in(graph, c) for c in strongly_connected(graph))


def _cycle_in(graph: Graph, component: frozenset[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    return paths[node] + [start]
                if nxt in component and nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"not a strongly connected component: {sorted(component)}")


def floor_of(module: str) -> str | None:
    """The floor package a module lives on (``None`` for the bare ``watcher`` package)."""
    for floor in FLOORS:
        if module == floor or module.startswith(floor + "."):
            return floor
    return None


def upward_imports(graph: Graph, lower: str, higher: str) -> list[str]:
    """``importer -> imported`` for every import from floor ``lower`` into ``higher``."""
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if floor_of(module) == lower
        for target in targets
        if floor_of(target) == higher
    )


# ---- the checks on the real tree ----


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph()


def test_the_graph_sees_the_tree(graph: Graph):
    """Guards the checks below against passing on an empty or unresolved graph."""
    assert {floor_of(m) for m in graph} >= set(FLOORS)  # modules on every floor
    assert sum(len(targets) for targets in graph.values()) > 200  # ~350 edges today
    # A new package beside the floors must be given one here.
    assert [m for m in graph if m not in ROOTS and floor_of(m) is None] == []


# The knots of cycles on main when this test was written, each in files whose owners
# are reworking them under issue 17.  A new knot, or a module joining one of these,
# fails; when one is untied, test_known_cycles_still_exist asks for its line here
# to go, so the list only shrinks.
KNOWN_CYCLES: frozenset[frozenset[str]] = frozenset(
    {
        # EventStream and Client each hand out the other (TYPE_CHECKING + a lazy import);
        # snapshot reads through the client and is read by the stream; the event model and
        # the start policy name ClientSnapshot and Client in annotations only.
        frozenset({"consumers.client", "consumers.events", "consumers.snapshot",
                   "consumers.startpolicy", "consumers.subscriber"}),
        # BatchRenderer calls back into the formats' base; base builds the renderer.
        frozenset({"consumers.export.formats.base", "consumers.export.formats.batch"}),
    }
)


def test_no_import_cycles(graph: Graph):
    new = [c for c in strongly_connected(graph) if c not in KNOWN_CYCLES]
    lines = sorted(f"{' -> '.join(_cycle_in(graph, c))}  (knot: {sorted(c)})" for c in new)
    assert not lines, "import cycles:\n" + "\n".join(lines)


def test_known_cycles_still_exist(graph: Graph):
    gone = KNOWN_CYCLES - set(strongly_connected(graph))
    assert not gone, "untied, remove from KNOWN_CYCLES: " + repr(sorted(map(sorted, gone)))


# Every (lower, higher) pair of floors: the lower must not import the higher.
UPWARD = [
    pytest.param(
        lower,
        higher,
        id=f"{lower}->{higher}",
    )
    for lower, lower_floor in FLOORS.items()
    for higher, higher_floor in FLOORS.items()
    if higher_floor > lower_floor
]


@pytest.mark.parametrize(("lower", "higher"), UPWARD)
def test_no_upward_import(graph: Graph, lower: str, higher: str):
    upward = upward_imports(graph, lower, higher)
    assert not upward, f"{lower} imports the higher floor {higher}:\n" + "\n".join(upward)


# ---- the checks can fail: made-up graphs and sources ----


def test_find_cycles_reports_a_made_up_cycle():
    graph = {
        "watcher.kernel.a": frozenset({"watcher.kernel.b"}),
        "watcher.kernel.b": frozenset({"watcher.kernel.c"}),
        "watcher.kernel.c": frozenset({"watcher.kernel.a", "watcher.kernel.d"}),
        "watcher.kernel.d": frozenset(),
        "consumers.x": frozenset({"consumers.y"}),
        "consumers.y": frozenset({"consumers.x"}),
    }
    assert find_cycles(graph) == [
        ["consumers.x", "consumers.y", "consumers.x"],
        ["watcher.kernel.a", "watcher.kernel.b", "watcher.kernel.c", "watcher.kernel.a"],
    ]
    acyclic = {m: t - {"watcher.kernel.a"} for m, t in graph.items() if "consumers" not in m}
    assert find_cycles(acyclic) == []


def test_upward_imports_reports_a_made_up_one():
    graph = {
        "watcher.kernel.maps.find": frozenset({"watcher.daemon.engine", "watcher.kernel.sys"}),
        "watcher.daemon.engine": frozenset({"watcher.kernel.maps.find"}),
    }
    assert upward_imports(graph, "watcher.kernel", "watcher.daemon") == [
        "watcher.kernel.maps.find -> watcher.daemon.engine"
    ]
    assert upward_imports(graph, "watcher.daemon", "consumers") == []


def test_imports_of_resolves_relative_and_function_level_imports():
    known = {
        "watcher.kernel",
        "watcher.kernel.maps",
        "watcher.kernel.maps.find",
        "watcher.kernel.sys",
        "watcher.kernel.sys.syscall",
        "watcher.decode.btf",
    }
    source = (
        "from . import find\n"
        "from ..sys.syscall import BpfError\n"
        "import os\n"
        "def later():\n"
        "    import watcher.decode.btf as btf\n"
    )
    assert imports_of("watcher.kernel.maps.dump", source, False, known) == {
        "watcher.kernel.maps.find",
        "watcher.kernel.sys.syscall",
        "watcher.decode.btf",
    }
    # In a package's __init__, one dot is the package itself.
    assert imports_of("watcher.kernel.maps", "from .find import MapHandle\n", True, known) == {
        "watcher.kernel.maps.find"
    }
