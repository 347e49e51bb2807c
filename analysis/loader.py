"""Load the runs of one or many sweeps into one tidy DataFrame.

A run is a Hydra job directory holding ``run.json`` and ``metrics.csv`` (written by
``pgvar-run``); it may sit at any depth below a sweep directory. The result has one
row per run and training iteration: the metrics, the run's identity (``run_dir``,
``sweep``) and every config value flattened into a column (``env.name``,
``estimator.lam``, ...), plus short aliases the analysis groups by: ``env``,
``estimator``, ``lam``, ``seed``, ``preset``.

Runs that cannot be trusted are left out and listed, with the reason, in the
``LoadReport``: no ``run.json`` (still running, or killed), a status other than
``complete`` (failed, diverged, running), a ``run.json`` or ``metrics.csv`` that does not
parse, or a metrics.csv that disagrees with its run.json (``analysis.validate``: cut
short, rows missing or repeated, cells without numbers). Nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.validate import DamagedRun, validated_paired_rows, validated_rows
from pgvar.estimators import DEFAULT_CONFIG
from pgvar.paired import SHARED_KNOBS, parse_spec
from pgvar.provenance import (
    code_record,
    describe,
    measured_by_other_code,
    stale_runs,
    stale_warning,
)

# The log schema is pgvar-run's (pgvar.runlog owns the file names, statuses and columns).
from pgvar.runlog import (
    LEARNING_CURVE_COLUMNS,
    MEASURED_COLUMNS,
    METRICS_FILE,
    PAIRED_FILE,
    RUN_FILE,
    STATUS_COMPLETE,
    STATUS_DIVERGED,
    STATUS_FAILED,
    STATUS_RUNNING,
)
from pgvar.stats import (
    BiasModel,
    bias_interval_from,
    degenerate_widening,
    pooled_cross_kurtosis,
    pooled_spread_kurtosis,
    pooled_tail_index,
    run_intervals_reliable,
    run_widening,
    variance_interval_from,
    variance_ratio_interval_from,
    widened_bias_se,
)

# Config keys that become short alias columns; the first one present wins.
ALIASES: dict[str, list[str]] = {
    "env": ["env.name", "env.id", "env"],
    "estimator": ["estimator.name", "estimator"],
    "lam": ["estimator.lam", "estimator.lambda_", "estimator.gae_lambda", "estimator.lmbda"],
    "preset": ["preset_name", "preset.name", "preset"],
}


class LoadError(Exception):
    """A path that cannot be analysed at all: missing, or holding no runs."""


@dataclass(frozen=True)
class SkippedRun:
    """A run left out of the analysis, and why."""

    path: Path
    status: str  # incomplete | failed | diverged | running | unreadable
    reason: str
    columns: dict[str, Any] = field(default_factory=dict)  # its config columns, when readable


@dataclass
class LoadReport:
    """What ``load_runs`` found: the runs it kept and the ones it left out, with reasons."""

    loaded: list[Path] = field(default_factory=list)
    skipped: list[SkippedRun] = field(default_factory=list)
    # which code made each loaded run: run.json's ``code`` entry (``pgvar.provenance``)
    records: list[Mapping[str, Any]] = field(default_factory=list, repr=False)

    def code_summary(self) -> dict[str, Any]:
        """Which code made the loaded runs, against this process's (``stale_runs``)."""
        return stale_runs(self.records)

    def summary(self) -> str:
        """A human-readable account, one line per skipped run, and a warning when some
        loaded runs were made by other (or unrecorded) pgvar code than this analysis."""
        lines = [f"loaded {len(self.loaded)} complete run(s); skipped {len(self.skipped)}"]
        lines += [f"  skipped [{s.status}] {s.path}: {s.reason}" for s in self.skipped]
        warning = stale_warning(self.code_summary(), "the analysed folders") if self.records else None
        return "\n".join(lines + ([warning] if warning else []))


