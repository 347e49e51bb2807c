"""What a run writes into its Hydra job directory, and how a re-run treats it.

Two files (column meanings: ``COLUMN_DOCS``; the README copies them), and with
``logger=tensorboard`` a third:

- ``metrics.csv``: one row per training iteration, written and flushed as it goes, so
  a run killed mid-way leaves every finished iteration on disk.
- ``events.out.tfevents.*`` (``logger=tensorboard``): the same scalars as metrics.csv,
  one tag per column, at x = ``step``; the job directory is one TensorBoard run, so
  ``tensorboard --logdir SWEEP_DIR`` shows a sweep run by run.
- ``run.json``: the run's record. Written atomically (temporary file, fsync, rename)
  twice: with ``status: "running"`` before the first iteration, and with the final
  status (``complete``, ``failed`` or ``diverged``) at the end. A run killed mid-way
  therefore leaves ``status: "running"`` (or, killed before its first write, no
  run.json at all): only ``status == "complete"`` marks a finished run, and readers
  must ignore every other run directory. It also records which code made the run
  (``code``: git commit, dirty flag and source digests, ``pgvar.provenance``).

Re-running a sweep into the same directory: a job whose run.json says ``complete`` for
the same resolved config is skipped; any other job is redone from scratch, its old
metrics.csv and run.json deleted first (``prepare_job_dir``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pgvar.provenance import code_record, describe, same_pgvar_code

METRICS_FILE = "metrics.csv"
PAIRED_FILE = "paired.csv"  # every estimator measured at a measured step (pgvar.paired)
CHECKPOINT_DIR = "checkpoints"  # the policy (and critic) at each measured step
RUN_FILE = "run.json"
EVENTS_GLOB = "events.out.tfevents.*"  # TensorBoard's event files (logger=tensorboard)

LOGGERS = ("csv", "tensorboard")  # csv: metrics.csv only; tensorboard: metrics.csv + events
TENSORBOARD_INSTALL = "pip install -e '.[tensorboard]'"

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"
STATUS_DIVERGED = "diverged"
FINAL_STATUSES = (STATUS_COMPLETE, STATUS_FAILED, STATUS_DIVERGED)

# Config keys that do not change a run's results, so do not stop a complete run being skipped.
CONFIG_KEYS_IGNORED_FOR_SKIP = ("rerun_complete",)

LEARNING_CURVE_COLUMNS = ("step", "env_steps", "episodes", "return_mean", "return_std", "wall_s")
MEASURED_COLUMNS = ("grad_variance", "grad_bias", "grad_bias_lo", "grad_bias_hi", "grad_mse",
                    "cos_ref", "cos_pairwise", "snr", "ref_norm", "ref_se")
EXTRA_COLUMNS = ("return_undiscounted_mean", "episode_length_mean", "grad_norm", "critic_loss",
                 "grad_rel_variance", "grad_rel_bias", "grad_bias_sq", "grad_bias_sq_se",
                 "bias_distinguishable", "n_estimates", "ref_exact", "ref_episodes",
                 "zero_grad_fraction", "grad_norm_mean", "grad_variance_lo", "grad_variance_hi",
                 "tail_index", "ci_reliable", "grad_bias_sq_lo", "grad_bias_sq_hi",
                 "spread_z_mean", "spread_z_sq_mean", "bias_v0", "bias_slope", "bias_skew0",
                 "proj_z_mean", "proj_z_sq_mean")
COLUMNS = LEARNING_CURVE_COLUMNS + MEASURED_COLUMNS + EXTRA_COLUMNS
# paired.csv: one row per (measured step, estimator spec, critic); the statistics have
# metrics.csv's names, so a reader treats both files' measured rows alike
PAIRED_KEY = ("step", "estimator", "critic")
PAIRED_COLUMNS = (
    *PAIRED_KEY, "estimator_name", "critic_episodes", "critic_error", "critic_error_kind",
    "trained_with", "is_training",
    *MEASURED_COLUMNS, *(c for c in EXTRA_COLUMNS if c not in (
        "return_undiscounted_mean", "episode_length_mean", "grad_norm", "critic_loss",
        "ref_exact", "ref_episodes")),
    "spread_z_cross", "ref_exact", "ref_episodes", "ref_method", "ref_rel_se", "ref_circular", "ref_disagreement",
    "source", "code", "wall_s")

COLUMN_DOCS: dict[str, str] = {
    "step": "training iteration i = 0..N-1; the row describes the policy theta_i before its update",
    "env_steps": "training environment steps so far, this iteration's batch included "
                 "(measurement and reference episodes not counted)",
    "episodes": "training episodes so far, this iteration's batch included (i+1)*B",
    "return_mean": "mean DISCOUNTED return sum_t gamma^t r_t (t < T) of this iteration's B "
                   "training episodes: a sample of J(theta_i)",
    "return_std": "sample standard deviation (ddof=1; 0 when B=1) of those B discounted returns",
    "wall_s": "seconds since the run started, at the end of this iteration: the only "
              "column that differs between two runs of the same config and seed",
    "grad_variance": "measured rows: tr Cov of the M batch estimates, 1/(M-1) sum ||g_m - g_bar||^2",
    "grad_bias": "measured rows: de-noised bias ||E g - g_ref||, sqrt(max(0, grad_bias_sq))",
    "grad_bias_lo": "measured rows: lower end of the 95% confidence interval of grad_bias, "
                    "sqrt(max(grad_bias_sq_lo, 0))",
    "grad_bias_hi": "measured rows: upper end of the 95% confidence interval of grad_bias, "
                    "sqrt(max(grad_bias_sq_hi, 0))",
    "grad_mse": "measured rows: mean ||g_m - g_ref||^2 over the M estimates",
    "cos_ref": "measured rows: mean cosine between each g_m and g_ref",
    "cos_pairwise": "measured rows: mean cosine between pairs of estimates (Ilyas et al. 2020)",
    "snr": "measured rows: ||g_bar||^2 / grad_variance",
    "ref_norm": "measured rows: ||g_ref||, the reference gradient at theta_i",
    "ref_se": "measured rows: standard error of g_ref (root of the summed per-coordinate "
              "variances; 0 when exact)",
    "return_undiscounted_mean": "extra: mean undiscounted return sum_t r_t of the B training episodes",
    "episode_length_mean": "extra: mean length (steps) of the B training episodes",
    "grad_norm": "extra: norm of the training gradient estimate used for this iteration's step",
    "critic_loss": "extra: final regression loss of the critic fitted on this batch (empty: no critic)",
    "grad_rel_variance": "extra, measured rows: grad_variance / ref_norm^2",
    "grad_rel_bias": "extra, measured rows: grad_bias / ref_norm",
    "grad_bias_sq": "extra, measured rows: ||g_bar - g_ref||^2 - trCov/M - SE_ref^2 (may be < 0)",
    "grad_bias_sq_se": "extra, measured rows: standard error of grad_bias_sq",
    "bias_distinguishable": "extra, measured rows: True when the bias is distinguishable from 0 at 95%",
    "n_estimates": "extra, measured rows: M, the number of batch estimates measured",
    "ref_exact": "extra, measured rows: True when g_ref is exact, False when Monte Carlo",
    "ref_episodes": "extra, measured rows: episodes the Monte Carlo reference used (0 when exact)",
    "zero_grad_fraction": "extra, measured rows: fraction of the M batch estimates that are exactly zero (no signal)",
    "grad_norm_mean": "extra, measured rows: mean norm of one batch estimate, mean_m ||g_m||",
    "grad_variance_lo": "extra, measured rows: lower end of the 95% interval of grad_variance "
                        "from this step's estimates alone (Bonett, kurtosis tail_index); the "
                        "analysis adds grad_variance_run_lo/_hi, with the kurtosis of the run's "
                        "whole series, which hold their level where this one under-covers",
    "grad_variance_hi": "extra, measured rows: upper end of the 95% interval of grad_variance",
    "tail_index": "extra, measured rows: M sum ||r_m||^4 / (sum ||r_m||^2)^2, r_m = g_m - g_bar: "
                  "1 when the spread is shared evenly, large when a few estimates hold it (heavy tails)",
    "spread_z_mean": "extra, measured rows: mean of z_m = ||r_m||^2 / (mean of the other "
                     "estimates' ||r||^2): with spread_z_sq_mean, what the analysis pools into the "
                     "run's kurtosis (pgvar.stats.pooled_spread_kurtosis)",
    "spread_z_sq_mean": "extra, measured rows: mean of z_m^2 (see spread_z_mean)",
    "bias_v0": "extra, measured rows: the squared bias's score model, Var(U | theta) = bias_v0 + "
               "bias_slope * theta with skewness bias_skew0 at theta = 0 (nan when M < 4): "
               "what the analysis needs to rebuild the interval with the run's kurtosis",
    "bias_slope": "extra, measured rows: see bias_v0",
    "bias_skew0": "extra, measured rows: see bias_v0",
    "proj_z_mean": "extra, measured rows: spread_z_mean of the estimates projected on the "
                   "estimated bias direction g_bar - g_ref",
    "proj_z_sq_mean": "extra, measured rows: spread_z_sq_mean of those projections",
    "grad_bias_sq_lo": "extra, measured rows: lower end of the 95% interval of the squared bias "
                       "(score interval; may be < 0); bias_distinguishable is grad_bias_sq_lo > 0",
    "grad_bias_sq_hi": "extra, measured rows: upper end of the 95% interval of the squared bias",
    "ci_reliable": "extra, measured rows: False when M < 16 or tail_index > 3, where the "
                   "calibration experiment measured the per-measurement intervals to under-cover; "
                   "a step that missed the tail passes, so the analysis adds ci_reliable_run "
                   "(M >= 16 and (kurtosis of the series' measured steps - 1) / M <= 0.1)",
}

PAIRED_COLUMN_DOCS: dict[str, str] = {
    "estimator": "the measured estimator's label: its name, and the knobs that differ from "
                 "the defaults, e.g. gae(lam=0.5)",
    "estimator_name": "the measured estimator's registry name",
    "critic": "empty (the estimator needs no critic), train (the run's critic, fitted on "
              "earlier training batches), fit:N (fresh, fitted on N episodes of this policy) "
              "or exact (the true V, tabular)",
    "critic_episodes": "N of fit:N (0 otherwise)",
    "critic_error": "the critic's RMS error on the measurement episodes (held out from its fit)",
    "critic_error_kind": "exact_v_rmse (against the true V) or heldout_rmse (against the "
                         "Monte Carlo returns G_t, which holds their own noise too)",
    "trained_with": "the run's training estimator (whose checkpoints these are)",
    "is_training": "True on the training estimator's row with the run's critic (metrics.csv's row)",
    "spread_z_cross": "mean_m z_m z'_m, z as in spread_z_mean and z' the same for the step's "
                      "first row (the training estimator's) on the same batches: the analysis "
                      "pools it into the interval of var_ratio_training",
    "ref_method": "exact, or monte_carlo:<estimator> (the reference this row is scored against)",
    "ref_rel_se": "the reference's standard error over its norm (0 when exact)",
    "ref_circular": "True when the only reference available averages this same estimator: "
                    "the bias test then cannot fail and is not a finding",
    "ref_disagreement": "||g_ref - g_alt||^2 / (se2_ref + se2_alt) of the step's two Monte "
                        "Carlo references, when an alternate was made: about 1 when they agree",
    "source": "run (measured while training) or remeasure (pgvar-measure, from a checkpoint)",
    "code": "the pgvar source digest of the code that measured the row (run.json's "
            "code.digest.pgvar for rows measured while training; empty in files written "
            "before rows carried it): pgvar-measure may add rows with newer code",
}


# ------------------------------------------------------------------------ metrics.csv


def measured_cells(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The cells of a measured row that the statistics fill (``pgvar.stats.GradStats``'s
    ``as_dict()``): every measured and extra column it has a value for."""
    return {key: stats[key] for key in MEASURED_COLUMNS + EXTRA_COLUMNS if key in stats}


