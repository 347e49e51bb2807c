"""``pgvar-reproduce NAME [--preset smoke|quick|full] [--out DIR]``: one experiment, end to end.

An experiment is a folder ``experiments/NAME/`` with a ``README.md`` (the claim, the
command, the last results) and a ``sweep.yaml``::

    description: one line saying what the experiment measures
    analysis:
      steps: all            # pgvar-analyze --steps for this experiment
    presets:
      quick:                # one entry per preset: smoke, quick, full
        tabular:            # a named sweep: the overrides of one `pgvar-run -m` call
          - env=tabular
          - estimator=reinforce,gae
          - seed=range(8)
        cartpole: [...]

An experiment with ``kind: simulation`` runs no sweep: each preset holds parameters, and
its ``analyze.py`` defines ``simulate(out, preset, params) -> str``, which draws and
scores its own estimates (the calibration of the intervals does this: hundreds of
repeats per cell would be hundreds of runs).

Each sweep runs as ``pgvar-run -m <overrides> preset=<preset> hydra/launcher=joblib
hydra.sweep.dir=OUT/runs/<sweep>`` in a subprocess (its log in ``OUT/logs/<sweep>.log``);
while it runs, a line is printed each time one of its jobs ends. Then the analysis
(``analysis.pipeline.analyze``) of ``OUT/runs`` writes the table and figures into
``OUT``, ``OUT/reproduce.json`` records what ran and how long it took, and the last
line printed is the path of the table. Re-running into the same OUT skips the runs
that are already complete (pgvar-run's own rule).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from analysis.loader import LoadError, load_runs
from analysis.pipeline import analyze
from pgvar.preflight import count_argument, output_dir_problem
from pgvar.progress import format_duration, rate_and_remaining
from pgvar.provenance import code_record
from pgvar.runlog import FINAL_STATUSES, RUN_FILE, read_run_record
from pgvar.sweep import expand_sweep

PRESETS = ("smoke", "quick", "full")
SPEC_FILE = "sweep.yaml"
POLL_S = 0.5


# ----------------------------------------------------------------------------- specs


@dataclass
class ExperimentSpec:
    """An experiment's sweeps for one preset, and how to analyse them."""

    name: str
    folder: Path
    preset: str
    sweeps: dict[str, list[str]]
    steps: str = "all"
    description: str = ""
    simulation: dict[str, Any] | None = None  # kind: simulation -> the preset's parameters


def experiments_dir() -> Path:
    """``$PGVAR_EXPERIMENTS_DIR``, else ``experiments/`` next to the package (repo root)."""
    env_dir = os.environ.get("PGVAR_EXPERIMENTS_DIR")
    if env_dir:
        return Path(env_dir)
    return Path(__file__).resolve().parent.parent / "experiments"


def available_experiments(root: Path) -> list[str]:
    """The folder names under ``root`` that hold a sweep.yaml."""
    return sorted(p.parent.name for p in root.glob(f"*/{SPEC_FILE}")) if root.is_dir() else []


