"""The bias/variance comparison table: one row per estimator (and environment).

Which measured steps feed it is the ``steps`` option:

- ``all`` (default): every measured iteration, averaged within a run first (one value
  per run). Each estimator is scored along its own training run, as it is used: with
  the critic it has fitted on the run's earlier batches. Rows are at different policies
  (each estimator trains its own), so a row mixes the estimator's noise with where it
  led the policy; the variance ratio to vanilla REINFORCE pairs runs by seed but not by
  parameters.
- ``first``: the first measured iteration of every run. All estimators of a seed start
  from the same initial parameters, so every row is scored at the same policy and rows
  differ only by the estimator: the cleanest comparison for estimators without a
  critic. But ``pgvar-run`` fits the critic after each iteration's step, so at the first
  measurement the critic is still at its initialisation (the value baseline then equals
  reward-to-go, and actor-critic and GAE bootstrap from an untrained V): not the
  estimators the seed describes.
- ``last``: the last measured iteration (the policy each estimator ended at).

The reference gradient is exact (or its standard error is logged and removed) at every
step, so bias is measured correctly whichever steps are used; only comparability differs.

Per row, the bias is ONE pooled quantity, and its interval and its verdict come from the
same test, so the three cannot disagree:

- ``bias_sq``: the mean over the row's runs of each run's mean unbiased squared-bias
  estimate U (``grad_bias_sq``, which can be negative), i.e. the mean squared bias over
  the measured steps, every run weighing the same. Its 95% interval is
  ``mean +- 1.96 sqrt(sum se^2) / n`` from the logged per-measurement standard errors
  (``grad_bias_sq_se``; measurements are independent across steps and runs):
  ``analysis.stats.mean_with_known_se``. It needs no replicate seeds and, measured on
  synthetic sweeps with heavy-tailed estimates, holds its coverage with 3 seeds where a
  bootstrap over seeds covers 70-80% (tests/test_table_consistency.py).
- ``ref_norm``: the root mean square of ``||grad J||`` over the same steps,
  ``sqrt(mean(ref_norm^2 - ref_se^2))`` (a Monte Carlo reference's squared SE is removed:
  E||g_ref||^2 = ||grad J||^2 + SE^2).
- ``rel_bias_sq = bias_sq / ref_norm^2``: the summed squared bias over the summed
  ``||grad J||^2``; an unbiased estimator reads near 0 with a tight interval even when
  grad J is near 0 late in training (a mean of per-step ratios would not).
- ``bias = sqrt(max(bias_sq, 0))`` and ``rel_bias = bias / ref_norm``, interval ends
  mapped the same way; ``bias_distinguishable`` is the interval's lower end > 0 (the same
  on every scale), or empty when the test's conditions fail (``bias_test_note`` says
  why: fewer than ``MIN_ESTIMATES`` estimates per measurement, or no finite SE).

Variance: ``variance`` is the mean over runs of each run's mean trace variance with a
bootstrap interval over runs, ``rel_variance = variance / ref_norm^2`` (ends too); the
variance ratio to vanilla REINFORCE pairs runs by seed, and verdicts that rest on it need
``MIN_RUNS_FOR_SEED_BOOTSTRAP`` seeds. ``analysis.claims`` turns the numbers into the
words of the seed's table and says whether they agree, and why when it cannot tell.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import claims as cl
from analysis.loader import ALIASES, SkippedRun, measured_rows
from analysis.render import format_ci
from analysis.stats import (
    MIN_RUNS_FOR_SEED_BOOTSTRAP,
    NAN_ESTIMATE,
    Estimate,
    mean_ci,
    mean_with_known_se,
    ratio_ci,
    stratified_bootstrap_iqm,
)

STEP_CHOICES = ("first", "last", "all")
ESTIMATOR_ORDER = ["reinforce", "reinforce_rtg", "mean_baseline", "rloo", "value_baseline",
                   "actor_critic", "gae", "ppo"]
# Config columns that never define a row: replicates, places, machinery.
_NOT_A_ROW_KEY = re.compile(r"(^|\.)(seed|.*dir|.*path|output.*|device|hydra|log.*|"
                            r"n_jobs|num_workers|threads?|versions?)(\.|$)")
RUN_STATS = ["grad_bias_sq", "grad_rel_bias_sq", "grad_variance", "grad_rel_variance",
             "grad_mse", "cos_ref", "cos_pairwise", "snr", "ref_norm"]
FINAL_FRACTION = 0.1  # the learning curve's last 10% of iterations give the final return
# The bias verdict rests on the per-measurement standard errors, whose calibration is
# targeted (and measured, experiments/calibration) for M >= 16 estimates per measurement.
MIN_ESTIMATES = 16
# The numeric columns that carry _lo and _hi interval ends.
NUMBER_COLUMNS = ["bias_sq", "rel_bias_sq", "bias", "rel_bias", "variance", "rel_variance",
                  "mse", "cos_ref", "cos_pairwise", "snr", "ref_norm", "var_ratio", "return_iqm"]


# ----------------------------------------------------------------------------- rows


def config_columns(df: pd.DataFrame) -> list[str]:
    """The flattened config columns (recorded by the loader, else those constant per run)."""
    recorded = df.attrs.get("config_columns")
    if recorded:
        return [c for c in recorded if c in df.columns]
    per_run = df.groupby("run_dir", sort=False).nunique(dropna=False)
    return [c for c in per_run.columns if (per_run[c] <= 1).all()
            and "." in c and c not in ("run_dir",)]


def row_key_columns(df: pd.DataFrame) -> list[str]:
    """``env``, ``estimator`` and every config column that varies within one of them.

    A GAE lambda sweep thus gives one row per lambda, a batch-size sweep one row per
    size; the seed never splits rows.
    """
    keys = ["env", "estimator"]
    runs = df.drop_duplicates("run_dir")
    for col in config_columns(df):
        if col in keys or _NOT_A_ROW_KEY.search(col) or col in ("env.name", "estimator.name"):
            continue
        varies = runs.groupby(["env", "estimator"], dropna=False)[col].nunique(dropna=True)
        if (varies > 1).any():
            keys.append(_alias_of(runs, col))
    return list(dict.fromkeys(keys))


def _alias_of(runs: pd.DataFrame, col: str) -> str:
    """The loader's short alias for a config column (``estimator.lam`` -> ``lam``) when
    the alias column holds the same values, else the column itself."""
    for alias, sources in ALIASES.items():
        if col in sources and alias in runs.columns and runs[alias].equals(runs[col]):
            return alias
    return col


def add_labels(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A ``label`` column naming each run's row, e.g. ``gae (lam=0.9)``."""
    runs = df.drop_duplicates("run_dir").set_index("run_dir")
    by_run = {}
    for _, group in runs.groupby("estimator", dropna=False, sort=False):
        # the settings that split this estimator on any env: one label for it everywhere
        splitting = [k for k in keys[2:] if group[k].nunique(dropna=True) > 1]
        for run, r in group[keys].iterrows():
            by_run[run] = row_label(r.to_dict(), ["env", "estimator"] + splitting)
    return df.assign(label=df["run_dir"].map(by_run))