def load_runs(paths: Path | str | Iterable[Path | str]) -> tuple[pd.DataFrame, LoadReport]:
    """Load every complete run below ``paths`` into one tidy DataFrame (see module doc).

    Raises ``LoadError`` for a path that does not exist or that holds no run directory;
    runs that exist but cannot be used are listed in the report, not raised.
    """
    roots = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not roots:
        raise LoadError("no sweep directory given")
    report = LoadReport()
    frames, config_keys, seen = [], {}, set()
    for root in roots:
        for run_dir in find_run_dirs(root):
            if run_dir.resolve() in seen:  # the same run reached through two given paths
                continue
            seen.add(run_dir.resolve())
            frame = _load_one(run_dir, root, report)
            if frame is not None:
                frames.append(frame)
                config_keys.update(dict.fromkeys(frame.attrs.get("config_columns", [])))
    if not frames:
        return _empty_frame(), report
    df = _tidy(pd.concat(frames, ignore_index=True, sort=False))
    df.attrs["config_columns"] = [c for c in config_keys if c in df.columns]
    return df, report


def find_run_dirs(root: Path) -> list[Path]:
    """Every job directory below ``root`` (itself included), sorted naturally.

    A job directory is one holding ``run.json``, ``metrics.csv`` or Hydra's ``.hydra``
    folder, so a job killed before writing anything still shows up as incomplete.
    """
    if not root.exists():
        raise LoadError(f"path does not exist: {root}")
    if not root.is_dir():
        raise LoadError(f"not a directory: {root}")
    markers = {RUN_FILE, METRICS_FILE, ".hydra"}
    found = {p.parent for name in markers for p in root.rglob(name)}
    found = {d for d in found if ".hydra" not in d.parts}
    if not found:
        raise LoadError(f"no runs found in {root}: expected job directories holding "
                        f"{RUN_FILE} and {METRICS_FILE} (the output of pgvar-run)")
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list[tuple[int, Any]]:
    """Sort key that puts job 10 (or ``seed=10``) after job 9."""
    return [(0, int(tok)) if tok.isdigit() else (1, tok)
            for part in path.parts for tok in re.split(r"(\d+)", part) if tok]


def _load_one(run_dir: Path, root: Path, report: LoadReport) -> pd.DataFrame | None:
    """The metrics of one run with its config columns, or None (and a report entry)."""
    columns: dict[str, Any] = {}

    def skip(status: str, reason: str) -> None:
        report.skipped.append(SkippedRun(run_dir, status, reason, columns))

    run_file = run_dir / RUN_FILE
    if not run_file.exists():
        skip("incomplete", f"no {RUN_FILE}: the run is still going or was killed")
        return None
    try:
        info = json.loads(run_file.read_text())
    except (ValueError, OSError) as err:
        skip("unreadable", f"{RUN_FILE} is not valid JSON ({err})")
        return None
    if not isinstance(info, dict):
        skip("unreadable", f"{RUN_FILE} does not hold a JSON object")
        return None
    columns.update(run_columns(info, run_dir, root))
    status = str(info.get("status", "missing"))
    if status != STATUS_COMPLETE:
        error = info.get("error") or "no error message"
        skip(status if status in (STATUS_FAILED, STATUS_DIVERGED, STATUS_RUNNING) else "incomplete",
             f"status '{status}': {error}")
        return None
    metrics = _read_metrics(run_dir, info, skip)
    if metrics is None:
        return None
    metrics = with_constant_columns(metrics, columns)
    config = info.get("config")
    metrics.attrs["config_columns"] = list(flatten_config(config)) if isinstance(config, Mapping) else []
    report.loaded.append(run_dir)
    report.records.append({"code": info.get("code")})  # not the whole run.json: only this is read
    return metrics


def with_constant_columns(frame: pd.DataFrame, columns: Mapping[str, Any]) -> pd.DataFrame:
    """``frame`` with one more column per entry of ``columns`` (replacing a column of the
    same name), the value repeated on every row. One concat: assigning ~50 columns one
    by one took most of the loading time of a 190-run sweep."""
    extra = pd.DataFrame({k: [v] * len(frame) for k, v in columns.items()}, index=frame.index)
    kept = frame.drop(columns=[c for c in columns if c in frame.columns])
    return pd.concat([kept, extra], axis=1)


