"""``pgvar-analyze SWEEP_DIR [SWEEP_DIR ...] [--out DIR]``: the table and figures of sweeps
(into ``DIR``, by default ``analysis/`` inside the first sweep directory)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.loader import LoadError
from analysis.pipeline import analyze
from analysis.table import STEP_CHOICES
from pgvar.preflight import output_dir_problem

EXIT_NO_RUNS = 2  # and every other user error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pgvar-analyze",
        description="Load every run below the sweep directories (output of pgvar-run -m) into "
                    "DIR/runs.parquet, and write the bias/variance table (md, csv, tex), "
                    "learning-curve aggregates and figures into DIR.")
    parser.add_argument("sweeps", nargs="+", type=Path, metavar="SWEEP_DIR",
                        help="Hydra sweep (or single run) directories; searched recursively")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output directory, created if needed (default: SWEEP_DIR/analysis "
                             "of the first sweep directory)")
    parser.add_argument("--steps", choices=STEP_CHOICES, default="all",
                        help="which measured iterations feed the table: 'all' (default: every "
                             "measured iteration, averaged within each run), 'first' (every "
                             "estimator at the same initial policy of a seed, but with critics "
                             "not fitted yet), or 'last'")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    return parser.parse_args(argv)


def default_out(first_sweep: Path) -> Path:
    """``analysis/`` inside the first sweep directory: beside the runs it describes."""
    return first_sweep / "analysis"


def main(argv: list[str] | None = None) -> int:
    """Run the analysis; exit 2 with a message when a path is missing or holds no runs,
    or when ``--out`` cannot be written."""
    args = parse_args(argv)
    if args.out is None:
        args.out = default_out(args.sweeps[0])
    problem = output_dir_problem(args.out, "--out")
    if problem:
        print(f"pgvar-analyze: error: {problem}", file=sys.stderr)
        return EXIT_NO_RUNS
    try:
        result = analyze(args.sweeps, args.out, steps=args.steps, figures=not args.no_figures)
    except LoadError as err:
        print(f"pgvar-analyze: error: {err}", file=sys.stderr)
        return EXIT_NO_RUNS
    print(result.report.summary())
    for name, path in result.files.items():
        print(f"wrote {name}: {path}")
    if result.figures:
        print(f"wrote {len(result.figures)} figure files in {result.out_dir / 'figures'}")
    print(f"table: {result.files['table.md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
