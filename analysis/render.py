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
    return f"{value:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def format_columns(record, name: str, digits: int = 3, missing: str = "n/a", **style) -> str:
    """``format_ci`` of a record's ``name``, ``name_lo`` and ``name_hi`` entries."""
    return format_ci(record[name], record[f"{name}_lo"], record[f"{name}_hi"], digits, missing,
                     **style)


def yes_no(flag: object) -> str:
    """``yes`` / ``no``, or ``n/a`` for an undecided (None or NaN) flag."""
    if flag is None or (isinstance(flag, float) and math.isnan(flag)):
        return "n/a"
    return "yes" if flag else "no"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a markdown table: the header, its rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


# --- added for gae_lambda/llm/calibration


def estimates_table(frame, columns: dict[str, str | tuple[str, int]], digits: int = 3,
                    **style) -> list[str]:
    """A markdown table of ``frame``'s rows, one column per ``header: name`` (or ``header:
    (name, digits)``) of ``columns``: ``format_columns`` where ``name_lo``/``name_hi`` exist
    beside ``name``, else the value (floats to ``digits`` significant digits, booleans as
    yes/no); ``(no data)`` for an empty frame."""
    if len(frame) == 0:
        return ["(no data)"]

    def cell(row, spec: str | tuple[str, int]) -> str:
        name, places = spec if isinstance(spec, tuple) else (spec, digits)
        if f"{name}_lo" in row and f"{name}_hi" in row:
            return format_columns(row, name, places, **style)
        value = row[name]
        if isinstance(value, (bool, np.bool_)):
            return yes_no(bool(value))
        return f"{value:.{places}g}" if isinstance(value, float) else str(value)

    return markdown_table(list(columns), [[cell(row, spec) for spec in columns.values()]
                                          for _, row in frame.iterrows()])