def _read_metrics(run_dir: Path, info: Mapping[str, Any], skip) -> pd.DataFrame | None:
    """metrics.csv as numbers, or None after reporting why it cannot be used: the file
    is checked against run.json first (``analysis.validate``), so a damaged run is
    skipped whole, never half-loaded."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        skip("unreadable", f"status complete but no {METRICS_FILE}")
        return None
    try:
        header, rows = validated_rows(path, info)
    except DamagedRun as err:
        skip("unreadable", str(err))
        return None
    except OSError as err:
        skip("unreadable", f"{METRICS_FILE} cannot be read ({err})")
        return None
    # "nan": a statistic that is undefined at that step (an SNR when every batch is zero)
    metrics = pd.DataFrame(rows, columns=header).replace({"": None, "nan": None})
    numeric = metrics.apply(_to_number)
    bad = [c for c in metrics.columns
           if metrics[c].notna().sum() > numeric[c].notna().sum()]
    if bad:
        skip("unreadable", f"{METRICS_FILE} has non-numeric values in {bad}")
        return None
    return numeric


_BOOLEAN_WORDS = {"true": 1.0, "false": 0.0}


def _to_number(column: pd.Series) -> pd.Series:
    """A metrics column as floats; ``True``/``False`` (a verdict column) become 1/0."""
    if column.dtype == bool:
        return column.astype(float)
    if column.dtype == object or pd.api.types.is_string_dtype(column):
        words = column.map(lambda v: _BOOLEAN_WORDS.get(v.strip().lower(), v) if isinstance(v, str) else v)
        return pd.to_numeric(words, errors="coerce")
    return pd.to_numeric(column, errors="coerce")


def run_columns(info: Mapping[str, Any], run_dir: Path, root: Path) -> dict[str, Any]:
    """Per-run columns: identity, flattened config, aliases, seed and elapsed time."""
    config = info.get("config") or {}
    flat = flatten_config(config) if isinstance(config, Mapping) else {}
    cols: dict[str, Any] = {
        "run_dir": str(run_dir),
        "sweep": str(root),
        "run_id": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
    }
    cols.update(flat)
    for alias, keys in ALIASES.items():
        cols[alias] = next((flat[k] for k in keys if k in flat), cols.get(alias))
    seed = info.get("seed", flat.get("seed"))
    cols["seed"] = seed
    cols["elapsed_s"] = info.get("elapsed_s")
    return cols


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys: ``{'env': {'name': 'x'}} -> {'env.name': 'x'}``.

    Lists are kept as JSON strings so the column stays one scalar type.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Column order (identity, config, metrics), stable types, derived bias columns."""
    df = add_derived_columns(df)
    df = _unify_object_columns(df)
    lead = ["sweep", "run_id", "env", "estimator", "lam", "seed", "preset"]
    metric_cols = [c for c in LEARNING_CURVE_COLUMNS + MEASURED_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in lead and c not in metric_cols]
    order = [c for c in lead if c in df.columns] + metric_cols + rest
    return df[order].sort_values(["sweep", "run_id", "step"], kind="stable").reset_index(drop=True)


