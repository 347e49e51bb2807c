"""Is a complete run's log whole? Checks a run's metrics.csv against its own run.json.

``pgvar-run`` writes ``run.json`` with ``status: complete`` only after its last row is
flushed, but a file can still be damaged afterwards (a copy cut short, a disk that
filled up, a concurrent writer, an edit by hand). The loader uses a run only when:

- ``run.json``'s config names the environment and the estimator;
- ``steps_completed`` is a positive integer, equal to ``training.iterations`` when the
  config holds it (a complete run did every iteration);
- ``metrics.csv`` ends with a line break (a file cut mid-line does not), its header
  holds every required column once, and every line has as many fields as the header;
- the steps are exactly 0, 1, ..., steps_completed - 1 (no row missing, none repeated);
- every row holds a number in each learning-curve column, and every measured row (the
  first, every ``training.measure_every``-th and the last, when the config says so)
  holds a number in each gradient column.

Any failure raises ``DamagedRun`` naming the first problem found; the loader then skips
the whole run (never part of it) and reports the reason.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pgvar.runlog import LEARNING_CURVE_COLUMNS as CURVE_COLUMNS
from pgvar.runlog import MEASURED_COLUMNS as GRADIENT_COLUMNS
from pgvar.runlog import PAIRED_FILE

REQUIRED_COLUMNS = CURVE_COLUMNS + GRADIENT_COLUMNS  # the schema pgvar.runlog writes


class DamagedRun(ValueError):
    """A run whose files disagree with each other or with themselves; the message says how."""


def nested(config: Mapping[str, Any], dotted: str) -> Any:
    """``config['a']['b']`` for ``'a.b'``, or None when any level is missing."""
    value: Any = config
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def is_count(value: Any, minimum: int = 0) -> bool:
    """True for an integer (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_record(info: Mapping[str, Any]) -> int:
    """Check run.json of a complete run; return its ``steps_completed``."""
    config = info.get("config")
    if not isinstance(config, Mapping):
        raise DamagedRun("run.json holds no config (it must name env and estimator)")
    for section in ("env", "estimator"):
        name = nested(config, f"{section}.name")
        if not isinstance(name, str) or not name:
            raise DamagedRun(f"run.json's config names no {section} ({section}.name is missing)")
    steps = info.get("steps_completed")
    if not is_count(steps, 1):
        raise DamagedRun(f"run.json's steps_completed is {steps!r}, not a positive integer")
    iterations = nested(config, "training.iterations")
    if iterations is not None and iterations != steps:
        raise DamagedRun(f"run.json says complete after {steps} steps but its config asks for "
                         f"training.iterations={iterations}")
    return steps


def measured_steps(config: Mapping[str, Any], n_steps: int) -> set[int]:
    """The steps pgvar-run measures (0, every k-th, the last); empty when the config
    does not say (logs not written by pgvar-run)."""
    every = nested(config, "training.measure_every")
    if not is_count(every, 1):
        return set()
    return {s for s in range(n_steps) if s % every == 0 or s == n_steps - 1}


def split_lines(text: str, name: str = "metrics.csv") -> list[list[str]]:
    """The CSV text as rows of cells; raises DamagedRun when it was cut mid-line."""
    if not text:
        raise DamagedRun(f"{name} is empty")
    if not text.endswith("\n"):
        raise DamagedRun(f"{name} ends mid-line (the file was cut short)")
    try:
        return list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as err:
        raise DamagedRun(f"{name} does not parse as CSV ({err})") from None


def check_header(header: Sequence[str]) -> None:
    """Every required column present, no column twice."""
    twice = sorted(c for c, n in Counter(header).items() if n > 1)
    if twice:
        raise DamagedRun(f"metrics.csv's header repeats column(s) {twice}")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DamagedRun(f"metrics.csv lacks column(s) {missing}")


def is_number(cell: str) -> bool:
    """True when ``cell`` parses as a float (``nan`` and ``inf`` included)."""
    try:
        float(cell)
    except ValueError:
        return False
    return True


def check_steps(steps: Sequence[str], n_steps: int) -> None:
    """The step column must read 0, 1, ..., n_steps - 1."""
    if steps == [str(s) for s in range(n_steps)]:
        return
    numbers = [int(float(s)) if is_number(s) and math.isfinite(float(s)) else s for s in steps]
    repeated = sorted({s for s, n in Counter(numbers).items() if n > 1}, key=str)
    if repeated:
        raise DamagedRun(f"metrics.csv repeats step(s) {repeated[:5]}")
    if len(steps) != n_steps:
        raise DamagedRun(f"metrics.csv has {len(steps)} rows but run.json says "
                         f"{n_steps} steps completed (rows missing or added)")
    raise DamagedRun(f"metrics.csv's steps are not 0..{n_steps - 1} in order")


def check_field_counts(header: Sequence[str], rows: Sequence[Sequence[str]],
                       name: str = "metrics.csv") -> None:
    """Every line has as many fields as the header (two writers interleaved do not)."""
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise DamagedRun(f"{name} line {i + 2} has {len(row)} fields, the header "
                             f"{len(header)}")


def check_numbers(header: Sequence[str], rows: Sequence[Sequence[str]], measured: set[int]) -> None:
    """A number in every learning-curve cell, and in every gradient cell of measured rows."""
    position = {c: header.index(c) for c in REQUIRED_COLUMNS}
    for i, row in enumerate(rows):
        needed = REQUIRED_COLUMNS if i in measured else CURVE_COLUMNS
        bad = [c for c in needed if not is_number(row[position[c]])]
        if bad:
            raise DamagedRun(f"metrics.csv line {i + 2} (step {row[position['step']]}) has no "
                             f"number in {bad}")


def validated_rows(path: Path, info: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a complete run's metrics.csv, checked against ``info``
    (its run.json); raises ``DamagedRun`` naming the first problem (module doc)."""
    n_steps = check_record(info)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedRun("metrics.csv is not UTF-8 text") from None
    lines = split_lines(text)
    header, rows = lines[0], lines[1:]
    check_header(header)
    check_field_counts(header, rows)
    check_steps([r[header.index("step")] for r in rows], n_steps)
    check_numbers(header, rows, measured_steps(info["config"], n_steps))
    return header, rows


# ----------------------------------------------------------------------------- paired.csv

PAIRED_NAME = PAIRED_FILE  # pgvar.runlog owns the name
# A paired measurement row names its step, the measured estimator and its critic, and
# holds every gradient column metrics.csv has (the format pgvar-run's paired measurement writes).
PAIRED_IDENTITY = ("step", "estimator", "estimator_name", "critic", "trained_with", "is_training")
PAIRED_REQUIRED = PAIRED_IDENTITY + GRADIENT_COLUMNS


def validated_paired_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a run's paired.csv, checked whole: it ends with a line
    break, its header holds every column of ``PAIRED_REQUIRED`` once, every line has the
    header's field count, names an estimator, holds an integer step and a number in every
    gradient column, and no (step, estimator, critic) appears twice. Raises ``DamagedRun``
    naming the first problem; the loader then falls back to the run's metrics.csv."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedRun(f"{PAIRED_NAME} is not UTF-8 text") from None
    lines = split_lines(text, PAIRED_NAME)
    header, rows = lines[0], lines[1:]
    twice = sorted(c for c, n in Counter(header).items() if n > 1)
    missing = [c for c in PAIRED_REQUIRED if c not in header]
    if twice or missing:
        raise DamagedRun(f"{PAIRED_NAME}'s header " + (f"repeats column(s) {twice}" if twice
                                                      else f"lacks column(s) {missing}"))
    if not rows:
        raise DamagedRun(f"{PAIRED_NAME} has a header but no rows")
    check_field_counts(header, rows, PAIRED_NAME)
    at = {c: header.index(c) for c in PAIRED_REQUIRED}
    seen: set[tuple[str, str, str]] = set()
    for i, row in enumerate(rows):
        step, estimator, critic = row[at["step"]], row[at["estimator"]], row[at["critic"]]
        if not (is_number(step) and math.isfinite(float(step)) and float(step).is_integer()):
            raise DamagedRun(f"{PAIRED_NAME} line {i + 2} has step {step!r}, not an integer")
        if not estimator or not row[at["estimator_name"]]:
            raise DamagedRun(f"{PAIRED_NAME} line {i + 2} names no estimator")
        bad = [c for c in GRADIENT_COLUMNS if not is_number(row[at[c]])]
        if bad:
            raise DamagedRun(f"{PAIRED_NAME} line {i + 2} (step {step}, {estimator}) has no "
                             f"number in {bad}")
        key = (str(int(float(step))), estimator, critic)
        if key in seen:
            raise DamagedRun(f"{PAIRED_NAME} repeats (step, estimator, critic) {key}")
        seen.add(key)
    return header, rows
