"""Size limits in ``watcher`` and ``consumers``: no function over 60 lines, no module
over 500.

Why: a function a reader cannot hold in view, or a module with several jobs, is where
the field-poking and duplicated rules of issue 17 grew.  Where one must be longer (a
generated-program emitter reads best as one straight listing), it says why: a
``# size: <why>`` comment on the ``def`` line, or ``size: <why>`` in the module
docstring.

Once many exceeded; they were in ``ALLOWED`` with the size each had, as a ratchet: an
entry may shrink (trim it when it drops under the limit) but not grow, and nothing new
may join it.  Nothing is left in it now.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("watcher", "consumers")
MAX_FUNCTION = 60
MAX_MODULE = 500

_REASON = re.compile(r"#\s*size:\s*\S")
_DOC_REASON = re.compile(r"^\s*size:\s*\S", re.MULTILINE)

# path -> lines for modules, path::Qualified.name -> lines for functions: what is left
# over the limits after issue 17's restructuring, each at its size then.  Empty since
# the last four modules were split (or, schema.py, gave their reason): keep it so.
ALLOWED: dict[str, int] = {}


def oversized(source: str, where: str) -> Iterator[tuple[str, int]]:
    """``(name, lines)`` for the module and each function in it over the limits and
    without a reason.  A function counts from its ``def`` line to its last line;
    nested functions and methods are named by their qualified name."""
    lines = source.splitlines()
    tree = ast.parse(source)
    doc = ast.get_docstring(tree) or ""
    if len(lines) > MAX_MODULE and not _DOC_REASON.search(doc):
        yield where, len(lines)
    yield from _functions(tree, lines, where, "")


def _functions(
    node: ast.AST, lines: list[str], where: str, prefix: str
) -> Iterator[tuple[str, int]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = prefix + child.name
            if not isinstance(child, ast.ClassDef):
                assert child.end_lineno is not None
                length = child.end_lineno - child.lineno + 1
                if length > MAX_FUNCTION and not _REASON.search(lines[child.lineno - 1]):
                    yield f"{where}::{name}", length
            yield from _functions(child, lines, where, name + ".")
        else:
            yield from _functions(child, lines, where, prefix)


def current_oversized(repo: Path = REPO) -> dict[str, int]:
    found: dict[str, int] = {}
    for root in ROOTS:
        for path in sorted((repo / root).rglob("*.py")):
            where = path.relative_to(repo).as_posix()
            found.update(oversized(path.read_text(), where))
    return found


def ratchet(found: dict[str, int], allowed: dict[str, int]) -> tuple[list[str], list[str]]:
    """What is over the limits and not allowed, and what grew past its allowance."""
    new = sorted(f"{name}: {n} lines" for name, n in found.items() if name not in allowed)
    grown = sorted(
        f"{name}: {n} lines (allowed {allowed[name]})"
        for name, n in found.items()
        if name in allowed and n > allowed[name]
    )
    return new, grown


def test_nothing_grows_and_nothing_new_exceeds():
    new, grown = ratchet(current_oversized(), ALLOWED)
    limits = f"functions over {MAX_FUNCTION} lines, modules over {MAX_MODULE}"
    assert not new, f"new {limits} (split it, or say why with '# size: ...'):\n" + "\n".join(new)
    assert not grown, "grew past its allowance (split it instead):\n" + "\n".join(grown)


# ---- the check can fail: made-up sources ----


def _body(n: int) -> str:
    return "".join(f"    x{i} = {i}\n" for i in range(n))


def test_a_long_function_is_reported_with_its_qualified_name():
    source = f"class A:\n    def f(self):\n{_body(70)}\n\ndef g():\n{_body(59)}\n"
    source = source.replace("    x", "        x", 70)
    assert dict(oversized(source, "m.py")) == {"m.py::A.f": 71}


def test_a_reason_on_the_def_line_exempts_a_function():
    source = f"def emit():  # size: one straight listing of instructions\n{_body(70)}"
    assert dict(oversized(source, "m.py")) == {}


def test_a_long_module_is_reported_unless_its_docstring_says_why():
    body = "".join(f"x{i} = {i}\n" for i in range(510))
    assert dict(oversized('"""Doc."""\n' + body, "m.py")) == {"m.py": 511}
    reason = '"""Doc.\n\nsize: the six generators share one table.\n"""\n'
    assert dict(oversized(reason + body, "m.py")) == {}


def test_the_ratchet_refuses_growth_and_newcomers_but_not_shrinking():
    allowed = {"a.py": 600, "a.py::f": 70}
    assert ratchet({"a.py": 550, "a.py::f": 70}, allowed) == ([], [])
    assert ratchet({"a.py": 601, "a.py::g": 61}, allowed) == (
        ["a.py::g: 61 lines"],
        ["a.py: 601 lines (allowed 600)"],
    )