def add_derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Add the unbiased squared-bias estimate and relative quantities when not logged.

    With M estimates, ``grad_mse = (M-1)/M trCov_hat + ||g_bar - g_ref||^2`` and
    ``E||g_bar - g_ref||^2 = ||bias||^2 + trCov/M + SE_ref^2``, so
    ``grad_mse - grad_variance - ref_se^2`` is an unbiased (possibly negative) estimate
    of the squared bias, whatever M is. Averaging it across seeds, rather than the
    clipped norm, keeps an unbiased estimator's average at zero.
    """
    df = df.copy()
    if "grad_bias_sq" not in df.columns and {"grad_mse", "grad_variance"} <= set(df.columns):
        ref_se = df["ref_se"].fillna(0.0) if "ref_se" in df.columns else 0.0
        df["grad_bias_sq"] = df["grad_mse"] - df["grad_variance"] - ref_se ** 2
    if "ref_norm" in df.columns:
        ref_sq = df["ref_norm"] ** 2
        ref_sq = ref_sq.where(ref_sq > 0)
        if "grad_rel_variance" not in df.columns and "grad_variance" in df.columns:
            df["grad_rel_variance"] = df["grad_variance"] / ref_sq
        if "grad_rel_bias_sq" not in df.columns and "grad_bias_sq" in df.columns:
            df["grad_rel_bias_sq"] = df["grad_bias_sq"] / ref_sq
    return df


def _unify_object_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Config columns with mixed types (e.g. int in one run, str in another) become
    strings, so the frame can be written to parquet; missing stays missing."""
    for col in df.columns:
        if df[col].dtype != object:
            continue
        kinds = {type(v) for v in df[col] if not _is_missing(v)}
        if len(kinds) > 1 and not kinds <= {int, float, bool}:
            df[col] = df[col].map(lambda v: None if _is_missing(v) else str(v))
        elif kinds <= {int, float} and kinds:
            df[col] = pd.to_numeric(df[col])
    return df


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame(columns=["sweep", "run_id", "env", "estimator", "seed",
                                 *LEARNING_CURVE_COLUMNS])


def save_runs(df: pd.DataFrame, out_dir: Path) -> Path:
    """Write the tidy frame to ``out_dir/runs.parquet`` and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "runs.parquet"
    df.to_parquet(path, index=False)
    return path


# ----------------------------------------------------------------------------- measurements
#
# The rows the table consumes: one per (run, measured step, MEASURED estimator, critic).
# A run that logged paired measurements (paired.csv: every estimator of
# training.measure.estimators scored at each measured step on the same episodes, against
# one shared reference) contributes its paired rows; any other run contributes its
# metrics.csv measured rows, which describe the training estimator (critic "", source
# "metrics"). The choice is per run, so a sweep whose runs have paired rows is tabulated
# from them, an older sweep exactly as before, and a run whose paired.csv is damaged
# falls back to its metrics.csv rows with a warning naming the file.

_TEXT_COLUMNS = {"estimator", "estimator_name", "critic", "critic_error_kind", "trained_with",
                 "source", "ref_method", "code"}
# Columns of a training step (metrics.csv) that paired rows of the same step share.
STEP_COLUMNS = [c for c in LEARNING_CURVE_COLUMNS if c != "wall_s"] + [
    "return_undiscounted_mean", "episode_length_mean", "grad_norm", "critic_loss"]


class PairedWarning(UserWarning):
    """A run's paired.csv could not be used; its metrics.csv rows are used instead."""


class StaleRowsWarning(UserWarning):
    """Some paired rows were measured by other pgvar code than the analysis reading them."""


