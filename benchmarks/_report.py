"""What every benchmark prints: an aligned table (text columns left, numbers right) and its notes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Column = tuple[str, str, str]
"""(title, key in the row, format string); a None value prints as "-"."""


def print_table(cols: Sequence[Column], rows: Sequence[dict[str, Any]], text_cols: int) -> None:
    cells = [[title for title, _, _ in cols]]
    cells += [["-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in cols] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) if j < text_cols else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_notes(notes: Sequence[str]) -> None:
    """The notes that say how to read the table, after a blank line."""
    print()
    for note in notes:
        print(f"note: {note}")
