"""Plain-text tables for the benchmark's figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def cell(value: object) -> str:
    """A figure as text: floats with two decimals, whole numbers as they are, a spread as
    `median (min-max)`."""
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, Mapping) and {"median", "min", "max"} <= value.keys():
        return f"{cell(value['median'])} ({cell(value['min'])}-{cell(value['max'])})"
    return "" if value is None else str(value)


def is_figure(value: object) -> bool:
    return isinstance(value, int | float | Mapping) or value is None


def table(rows: Sequence[Mapping[str, object]]) -> str:
    """The rows as aligned plain text, one column per key: text left, figures right."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    right = [all(is_figure(row.get(c)) for row in rows) for c in columns]
    lines = [columns, ["-" * w for w in widths], *cells]
    return "\n".join(
        "  ".join(
            value.rjust(width) if align else value.ljust(width)
            for value, width, align in zip(line, widths, right, strict=True)
        ).rstrip()
        for line in lines
    )