def measured_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The measurement rows of the runs in ``df`` (the tidy frame of ``load_runs``): per
    run its paired.csv rows when it has a usable one, else its metrics.csv measured rows
    (see the comment above). Every row carries the run's columns (``run_dir``, ``seed``,
    ``env.*``, ``training.*``), the measured estimator's identity (``estimator``: its
    name; ``estimator.*``: the knobs it was measured with; ``lam``; ``critic``) and
    ``trained_with``. A damaged paired.csv gives a ``PairedWarning`` naming the file."""
    if "grad_variance" not in df.columns:
        return df.iloc[0:0]
    own = df[np.isfinite(df["grad_variance"].to_numpy(dtype=float))]
    if "run_dir" not in df.columns:
        return _training_rows(own)
    run_cols = _run_column_names(df)
    frames = []
    for run_dir, run in df.groupby("run_dir", sort=False):
        paired = _paired_rows(Path(str(run_dir)), run, run_cols)
        frames.append(paired if paired is not None else _training_rows(own[own["run_dir"] == run_dir]))
    frames = [f for f in frames if not f.empty]
    if not frames:
        return _training_rows(own.iloc[0:0])
    rows = pd.concat(frames, ignore_index=True, sort=False)
    warn_other_code_rows(rows)
    return with_run_reliability(rows)


def warn_other_code_rows(rows: pd.DataFrame) -> None:
    """A ``StaleRowsWarning`` when paired rows were measured by other pgvar code than this
    analysis's (``code`` column: pgvar-measure adds rows to a finished run with the code
    of its own day), naming how many, in which runs, and the fix. The run-level check (``LoadReport.summary``) only
    sees the code that wrote run.json."""
    if "code" not in rows.columns:
        return
    other = rows[measured_by_other_code(rows["code"])]
    if other.empty:
        return
    runs = sorted(other["run_dir"].astype(str).unique())  # measured_rows' rows carry run_dir
    shown = ", ".join(runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
    warnings.warn(f"{len(other)} of {len(rows)} paired measurement rows (in {len(runs)} run(s): "
                  f"{shown}) were measured by other pgvar code than this analysis's "
                  f"({describe(code_record())}): re-measure them with `pgvar-measure RUN_DIR "
                  f"--estimators ...` or re-run into a fresh --out", StaleRowsWarning, stacklevel=2)


def with_run_reliability(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with what each series (one estimator with one critic in one run) says
    about its per-measurement intervals, judged from all its measured steps together (one
    step's sample misses the tail that the series holds):

    - ``kurtosis_run``: the series' kurtosis (``series_kurtosis``);
    - ``ci_reliable_run``: whether they can be trusted (``pgvar.stats.run_intervals_reliable``
      on that kurtosis and the series' smallest M);
    - ``grad_variance_run_lo`` / ``_run_hi``: the variance interval of each step with
      that kurtosis (``pgvar.stats.variance_interval_from``); metrics.csv keeps the
      step's own ``grad_variance_lo`` / ``_hi``;
    - ``grad_bias_sq_run_lo`` / ``_run_hi`` and ``bias_distinguishable_run``: the
      squared-bias interval rebuilt with it and the kurtosis along the bias
      (``run_bias_intervals``), and its verdict;
    - ``grad_bias_sq_se_run``: U's standard error widened as that interval's is
      (``pgvar.stats.widened_bias_se``); the comparison table pools a share of its excess
      over the logged SE (``analysis.table.pooled_se``);
    - ``var_ratio_training`` and its interval (``with_training_ratio``).

    Logs without ``tail_index`` are returned unchanged."""
    if rows.empty or "tail_index" not in rows.columns or "n_estimates" not in rows.columns:
        return rows
    # extra columns are not validated on load: a damaged cell reads as missing, not as text
    rows = rows.assign(**{c: pd.to_numeric(rows[c], errors="coerce") for c in SERIES_INPUTS
                          if c in rows.columns})
    label = "estimator_label" if "estimator_label" in rows.columns else "estimator"
    keys = [c for c in ("run_dir", label, "critic") if c in rows.columns]
    return with_training_ratio(with_series_intervals(rows, keys), keys)


RATIO_INPUTS = {"is_training", "step", "run_dir", "grad_variance", "n_estimates", "spread_z_mean",
                "spread_z_sq_mean", "spread_z_cross"}


