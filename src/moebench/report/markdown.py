"""The one Markdown table writer of moebench (tabulate's GitHub "pipe" format), so every
table in results/ and the README is drawn the same way; and the one Markdown -> HTML
renderer (markdown-it, CommonMark with tables) for the HTML report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from markdown_it import MarkdownIt
from tabulate import tabulate

HTML_STYLE = (
    "body{font-family:sans-serif;max-width:72em;margin:1em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0}"
    "th,td{border:1px solid #bbb;padding:.2em .5em}th{background:#eee}"
    "tr:nth-child(even) td{background:#f7f7f7}code{background:#f2f2f2}"
)


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


def markdown_html(title: str, text: str) -> str:
    """A standalone HTML page of Markdown `text` (tables rendered, raw HTML escaped)."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{HTML_STYLE}</style></head>\n<body>\n{body}</body></html>\n"
    )


def records_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """`markdown_table` of `columns` of dict rows, floats to 4 significant digits (benchmark
    and replay results)."""
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else r[c] for c in columns] for r in rows]
    return markdown_table(columns, cells)
