"""Tables that stay readable at any width, the way kubectl and bpftool print them.

- **Not a terminal** (``| grep``, ``| less``, CI logs): plain aligned columns
  separated by two spaces, one line per row, never wrapped whatever the width,
  so ``grep`` and ``awk`` see whole rows.  Headers are upper case without
  spaces and empty cells are ``-``, so every row has the same fields.
- **A terminal**: a rich table.  A column marked ``keep`` (a name, an id, a
  path) is never cut or folded; when the table is too wide, the least
  important columns are dropped first (highest ``drop`` first).  If the kept
  columns alone are wider than the terminal, the lines are printed whole and
  the terminal wraps them: nothing is cut.
- ``-o wide``: the ``wide`` columns too, and nothing dropped.

A :class:`Piped` stands in for rich's console when stdout is certainly not a
terminal, so that ``pymap status | ...`` and ``pymap list | ...`` never import
rich (a third of their start-up, bench/bench_cli.py); rich is imported only to
draw a table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


@attrs.frozen
class Piped:
    """stdout when it is a pipe or a file: plain columns go to ``file``, nothing else."""

    file: IO[str]
    is_terminal = False

    @classmethod
    def certainly(cls, file: IO[str]) -> Piped | None:
        """A ``Piped`` for ``file`` when rich would certainly not treat it as a terminal:
        not a tty, and none of the variables that make rich render as for one
        (``TTY_COMPATIBLE``, ``FORCE_COLOR``) set; otherwise None, and rich decides."""
        if os.environ.get("TTY_COMPATIBLE") or os.environ.get("FORCE_COLOR") is not None:
            return None
        isatty = getattr(file, "isatty", None)
        return cls(file) if isatty is not None and not isatty() else None


@attrs.frozen
class Column:
    header: str
    right: bool = False  # right-justified (numbers)
    keep: bool = False  # never cut or dropped: names, ids, paths
    drop: int = 0  # in a narrow terminal, the column with the highest drop goes first; 0: never
    wide: bool = False  # only with -o wide


UNBOUNDED = 1 << 20  # a width to measure a table's natural width against

# A cell: one line, or several (the terminal shows them stacked, plain output joins them).
Cell = str | Sequence[str]


def _lines(cell: Cell) -> list[str]:
    return [cell] if isinstance(cell, str) else list(cell)


def print_table(console: Console | Piped, columns: Sequence[Column],
                rows: Sequence[Sequence[Cell]], title: str | None = None,
                caption: str | None = None, wide: bool = False) -> None:
    """Print ``rows`` (one cell per column) for a person or for a pipe; see the module doc."""
    if isinstance(console, Piped) or not console.is_terminal:
        chosen = [i for i, c in enumerate(columns) if wide or not c.wide]
        _print_plain(console.file, [columns[i] for i in chosen],
                     [[row[i] for i in chosen] for row in rows], title, caption)
        return
    table, needed = fit_table(console, columns, rows, console.width, title, caption, wide)
    if needed <= console.width:
        console.print(table)
        return
    # The kept columns alone are too wide: whole lines, which the terminal wraps.
    width = console.width
    console.width = needed
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def fit_table(console: Console, columns: Sequence[Column], rows: Sequence[Sequence[Cell]],
              width: int, title: str | None = None, caption: str | None = None,
              wide: bool = False, **table_options) -> tuple[Table, int]:
    """A rich table of ``rows`` that fits ``width`` if dropping columns can make it fit
    (see the module doc), and the width it needs.  Also ``pymap top``'s live tables."""
    chosen = [i for i, c in enumerate(columns) if wide or not c.wide]
    while True:
        table = _rich_table([columns[i] for i in chosen], [[row[i] for i in chosen] for row in rows],
                            title, caption, **table_options)
        needed = console.measure(table, options=console.options.update_width(UNBOUNDED)).maximum
        droppable = [i for i in chosen if columns[i].drop and not wide]
        if needed <= width or not droppable:
            return table, needed
        chosen.remove(max(droppable, key=lambda i: columns[i].drop))


def _rich_table(columns: Sequence[Column], rows: Sequence[Sequence[Cell]],
                title: str | None, caption: str | None, **table_options) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left",
                  **table_options)
    for c in columns:
        table.add_column(c.header, justify="right" if c.right else "left", no_wrap=c.keep,
                         overflow="ignore" if c.keep else "fold")
    for row in rows:
        # Text, not markup: data such as "[fd00::1]:0" must not be read as rich markup.
        table.add_row(*(Text("\n".join(_lines(cell))) for cell in row))
    return table


def _print_plain(file: IO[str], columns: Sequence[Column], rows: Sequence[Sequence[Cell]],
                 title: str | None, caption: str | None) -> None:
    headers = [c.header.upper().replace(" ", "_") for c in columns]
    cells = [[",".join(_lines(cell)) or "-" for cell in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if c.right else v.ljust(w)
                         for v, w, c in zip(values, widths, columns)).rstrip()

    out = [title] if title else []
    out += [line(headers), *(line(r) for r in cells)]
    if caption:
        out.append(caption)
    file.write("\n".join(out) + "\n")
