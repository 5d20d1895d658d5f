"""The fenced code blocks of a doc page, so that tests run the configs the docs show
(no tests here)."""

from __future__ import annotations

import re
from pathlib import Path

import attrs


@attrs.frozen
class Block:
    info: str  # what follows the opening fence: ``yaml``, ``console``, ...
    text: str
    section: str  # the nearest heading above it, without its #s
    line: int  # the opening fence's line number, 1-based

    def first_comment(self) -> str:
        """The block's first line when it is a comment naming a file (``# /etc/x.conf``)."""
        first = self.text.split("\n", 1)[0]
        return first[1:].strip() if first.startswith("#") else ""


def code_blocks(path: Path, info: str | None = None, section: str | None = None) -> list[Block]:
    """Every fenced block of ``path`` in order; only those whose info string is ``info``
    and whose heading is ``section`` when given."""
    blocks: list[Block] = []
    heading = ""
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"#{1,6} (.*)", line):
            heading = m.group(1).strip()
        elif m := re.match(r"( *)(```+)(.*)", line):  # indented in a list item too
            indent, fence, start = m.group(1), m.group(2), i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith(indent + fence):
                body.append(lines[i].removeprefix(indent))
                i += 1
            blocks.append(Block(m.group(3).strip(), "\n".join(body) + "\n", heading, start + 1))
        i += 1
    return [b for b in blocks if (info is None or b.info == info)
            and (section is None or b.section == section)]
