"""Plain-text tables for people: flannelctl's status and leases, the demo's and the
benchmark's reports."""

from __future__ import annotations

import re
from collections.abc import Sequence

_ANSI = re.compile(r"\033\[[0-9;]*m")


def width(cell: str) -> int:
    """What a cell takes on a terminal: colour codes take nothing."""
    return len(_ANSI.sub("", cell))


def table_lines(
    rows: Sequence[Sequence[str]], indent: str = "  ", center: bool = False
) -> list[str]:
    """Rows of cells as aligned lines, two spaces between columns (widths ignore colour
    codes), no trailing blanks; `center` centres all but the first column."""
    widths = [max(width(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = []
        for i, (cell, w) in enumerate(zip(row, widths, strict=True)):
            pad = w - width(cell)
            left = pad // 2 if center and i else 0
            cells.append(" " * left + cell + " " * (pad - left))
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines
