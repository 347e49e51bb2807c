"""Numbers into words: the one interval formatter and the one markdown-table renderer that
the comparison table and every experiment's result.md use."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def format_ci(value: float, lo: float, hi: float, digits: int = 3, missing: str = "n/a",
              style: str = "g", sign: bool = False) -> str:
    """``value [lo, hi]`` to ``digits`` significant digits (``style="f"``: decimals; ``sign``:
    always a sign); ``value`` alone when an end is missing; ``missing`` when the value is."""
    spec = f"{'+' if sign else ''}.{digits}{style}"
    if not math.isfinite(value):
        return missing
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{value:{spec}}"
    low = ABOVE_ZERO if barely_positive(lo, hi) else f"{lo:{spec}}"
    return f"{value:{spec}} [{low}, {hi:{spec}}]"


ABOVE_ZERO = ">0"  # how a lower end that only says "above 0" is shown


def barely_positive(lo: float, hi: float) -> bool:
    """A lower end that is positive but far below any printable digit of the interval
    (under 1e-12 of its upper end): a test that rejects "0" while the interval's other
    construction reaches below it sets it to the smallest positive number
    (``pgvar.stats.bias_interval_from``); its digits mean nothing, only that it is > 0."""
    return 0 < lo < 1e-12 * abs(hi)


def format_columns(record, name: str, digits: int = 3, missing: str = "n/a", **style) -> str:
    """``format_ci`` of a record's ``name``, ``name_lo`` and ``name_hi`` entries."""
    return format_ci(record[name], record[f"{name}_lo"], record[f"{name}_hi"], digits, missing,
                     **style)


def format_estimate(est, digits: int = 3, missing: str = "n/a", **style) -> str:
    """``format_ci`` of an ``analysis.stats.Estimate``'s value and interval."""
    return format_ci(est.value, est.lo, est.hi, digits, missing, **style)


def yes_no(flag: object) -> str:
    """``yes`` / ``no``, or ``n/a`` for an undecided (None or NaN) flag."""
    if flag is None or (isinstance(flag, float) and math.isnan(flag)):
        return "n/a"
    return "yes" if flag else "no"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a markdown table: the header, its rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def table_sections(sections: Iterable[tuple[str, object, object]], heading: str = "##") -> list[str]:
    """Titled tables for result.md: per ``(title, rows, columns)`` a ``heading title`` line,
    a blank line, ``frame_table(rows, columns)`` and a blank line."""
    return [line for title, rows, columns in sections
            for line in [f"{heading} {title}", "", *frame_table(rows, columns), ""]]


def frame_table(rows, columns: dict[str, object] | Sequence[str], digits: int = 3,
                missing: str = "n/a", **style) -> list[str]:
    """``markdown_table`` of a data frame's rows (or of records), one column per
    ``header: spec`` (a list of column names: each its own header and spec). A spec is a
    function of the row giving the cell, or a column name (or ``(name, digits)``):
    ``format_ci`` of it and its ``name_lo``/``name_hi`` where those exist, else its value
    (booleans yes/no, floats to ``digits`` significant digits, ``missing`` where absent or
    NaN). ``(no data)`` when there are no rows."""
    columns = columns if isinstance(columns, dict) else {name: name for name in columns}
    records = rows.to_dict("records") if hasattr(rows, "to_dict") else \
        [r.to_dict() if hasattr(r, "to_dict") else r for r in rows]
    if not records:
        return ["(no data)"]

    def cell(row: dict, spec) -> str:
        if callable(spec):
            return spec(row)
        name, places = spec if isinstance(spec, tuple) else (spec, digits)
        value = row.get(name, math.nan)
        if f"{name}_lo" in row:
            return format_ci(value, row[f"{name}_lo"], row.get(f"{name}_hi", math.nan), places,
                             missing, **style)
        if isinstance(value, (bool, np.bool_)):
            return yes_no(bool(value))
        if isinstance(value, (float, np.floating)):
            return format_ci(value, math.nan, math.nan, places, missing, **style)
        return str(value)

    return markdown_table(list(columns), [[cell(row, spec) for spec in columns.values()]
                                          for row in records])