def select_steps(measured: pd.DataFrame, steps: str) -> pd.DataFrame:
    """The measured rows the table uses: each run's first, last or all measured steps."""
    if steps not in STEP_CHOICES:
        raise ValueError(f"steps must be one of {STEP_CHOICES}, got {steps!r}")
    if steps == "all" or measured.empty:
        return measured
    pick = "min" if steps == "first" else "max"
    chosen = measured.groupby("run_dir")["step"].transform(pick)
    return measured[measured["step"] == chosen]


def per_run_values(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per run: the mean of each statistic over the run's selected steps, and
    the standard errors of the run's mean U and mean relative U (``sqrt(sum se_k^2) / K``
    over its K steps, from the logged ``grad_bias_sq_se``), the mean de-noised
    ``||grad J||^2`` (``ref_sq``) and the fewest estimates of a measurement."""
    cols = [c for c in RUN_STATS if c in rows.columns]
    by_run = rows.groupby("run_dir", sort=False)
    values = by_run[cols].mean()
    values["seed"] = by_run["seed"].first()
    if "ref_norm" in rows.columns:
        values["ref_sq"] = _true_gradient_sq(rows).groupby(rows["run_dir"], sort=False).mean()
    if "n_estimates" in rows.columns:
        values["n_estimates"] = by_run["n_estimates"].min()
    if "grad_bias_sq_se" in rows.columns:
        values["grad_bias_sq_se"] = by_run["grad_bias_sq_se"].apply(_se_of_mean)
        if "ref_norm" in rows.columns:
            rel_se = rows["grad_bias_sq_se"] / rows["ref_norm"].where(rows["ref_norm"] > 0) ** 2
            values["grad_rel_bias_sq_se"] = rel_se.groupby(rows["run_dir"], sort=False).apply(_se_of_mean)
    return values


def _true_gradient_sq(rows: pd.DataFrame) -> pd.Series:
    """``ref_norm^2 - ref_se^2`` per measurement: unbiased for ``||grad J||^2`` (a Monte
    Carlo reference's length is inflated by its noise, E||g_ref||^2 = ||grad J||^2 + SE^2)."""
    ref_se = rows["ref_se"].fillna(0.0) if "ref_se" in rows.columns else 0.0
    return rows["ref_norm"] ** 2 - ref_se ** 2


def _se_of_mean(se: pd.Series) -> float:
    """Standard error of the mean of independent values with standard errors ``se``."""
    se = se.to_numpy(float)
    if se.size == 0 or not np.isfinite(se).all():
        return math.nan
    return math.sqrt(float((se ** 2).sum())) / se.size


def final_returns(df: pd.DataFrame) -> pd.Series:
    """Each run's final return: mean ``return_mean`` over its last 10% of iterations."""
    def tail_mean(run: pd.DataFrame) -> float:
        n = max(1, math.ceil(len(run) * FINAL_FRACTION))
        return float(run.sort_values("step")["return_mean"].tail(n).mean())
    return df.groupby("run_dir", sort=False)[["step", "return_mean"]].apply(tail_mean)


def _by_seed(values: pd.DataFrame, column: str) -> dict[object, float]:
    """seed -> the run's value (averaged if a seed appears twice) for paired ratios."""
    if column not in values.columns:
        return {}
    return values.groupby("seed", dropna=False)[column].mean().to_dict()


# ----------------------------------------------------------------------------- table


def build_table(df: pd.DataFrame, steps: str = "all",
                skipped: Iterable[SkippedRun] = ()) -> pd.DataFrame:
    """The comparison table as a DataFrame of numbers and words (see module doc).

    ``skipped`` (the loader's report) adds, per row, how many of its runs were left out
    and why: an estimator that diverges in 14 of 20 seeds is a finding, not a footnote.
    """
    if df.empty:
        raise ValueError("no runs to tabulate")
    keys = row_key_columns(df)
    if "label" not in df.columns:
        df = add_labels(df, keys)
    measured = select_steps(measured_rows(df), steps)
    finals = final_returns(df)
    groups = {k: g for k, g in df.groupby(keys, dropna=False, sort=False)}
    chosen = {k: measured[measured["run_dir"].isin(g["run_dir"].unique())] for k, g in groups.items()}
    per_row = {k: per_run_values(rows) for k, rows in chosen.items()}
    records = []
    for key, group in groups.items():
        record = _row_numbers(dict(zip(keys, key)), keys, per_row[key], per_row,
                              finals[group["run_dir"].unique()], group, chosen[key])
        records.append(record)
    skipped = list(skipped)
    records += _rows_without_complete_runs(records, keys, skipped)
    table = pd.DataFrame.from_records(records)
    table["n_left_out"], table["left_out"] = zip(*(_left_out(r, keys, skipped)
                                                  for _, r in table.iterrows()))
    known = table[table["reference"] != "unknown"].groupby("env")["reference"].first()
    table["reference"] = [known.get(env, ref) if ref == "unknown" else ref
                          for env, ref in zip(table["env"], table["reference"])]
    table = _add_judgements(table, keys)
    table["steps"] = steps
    return _sort_rows(table, keys)


def _rows_without_complete_runs(records: list[dict], keys: list[str],
                                skipped: list[SkippedRun]) -> list[dict]:
    """Rows for settings whose every run was left out (e.g. an estimator that diverged on
    every seed), so the table shows them with 0 runs instead of dropping them."""
    known = [tuple(r[k] for k in keys) for r in records]
    labelled = {r["estimator"] for r in records if " (" in str(r["label"])}
    extra: dict[tuple, dict] = {}
    for run in skipped:
        if not run.columns or any(k not in run.columns for k in keys):
            continue
        key = tuple(run.columns[k] for k in keys)
        if any(all(_same(a, b) for a, b in zip(key, other)) for other in [*known, *extra]):
            continue
        row = dict(zip(keys, key))
        claim = cl.claim_for(str(row["estimator"]))
        label_keys = keys if row["estimator"] in labelled else keys[:2]
        extra[key] = {**row, "label": row_label(row, label_keys), "variant": claim.variant,
                      "baseline": claim.baseline, "n_runs": 0, "n_measured_runs": 0,
                      "reference": "unknown",
                      **{f"{n}{s}": math.nan for n in NUMBER_COLUMNS for s in ("", "_lo", "_hi")},
                      "bias_distinguishable": None, "bias_test_note": "no complete run",
                      "n_measurements": 0, "var_ratio_n": math.nan}
    return list(extra.values())


def _left_out(row: pd.Series, keys: list[str], skipped: Iterable[SkippedRun]) -> tuple[int, str]:
    """How many skipped runs belong to this row, as a count and as words by status."""
    counts: dict[str, int] = {}
    for run in skipped:
        if run.columns and all(k in run.columns and _same(run.columns[k], row[k]) for k in keys):
            counts[run.status] = counts.get(run.status, 0) + 1
    words = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return sum(counts.values()), words


def _row_numbers(row: dict, keys: list[str], values: pd.DataFrame, per_row: dict,
                 finals: pd.Series, group: pd.DataFrame, measured: pd.DataFrame) -> dict:
    """Every numeric column of one row, with 95% intervals, as a flat dict."""
    claim = cl.claim_for(str(row["estimator"]))
    out: dict[str, object] = dict(row)
    out["label"] = group["label"].iloc[0]
    out["variant"], out["baseline"] = claim.variant, claim.baseline
    out["n_runs"] = int(group["run_dir"].nunique())
    out["n_measured_runs"] = len(values)
    out["reference"] = reference_kind(measured)
    pooled = pooled_bias(values)
    _put(out, "bias_sq", pooled.bias_sq)
    _put(out, "rel_bias_sq", pooled.relative(pooled.bias_sq))
    _put(out, "bias", pooled.bias_sq.map(_sqrt0))
    _put(out, "rel_bias", pooled.relative(pooled.bias_sq).map(_sqrt0))
    out["bias_distinguishable"], out["bias_test_note"] = pooled.verdict()
    _put(out, "ref_norm", Estimate(_sqrt0(pooled.ref_sq), math.nan, math.nan, len(values)))
    out["n_measurements"] = len(measured)
    variance = _mean_of(values, "grad_variance")
    _put(out, "variance", variance)
    _put(out, "rel_variance", pooled.relative(variance))
    for name, col in [("mse", "grad_mse"), ("cos_ref", "cos_ref"),
                      ("cos_pairwise", "cos_pairwise"), ("snr", "snr")]:
        _put(out, name, _mean_of(values, col))
    ratio = _variance_ratio(row, keys, values, per_row)
    _put(out, "var_ratio", ratio)
    out["var_ratio_n"] = ratio.n if math.isfinite(ratio.value) else math.nan
    _put(out, "return_iqm", stratified_bootstrap_iqm({row["env"]: finals.to_numpy()}))
    return out


def _mean_of(values: pd.DataFrame, column: str) -> Estimate:
    return mean_ci(values[column].to_numpy()) if column in values.columns else NAN_ESTIMATE


def _put(out: dict, name: str, est: Estimate) -> None:
    out[name], out[f"{name}_lo"], out[f"{name}_hi"] = est.value, est.lo, est.hi


def _sqrt0(x: float) -> float:
    """sqrt of max(x, 0), keeping NaN: a bias norm from a squared-bias estimate."""
    return math.sqrt(max(x, 0.0)) if math.isfinite(x) else x


def squared_bias_interval(values: pd.DataFrame, column: str) -> Estimate:
    """Mean across runs of an unbiased squared-bias estimate, with a conservative 95%
    interval: the hull of two intervals for it. Kept for the experiments' own analyses
    (``experiments/*/analyze.py``); the comparison table uses ``pooled_bias``.

    - the percentile bootstrap across runs (rough with few runs: it under-covers);
    - ``mean U +- 1.96 * pooled SE``, the pooled SE ``sqrt(sum_i se_i^2) / n`` from the
      runs' own standard errors (``<column>_se``, when logged). Under 'no bias' every U_i
      has mean 0, so this interval is right whatever the number of runs.

    Reading 'bias distinguishable from zero' as this interval lying above 0 makes both
    tests agree: an unbiased estimator is rarely called biased.
    """
    boot = _mean_of(values, column)
    se_col = f"{column}_se"
    if se_col not in values.columns or not math.isfinite(boot.value):
        return boot
    se = values.loc[values[column].notna(), se_col].to_numpy(float)
    if se.size == 0 or not np.isfinite(se).all():
        return boot
    half = 1.96 * math.sqrt(float((se ** 2).sum())) / se.size
    lo = boot.value - half if not math.isfinite(boot.lo) else min(boot.lo, boot.value - half)
    hi = boot.value + half if not math.isfinite(boot.hi) else max(boot.hi, boot.value + half)
    return Estimate(boot.value, lo, hi, boot.n)


@dataclass(frozen=True)
class PooledBias:
    """A row's one bias quantity (module doc): the mean squared bias over its measured
    steps and runs with its interval, and the mean ``||grad J||^2`` it is relative to."""

    bias_sq: Estimate
    ref_sq: float
    fewest_estimates: float = math.nan
    se_logged: bool = True

    def relative(self, est: Estimate) -> Estimate:
        """``est`` divided by the pooled ``||grad J||^2`` (value and ends; NaN when the
        pooled squared gradient is not positive)."""
        if not (math.isfinite(self.ref_sq) and self.ref_sq > 0):
            return Estimate(math.nan, math.nan, math.nan, est.n)
        return Estimate(est.value / self.ref_sq, est.lo / self.ref_sq, est.hi / self.ref_sq, est.n)

    def verdict(self) -> tuple[bool | None, str]:
        """(distinguishable from 0, note): the interval's lower end > 0, or None with the
        reason the test cannot be read."""
        if not math.isfinite(self.bias_sq.value):
            return None, "bias not measured"
        if math.isfinite(self.fewest_estimates) and self.fewest_estimates < MIN_ESTIMATES:
            return None, (f"too few estimates per measurement (M={self.fewest_estimates:g} "
                          f"< {MIN_ESTIMATES})")
        if not self.se_logged and self.bias_sq.n < MIN_RUNS_FOR_SEED_BOOTSTRAP:
            return None, f"too few runs (n={self.bias_sq.n} < {MIN_RUNS_FOR_SEED_BOOTSTRAP})"
        if not math.isfinite(self.bias_sq.lo):
            return None, "no finite standard error for the squared bias"
        return bool(self.bias_sq.lo > 0), ""


def pooled_bias(values: pd.DataFrame) -> PooledBias:
    """The pooled squared bias of one row from its ``per_run_values`` (module doc).

    Runs logged without ``grad_bias_sq_se`` fall back to a bootstrap over runs, whose
    verdict then needs ``MIN_RUNS_FOR_SEED_BOOTSTRAP`` runs.
    """
    if "grad_bias_sq" not in values.columns:
        return PooledBias(NAN_ESTIMATE, math.nan)
    se_logged = "grad_bias_sq_se" in values.columns
    if se_logged:
        b2 = mean_with_known_se(values["grad_bias_sq"], values["grad_bias_sq_se"])
    else:
        b2 = mean_ci(values["grad_bias_sq"].to_numpy())
    ref_sq = float(values["ref_sq"].mean()) if "ref_sq" in values.columns else math.nan
    fewest = float(values["n_estimates"].min()) if "n_estimates" in values.columns else math.nan
    return PooledBias(b2, ref_sq, fewest, se_logged)


def _variance_ratio(row: dict, keys: list[str], values: pd.DataFrame,
                    per_row: dict) -> Estimate:
    """Var(row) / Var(vanilla REINFORCE) on the same env and non-estimator settings,
    paired by seed."""
    reference = _reference_key(row, keys, per_row)
    if reference is None:
        return NAN_ESTIMATE
    return ratio_ci(_by_seed(values, "grad_variance"), _by_seed(per_row[reference], "grad_variance"))


def _reference_key(row: dict, keys: list[str], per_row: dict) -> tuple | None:
    """The key of the vanilla REINFORCE row this row is compared with, if any."""
    shared = [k for k in keys if k != "estimator" and not _estimator_specific(k)]
    for key in per_row:
        cand = dict(zip(keys, key))
        if cand["estimator"] == cl.REFERENCE_ESTIMATOR and all(
                _same(cand[k], row[k]) for k in shared):
            return key
    return None


def _estimator_specific(column: str) -> bool:
    """A setting of the estimator itself (``estimator.*`` or its alias, e.g. ``lam``),
    which vanilla REINFORCE's row need not share."""
    return column.startswith("estimator.") or any(
        column == alias and all(s.startswith("estimator.") for s in sources)
        for alias, sources in ALIASES.items())


def _same(a: object, b: object) -> bool:
    return (pd.isna(a) and pd.isna(b)) if (_isna(a) or _isna(b)) else a == b


def _isna(x: object) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def row_label(row: dict, keys: list[str]) -> str:
    """``estimator`` plus the settings that split it, e.g. ``gae (lam=0.9)``."""
    extras = [f"{k.split('.')[-1]}={_short(row[k])}" for k in keys[2:] if not _isna(row[k])]
    return f"{row['estimator']} ({', '.join(extras)})" if extras else str(row["estimator"])


def _short(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sort_rows(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Environments with an exact reference first, then by name; estimators in the seed's
    order; then settings (e.g. lambda)."""
    order = {e: i for i, e in enumerate(ESTIMATOR_ORDER)}
    table["_est"] = table["estimator"].map(lambda e: order.get(e, len(order)))
    table["_exact"] = table["reference"].ne("exact")
    table = table.sort_values(["_exact", "env", "_est", "estimator"] + keys[2:], kind="stable")
    return table.drop(columns=["_est", "_exact"]).reset_index(drop=True)


def reference_kind(measured: pd.DataFrame) -> str:
    """'exact' when every measurement had an exact reference gradient, else 'Monte Carlo'."""
    if "ref_exact" in measured.columns and measured["ref_exact"].notna().any():
        return "exact" if bool((measured["ref_exact"] == 1).all()) else "Monte Carlo"
    if "ref_se" in measured.columns and measured["ref_se"].notna().any():
        return "exact" if bool((measured["ref_se"].fillna(0) == 0).all()) else "Monte Carlo"
    return "unknown"


# ----------------------------------------------------------------------------- judging


def _add_judgements(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The seed's words next to each row and whether the measurement agrees: the
    verdict (``agreement``), in a word or two (``agreement_short``), and in words with
    every inconclusive part's reason (``agreement_detail``)."""
    verdicts, shorts, details, seed_bias, seed_var, measured_var = [], [], [], [], [], []
    for _, row in table.iterrows():
        claim = cl.claim_for(str(row["estimator"]))
        ratio = Estimate(row["var_ratio"], row["var_ratio_lo"], row["var_ratio_hi"],
                         int(row["var_ratio_n"]) if math.isfinite(row["var_ratio_n"]) else 0)
        rel_bias = Estimate(row["rel_bias"], row["rel_bias_lo"], row["rel_bias_hi"], 0)
        is_ref = row["estimator"] == cl.REFERENCE_ESTIMATOR
        variance = cl.judge_variance(claim.variance, ratio, _others_above_one(table, row),
                                     is_reference=is_ref, n_runs=ratio.n)
        dist = row["bias_distinguishable"]
        bias = cl.judge_bias(claim.bias, None if _isna(dist) else bool(dist), rel_bias,
                             _tunable(table, row) if claim.bias == "tunable" else None,
                             note=row["bias_test_note"],
                             note_short=_short_note(row["bias_test_note"]))
        overall = cl.combine(bias, variance)
        if row["n_runs"] == 0:
            overall = cl.Judgement("no data", f"no complete run ({row['left_out']})")
        verdicts.append(overall.verdict)
        shorts.append(overall.cell)
        details.append(overall.words)
        seed_bias.append(claim.bias or "-")
        seed_var.append(claim.variance or "-")
        measured_var.append(cl.variance_band(row["var_ratio"])
                            if math.isfinite(row["var_ratio"]) else "-")
    table["seed_bias"], table["seed_variance"] = seed_bias, seed_var
    table["measured_variance_word"] = measured_var
    table["agreement"], table["agreement_short"] = verdicts, shorts
    table["agreement_detail"] = details
    return table


def _short_note(note: object) -> str:
    """A few characters for a bias test that could not be read (the compact table)."""
    note = "" if _isna(note) else str(note)
    if note.startswith("too few estimates"):
        return f"M < {MIN_ESTIMATES}"
    if note.startswith("too few runs"):
        return f"n < {MIN_RUNS_FOR_SEED_BOOTSTRAP}"
    return "no bias test" if note else ""


def _others_above_one(table: pd.DataFrame, row: pd.Series) -> bool | None:
    """For the vanilla row: does another seed-table row on its env, with enough runs for
    its ratio interval, have Var ratio > 1? None when there is no such row."""
    others = table[(table["env"] == row["env"]) & (table["estimator"] != row["estimator"])
                   & table["estimator"].isin(cl.SEED_TABLE_ROWS)
                   & (table["var_ratio_n"] >= MIN_RUNS_FOR_SEED_BOOTSTRAP)]
    lows = others["var_ratio_lo"].dropna()
    if others.empty or lows.empty:
        return None
    return bool((lows > 1).any())


def _tunable(table: pd.DataFrame, row: pd.Series) -> cl.Judgement:
    """Does lambda move GAE's bias on this env? Compare the relative squared-bias
    intervals at the smallest and the largest lambda."""
    lam_col = "lam" if "lam" in table.columns else None
    rows = table[(table["env"] == row["env"]) & (table["estimator"] == row["estimator"])]
    if lam_col is None or rows[lam_col].nunique() < 2:
        return cl.inconclusive("bias: seed says tunable", "one lambda in the sweep", "one lambda")
    lo_row = rows.loc[rows[lam_col].idxmin()]
    hi_row = rows.loc[rows[lam_col].idxmax()]
    words = (f"bias: seed says tunable, relative bias {lo_row['rel_bias']:.3g} at "
             f"lambda={lo_row[lam_col]:g} vs {hi_row['rel_bias']:.3g} at lambda={hi_row[lam_col]:g}")
    for end in (lo_row, hi_row):
        if _isna(end["bias_distinguishable"]):
            note = end["bias_test_note"]
            return cl.inconclusive(words, f"lambda={end[lam_col]:g}: {note}", _short_note(note))
    relative = all(math.isfinite(r["rel_bias_sq"]) for r in (lo_row, hi_row))
    col = "rel_bias_sq" if relative else "bias_sq"
    apart = (lo_row[f"{col}_lo"] > hi_row[f"{col}_hi"]
             or hi_row[f"{col}_lo"] > lo_row[f"{col}_hi"])
    if apart:
        return cl.Judgement("agrees", words)
    return cl.inconclusive(words, "the intervals at the two lambdas overlap", "CIs overlap")


# ----------------------------------------------------------------------------- writing


def fmt_ci(value: float, lo: float, hi: float) -> str:
    """A table cell: ``analysis.render.format_ci`` with ``-`` for a missing value."""
    return format_ci(value, lo, hi, missing="-")


def _ci_column(table: pd.DataFrame, name: str) -> pd.Series:
    return table.apply(lambda r: fmt_ci(r[name], r[f"{name}_lo"], r[f"{name}_hi"]), axis=1)


def _env_column(table: pd.DataFrame) -> pd.Series:
    return table["env"] + " (" + table["reference"] + " ∇J)"


def _bias_verdict_cell(row: pd.Series) -> str:
    """yes / no from the pooled interval's lower end, or why there is no verdict."""
    value = row["bias_distinguishable"]
    if not _isna(value):
        return "yes" if value else "no"
    short = _short_note(row.get("bias_test_note"))
    return f"n/a ({short})" if short else "-"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The full human-facing table: every column, numbers formatted with their intervals."""
    out = pd.DataFrame()
    if table["env"].nunique() > 1:
        out["env"] = _env_column(table)
    out["estimator"] = table["label"]
    out["variant"] = table["variant"]
    out["baseline"] = table["baseline"]
    out["bias ‖E ĝ − ∇J‖ (RMS)"] = _ci_column(table, "bias")
    out["relative bias"] = _ci_column(table, "rel_bias")
    out["bias distinguishable from 0"] = table.apply(_bias_verdict_cell, axis=1)
    out["RMS ‖∇J‖"] = table["ref_norm"].map(lambda v: fmt_ci(v, math.nan, math.nan))
    out["variance tr Cov"] = _ci_column(table, "variance")
    out["relative variance"] = _ci_column(table, "rel_variance")
    out["variance / vanilla"] = _ci_column(table, "var_ratio")
    out["MSE"] = table.apply(lambda r: fmt_ci(r["mse"], math.nan, math.nan), axis=1)
    out["cos(ĝ, ∇J)"] = table.apply(lambda r: fmt_ci(r["cos_ref"], math.nan, math.nan), axis=1)
    out["final return (IQM)"] = _ci_column(table, "return_iqm")
    out["runs"] = [f"{n} (+{words})" if words else str(n)
                   for n, words in zip(table["n_runs"], table["left_out"])]
    out["seed: bias / variance"] = table["seed_bias"] + " / " + table["seed_variance"]
    out["agrees with seed?"] = table["agreement"] + ": " + table["agreement_detail"]
    return out


def compact_table(table: pd.DataFrame) -> pd.DataFrame:
    """The main table, read at a glance: at most 7 columns, no sentences in cells.

    Relative bias (pooled, with its interval) and its yes/no from the same interval, the
    variance ratio to vanilla REINFORCE with its interval, the seed's words and the
    verdict in a word or two; ``display_table`` has everything else.
    """
    out = pd.DataFrame()
    if table["env"].nunique() > 1:
        out["env"] = _env_column(table)
    out["estimator"] = table["label"]
    out["relative bias [95% CI]"] = _ci_column(table, "rel_bias")
    out["bias ≠ 0?"] = table.apply(_bias_verdict_cell, axis=1)
    out["variance / vanilla [95% CI]"] = _ci_column(table, "var_ratio")
    out["seed says (bias / variance)"] = table["seed_bias"] + " / " + table["seed_variance"]
    out["agrees with seed?"] = table["agreement_short"]
    return out


COMPACT_NOTE = (
    "Relative bias: sqrt(mean squared bias / mean ‖∇J‖²) over every measured step and run, "
    "95% interval from the per-measurement standard errors; 'bias ≠ 0?' is that interval's "
    "lower end > 0. Variance / vanilla: trace variance over vanilla REINFORCE's on the same "
    "environment, paired by seed, 95% bootstrap interval. Verdict tags: n < {k} too few runs "
    "for a seed bootstrap; M < {m} too few estimates per measurement for the bias test; band "
    "edge: the interval crosses the edge of the claimed band. Every column, and each verdict "
    "in words: table_full.md."
)


def _markdown(shown: pd.DataFrame) -> str:
    """A GitHub markdown table (written by hand: no optional ``tabulate`` dependency)."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(c) for c in shown.columns) + " |",
             "| " + " | ".join("---" for _ in shown.columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in rec) + " |" for rec in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_markdown(table: pd.DataFrame) -> str:
    """The full table (``display_table``) as GitHub markdown."""
    return _markdown(display_table(table))


def to_markdown_compact(table: pd.DataFrame) -> str:
    """The main table (``compact_table``) as GitHub markdown, with a note on its columns."""
    note = COMPACT_NOTE.format(k=MIN_RUNS_FOR_SEED_BOOTSTRAP, m=MIN_ESTIMATES)
    return _markdown(compact_table(table)) + "\n" + note + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "‖": r"$\|$", "∇": r"$\nabla$", "ĝ": r"$\hat g$",
                "−": "-", "λ": r"$\lambda$", "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$"}


def tex_escape(text: object) -> str:
    """Escape LaTeX's special characters in a cell."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs ``tabular`` of the displayed columns (needs ``\\usepackage{booktabs}``)."""
    shown = display_table(table)
    spec = "l" * len(shown.columns)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join(tex_escape(c) for c in shown.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(v) for v in rec) + r" \\" for rec in shown.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write ``table.md`` (the compact main table), ``table_full.md`` (every column),
    ``table.csv`` (all numbers, interval ends as columns) and ``table.tex`` (every
    column) into ``out_dir``; return their paths by name (``md``, ``full.md``, ...)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"table.{ext}" for ext in ("md", "csv", "tex")}
    paths["full.md"] = out_dir / "table_full.md"
    paths["md"].write_text(to_markdown_compact(table))
    paths["full.md"].write_text(to_markdown(table))
    table.to_csv(paths["csv"], index=False)
    paths["tex"].write_text(to_latex(table))
    return paths


def env_list(table: pd.DataFrame) -> Iterable[str]:
    return list(dict.fromkeys(table["env"]))
