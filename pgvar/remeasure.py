"""``pgvar-measure``: score estimators at the checkpoints of runs that already ran.

    pgvar-measure multirun/2026-12-01/10-00-00 --estimators optimal_baseline "gae(lam=0.5)"
    pgvar-measure RUN_DIR --estimators gae --critic-episodes 32 320

For every run below the given folders (a folder with run.json and checkpoints/), at
every saved step, the estimators are scored exactly as ``pgvar-run`` scores its own:
same measurement episodes, same reference (same seed streams), the run's critic as it
was at that step ("train") plus any fresh critics asked for. Rows are merged into the
run's paired.csv (``source=remeasure``; a row with the same step, estimator and critic
is replaced, every other row kept), so an estimator added after a sweep needs no
retraining and is paired with the rows measured during training.

Runs still running (their job lock is held, or run.json says running) are skipped.
Cost: per checkpoint, one reference (Monte Carlo environments) plus one estimator's
gradients per row; progress is printed per checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from pgvar import joblock, runlog
from pgvar.checkpoints import Checkpoint, CheckpointError, checkpoint_steps, load_checkpoint
from pgvar.estimators import EstimatorConfig
from pgvar.measured_step import critic_choices, measure_step, paired_cells, step_references
from pgvar.paired import EstimatorSpec, parse_spec
from pgvar.preflight import count_argument
from pgvar.progress import rate_and_remaining


class RemeasureError(ValueError):
    """A request that cannot be measured (no runs, a critic-based estimator with no critic)."""


def find_measurable_runs(paths: Iterable[Path]) -> list[Path]:
    """Run folders below ``paths`` that have a run.json and at least one checkpoint."""
    found: set[Path] = set()
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise RemeasureError(f"{path} does not exist: give a run folder or a sweep folder")
        candidates = [path] if (path / runlog.RUN_FILE).exists() else \
            [p.parent for p in path.rglob(runlog.RUN_FILE)]
        found.update(p for p in candidates if checkpoint_steps(p))
    return sorted(found)


def checkpoint_specs(point: Checkpoint, specs: Sequence[EstimatorSpec]
                     ) -> tuple[list[EstimatorSpec], list[EstimatorConfig]]:
    """The specs with their configs, sharing the run's objective knobs."""
    base = EstimatorConfig(**point.run_cfg.estimator.core_kwargs())
    return list(specs), [spec.config(base) for spec in specs]


def measure_checkpoint(point: Checkpoint, specs: Sequence[EstimatorSpec],
                       critic_episodes: Sequence[int], exact_critic: bool) -> list[dict]:
    """paired.csv rows of ``specs`` at one checkpoint."""
    started = time.perf_counter()
    run_cfg, step = point.run_cfg, point.step
    critics = critic_choices(run_cfg, point.env, point.policy, point.critic, step,
                             episodes=critic_episodes, exact=exact_critic)
    needing = [s.name for s in specs if s.needs_critic]
    if needing and not critics:
        raise RemeasureError(f"{needing} need a critic and run {point.path.parent.parent} saved "
                             "none: add --critic-episodes N (a fresh critic fitted on N episodes)")
    specs, configs = checkpoint_specs(point, specs)
    references = step_references(run_cfg, point.env, point.policy, point.critic, step)
    rows = measure_step(run_cfg, point.env, point.policy, point.critic, specs, configs, step,
                        critics=critics, references=references)
    return [paired_cells(row, run_cfg, step, references, "remeasure", started) for row in rows]


def remeasure_run(run_dir: Path, specs: Sequence[EstimatorSpec], critic_episodes: Sequence[int],
                  exact_critic: bool, steps: Sequence[int] | None = None, log=print) -> int:
    """Measure ``specs`` at the run's checkpoints (all, or ``steps``) and merge the rows
    into its paired.csv; returns the rows written. A run that is running is skipped."""
    with joblock.claim_job(run_dir) as claim:
        status = (runlog.read_run_record(run_dir) or {}).get("status")
        if not claim.held or status == runlog.STATUS_RUNNING:
            log(f"skipping {run_dir}: the run is still running ({claim.holder or status})")
            return 0
        wanted = checkpoint_steps(run_dir)
        if steps is not None:
            missing = sorted(set(steps) - set(wanted))
            if missing:
                raise RemeasureError(f"{run_dir} has no checkpoint at steps {missing}; it has {wanted}")
            wanted = [s for s in wanted if s in set(steps)]
        written = 0
        for step in wanted:
            point = load_checkpoint(run_dir, step)
            rows = measure_checkpoint(point, specs, critic_episodes, exact_critic)
            runlog.merge_paired_rows(run_dir / runlog.PAIRED_FILE, rows)
            written += len(rows)
            close = getattr(point.env, "close", None)
            if callable(close):
                close()
        return written


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pgvar-measure",
        description="Score estimators at the saved checkpoints of existing runs; rows are "
                    "merged into each run's paired.csv (source=remeasure).")
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or sweep folders")
    parser.add_argument("--estimators", nargs="+", required=True,
                        help='estimator specs: a name ("gae") or name(knob=value,...) '
                             '("gae(lam=0.5)")')
    parser.add_argument("--critic-episodes", nargs="*", type=count_argument(2), default=[],
                        help="also score critic-based estimators with a fresh critic fitted on "
                             "this many episodes of the checkpoint's policy (one row per N)")
    parser.add_argument("--exact-critic", action="store_true",
                        help="tabular environments: also score them with the true V")
    parser.add_argument("--steps", nargs="*", type=count_argument(0), default=None,
                        help="only these checkpoint steps (default: all)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry ``pgvar-measure``; exit 2 on a request that cannot be measured."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        specs = [parse_spec(text) for text in args.estimators]
        runs = find_measurable_runs(args.paths)
        if not runs:
            raise RemeasureError(f"no run with checkpoints below {[str(p) for p in args.paths]}: "
                                 "runs save them at measured steps (training.measure.checkpoints"
                                 "=true, the default since paired measurement)")
        started = time.perf_counter()
        total = 0
        for i, run_dir in enumerate(runs, 1):
            total += remeasure_run(run_dir, specs, args.critic_episodes, args.exact_critic,
                                   args.steps, log=lambda m: print(m, file=sys.stderr))
            pace = rate_and_remaining(i, len(runs), time.perf_counter() - started, "runs")
            print(f"pgvar-measure: {run_dir}: done ({i}/{len(runs)} runs, {pace})", file=sys.stderr)
    except (RemeasureError, CheckpointError, ValueError) as err:
        print(f"pgvar-measure: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"pgvar-measure: {total} rows written to the paired.csv of {len(runs)} runs")


if __name__ == "__main__":
    main()
