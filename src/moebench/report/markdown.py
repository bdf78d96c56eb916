"""The one Markdown table writer of moebench (tabulate's GitHub "pipe" format), so every
table in results/ and the README is drawn the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tabulate import tabulate


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None
) -> str:
    """A GitHub-flavoured Markdown table of already formatted cells; `align` has one letter
    per column, "l" or "r" (default: the first column left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align={align!r} needs one letter per column ({len(header)})")
    return tabulate(
        [[str(c) for c in row] for row in rows],
        headers=list(header),
        tablefmt="pipe",
        colalign=["left" if a == "l" else "right" for a in align],
        disable_numparse=True,
    )


def records_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """`markdown_table` of `columns` of dict rows, floats to 4 significant digits (benchmark
    and replay results)."""
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else r[c] for c in columns] for r in rows]
    return markdown_table(columns, cells)
