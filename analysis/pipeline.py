"""The whole analysis in one call: load, table, aggregates, figures, all into one folder.

Files written into ``out``:

- ``runs.parquet``: the tidy frame (one row per run and iteration, config as columns);
- ``table.md``: the comparison table, compact (7 columns at most, read at a glance);
- ``table_full.md``, ``table.csv``, ``table.tex``: the full table, every column;
- ``learning_curves.csv``: IQM return per row and environment-step grid point, 95% CI;
- ``gradient_stats_by_step.csv``: relative variance and bias per row and iteration;
- ``returns_iqm.csv``: final return per row, normalised and pooled over environments;
- ``skipped_runs.csv``: every run left out, with its status and the reason;
- ``figures/``: PNG and PDF of every figure (``analysis.figures``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import curves as cv
from analysis import figures as fg
from analysis import table as tb
from analysis.loader import LoadError, LoadReport, load_runs, save_runs


@dataclass
class AnalysisResult:
    """Where everything went, and the objects behind it for notebook use."""

    out_dir: Path
    table: pd.DataFrame
    report: LoadReport
    files: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)


def analyze(paths: Iterable[Path | str], out: Path | str, steps: str = "all",
            figures: bool = True) -> AnalysisResult:
    """Load every run below ``paths`` and write the table, aggregates and figures to ``out``.

    Raises ``LoadError`` when a path is missing or holds no runs, or when none of the
    runs found is complete (the report of why each was skipped is in the message).
    """
    out_dir = Path(out)
    df, report = load_runs(list(paths))
    if df.empty:
        raise LoadError("no complete run to analyse\n" + report.summary())
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"runs": save_runs(df, out_dir), "skipped": _write_skipped(report, out_dir)}
    keys = tb.row_key_columns(df)
    df = tb.add_labels(df, keys)
    table = tb.build_table(df, steps=steps, skipped=report.skipped)
    files.update({p.name: p for p in tb.write_table(table, out_dir).values()})
    curves = cv.learning_curve_iqm(df, ["env", "label"])
    files["learning_curves"] = _csv(curves, out_dir / "learning_curves.csv")
    measured = fg.trajectory_rows(tb.measurement_rows(df))  # labelled; paired rows where logged
    by_step = fg.gradient_stats_by_step(measured) if not measured.empty else pd.DataFrame()
    files["gradient_stats_by_step"] = _csv(by_step, out_dir / "gradient_stats_by_step.csv")
    finals = tb.final_returns(df)
    files["returns_iqm"] = _csv(cv.final_return_summary(table, df, finals), out_dir / "returns_iqm.csv")
    written = fg.make_figures(table, measured, curves, out_dir / "figures") if figures else []
    return AnalysisResult(out_dir, table, report, files, written)


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _write_skipped(report: LoadReport, out_dir: Path) -> Path:
    """``skipped_runs.csv``: path, status, reason of every run left out."""
    rows = [{"path": str(s.path), "status": s.status, "reason": s.reason} for s in report.skipped]
    return _csv(pd.DataFrame(rows, columns=["path", "status", "reason"]), out_dir / "skipped_runs.csv")