def load_spec(name: str, preset: str, root: Path | None = None) -> ExperimentSpec:
    """Read ``root/name/sweep.yaml`` and pick the preset; clear errors for bad names."""
    root = root or experiments_dir()
    path = root / name / SPEC_FILE
    if not path.exists():
        known = ", ".join(available_experiments(root)) or "none"
        raise SystemExit(f"pgvar-reproduce: no experiment {name!r} (no {path}); available: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    presets = raw.get("presets") or {}
    if preset not in presets:
        raise SystemExit(f"pgvar-reproduce: experiment {name!r} has no preset {preset!r}; "
                         f"it has: {', '.join(presets) or 'none'}")
    if raw.get("kind") == "simulation":
        return ExperimentSpec(name=name, folder=path.parent, preset=preset, sweeps={},
                              description=str(raw.get("description", "")),
                              simulation=dict(presets[preset] or {}))
    sweeps = {str(k): [str(o) for o in v] for k, v in (presets[preset] or {}).items()}
    if not sweeps:
        raise SystemExit(f"pgvar-reproduce: preset {preset!r} of {name!r} lists no sweep")
    analysis = raw.get("analysis") or {}
    return ExperimentSpec(name=name, folder=path.parent, preset=preset, sweeps=sweeps,
                          steps=str(analysis.get("steps", "all")),
                          description=str(raw.get("description", "")))


def count_jobs(overrides: list[str]) -> int | None:
    """How many jobs ``pgvar-run -m`` makes of these overrides (Hydra's own expansion);
    None when they do not parse here (pgvar-run then reports the error itself)."""
    try:
        return len(expand_sweep(overrides))
    except Exception:  # noqa: BLE001 - only a progress denominator
        return None


def sweep_command(overrides: list[str], preset: str, sweep_dir: Path, n_jobs: int) -> list[str]:
    """The ``pgvar-run -m`` command line of one sweep."""
    return [*_pgvar_run(), "-m", *overrides, f"preset={preset}", "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={n_jobs}", f"hydra.sweep.dir={sweep_dir.resolve()}"]


def _pgvar_run() -> list[str]:
    """``pgvar-run`` next to this Python when installed, else ``python -m pgvar``."""
    script = Path(sys.executable).with_name("pgvar-run")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pgvar"]


# ----------------------------------------------------------------------------- running


@dataclass
class SweepOutcome:
    """How one sweep went: exit status, job counts by final status, seconds."""

    name: str
    returncode: int
    seconds: float
    statuses: dict[str, int] = field(default_factory=dict)
    log: str = ""
    already_finished: int = 0


def finished_jobs(sweep_dir: Path) -> dict[Path, str]:
    """Job directories under ``sweep_dir`` whose run.json holds a final status."""
    done = {}
    for run_file in sweep_dir.rglob(RUN_FILE):
        try:
            status = json.loads(run_file.read_text()).get("status")
        except (ValueError, OSError):
            continue  # being written (pgvar-run writes atomically, so rarely seen)
        if status in FINAL_STATUSES:
            done[run_file.parent] = status
    return done


def run_sweep(name: str, overrides: list[str], spec: ExperimentSpec, out: Path, n_jobs: int,
              offset: int, total: int | None) -> SweepOutcome:
    """Run one sweep in a subprocess, printing a line whenever one of its jobs ends."""
    sweep_dir = out / "runs" / name
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    cmd = sweep_command(overrides, spec.preset, sweep_dir, n_jobs)
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    seen = finished_jobs(sweep_dir)
    already = len(seen)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while True:
            rc = proc.poll()
            seen = _report_new(sweep_dir, seen, name, offset, total, started, already)
            if rc is not None:
                break
            time.sleep(POLL_S)
    seen = _report_new(sweep_dir, seen, name, offset, total, started, already)
    statuses: dict[str, int] = {}
    for status in seen.values():
        statuses[status] = statuses.get(status, 0) + 1
    if already:
        print(f"[{name}] {already} job(s) were already finished in {sweep_dir}", flush=True)
    return SweepOutcome(name, rc, time.perf_counter() - started, statuses, str(log_path), already)


def _report_new(sweep_dir: Path, seen: dict[Path, str], name: str, offset: int,
                total: int | None, started: float, already: int = 0) -> dict[Path, str]:
    """Print one progress line per job that ended since the last look: its place, the
    sweep's rate so far (jobs finished before this invocation not counted) and the time
    left for the whole reproduction at that rate."""
    now = finished_jobs(sweep_dir)
    for job in sorted(set(now) - set(seen), key=str):
        done = offset + len(seen) + 1
        seen = {**seen, job: now[job]}
        of = f"/{total}" if total else ""
        elapsed = time.perf_counter() - started
        remaining = None if not total else total - done
        pace = rate_and_remaining(len(seen) - already, None if remaining is None
                                  else len(seen) - already + remaining, elapsed, "jobs")
        print(f"  [{done}{of}] {name}/{job.name}: {now[job]} "
              f"({elapsed:.0f}s into the sweep; {pace})", flush=True)
    return now


def tail(path: str, n: int = 30) -> str:
    """The last ``n`` lines of a log file."""
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- main


DESCRIPTION = ("Run a named experiment from experiments/NAME (its sweeps through pgvar-run "
               "with the joblib launcher), then its analysis; prints the path of the table "
               "it wrote.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``pgvar-reproduce`` (``--help`` lists it)."""
    parser = argparse.ArgumentParser(prog="pgvar-reproduce", description=DESCRIPTION)
    parser.add_argument("name", help="experiment folder under experiments/, e.g. table")
    parser.add_argument("--preset", choices=PRESETS, default="quick",
                        help="smoke: seconds, for tests; quick: minutes on 2 cores; "
                             "full: the published result (default: quick)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: results/NAME-PRESET)")
    parser.add_argument("--jobs", type=count_argument(1), default=os.cpu_count() or 1,
                        help="parallel jobs for the joblib launcher (default: all cores)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the table, figures (PNG) and run record into "
                             "experiments/NAME/results/PRESET/ (what the README shows)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every sweep of the experiment's preset, then analyse; see the module doc."""
    code_record()  # the code as launched: reproduce.json must not name files edited since
    args = parse_args(argv)
    try:
        spec = load_spec(args.name, args.preset)
    except SystemExit as err:  # an unknown experiment or preset: a user error, one line
        print(err, file=sys.stderr)
        return 2
    out = args.out or Path("results") / f"{spec.name}-{spec.preset}"
    problem = output_dir_problem(out, "--out")
    if problem:
        print(f"pgvar-reproduce: {problem}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if spec.simulation is not None:
        return run_simulation(spec, out, args, argv)
    totals = {name: count_jobs(overrides) for name, overrides in spec.sweeps.items()}
    total = sum(totals.values()) if None not in totals.values() else None
    print(f"pgvar-reproduce {spec.name} --preset {spec.preset}: {len(spec.sweeps)} sweep(s), "
          f"{total if total is not None else '?'} run(s), {args.jobs} parallel job(s), into {out}",
          flush=True)
    started = time.perf_counter()
    outcomes, offset = [], 0
    for name, overrides in spec.sweeps.items():
        outcome = run_sweep(name, overrides, spec, out, args.jobs, offset, total)
        outcomes.append(outcome)
        offset += sum(outcome.statuses.values())
        print(f"[{name}] done in {outcome.seconds:.0f}s: {outcome.statuses or 'no run finished'}",
              flush=True)
        if outcome.returncode == 2:
            print(f"pgvar-reproduce: pgvar-run refused sweep {name!r}:\n{tail(outcome.log)}",
                  file=sys.stderr)
            return 2
        if outcome.returncode != 0:
            print(f"pgvar-reproduce: sweep {name!r} exited {outcome.returncode}; the analysis "
                  f"reports which runs failed. Log tail ({outcome.log}):\n{tail(outcome.log, 15)}",
                  file=sys.stderr)
    sweeps_s = time.perf_counter() - started
    code, runs_code = _analyse(spec, out, args.no_figures)
    if code == 0:
        code = run_experiment_analysis(spec, out)
    _write_record(spec, out, outcomes, sweeps_s, time.perf_counter() - started, argv, runs_code)
    if code:
        return code
    if args.publish:
        print(f"published into {publish(out, spec)}")
    failed = any(o.returncode != 0 for o in outcomes)
    print(f"total {time.perf_counter() - started:.0f}s (sweeps {sweeps_s:.0f}s)")
    if (out / "result.md").exists():
        print(f"experiment result: {out / 'result.md'}")
    print(out / "table.md")
    return 1 if failed else 0


def _analyse(spec: ExperimentSpec, out: Path, no_figures: bool) -> tuple[int, dict[str, Any] | None]:
    """Run the analysis of ``out/runs`` into ``out``: (0, which code made the runs it read,
    ``LoadReport.code_summary``), or (2, None) when there is nothing to analyse."""
    print(f"analysing {out / 'runs'} (table steps: {spec.steps})", flush=True)
    try:
        result = analyze([out / "runs"], out, steps=spec.steps, figures=not no_figures)
    except LoadError as err:
        print(f"pgvar-reproduce: error: {err}", file=sys.stderr)
        return 2, None
    print(result.report.summary())
    print(f"wrote {len(result.files)} data files and {len(result.figures)} figure files into {out}")
    return 0, result.report.code_summary()


EXPERIMENT_ANALYSIS = "analyze.py"


def run_simulation(spec: ExperimentSpec, out: Path, args: argparse.Namespace,
                   argv: list[str] | None) -> int:
    """A ``kind: simulation`` experiment: its ``simulate(out, preset, params)`` does all
    the work (with its own progress lines); then the record and, if asked, publishing."""
    module = load_experiment_module(spec.folder)
    if not callable(getattr(module, "simulate", None)):
        raise SystemExit(f"pgvar-reproduce: {spec.folder / EXPERIMENT_ANALYSIS} defines no "
                         "simulate(out, preset, params), which kind: simulation needs")
    print(f"pgvar-reproduce {spec.name} --preset {spec.preset}: simulation into {out}", flush=True)
    started = time.perf_counter()
    summary = module.simulate(out, spec.preset, spec.simulation)
    for line in str(summary).splitlines():
        if line.startswith("Verdict"):
            print(line, flush=True)
    _write_record(spec, out, [], 0.0, time.perf_counter() - started, argv)
    if args.publish:
        print(f"published into {publish(out, spec)}")
    print(f"total {time.perf_counter() - started:.0f}s")
    print(out / "result.md")
    return 0


@contextlib.contextmanager
def forked_map(fn: Callable[[Any], Any], items: list, workers: int) -> Iterator[Iterator[Any]]:
    """``fn`` over ``items`` for a simulation experiment: in ``workers`` forked processes,
    results in the order they finish (what ``fn`` reads from module globals set before the
    call reaches the workers through fork), or here, in order, with one worker."""
    if workers <= 1:
        yield map(fn, items)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield pool.imap_unordered(fn, items)


def ensure_trained_run(name: str, run_dir: Path, overrides: list[str] | None) -> None:
    """Train one run into ``run_dir`` (``pgvar-run`` with ``overrides``) for a simulation
    experiment that measures its checkpoints, unless ``run_dir`` holds a complete run (a
    re-run reuses it)."""
    if (read_run_record(run_dir) or {}).get("status") == "complete":
        return
    if not overrides:
        raise SystemExit(f"{name}: {run_dir} holds no complete training run and the preset "
                         "gives no `train` overrides to make one")
    cmd = [*_pgvar_run(), *[str(o) for o in overrides], f"hydra.run.dir={run_dir}"]
    print(f"{name}: training:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def run_checkpoints(name: str, params: dict, out: Path,
                    need_critic: bool = False) -> list[tuple[str, Any]]:
    """(label, ``pgvar.checkpoints.Checkpoint``) for a simulation that measures the
    checkpoints of one training run. Preset keys: ``checkpoints`` (label -> step);
    ``run_dir`` (relative to ``out``) and ``train`` (``pgvar-run`` overrides that make the
    run, skipped when a complete one is there); without ``run_dir`` every step must be 0
    and the initial state of ``initial_config`` is used, as ``pgvar-run`` builds it.
    ``need_critic``: refuse a run without a critic (the error says how to get one)."""
    from pgvar.checkpoints import initial_checkpoint, load_checkpoint

    steps = {str(label): int(step) for label, step in params["checkpoints"].items()}
    if "run_dir" not in params:
        if any(steps.values()):
            raise SystemExit(f"{name}: checkpoints after step 0 need a run_dir (and train "
                             "overrides) in the preset")
        points = [(label, initial_checkpoint(params["initial_config"])) for label in steps]
    else:
        run_dir = Path(params["run_dir"])
        run_dir = run_dir if run_dir.is_absolute() else out / run_dir
        ensure_trained_run(name, run_dir, params.get("train"))
        points = [(label, load_checkpoint(run_dir, step)) for label, step in steps.items()]
    if need_critic and any(point.critic is None for _, point in points):
        raise SystemExit(f"{name}: the run has no critic; train it with a critic-based "
                         "estimator (estimator=gae in the preset's train overrides)")
    return points


def per_checkpoint(params: dict, key: str, label: str) -> Any:
    """A preset value that may differ per checkpoint: ``params[key]`` itself, or its entry
    for ``label`` when it is a mapping label -> value."""
    value = params[key]
    return value[label] if isinstance(value, dict) else value


MeasureCheckpoint = Callable[[int, str, Any], tuple[list[dict], dict]]
_CHECKPOINT_JOB: tuple = ()  # (checkpoints, measure, threads): what forked workers read


def _measure_checkpoint(i: int) -> tuple[int, tuple[list[dict], dict]]:
    import torch

    checkpoints, measure, threads = _CHECKPOINT_JOB
    torch.set_num_threads(threads)
    label, point = checkpoints[i]
    return i, measure(i, label, point)


def measure_checkpoints(name: str, params: dict, out: Path, measure: MeasureCheckpoint,
                        write: Callable[[list[dict], list[dict], int], str],
                        need_critic: bool = False) -> str:
    """A simulation over the checkpoints of one run (``run_checkpoints``): ``measure(i,
    label, checkpoint)`` gives each one's records and its summary row (with ``step`` and
    ``seconds``), in ``params['workers']`` forked processes of ``params['threads']``
    threads (default 1 and 1); ``params['only']`` names a subset, measured as in the whole
    preset (index ``i`` unchanged), to split a long preset across invocations. ``write(records,
    rows, n_checkpoints)`` runs after every checkpoint (records and rows in the checkpoints'
    order, whichever worker finished first), so a long run's finished part is never lost;
    returns its last text. ``need_critic``: as in ``run_checkpoints``."""
    import torch

    global _CHECKPOINT_JOB
    out.mkdir(parents=True, exist_ok=True)
    threads = int(params.get("threads", 1))
    torch.set_num_threads(threads)
    checkpoints = run_checkpoints(name, params, out, need_critic)
    _CHECKPOINT_JOB = (checkpoints, measure, threads)
    todo = [i for i, (label, _) in enumerate(checkpoints) if label in params.get("only", [label])]
    workers = max(1, min(int(params.get("workers", 1)), len(todo)))
    done: dict[int, tuple[list[dict], dict]] = {}
    text = ""
    with forked_map(_measure_checkpoint, todo, workers) as results:
        for i, (recs, row) in results:
            done[i] = recs, row
            print(f"{name}: {len(done)} of {len(todo)} checkpoints done (step {row['step']}, "
                  f"{format_duration(row['seconds'])})", flush=True)
            ordered = [done[j] for j in sorted(done)]  # the checkpoints' order, whichever finished first
            text = write([r for recs, _ in ordered for r in recs], [row for _, row in ordered], len(todo))
    return text


def load_experiment_module(folder: Path):
    """``folder/analyze.py`` imported by file path (``experiments/`` is not a package),
    registered in ``sys.modules`` first: dataclasses and pickling look it up by name."""
    import importlib.util

    path = folder / EXPERIMENT_ANALYSIS
    module_spec = importlib.util.spec_from_file_location(f"pgvar_experiment_{folder.name}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


def load_experiment_analysis(folder: Path):
    """The ``analyze(frame, out, preset) -> str`` function of ``folder/analyze.py``, or None.

    Experiments whose claim needs more than the comparison table (a fit, a verdict) keep
    that analysis beside their sweep.
    """
    path = folder / EXPERIMENT_ANALYSIS
    if not path.exists():
        return None
    module = load_experiment_module(folder)
    if not callable(getattr(module, "analyze", None)):
        raise SystemExit(f"pgvar-reproduce: {path} defines no analyze(frame, out, preset)")
    return module.analyze


def run_experiment_analysis(spec: ExperimentSpec, out: Path) -> int:
    """Run the experiment's own analysis on the complete runs; it writes result.md."""
    analyze_fn = load_experiment_analysis(spec.folder)
    if analyze_fn is None:
        return 0
    frame, _ = load_runs([out / "runs"])
    print(f"experiment analysis: {spec.folder / EXPERIMENT_ANALYSIS}", flush=True)
    summary = analyze_fn(frame, out, spec.preset)
    verdicts = [line for line in str(summary).splitlines() if "Verdict" in line]
    for line in verdicts:
        print(line, flush=True)
    return 0


PUBLISHED_FILES = ("table.md", "table_full.md", "table.csv", "table.tex", "table_critic.md",
                   "variance_separations.csv", "returns_iqm.csv", "reproduce.json",
                   "skipped_runs.csv", "result.md", "result.csv")


def publish(out: Path, spec: ExperimentSpec) -> Path:
    """Copy the small result files and the PNG figures into the experiment's folder,
    ``experiments/NAME/results/PRESET/``, replacing the previous ones."""
    target = spec.folder / "results" / spec.preset
    if target.exists():
        shutil.rmtree(target)
    (target / "figures").mkdir(parents=True)
    for name in PUBLISHED_FILES:
        if (out / name).exists():
            shutil.copy2(out / name, target / name)
    for png in sorted((out / "figures").glob(published_figures_pattern(spec))):
        shutil.copy2(png, target / "figures" / png.name)
    return target


def published_figures_pattern(spec: ExperimentSpec) -> str:
    """An experiment with its own analysis publishes its own figures (``NAME_*.png``);
    the generic table figures say nothing about runs of one measurement each."""
    if (spec.folder / EXPERIMENT_ANALYSIS).exists():
        return f"{spec.name}_*.png"
    return "*.png"


def _write_record(spec: ExperimentSpec, out: Path, outcomes: list[SweepOutcome],
                  sweeps_s: float, total_s: float, argv: list[str] | None,
                  runs_code: dict[str, Any] | None = None) -> None:
    """``OUT/reproduce.json``: what ran, with which code (this call's, and the code that
    made the runs the analysis read: ``LoadReport.code_summary``), its outcome and timings,
    on what machine."""
    record: dict[str, Any] = {
        "experiment": spec.name, "preset": spec.preset, "steps": spec.steps,
        "argv": ["pgvar-reproduce", *(argv if argv is not None else sys.argv[1:])],
        "code": code_record(),
        **({"runs_code": runs_code} if runs_code is not None else {}),
        "sweeps": {o.name: {"overrides": spec.sweeps[o.name], "returncode": o.returncode,
                            "seconds": round(o.seconds, 1), "statuses": o.statuses,
                            "already_finished_before_this_call": o.already_finished}
                   for o in outcomes},
        "sweeps_s": round(sweeps_s, 1), "total_s": round(total_s, 1),
        "machine": {"cpus": os.cpu_count(),
                    "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                    "platform": platform.platform(),
                    "python": platform.python_version()},
    }
    (out / "reproduce.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
