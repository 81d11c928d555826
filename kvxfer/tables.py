"""Tables for people, drawn by rich: a header, aligned columns, numbers right-aligned with
thousands separators, no colour in text form."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

_WIDTH = 1000  # wide enough never to wrap a cell: a table is as wide as its contents


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    """A rich Table of `rows` under `headers`; a column of numbers only is right-aligned."""
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    out = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for header, right in zip(headers, numeric, strict=True):
        out.add_column(header, justify="right" if right else "left", no_wrap=True)
    for row in rows:
        out.add_row(*(_cell(v) for v in row))
    return out


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The table as plain text, for reports and logs."""
    text = io.StringIO()
    Console(file=text, width=_WIDTH, color_system=None, highlight=False).print(table(headers, rows))
    return "\n".join(line.rstrip() for line in text.getvalue().splitlines()).strip("\n")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