def with_training_ratio(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``rows`` with ``var_ratio_training`` and its interval ``_lo`` / ``_hi``: each
    step's tr Cov over the training estimator's on the same batches (paired rows), the
    interval from the kurtoses of the two series and their joint one over all the run's
    steps (``pgvar.stats.variance_ratio_interval_from``). Logs without ``spread_z_cross``
    are returned unchanged."""
    if not RATIO_INPUTS <= set(rows.columns):
        return rows
    cols = ["grad_variance", "spread_z_mean", "spread_z_sq_mean"]
    training = rows[rows["is_training"].astype(bool)].drop_duplicates(["run_dir", "step"])
    partner = rows[["run_dir", "step"]].merge(
        training[["run_dir", "step", *cols]], on=["run_dir", "step"], how="left")
    ratio = rows["grad_variance"].to_numpy(dtype=float) / partner["grad_variance"].to_numpy(dtype=float)
    lo, hi = paired_ratio_intervals(
        rows.groupby(keys, sort=False, dropna=False).indices.values(), ratio,
        rows["n_estimates"].to_numpy(dtype=float), rows["spread_z_mean"], rows["spread_z_sq_mean"],
        partner["spread_z_mean"], partner["spread_z_sq_mean"], rows["spread_z_cross"])
    return rows.assign(var_ratio_training=ratio, var_ratio_training_lo=lo, var_ratio_training_hi=hi)


def paired_ratio_intervals(series, ratio: np.ndarray, n_estimates: np.ndarray, z_mean, z_sq_mean,
                           other_z_mean, other_z_sq_mean, z_cross) -> tuple[np.ndarray, np.ndarray]:
    """The interval of each row's variance ratio to its partner on the same batches, from
    the two estimators' kurtoses and their joint one pooled over the row's series
    (``series``: the row positions of each; the moments: per row, the partner's on the
    row's own line): ``pgvar.stats.variance_ratio_interval_from``."""
    lo, hi = np.full(len(ratio), math.nan), np.full(len(ratio), math.nan)
    moments = [np.asarray(v, dtype=float) for v in (z_mean, z_sq_mean, other_z_mean, other_z_sq_mean, z_cross)]
    for where in series:
        m1, m2, o1, o2, cross = (v[where] for v in moments)
        kappas = (pooled_spread_kurtosis(m1, m2), pooled_spread_kurtosis(o1, o2),
                  pooled_cross_kurtosis(m1, o1, cross))
        for i in where:
            lo[i], hi[i] = variance_ratio_interval_from(float(ratio[i]), int(np.nan_to_num(n_estimates[i])),
                                                        *kappas)
    return lo, hi


def with_series_intervals(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``rows`` with ``ci_reliable_run``, ``kurtosis_run``, ``grad_variance_run_lo`` /
    ``_hi``, ``grad_bias_sq_run_lo`` / ``_hi`` and ``grad_bias_sq_se_run`` (see
    ``with_run_reliability``) for the series sharing ``keys``; needs ``tail_index``,
    ``n_estimates`` and, for the intervals, ``grad_variance`` and the score model's columns
    (``BIAS_INPUTS``)."""
    groups = rows.groupby(keys, sort=False, dropna=False)
    which = groups.ngroup().to_numpy()
    series = [(series_kurtosis(g), int(g["n_estimates"].fillna(0).min())) for _, g in groups]
    pooled = np.array([kappa for kappa, _ in series], dtype=float)[which]
    reliable = np.array([run_intervals_reliable(kappa, M) for kappa, M in series], dtype=bool)[which]
    out = rows.assign(ci_reliable_run=reliable, kurtosis_run=pooled)
    if "grad_variance" not in rows.columns:
        return out
    ends = [variance_interval_from(float(v), int(m), float(k)) if np.isfinite(m) else (math.nan,) * 2
            for v, m, k in zip(rows["grad_variance"].to_numpy(dtype=float),
                               rows["n_estimates"].to_numpy(dtype=float), pooled)]
    lo, hi = (np.array([e[i] for e in ends], dtype=float) for i in (0, 1))
    out = out.assign(grad_variance_run_lo=lo, grad_variance_run_hi=hi)
    if not BIAS_INPUTS <= set(rows.columns):
        return out
    along = np.array([pooled_spread_kurtosis(g["proj_z_mean"], g["proj_z_sq_mean"]) for _, g in groups],
                     dtype=float)[which]
    lo, hi, se = run_bias_intervals(rows, pooled, along)
    return out.assign(grad_bias_sq_run_lo=lo, grad_bias_sq_run_hi=hi, bias_distinguishable_run=lo > 0,
                      grad_bias_sq_se_run=se)


SERIES_INPUTS = ["tail_index", "n_estimates", "spread_z_mean", "spread_z_sq_mean", "spread_z_cross",
                 "grad_variance", "grad_bias_sq", "grad_bias_sq_se", "bias_v0", "bias_slope",
                 "bias_skew0", "proj_z_mean", "proj_z_sq_mean"]
BIAS_INPUTS = {"grad_bias_sq", "grad_bias_sq_se", "bias_v0", "bias_slope", "bias_skew0",
               "proj_z_mean", "proj_z_sq_mean", "tail_index", "n_estimates"}


def run_bias_intervals(rows: pd.DataFrame, kappa: np.ndarray, kappa_along: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's squared-bias interval (lo, hi) and U's standard error widened the same
    way (``pgvar.stats.widened_bias_se``), rebuilt from its logged score model, the lower end
    with its linear part widened by the run's kurtosis along the bias (``kappa_along``,
    ``run_widening``) and its degenerate part by the run's kurtosis (``kappa``,
    ``degenerate_widening``): ``pgvar.stats.bias_interval_from``. The score form at every
    step with M >= 4, heavy-tailed ones too (where the step alone takes the Wald form: with
    the run's widening the score form held its false-positive rate at 1.5-3.5% where the
    Wald one fell to 0.4%); M < 4 or no logged model: the Wald form, its SE widened."""
    lo, hi, se_run = (np.full(len(rows), math.nan) for _ in range(3))
    cols = [rows[c].to_numpy(dtype=float) for c in ("grad_bias_sq", "grad_bias_sq_se", "bias_v0",
                                                     "bias_slope", "bias_skew0", "n_estimates")]
    for i, (u, se, v0, slope, skew0, M) in enumerate(zip(*cols)):
        if not (np.isfinite(u) and np.isfinite(se) and np.isfinite(M)):
            continue
        model = BiasModel(u=u, v0=v0, slope=slope, skew0=skew0 if np.isfinite(skew0) else 0.0) \
            if M >= 4 and np.isfinite(v0) and np.isfinite(slope) else None
        widen = {"widen_linear": run_widening(kappa_along[i], int(M)),
                 "widen_degenerate": degenerate_widening(kappa[i], int(M))}
        lo[i], hi[i] = bias_interval_from(u, se, model, heavy=model is None, **widen,
                                          n_estimates=int(M))
        se_run[i] = widened_bias_se(u, se, model, **widen)
    return lo, hi, se_run


def series_kurtosis(series: pd.DataFrame) -> float:
    """The kurtosis of one series' squared deviations over all its measured steps:
    ``pgvar.stats.pooled_spread_kurtosis`` of its ``spread_z_mean`` / ``spread_z_sq_mean``
    (logs before those columns: the mean ``tail_index``, which under-states heavy tails)."""
    if {"spread_z_mean", "spread_z_sq_mean"} <= set(series.columns):
        kappa = pooled_spread_kurtosis(series["spread_z_mean"], series["spread_z_sq_mean"])
        if math.isfinite(kappa):
            return kappa
    return pooled_tail_index(series["tail_index"])


RUN_IDENTITY = ["sweep", "run_id", "run_dir", "env", "seed", "preset", "elapsed_s"]


def _run_column_names(df: pd.DataFrame) -> list[str]:
    """The columns of ``df`` that describe a run rather than one of its steps: identity
    and config (as recorded by ``load_runs``; else every dotted column)."""
    config = df.attrs.get("config_columns") or [c for c in df.columns if "." in c]
    return [c for c in dict.fromkeys(RUN_IDENTITY + list(config)) if c in df.columns]


def _training_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """metrics.csv measured rows as measurement rows of the training estimator."""
    rows = rows.copy()
    name = rows["estimator"] if "estimator" in rows.columns else pd.Series("", index=rows.index)
    defaults = {"estimator_name": name, "critic": "", "critic_episodes": 0,
                "critic_error": math.nan, "critic_error_kind": "", "trained_with": name,
                "is_training": True, "source": "metrics"}
    for col, value in defaults.items():
        if col not in rows.columns:
            rows[col] = value
    return rows


def _paired_rows(run_dir: Path, run: pd.DataFrame, run_cols: list[str]) -> pd.DataFrame | None:
    """The run's paired.csv as measurement rows, None when it has none or it is damaged
    (then a ``PairedWarning`` says which file and why)."""
    path = run_dir / PAIRED_FILE
    if not path.exists():
        return None
    try:
        stat = path.stat()
        paired = _read_paired(str(path), stat.st_mtime_ns, stat.st_size)
    except (DamagedRun, OSError) as err:
        warnings.warn(f"{path}: unusable paired measurements ({err}); using the run's "
                      f"{METRICS_FILE} rows (the training estimator only)", PairedWarning,
                      stacklevel=3)
        return None
    return _with_run_columns(paired.copy(), run, run_cols)


@lru_cache(maxsize=512)
def _read_paired(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    """paired.csv checked (``analysis.validate``) and typed; cached per file version."""
    header, rows = validated_paired_rows(Path(path))
    frame = pd.DataFrame(rows, columns=header).replace({"": None})
    out = {}
    for col in frame.columns:
        if col in _TEXT_COLUMNS:
            out[col] = frame[col].fillna("").astype(str)
        else:
            out[col] = _to_number(frame[col])
    typed = pd.DataFrame(out)
    typed["step"] = typed["step"].astype(int)
    typed["is_training"] = typed["is_training"].fillna(0).astype(bool)
    if "ref_circular" in typed.columns:
        typed["ref_circular"] = typed["ref_circular"].fillna(0).astype(bool)
    return typed


def _with_run_columns(paired: pd.DataFrame, run: pd.DataFrame, run_cols: list[str]) -> pd.DataFrame:
    """Paired rows plus the run's columns and its training step's learning-curve cells
    (``STEP_COLUMNS``); ``estimator.*`` describe the MEASURED estimator: the run's own on
    the training rows (which keep the run's ``label``), else the spec's knobs over the
    training config's shared knobs over the estimator defaults (``pgvar.paired``)."""
    first = run.iloc[0]
    per_run = {c: first[c] for c in run_cols
               if c not in paired.columns and not c.startswith("estimator.")
               and c not in ("estimator", "lam")}
    out = with_constant_columns(paired, per_run)
    steps = [c for c in STEP_COLUMNS if c in run.columns and c not in paired.columns]
    if steps:
        out = out.merge(run[["step", *steps]].drop_duplicates("step"), on="step", how="left")
    out = add_derived_columns(out)
    trained = {c: first[c] for c in run.columns if c.startswith("estimator.")}
    columns: dict[str, list[Any]] = {c: [] for c in trained}
    resolved: dict[tuple[str, str], dict[str, Any]] = {}
    for spec, name, is_training in zip(out["estimator"], out["estimator_name"], out["is_training"]):
        if is_training:
            knobs = trained
        else:
            if (spec, name) not in resolved:
                resolved[(spec, name)] = _spec_columns(str(spec), str(name), trained)
            knobs = resolved[(spec, name)]
        for c, values in columns.items():
            values.append(knobs.get(c))
    for c, values in columns.items():
        out[c] = values
    out["estimator_label"] = out["estimator"]
    out["estimator"] = out["estimator_name"]
    if "estimator.lam" in out.columns:
        out["lam"] = out["estimator.lam"]
    if "label" in run.columns:
        out["label"] = np.where(out["is_training"], first["label"], None)
    return out


def _spec_columns(label: str, name: str, trained: Mapping[str, Any]) -> dict[str, Any]:
    """The ``estimator.*`` columns of a measured spec, resolved as pgvar-run resolves it
    (``pgvar.paired.EstimatorSpec.config``: the spec's knobs over the training config's
    shared knobs over the defaults); a label pgvar cannot parse keeps only its name."""
    try:
        spec = parse_spec(label)
        knobs = asdict(spec.config(replace(DEFAULT_CONFIG, **{
            k: trained[f"estimator.{k}"] for k in SHARED_KNOBS
            if f"estimator.{k}" in trained and trained[f"estimator.{k}"] is not None})))
    except (ValueError, TypeError):
        knobs = {}
    cols = {c: knobs.get(c.split(".", 1)[1]) for c in trained}
    cols["estimator.name"] = name
    return cols
