"""Small pieces every experiment's ``analyze.py`` needs: numbers with intervals in
words, the result files of an experiment without data, and a result csv of sections."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd


def format_ci(value: float, lo: float, hi: float, digits: int = 3) -> str:
    """``value [lo, hi]`` to ``digits`` significant digits; ``n/a`` for a missing value."""
    if not math.isfinite(value):
        return "n/a"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{value:.{digits}g}"
    return f"{value:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def write_inconclusive(out: Path, title: str, reason: str) -> str:
    """result.md with an 'inconclusive' verdict and an empty result.csv, for runs that
    hold nothing this experiment can measure; returns the markdown."""
    text = f"# {title}\n\nVerdict: inconclusive — {reason}.\n"
    (out / "result.md").write_text(text)
    pd.DataFrame().to_csv(out / "result.csv", index=False)
    return text


def write_sections_csv(path: Path, **sections: pd.DataFrame) -> Path:
    """One csv holding several tables, told apart by a leading ``section`` column."""
    both = pd.concat([frame.assign(section=name) for name, frame in sections.items()],
                     ignore_index=True)
    both[["section"] + [c for c in both.columns if c != "section"]].to_csv(path, index=False)
    return path
