"""Fixed-width text tables for terminals: the report's summary, `targets` and `analyze` share one helper."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Column:
    """A column's title, width, how its numbers are formatted, and its alignment.

    `number` is a format spec such as `","` or `".4g"`; it applies to numbers only, so a column
    can hold "n/a" or "-" beside its numbers. Text columns align left, number columns right.
    """

    title: str
    width: int
    number: str = ""
    align: str = ">"

    def cell(self, value: Any) -> str:
        text = value if isinstance(value, str) else format(value, self.number)
        return f"{text:{self.align}{self.width}}"


def text_table(columns: Sequence[Column], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The header line, then one line per row (trailing spaces stripped)."""
    lines = ["".join(column.cell(column.title) for column in columns).rstrip()]
    lines.extend("".join(column.cell(value) for column, value in zip(columns, row, strict=False)).rstrip() for row in rows)
    return lines