def format_cell(value: Any) -> str:
    """One CSV cell: empty for None, shortest round-trip text for floats, ints as ints."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # nan, inf, -inf
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        return format_cell(value.item())
    return str(value)


class MetricsWriter:
    """Appends rows to ``metrics.csv`` with a fixed header, flushing after every row."""

    def __init__(self, path: Path, columns: tuple[str, ...] = COLUMNS):
        self.path = Path(path)
        self.columns = columns
        self._file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(self.columns)
        self._file.flush()

    def write(self, row: Mapping[str, Any]) -> None:
        """Write one row; missing columns are empty, unknown keys are an error."""
        unknown = sorted(set(row) - set(self.columns))
        if unknown:
            raise KeyError(f"metrics row has unknown columns {unknown}; known: {list(self.columns)}")
        self._writer.writerow([format_cell(row.get(c)) for c in self.columns])
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensorboard_installed() -> bool:
    """Whether ``torch.utils.tensorboard`` can write here (it needs the tensorboard package)."""
    return importlib.util.find_spec("tensorboard") is not None


def scalar_of(value: Any) -> float | None:
    """A metrics cell as a TensorBoard scalar: numbers and booleans (0/1) as floats,
    None (an empty cell) as None."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


class TensorBoardWriter:
    """Writes each metrics row as scalars of an event file in ``log_dir``: one tag per
    column of ``columns`` (``step`` is the x axis), empty cells left out; flushed after
    every row, as metrics.csv is."""

    def __init__(self, log_dir: Path, columns: tuple[str, ...] = COLUMNS):
        from torch.utils.tensorboard import SummaryWriter

        self.columns = tuple(c for c in columns if c != "step")
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        for column in self.columns:
            value = scalar_of(row.get(column))
            if value is not None:
                self._writer.add_scalar(column, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class RunLog:
    """Where a run's rows go: metrics.csv always, TensorBoard events with
    ``logger="tensorboard"``. ``write`` checks the row against the columns first."""

    def __init__(self, job_dir: Path, logger: str = "csv"):
        if logger not in LOGGERS:
            raise ValueError(f"logger must be one of {list(LOGGERS)}, got {logger!r}")
        job_dir = Path(job_dir)
        self.writers: list[MetricsWriter | TensorBoardWriter] = [
            MetricsWriter(job_dir / METRICS_FILE)]
        if logger == "tensorboard":
            self.writers.append(TensorBoardWriter(job_dir))

    def write(self, row: Mapping[str, Any]) -> None:
        for writer in self.writers:  # metrics.csv first: it refuses unknown columns
            writer.write(row)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def __enter__(self) -> RunLog:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_paired_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a paired.csv as text cells (none when the file does not exist)."""
    if not Path(path).exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def merge_paired_rows(path: Path, new_rows: list[Mapping[str, Any]]) -> int:
    """Add ``new_rows`` to the paired.csv at ``path``, replacing rows with the same
    (step, estimator, critic); written atomically, so a reader sees the old file or the
    new one and an interrupted call loses nothing. Returns the number of rows now there."""
    path = Path(path)
    new = [{c: format_cell(row.get(c)) for c in PAIRED_COLUMNS} for row in new_rows]
    unknown = sorted({k for row in new_rows for k in row} - set(PAIRED_COLUMNS))
    if unknown:
        raise KeyError(f"paired row has unknown columns {unknown}; known: {list(PAIRED_COLUMNS)}")
    replaced = {tuple(row[k] for k in PAIRED_KEY) for row in new}
    kept = [row for row in read_paired_rows(path)
            if tuple(row.get(k, "") for k in PAIRED_KEY) not in replaced]
    rows = sorted(kept + new, key=lambda r: (int(float(r["step"] or 0)), r["estimator"], r["critic"]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PAIRED_COLUMNS, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(rows)


# --------------------------------------------------------------------------- run.json


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON so a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_record(job_dir: Path) -> dict[str, Any] | None:
    """The job's run.json as a dict, or None if it is missing or unreadable."""
    try:
        with open(Path(job_dir) / RUN_FILE, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of the software that produced the numbers."""
    return {
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "gymnasium": package_version("gymnasium"),
        "pgvar": package_version("pgvar"),
        "numpy": package_version("numpy"),
        "hydra-core": package_version("hydra-core"),
    }


@dataclass
class RunRecord:
    """The content of run.json (see the module docstring for the meaning of ``status``)."""

    status: str
    config: dict[str, Any]
    seed: int
    started_at: str
    elapsed_s: float = 0.0
    error: str | None = None
    traceback: str | None = None
    steps_completed: int = 0
    diverged_at_step: int | None = None
    device: str | None = None
    job_dir: str | None = None
    overrides: list[str] | None = None
    choices: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error": self.error,
            "seed": self.seed,
            "elapsed_s": self.elapsed_s,
            "started_at": self.started_at,
            "steps_completed": self.steps_completed,
            "diverged_at_step": self.diverged_at_step,
            "device": self.device,
            "job_dir": self.job_dir,
            "overrides": self.overrides,
            "choices": self.choices,
            "versions": versions(),
            "code": code_record(),
            "host": platform.node(),
            "argv": list(sys.argv),
            "config": self.config,
            "traceback": self.traceback,
        }

    def write(self, job_dir: Path) -> None:
        write_json_atomic(Path(job_dir) / RUN_FILE, self.as_dict())


# ---------------------------------------------------------------------- skip / redo


def comparable_config(config: Mapping[str, Any]) -> Any:
    """The config as plain JSON data, without keys that do not affect results."""
    plain = json.loads(json.dumps(dict(config), default=str))
    for key in CONFIG_KEYS_IGNORED_FOR_SKIP:
        plain.pop(key, None)
    return plain


def is_complete(record: Mapping[str, Any] | None, config: Mapping[str, Any]) -> bool:
    """True when ``record`` is a complete run of exactly ``config``."""
    if not record or record.get("status") != STATUS_COMPLETE:
        return False
    stored = record.get("config")
    return isinstance(stored, dict) and comparable_config(stored) == comparable_config(config)


def clear_run_outputs(job_dir: Path) -> None:
    """Delete what an earlier, unfinished attempt left: metrics.csv, paired.csv, run.json,
    checkpoints, TensorBoard event files, temp files."""
    job_dir = Path(job_dir)
    for name in (METRICS_FILE, PAIRED_FILE, RUN_FILE):
        (job_dir / name).unlink(missing_ok=True)
    for stale in (job_dir / CHECKPOINT_DIR).glob("*.pt"):
        stale.unlink(missing_ok=True)
    for pattern in (f".{RUN_FILE}.*.tmp", EVENTS_GLOB):
        for stale in job_dir.glob(pattern):
            stale.unlink(missing_ok=True)


@dataclass
class JobDecision:
    """What a (re-)started job does: ``action`` is ``"skip"`` or ``"run"``; ``reason`` says why."""

    action: str
    reason: str


def code_difference(record: Mapping[str, Any]) -> str:
    """'' when a run's recorded pgvar code is this process's, else a clause saying it was
    made by other (or unrecorded) code and kept all the same (``pgvar.provenance``)."""
    if same_pgvar_code(record.get("code")):
        return ""
    return (f" (made by other pgvar code, {describe(record.get('code'))}, than this call's "
            f"{describe(code_record())}; kept: pass rerun_complete=true to redo it)")


def prepare_job_dir(job_dir: Path, config: Mapping[str, Any], rerun_complete: bool = False) -> JobDecision:
    """Decide whether a job runs, and clear what an earlier attempt left if it does.

    A complete run of the same config is skipped unless ``rerun_complete``; anything
    else (no record; ``running``, i.e. killed; failed; diverged; a complete run of a
    different config) is redone from scratch.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    record = read_run_record(job_dir)
    if is_complete(record, config):
        if not rerun_complete:
            return JobDecision("skip", "run.json says complete for this config"
                               + code_difference(record))
        reason = "rerun_complete=true: redoing a complete run"
    elif record is None:
        reason = "no earlier run" if not (job_dir / METRICS_FILE).exists() else \
            "an earlier attempt left metrics.csv but no run.json: redoing it"
    elif record.get("status") == STATUS_COMPLETE:
        reason = "the complete run in this directory had a different config: redoing it"
    else:
        reason = f"an earlier attempt ended with status {record.get('status')!r}: redoing it"
    clear_run_outputs(job_dir)
    return JobDecision("run", reason)
