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
    """``frame_table`` with number formatting: one column per ``header: name`` (or
    ``header: (name, digits)``), ``format_columns`` where ``name_lo``/``name_hi`` exist
    beside ``name``, else the value (floats to ``digits`` significant digits, booleans as
    yes/no); ``(no data)`` for an empty frame."""
    if len(frame) == 0:
        return ["(no data)"]

    def cell(spec: str | tuple[str, int]):
        name, places = spec if isinstance(spec, tuple) else (spec, digits)

        def text(row) -> str:
            if f"{name}_lo" in row.index and f"{name}_hi" in row.index:
                return format_columns(row, name, places, **style)
            value = row[name]
            if isinstance(value, (bool, np.bool_)):
                return yes_no(bool(value))
            return f"{value:.{places}g}" if isinstance(value, float) else str(value)
        return text

    return frame_table(frame, {header: cell(spec) for header, spec in columns.items()})


# --- added for batch_size/horizon/sparse/rtg


def frame_table(frame, columns: dict[str, object]) -> list[str]:
    """``markdown_table`` of a data frame: one column per ``header: spec``, the spec a
    column name (its interval with ``format_columns`` when ``name_lo``/``name_hi`` exist,
    else the value) or a function of the row giving the cell."""
    def cell(row, spec):
        if callable(spec):
            return spec(row)
        return format_columns(row, spec) if f"{spec}_lo" in row.index else row[spec]
    return markdown_table(list(columns), [[cell(row, spec) for spec in columns.values()]
                                          for _, row in frame.iterrows()])


def checks_table(checks) -> list[str]:
    """The checks of an experiment (``analysis.experiment.check``): what, its class
    (``tested`` or ``by construction``), whether it passed, the deciding numbers."""
    return frame_table(checks, {"scope": "scope", "check": "check", "class": "kind",
                                "passed": lambda r: yes_no(r["passed"]), "numbers": "numbers"})


# --- added for baselines/ppo_clip/practice_biases


def interval_table(rows, lead: Sequence[tuple[str, str]], columns: Sequence[tuple[str, str]],
                   digits: int = 3, **style) -> list[str]:
    """The markdown lines of a table of ``rows`` (records or a frame's ``iterrows``):
    the ``lead`` columns as they are, then each of ``columns`` as ``format_ci`` of it and
    its ``_lo``/``_hi`` ends (``—`` where a row lacks it). Both are ``(column, header)``
    pairs."""
    nan = float("nan")
    return markdown_table([h for _, h in (*lead, *columns)], [
        [r[c] for c, _ in lead] + [format_ci(r.get(c, nan), r.get(f"{c}_lo", nan), r.get(f"{c}_hi", nan),
                                             digits, "—", **style) for c, _ in columns] for r in rows])
