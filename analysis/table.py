"""The bias/variance comparison table: one row per measured estimator (and critic, and
environment block).

Rows come from measurement rows (``measurement_rows``: ``analysis.loader.measured_rows``,
labelled). A run that logged paired measurements (paired.csv) contributes one row per
(step, estimator spec, critic): every estimator of ``training.measure.estimators`` scored
at the run's checkpoints on the SAME episodes against ONE reference. A sweep of such runs
(one training estimator per block, as experiments/table/sweep.yaml does) therefore
scores every row of a block at the same frozen checkpoints, and compares rows paired per
(run, step). Runs without paired.csv contribute their metrics.csv rows (the training
estimator along its own trajectory), and a table of such runs is built as before.

A row is keyed by ``env``, ``estimator`` (the measured one's name), the settings that
split it (``lam``, ...), its ``critic`` (``""`` none, ``train`` the run's own critic,
``fit:N`` a fresh critic fitted on N episodes of the checkpoint's policy, ``exact`` the
true V) and, when two blocks of one env differ in it, ``trained_with``. ``scope`` says
which checkpoints: ``headline`` = all measured steps except, in a paired run with a
training critic, its first, where that critic was never fitted (V at its
initialisation); those checkpoints get their own rows, scope ``UNFITTED``, shown apart.

Which measured steps feed the headline is the ``steps`` option:

- ``all`` (default): every measured iteration, averaged within a run first (one value
  per run).
- ``first``: the first (headline) measured iteration of every run;
- ``last``: the last measured iteration.

The reference gradient is exact (or its standard error is logged and removed) at every
step, so bias is measured correctly whichever steps are used; only comparability differs.
Monte Carlo rows state the reference's mean relative SE (``ref_rel_se``), the estimator it
averages (``ref_method``) and ``ref_circular`` (no reference from another estimator
existed: the bias verdict is then 'not tested', by construction).

Variance ratios (``paired_variance_ratio``): on shared checkpoints, the ratio of the
rows' summed trace variances over the shared (run, step), with a bootstrap over runs;
otherwise (rows from different runs) runs paired by seed. Every pair of rows of a block
is compared the same way (``variance_separations``): ``var_rank`` and ``var_ties`` say
which rows the intervals separate.

Per row, the bias is ONE pooled quantity, and its interval and its verdict come from the
same test, so the three cannot disagree:

- ``bias_sq``: the mean over the row's runs of each run's mean unbiased squared-bias
  estimate U (``grad_bias_sq``, which can be negative), i.e. the mean squared bias over
  the measured steps, every run weighing the same. Its 95% interval is the score
  interval of the pooled model of that mean (``pooled_score_interval``: the steps' logged
  score models summed, measurements being independent across steps and runs), a positive
  lower end no higher than, and the upper end no lower than, ``mean +- 1.96 sqrt(sum se^2) / n``
  from the per-measurement standard errors (``analysis.stats.mean_with_known_se`` on the
  logged SEs, the run's widening of each shared out over the measurements pooled,
  ``pooled_se``: the logged ones alone covered 80-83% over one run of a moving policy on
  LQR); that interval alone where the runs logged no score model. It needs no replicate
  seeds, where a bootstrap over seeds covers 70-80% with 3 seeds on synthetic sweeps with
  heavy-tailed estimates (tests/test_table_consistency.py).
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
variance ratio to vanilla REINFORCE is ``paired_variance_ratio``, and verdicts that rest
on it need ``MIN_RUNS_FOR_SEED_BOOTSTRAP`` runs. ``analysis.claims`` turns the numbers into the
words of the seed's table and says whether they agree, and why when it cannot tell.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
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
from pgvar.stats import SMALLEST_POSITIVE, BiasModel, score_end

STEP_CHOICES = ("first", "last", "all")
ESTIMATOR_ORDER = ["reinforce", "reinforce_rtg", "mean_baseline_episode", "mean_baseline", "rloo",
                   "value_baseline", "actor_critic", "gae", "ppo"]
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
    """``env``, ``estimator`` and every setting that varies within one of them: a config
    column (a GAE lambda sweep gives one row per lambda, a batch-size sweep one row per
    size), the ``critic`` a measurement used (``train``, ``fit:320``, ``exact``) and the
    estimator a run ``trained_with`` when two blocks of one environment differ in it.
    The seed never splits rows. Works on run frames and on measurement rows."""
    keys = ["env", "estimator"]
    candidates = [*config_columns(df), "critic", "trained_with"]
    for col in dict.fromkeys(candidates):
        if col in keys or col not in df.columns or _NOT_A_ROW_KEY.search(col) \
                or col in ("env.name", "estimator.name"):
            continue
        varies = df.groupby(["env", "estimator"], dropna=False)[col].nunique(dropna=True)
        if (varies > 1).any() or (col == "critic" and _has_critic_labels(df)):
            keys.append(_alias_of(df, col))
    return list(dict.fromkeys(keys))


def _has_critic_labels(df: pd.DataFrame) -> bool:
    return "critic" in df.columns and bool(df["critic"].fillna("").astype(str).ne("").any())


def _alias_of(runs: pd.DataFrame, col: str) -> str:
    """The loader's short alias for a config column (``estimator.lam`` -> ``lam``) when
    the alias column holds the same values, else the column itself."""
    for alias, sources in ALIASES.items():
        if col in sources and alias in runs.columns and runs[alias].equals(runs[col]):
            return alias
    return col


def add_labels(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A ``label`` column naming each line's row, e.g. ``gae (lam=0.9) [fit:320]``: the
    estimator, the settings that split it on any env, and its critic in brackets."""
    settings = [k for k in keys[2:] if k != "critic"]
    combos = df.drop_duplicates(keys).copy()
    by_key = {}
    for _, group in combos.groupby("estimator", dropna=False, sort=False):
        splitting = [k for k in settings if group[k].nunique(dropna=True) > 1]
        for _, r in group.iterrows():
            by_key[_key_of(r, keys)] = row_label(r.to_dict(), ["env", "estimator"] + splitting)
    labels = [by_key[_key_of(r, keys)] for _, r in df[keys].iterrows()]
    return df.assign(label=labels)


def _key_of(row: pd.Series, keys: list[str]) -> tuple:
    return tuple("<na>" if _isna(row[k]) else row[k] for k in keys)


def measurement_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The labelled measurement rows of the runs in ``df`` (``analysis.loader.measured_rows``:
    paired rows where a run logged them), each marked ``critic_fitted``: False on a
    paired run's first measured step when the run has a ``train`` critic, which is then
    still at its initialisation (pgvar-run fits it after each update). The table leaves
    those checkpoints out of its headline and shows them apart."""
    rows = measured_rows(df)
    rows.attrs["config_columns"] = config_columns(df) if not df.empty else []
    if rows.empty:
        return rows.assign(label=pd.Series(dtype=str), critic_fitted=pd.Series(dtype=bool))
    keys = row_key_columns(rows)
    rows = add_labels(rows, keys)
    rows["critic_fitted"] = ~_unfitted_checkpoints(rows)
    rows.attrs["row_keys"] = keys
    return rows


def _unfitted_checkpoints(rows: pd.DataFrame) -> pd.Series:
    """True on every row of a (run, step) where the run's training critic was never fitted:
    the first measured step of a paired run that has ``train`` critic rows."""
    paired = rows["source"].ne("metrics") if "source" in rows.columns else pd.Series(False, index=rows.index)
    critic = rows["critic"].fillna("").astype(str) if "critic" in rows.columns else ""
    has_train = (critic == "train").groupby(rows["run_dir"]).transform("any")
    first = rows.groupby("run_dir")["step"].transform("min")
    return paired & has_train & rows["step"].eq(first)


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
    """One line per run: the mean of each statistic over the run's selected steps; for U
    and the relative U (``grad_rel_bias_sq``) the standard error of the run's mean from the
    logged ones (``<column>_se`` = ``sqrt(sum se_k^2) / K`` over its K steps), and what
    ``pooled_se`` needs to widen it (``<column>_widening``, ``<column>_se4``); the mean
    de-noised ``||grad J||^2`` (``ref_sq``) and the fewest estimates of a measurement."""
    cols = [c for c in RUN_STATS if c in rows.columns]
    by_run = rows.groupby("run_dir", sort=False)
    values = by_run[cols].mean()
    values["seed"] = by_run["seed"].first()
    if "ref_norm" in rows.columns:
        values["ref_sq"] = _true_gradient_sq(rows).groupby(rows["run_dir"], sort=False).mean()
    if "n_estimates" in rows.columns:
        values["n_estimates"] = by_run["n_estimates"].min()
    if "grad_bias_sq_se" in rows.columns:
        se, extra = rows["grad_bias_sq_se"].astype(float), widening_variance(rows)
        scales = {"grad_bias_sq": 1.0}
        if "ref_norm" in rows.columns:
            scales["grad_rel_bias_sq"] = rows["ref_norm"].where(rows["ref_norm"] > 0) ** 2
        for column, scale in scales.items():
            parts = pd.DataFrame({"var": (se / scale) ** 2, "extra": extra / scale ** 2})
            run = parts.groupby(rows["run_dir"], sort=False)
            k = run["var"].size()
            var = run["var"].agg(_finite_sum) / k ** 2
            values[f"{column}_se"] = np.sqrt(var)
            values[f"{column}_widening"] = run["extra"].agg(_finite_sum) / k ** 2
            values[f"{column}_se4"] = run["var"].agg(lambda v: _finite_sum(v ** 2)) / k ** 4
    if set(SCORE_MODEL_COLUMNS) <= set(rows.columns):
        values = values.join(run_score_models(rows))
    return values


# the score model of each measurement's U (pgvar.stats.BiasModel) as the runs log it
SCORE_MODEL_COLUMNS = ("grad_bias_sq", "bias_v0", "bias_slope", "bias_skew0")


def run_score_models(rows: pd.DataFrame) -> pd.DataFrame:
    """Per run, the sums that make its measurements' score models (``bias_v0``,
    ``bias_slope``, ``bias_skew0``: U's degenerate variance, its linear slope in the squared
    bias, its skewness) the model of the run's mean U over its K steps, the steps being
    independent: ``score_v0`` = sum v0 / K^2, ``score_slope`` = sum slope / K^2,
    ``score_slope_u`` = sum slope max(U, 0) / K^2 and ``score_pos`` = sum max(U, 0) / K
    (to weigh each step's slope by its share of the squared bias, which differs along a
    moving policy), ``score_k3`` = sum skew0 v0^1.5 / K^3 (third cumulants add). NaN where
    a step has no model (M < 4)."""
    u, v0, slope, skew = (rows[c].astype(float) for c in SCORE_MODEL_COLUMNS)
    parts = pd.DataFrame({"v0": v0, "slope": slope, "slope_u": slope * u.clip(lower=0.0),
                          "pos": u.clip(lower=0.0), "k3": skew * v0.clip(lower=0.0) ** 1.5})
    run = parts.groupby(rows["run_dir"], sort=False)
    k = run["v0"].size().astype(float)
    sums = run.agg(_finite_sum)
    return pd.DataFrame({"score_v0": sums["v0"] / k ** 2, "score_slope": sums["slope"] / k ** 2,
                         "score_slope_u": sums["slope_u"] / k ** 2, "score_pos": sums["pos"] / k,
                         "score_k3": sums["k3"] / k ** 3})


def widening_variance(rows: pd.DataFrame) -> pd.Series:
    """Per measurement, what the run's widening adds to U's variance:
    ``grad_bias_sq_se_run^2 - grad_bias_sq_se^2`` (``analysis.loader.with_run_reliability``),
    0 where the loader could not build it."""
    if "grad_bias_sq_se_run" not in rows.columns:
        return pd.Series(0.0, index=rows.index)
    extra = rows["grad_bias_sq_se_run"].astype(float) ** 2 - rows["grad_bias_sq_se"].astype(float) ** 2
    return extra.clip(lower=0.0).fillna(0.0)


def pooled_se(values: pd.DataFrame, column: str) -> np.ndarray:
    """Each run's standard error as a row pools them (``per_run_values`` lines of one row):
    ``sqrt(se_i^2 + f * widening_i)``, the run-widened variance's excess shared out over
    the effectively independent measurements pooled, f = sum se^4 / (sum se^2)^2 (1 when
    one measurement carries the sum, 1/n for n equal ones).

    Why: one step's SE is estimated from its own M estimates and, on heavy tails, comes
    out small together with a far U; the run's widening (``pgvar.stats.widened_bias_se``)
    corrects one step, but a sum's variance estimate is uncertain by about 1/n_eff of one
    term's, so its excess shrinks as 1/n_eff. Over one run of a moving LQR policy
    (mean_baseline B = 2, M = 16 / 32 / 128) the logged SEs covered 80 / 83 / 93%, this
    95 / 93 / 97%, every step fully widened 99 / 98 / 98% (experiments/calibration,
    "pooled over 10"); over 30 steps the full widening covered 98.6% on average, this 96.9%.
    Without ``<column>_widening`` the logged SEs."""
    se = values[f"{column}_se"].to_numpy(float)
    if f"{column}_widening" not in values.columns:
        return se
    widening = values[f"{column}_widening"].to_numpy(float)
    total = float(np.nansum(se ** 2))
    share = float(np.nansum(values[f"{column}_se4"].to_numpy(float))) / total ** 2 if total > 0 else 1.0
    return np.sqrt(se ** 2 + share * widening)


def _finite_sum(x: pd.Series) -> float:
    """Sum, nan when any value is not finite (an SE that could not be computed)."""
    x = x.to_numpy(float)
    return float(x.sum()) if np.isfinite(x).all() else math.nan


def _true_gradient_sq(rows: pd.DataFrame) -> pd.Series:
    """``ref_norm^2 - ref_se^2`` per measurement: unbiased for ``||grad J||^2`` (a Monte
    Carlo reference's length is inflated by its noise, E||g_ref||^2 = ||grad J||^2 + SE^2)."""
    ref_se = rows["ref_se"].fillna(0.0) if "ref_se" in rows.columns else 0.0
    return rows["ref_norm"] ** 2 - ref_se ** 2


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

HEADLINE = "headline"
UNFITTED = "first checkpoint, training critic never fitted"


def build_table(df: pd.DataFrame, steps: str = "all",
                skipped: Iterable[SkippedRun] = ()) -> pd.DataFrame:
    """The comparison table as a DataFrame of numbers and words (see module doc).

    One row per (row key, ``scope``): the ``headline`` scope uses the checkpoints where
    the training critic had been fitted (all of them for runs without paired rows); a
    block with paired ``train``-critic rows also gets every row at its unfitted first
    checkpoint, scope ``UNFITTED``, shown apart. ``skipped`` (the loader's report) adds,
    per row, how many of its runs were left out and why. ``separations(table)`` gives
    every pairwise variance comparison within a block (``variance_separations``).
    """
    if df.empty:
        raise ValueError("no runs to tabulate")
    rows = measurement_rows(df)
    if rows.empty:
        raise ValueError("no measured steps to tabulate")
    keys = rows.attrs["row_keys"]
    finals = final_returns(df)
    scopes = {HEADLINE: select_steps(rows[rows["critic_fitted"]], steps),
              UNFITTED: rows[~rows["critic_fitted"]]}
    records, separations = [], []
    for scope, chosen in scopes.items():
        if chosen.empty:
            continue
        groups = {k: g for k, g in chosen.groupby(keys, dropna=False, sort=False)}
        for key, group in groups.items():
            record = _row_numbers(dict(zip(keys, key)), keys, group, groups,
                                  finals[finals.index.isin(group["run_dir"].unique())])
            record["scope"] = scope
            records.append(record)
        separations.append(variance_separations(groups, keys).assign(scope=scope))
    skipped = list(skipped)
    records += _rows_without_complete_runs(records, keys, skipped)
    table = pd.DataFrame.from_records(records)
    table["n_left_out"], table["left_out"] = zip(*(_left_out(r, keys, skipped)
                                                  for _, r in table.iterrows()))
    known = table[table["reference"] != "unknown"].groupby("env")["reference"].first()
    table["reference"] = [known.get(env, ref) if ref == "unknown" else ref
                          for env, ref in zip(table["env"], table["reference"])]
    pairs = pd.concat(separations, ignore_index=True) if separations else pd.DataFrame()
    table = _add_ranks(table, pairs)
    table = _add_judgements(table, keys, pairs)
    table["steps"] = steps
    table = _sort_rows(table, keys)
    table.attrs["separations"] = pairs.to_dict("records")  # records: pandas compares attrs
    return table


def _rows_without_complete_runs(records: list[dict], keys: list[str],
                                skipped: list[SkippedRun]) -> list[dict]:
    """Rows for settings whose every run was left out (e.g. an estimator that diverged on
    every seed), so the table shows them with 0 runs instead of dropping them."""
    known = [tuple(r.get(k) for k in keys) for r in records]
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
                      "reference": "unknown", "scope": HEADLINE, "estimator_name": row["estimator"],
                      **{f"{n}{s}": math.nan for n in NUMBER_COLUMNS for s in ("", "_lo", "_hi")},
                      "bias_distinguishable": None, "bias_test_note": "no complete run",
                      "n_measurements": 0, "var_ratio_n": math.nan, "ref_circular": False,
                      "var_ratio_pairing": ""}
    return list(extra.values())


def _left_out(row: pd.Series, keys: list[str], skipped: Iterable[SkippedRun]) -> tuple[int, str]:
    """How many skipped runs belong to this row, as a count and as words by status. A
    skipped run belongs to the rows it would have measured: same settings, and (paired
    rows) trained with the run's estimator."""
    counts: dict[str, int] = {}
    trained = row.get("trained_with")
    paired = not _isna(trained) and trained != row["estimator"]
    for run in skipped:
        if not run.columns:
            continue
        if paired:
            same = (_same(run.columns.get("estimator"), trained) and all(
                _same(run.columns.get(k), row[k]) for k in keys
                if not _estimator_specific(k) and k in run.columns))
        else:
            same = all(k in run.columns and _same(run.columns[k], row[k])
                       for k in keys if k not in ("critic", "trained_with"))
        if same:
            counts[run.status] = counts.get(run.status, 0) + 1
    words = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return sum(counts.values()), words


def _row_numbers(row: dict, keys: list[str], measured: pd.DataFrame, groups: dict,
                 finals: pd.Series) -> dict:
    """Every numeric column of one row, with 95% intervals, as a flat dict."""
    name = str(measured["estimator_name"].iloc[0]) if "estimator_name" in measured else str(row["estimator"])
    claim = cl.claim_for(name)
    values = per_run_values(measured)
    out: dict[str, object] = dict(row)
    out["estimator_name"] = name
    out["label"] = measured["label"].iloc[0]
    out["variant"], out["baseline"] = claim.variant, claim.baseline
    out["n_runs"] = int(measured["run_dir"].nunique())
    out["n_measured_runs"] = len(values)
    out["reference"] = reference_kind(measured)
    out.update(_descriptive(measured))
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
    for stat, col in [("mse", "grad_mse"), ("cos_ref", "cos_ref"),
                      ("cos_pairwise", "cos_pairwise"), ("snr", "snr")]:
        _put(out, stat, _mean_of(values, col))
    reference = _reference_key(row, keys, groups)
    ratio, pairing = (paired_variance_ratio(measured, groups[reference]) if reference is not None
                      else (NAN_ESTIMATE, ""))
    _put(out, "var_ratio", ratio)
    out["var_ratio_n"] = ratio.n if math.isfinite(ratio.value) else math.nan
    out["var_ratio_pairing"] = pairing
    _put(out, "return_iqm", stratified_bootstrap_iqm({row["env"]: finals.to_numpy()}))
    return out


def _descriptive(measured: pd.DataFrame) -> dict[str, object]:
    """The row's reference and critic in words and numbers: the reference's mean relative
    standard error (0 when exact), whether any measurement's bias reference was circular,
    the mean disagreement of the two references, and the critic's data and mean error."""
    def mean(col: str) -> float:
        return float(measured[col].mean()) if col in measured.columns and measured[col].notna().any() else math.nan

    def first(col: str, default: object = "") -> object:
        vals = measured[col].dropna() if col in measured.columns else pd.Series(dtype=object)
        return vals.iloc[0] if len(vals) else default

    rel_se = mean("ref_rel_se")
    if not math.isfinite(rel_se) and {"ref_se", "ref_norm"} <= set(measured.columns):
        rel_se = float((measured["ref_se"].fillna(0) / measured["ref_norm"].where(measured["ref_norm"] > 0)).mean())
    circular = bool(measured["ref_circular"].fillna(False).astype(bool).any()) \
        if "ref_circular" in measured.columns else False
    return {"ref_rel_se": rel_se, "ref_rel_se_max": float(measured["ref_rel_se"].max())
            if "ref_rel_se" in measured.columns else math.nan,
            "ref_method": first("ref_method"), "ref_circular": circular,
            "ref_disagreement": mean("ref_disagreement"),
            "critic_episodes": first("critic_episodes", 0), "critic_error": mean("critic_error"),
            "critic_error_kind": first("critic_error_kind"),
            "trained_with": first("trained_with")}


def paired_variance_ratio(rows: pd.DataFrame, reference: pd.DataFrame) -> tuple[Estimate, str]:
    """Var(rows) / Var(reference) and how it was paired.

    Measurements of the same (run, step) come from the same episodes (paired rows): the
    ratio is then sum over the shared (run, step) of tr Cov(row) over the same sum for
    the reference, i.e. the ratio of the per-run means over the shared checkpoints
    (equal weights per checkpoint), with a bootstrap over RUNS that resamples each run's
    checkpoints together (a run's checkpoints lie on one trajectory and are not
    independent): ``analysis.stats.ratio_ci`` keyed by run. A ratio of pooled means
    rather than a mean of per-checkpoint log ratios: each checkpoint's ratio of two
    M-sample variances is noisy and its log is biased by about the difference of the two
    tail indices over M, which pooling over checkpoints before dividing avoids.

    Rows from different runs (each estimator trained its own policy) fall back to runs
    paired by seed, over each side's own steps (``pairing`` says ``seed``).
    """
    a, b = _by_checkpoint(rows), _by_checkpoint(reference)
    shared = a.index.intersection(b.index)
    if len(shared):
        per_run_a = a.loc[shared].groupby(level="run_dir").mean()
        per_run_b = b.loc[shared].groupby(level="run_dir").mean()
        return ratio_ci(per_run_a.to_dict(), per_run_b.to_dict()), "run, step"
    a, b = per_run_values(rows), per_run_values(reference)
    return ratio_ci(_by_seed(a, "grad_variance"), _by_seed(b, "grad_variance")), "seed"


def _by_checkpoint(rows: pd.DataFrame) -> pd.Series:
    """tr Cov per (run_dir, step) (one measurement each for one table row)."""
    return rows.groupby(["run_dir", "step"], sort=False)["grad_variance"].mean()


def variance_separations(groups: dict, keys: list[str]) -> pd.DataFrame:
    """Every pair of rows of one block (same env and non-estimator settings): Var(a) /
    Var(b) as ``paired_variance_ratio`` pairs it (per (run, step) on shared checkpoints,
    else by seed: ``paired_by``), its 95% interval, and ``separated`` when the interval
    excludes 1 and rests on at least ``MIN_RUNS_FOR_SEED_BOOTSTRAP`` runs."""
    records = []
    items = list(groups.items())
    for i, (key_a, rows_a) in enumerate(items):
        for key_b, rows_b in items[i + 1:]:
            if not _same_block(dict(zip(keys, key_a)), dict(zip(keys, key_b)), keys):
                continue
            ratio, pairing = paired_variance_ratio(rows_a, rows_b)
            if not math.isfinite(ratio.value):
                continue
            records.append({"env": key_a[0], "a": rows_a["label"].iloc[0],
                            "b": rows_b["label"].iloc[0], "ratio": ratio.value,
                            "lo": ratio.lo, "hi": ratio.hi, "n": ratio.n, "paired_by": pairing,
                            "separated": ratio.excludes(1.0)
                            and ratio.n >= MIN_RUNS_FOR_SEED_BOOTSTRAP})
    return pd.DataFrame.from_records(
        records, columns=["env", "a", "b", "ratio", "lo", "hi", "n", "paired_by", "separated"])


def separations(table: pd.DataFrame) -> pd.DataFrame:
    """The pairwise variance comparisons ``build_table`` made (empty when none)."""
    return pd.DataFrame.from_records(table.attrs.get("separations") or [])


def _same_block(a: dict, b: dict, keys: list[str]) -> bool:
    """Two rows of one block: the same env and settings that are not the estimator's."""
    return all(_same(a[k], b[k]) for k in keys if not _estimator_specific(k))


def _add_ranks(table: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """From the pairwise comparisons: ``var_rank`` (1 + the number of rows of the block
    whose variance is separated BELOW this row's by the paired interval; rank 1 = no row
    is shown to have less variance) and ``var_ties`` (the rows it is not separated from)."""
    ranks, ties = [], []
    for _, row in table.iterrows():
        mine = pairs[(pairs["env"] == row["env"]) & (pairs["scope"] == row["scope"])] \
            if not pairs.empty else pairs
        as_a, as_b = mine[mine["a"] == row["label"]], mine[mine["b"] == row["label"]]
        if as_a.empty and as_b.empty:
            ranks.append(math.nan)
            ties.append("")
            continue
        # undecided comparisons (no interval with too few runs) count as not separated
        sep_a = as_a["separated"].astype("boolean").fillna(False).astype(bool)
        sep_b = as_b["separated"].astype("boolean").fillna(False).astype(bool)
        below = int((sep_a & (as_a["lo"] > 1)).sum() + (sep_b & (as_b["hi"] < 1)).sum())
        tied = list(as_a.loc[~sep_a, "b"]) + list(as_b.loc[~sep_b, "a"])
        ranks.append(1 + below)
        ties.append(", ".join(tied))
    table["var_rank"] = ranks
    table["var_ties"] = ties
    return table


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
    se = pooled_se(values, column)[values[column].notna().to_numpy()]
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
        pooled squared gradient is not positive). A positive lower end stays positive: the
        smallest positive number that marks "above 0" would underflow to 0 and make the
        relative column contradict the verdict."""
        if not (math.isfinite(self.ref_sq) and self.ref_sq > 0):
            return Estimate(math.nan, math.nan, math.nan, est.n)
        lo = est.lo / self.ref_sq
        if est.lo > 0:
            lo = max(lo, SMALLEST_POSITIVE)
        return Estimate(est.value / self.ref_sq, lo, est.hi / self.ref_sq, est.n)

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
        se = pooled_se(values, "grad_bias_sq")
        b2 = pooled_score_interval(values, mean_with_known_se(values["grad_bias_sq"], se), se)
    else:
        b2 = mean_ci(values["grad_bias_sq"].to_numpy())
    ref_sq = float(values["ref_sq"].mean()) if "ref_sq" in values.columns else math.nan
    fewest = float(values["n_estimates"].min()) if "n_estimates" in values.columns else math.nan
    return PooledBias(b2, ref_sq, fewest, se_logged)


def pooled_score_model(values: pd.DataFrame, u: float) -> BiasModel | None:
    """The score model of a row's pooled U (the mean ``u`` of its n runs' means) from
    ``run_score_models``: v0 = sum v0_i / n^2, skewness from the summed third cumulants
    (sum k3_i / n^3), and the linear part's slope as the steps' slopes weighted by their
    shares of the positive part of U, (sum slope_u_i / n^2) / (sum pos_i / n) (the plain
    sum slope_i / n^2 when every U is <= 0): at a fixed policy the two agree; along a
    moving one the steps whose squared bias is large carry the linear part. (Dividing by
    the mean U instead blew the slope up where U is near 0.) None when a run has none."""
    cols = ["score_v0", "score_slope", "score_slope_u", "score_pos", "score_k3"]
    kept = values[values["grad_bias_sq"].notna()]
    if not set(cols) <= set(kept.columns) or kept.empty:
        return None
    v0, slope, slope_u, pos, k3 = (kept[c].to_numpy(float) for c in cols)
    if not all(np.isfinite(x).all() for x in (v0, slope, slope_u, pos, k3)):
        return None
    n = len(kept)
    v0_sum = float(v0.sum()) / n ** 2
    positive = float(pos.sum()) / n
    slope_at = float(slope_u.sum()) / n ** 2 / positive if positive > 0 else float(slope.sum()) / n ** 2
    skew = float(k3.sum()) / n ** 3 / v0_sum ** 1.5 if v0_sum > 0 else 0.0
    return BiasModel(u=u, v0=v0_sum, slope=slope_at, skew0=skew)


def pooled_score_interval(values: pd.DataFrame, wald: Estimate, se: np.ndarray) -> Estimate:
    """The row's squared-bias interval as one measurement's is built
    (``pgvar.stats.bias_interval_from``), from the pooled score model
    (``pooled_score_model``): the score test of "squared bias = theta" at the pooled
    model's variance and skewness AT theta, so that "no bias" is tested with the
    degenerate spread alone; its lower end with the runs' widening shared out
    (``pooled_se``) added to the degenerate part, and, where that end is positive, the
    lower of it and the Wald end ``wald.lo`` (mean -/+ 1.96 pooled SE); its upper end the
    higher of the model's and the Wald one. ``wald`` itself where the runs logged no score
    model.

    Why: the Wald interval on the summed SEs alone said "biased" in 0.24% (fixed
    policies) and 0.67% (moving) of the calibration's zero-bias runs of 10 steps (seeds
    1-3, 2,880 and 1,800 runs; nominal 2.5%): the corrected jackknife SE is floored at U's
    degenerate variance, ~1.6x too large in variance under no bias, and moves with U. This
    interval says so in 1.5% and 2.1% and meets 95% +- 2 in every cell on each seed
    (experiments/calibration, "pooled over 10"); its upper end taken from the model alone
    (not the higher of the two) covered 85% of moving LQR runs at B = 2, M = 16."""
    if not (math.isfinite(wald.lo) and math.isfinite(wald.value)):
        return wald
    model = pooled_score_model(values, wald.value)
    if model is None:
        return wald
    ok = values["grad_bias_sq"].notna().to_numpy()
    n = int(ok.sum())
    excess = float(np.nansum(se[ok] ** 2 - values["grad_bias_sq_se"].to_numpy(float)[ok] ** 2)) / n ** 2
    widen = 1.0 + max(excess, 0.0) / model.v0 if model.v0 > 0 else 1.0
    lo = score_end(replace(model, v0=model.v0 * widen), upper=False)
    hi = max(score_end(model, upper=True), wald.hi)
    if lo > 0:
        lo = max(min(lo, wald.lo), SMALLEST_POSITIVE)
    return Estimate(wald.value, lo, hi, wald.n)


def _reference_key(row: dict, keys: list[str], groups: dict) -> tuple | None:
    """The key of the vanilla REINFORCE row this row is compared with, if any: same
    block (env and the settings that are not the estimator's)."""
    shared = [k for k in keys if not _estimator_specific(k)]
    for key in groups:
        cand = dict(zip(keys, key))
        if cand["estimator"] == cl.REFERENCE_ESTIMATOR and all(
                _same(cand[k], row[k]) for k in shared):
            return key
    return None


def _estimator_specific(column: str) -> bool:
    """A setting of the measured estimator itself (its name, ``estimator.*`` or an
    alias such as ``lam``, its ``critic``), which vanilla REINFORCE's row need not share."""
    if column in ("estimator", "critic"):
        return True
    return column.startswith("estimator.") or any(
        column == alias and all(s.startswith("estimator.") for s in sources)
        for alias, sources in ALIASES.items())


def _same(a: object, b: object) -> bool:
    return (pd.isna(a) and pd.isna(b)) if (_isna(a) or _isna(b)) else a == b


def _isna(x: object) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def row_label(row: dict, keys: list[str]) -> str:
    """``estimator`` plus the settings that split it and its critic, e.g.
    ``gae (lam=0.9) [fit:320]``."""
    extras = [f"{k.split('.')[-1]}={_short(row[k])}" for k in keys[2:]
              if k != "critic" and not _isna(row[k])]
    label = f"{row['estimator']} ({', '.join(extras)})" if extras else str(row["estimator"])
    critic = row.get("critic")
    return f"{label} [{critic}]" if isinstance(critic, str) and critic else label


def _short(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sort_rows(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Headline rows first; environments with an exact reference first, then by name;
    estimators in the seed's order; then settings (e.g. lambda); then critics (none,
    train, fit:N by N, exact)."""
    order = {e: i for i, e in enumerate(ESTIMATOR_ORDER)}
    table["_scope"] = table["scope"].ne(HEADLINE)
    table["_est"] = table["estimator"].map(lambda e: order.get(e, len(order)))
    table["_exact"] = table["reference"].ne("exact")
    table["_critic"] = table["critic"].map(_critic_order) if "critic" in table.columns else 0
    settings = [k for k in keys[2:] if k != "critic"]
    table = table.sort_values(["_scope", "_exact", "env", "_est", "estimator", *settings, "_critic"],
                              kind="stable")
    return table.drop(columns=["_scope", "_est", "_exact", "_critic"]).reset_index(drop=True)


def _critic_order(critic: object) -> float:
    """Sort key of a critic label: none, train, fit:N by N, exact."""
    critic = "" if _isna(critic) else str(critic)
    if critic.startswith("fit:") and critic[4:].isdigit():
        return 2 + int(critic[4:]) / 1e9
    return {"": 0, "train": 1, "exact": 4}.get(critic, 5)


def reference_kind(measured: pd.DataFrame) -> str:
    """'exact' when every measurement had an exact reference gradient, else 'Monte Carlo'."""
    if "ref_exact" in measured.columns and measured["ref_exact"].notna().any():
        return "exact" if bool((measured["ref_exact"] == 1).all()) else "Monte Carlo"
    if "ref_se" in measured.columns and measured["ref_se"].notna().any():
        return "exact" if bool((measured["ref_se"].fillna(0) == 0).all()) else "Monte Carlo"
    return "unknown"


# ----------------------------------------------------------------------------- judging


def _add_judgements(table: pd.DataFrame, keys: list[str], pairs: pd.DataFrame) -> pd.DataFrame:
    """The seed's words next to each row and whether the measurement agrees: the
    verdict (``agreement``), in a word or two (``agreement_short``), in words with every
    inconclusive part's reason (``agreement_detail``), and ``verdict_kind``: ``tested``
    when every stated part could have failed, else which parts hold by construction
    (those are not counted). Critic-based rows at fitted critics also get
    ``critic_trend``: does their bias fall with the critic's data (``claims.judge_bias_trend``)."""
    verdicts, shorts, details, kinds, seed_bias, seed_var, measured_var, trends = ([] for _ in range(8))
    for _, row in table.iterrows():
        name = str(row["estimator_name"])
        claim = cl.claim_for(name)
        ratio = _ratio_of(row)
        rel_bias = Estimate(row["rel_bias"], row["rel_bias_lo"], row["rel_bias_hi"], 0)
        if name == cl.REFERENCE_ESTIMATOR:
            variance = cl.judge_vanilla_variance(_other_source_ratios(table, row, keys))
        else:
            variance = cl.judge_variance(claim.variance, ratio, n_runs=ratio.n)
        dist = row["bias_distinguishable"]
        bias = cl.judge_bias(claim.bias, None if _isna(dist) else bool(dist), rel_bias,
                             _tunable(table, row, keys, pairs) if claim.bias == "tunable" else None,
                             note=row["bias_test_note"],
                             note_short=_short_note(row["bias_test_note"]),
                             circular=bool(row.get("ref_circular", False) is True))
        overall = cl.combine(bias, variance)
        if row["n_runs"] == 0:
            overall = cl.Judgement("no data", f"no complete run ({row['left_out']})")
        verdicts.append(overall.verdict)
        shorts.append(overall.cell)
        details.append(overall.words)
        kinds.append(_verdict_kind(bias, variance))
        seed_bias.append(claim.bias or "-")
        seed_var.append(claim.variance or "-")
        measured_var.append(cl.variance_band(row["var_ratio"])
                            if math.isfinite(row["var_ratio"]) else "-")
        trends.append(_critic_trend(table, row, keys))
    table["seed_bias"], table["seed_variance"] = seed_bias, seed_var
    table["measured_variance_word"] = measured_var
    table["agreement"], table["agreement_short"] = verdicts, shorts
    table["agreement_detail"] = details
    table["verdict_kind"] = kinds
    table["critic_trend"] = trends
    return table


def _ratio_of(row: pd.Series) -> Estimate:
    n = int(row["var_ratio_n"]) if math.isfinite(row["var_ratio_n"]) else 0
    return Estimate(row["var_ratio"], row["var_ratio_lo"], row["var_ratio_hi"], n)


def _verdict_kind(*parts: cl.Judgement) -> str:
    """``tested`` when every stated part was tested; else names the untested parts."""
    stated = [j for j in parts if j.verdict != "no claim"]
    if not stated:
        return "-"
    untested = [j.words.partition(":")[0] for j in stated if j.kind != cl.TESTED]
    return cl.TESTED if not untested else f"{', '.join(untested)} {cl.BY_CONSTRUCTION}"


def _block_rows(table: pd.DataFrame, row: pd.Series, keys: list[str]) -> pd.DataFrame:
    """The rows of ``row``'s block (same env and non-estimator settings) and scope."""
    same = table["scope"] == row["scope"]
    for k in keys:
        if not _estimator_specific(k):
            same &= np.array([_same(v, row[k]) for v in table[k]], dtype=bool)
    return table[same]


def _other_source_ratios(table: pd.DataFrame, row: pd.Series, keys: list[str]) -> list[tuple[str, Estimate]]:
    """The paired variance ratios to vanilla of the block's other source-table rows."""
    block = _block_rows(table, row, keys)
    others = block[block["estimator_name"].isin(cl.SEED_TABLE_ROWS)
                   & (block["estimator_name"] != cl.REFERENCE_ESTIMATOR)]
    return [(r["label"], _ratio_of(r)) for _, r in others.iterrows()]


def _short_note(note: object) -> str:
    """A few characters for a bias test that could not be read (the compact table)."""
    note = "" if _isna(note) else str(note)
    if note.startswith("too few estimates"):
        return f"M < {MIN_ESTIMATES}"
    if note.startswith("too few runs"):
        return f"n < {MIN_RUNS_FOR_SEED_BOOTSTRAP}"
    return "no bias test" if note else ""


def _pair_ratio(pairs: pd.DataFrame, a: str, b: str, env: str, scope: str) -> Estimate:
    """Var(a) / Var(b) from the block's pairwise comparisons (either order), or NaN."""
    if pairs.empty:
        return NAN_ESTIMATE
    mine = pairs[(pairs["env"] == env) & (pairs["scope"] == scope)]
    hit = mine[(mine["a"] == a) & (mine["b"] == b)]
    if not hit.empty:
        r = hit.iloc[0]
        return Estimate(r["ratio"], r["lo"], r["hi"], int(r["n"]))
    hit = mine[(mine["a"] == b) & (mine["b"] == a)]
    if not hit.empty:
        r = hit.iloc[0]
        return Estimate(1 / r["ratio"], 1 / r["hi"], 1 / r["lo"], int(r["n"]))
    return NAN_ESTIMATE


def _tunable(table: pd.DataFrame, row: pd.Series, keys: list[str], pairs: pd.DataFrame) -> cl.Judgement:
    """Does lambda tune GAE's bias against its variance on this block, at this row's
    critic? ``claims.judge_tunable`` on the smallest and largest lambda's rows (the
    one-step actor-critic row standing for lambda = 0)."""
    if "lam" not in table.columns:
        return cl.inconclusive("bias: seed says tunable", "one lambda in the sweep", "one lambda")
    block = _block_rows(table, row, keys)
    rows = block[(block["estimator_name"] == row["estimator_name"]) & block["lam"].notna()]
    # one-step actor-critic IS GAE at lambda = 0 (the same advantage, delta_t): its rows
    # give the sweep its lambda = 0 end when no gae(lam=0) row was measured
    one_step = block[block["estimator_name"] == "actor_critic"].assign(lam=0.0)
    if not (rows["lam"] == 0).any():
        rows = pd.concat([rows, one_step])
    if "critic" in rows.columns:
        rows = rows[[_same(c, row.get("critic")) for c in rows["critic"]]]
    if rows["lam"].nunique() < 2:
        return cl.inconclusive("bias: seed says tunable", "one lambda in the sweep", "one lambda")
    lo_row, hi_row = rows.loc[rows["lam"].idxmin()], rows.loc[rows["lam"].idxmax()]
    ends = [cl.LambdaEnd(float(r["lam"]), Estimate(r["rel_bias_sq"], r["rel_bias_sq_lo"],
                                                   r["rel_bias_sq_hi"], 0),
                         None if _isna(r["bias_distinguishable"]) else bool(r["bias_distinguishable"]),
                         "" if _isna(r["bias_test_note"]) else str(r["bias_test_note"]))
            for r in (lo_row, hi_row)]
    tested = rows["bias_distinguishable"].dropna()
    any_biased = bool(tested.astype(bool).any()) if len(tested) == len(rows) else None
    var = _pair_ratio(pairs, hi_row["label"], lo_row["label"], row["env"], row["scope"])
    return cl.judge_tunable(ends[0], ends[1], var, any_biased)


CRITIC_ESTIMATORS = ("value_baseline", "actor_critic", "gae", "ppo")


def _critic_trend(table: pd.DataFrame, row: pd.Series, keys: list[str]) -> str:
    """For a critic-based row at a fitted critic (``fit:N``): does the same estimator's
    bias fall from the fewest to the most critic episodes? Empty for other rows."""
    critic = str(row.get("critic", "") or "")
    if row["estimator_name"] not in CRITIC_ESTIMATORS or not critic.startswith("fit:"):
        return ""
    block = _block_rows(table, row, keys)
    same = block[(block["estimator_name"] == row["estimator_name"])
                 & block["critic"].fillna("").astype(str).str.startswith("fit:")]
    settings = [k for k in keys if _estimator_specific(k) and k not in ("estimator", "critic")]
    for k in settings:
        same = same[[_same(v, row[k]) for v in same[k]]]
    points = [(int(r["critic_episodes"]), Estimate(r["rel_bias_sq"], r["rel_bias_sq_lo"],
                                                   r["rel_bias_sq_hi"], 0))
              for _, r in same.iterrows() if math.isfinite(float(r["critic_episodes"]))]
    judgement = cl.judge_bias_trend(points)
    return f"{judgement.cell}: {judgement.words}"


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


def _col(table: pd.DataFrame, name: str, default: object = "") -> pd.Series:
    return table[name] if name in table.columns else pd.Series(default, index=table.index)


def _number_cell(value: object) -> str:
    return "-" if _isna(value) else fmt_ci(float(value), math.nan, math.nan)


def _critic_cell(row: pd.Series) -> str:
    """``fit:320, error 0.12 (heldout_rmse)`` or ``-`` for rows without a critic."""
    critic = row.get("critic")
    if _isna(critic) or not critic:
        return "-"
    error = row.get("critic_error")
    if _isna(error):
        return str(critic)
    return f"{critic}, error {_number_cell(error)} ({row.get('critic_error_kind') or '?'})"


def _ref_cell(row: pd.Series) -> str:
    """The reference behind a row: exact, or Monte Carlo with its relative SE, and a
    circular reference flagged."""
    if row.get("reference") == "exact":
        return "exact"
    method = row.get("ref_method")
    text = f"{method}" if isinstance(method, str) and method else str(row.get("reference"))
    text += f", rel SE {_number_cell(row.get('ref_rel_se'))}"
    if row.get("ref_circular") is True:
        text += ", CIRCULAR"
    return text


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The full human-facing table: every column, numbers formatted with their intervals."""
    out = pd.DataFrame()
    if table["scope"].nunique() > 1:
        out["checkpoints"] = table["scope"]
    if table["env"].nunique() > 1:
        out["env"] = _env_column(table)
    out["estimator"] = table["label"]
    out["variant"] = table["variant"]
    out["baseline"] = table["baseline"]
    if _has_critic_labels(table):
        out["critic (data, error)"] = table.apply(_critic_cell, axis=1)
    out["reference (rel SE)"] = table.apply(_ref_cell, axis=1)
    out["bias ‖E ĝ − ∇J‖ (RMS)"] = _ci_column(table, "bias")
    out["relative bias"] = _ci_column(table, "rel_bias")
    out["bias distinguishable from 0"] = table.apply(_bias_verdict_cell, axis=1)
    out["RMS ‖∇J‖"] = table["ref_norm"].map(lambda v: fmt_ci(v, math.nan, math.nan))
    out["variance tr Cov"] = _ci_column(table, "variance")
    out["relative variance"] = _ci_column(table, "rel_variance")
    out["variance / vanilla"] = _ci_column(table, "var_ratio")
    out["paired by"] = _col(table, "var_ratio_pairing")
    out["variance rank (ties)"] = [f"{_number_cell(r)} ({t})" if t else _number_cell(r)
                                   for r, t in zip(_col(table, "var_rank", math.nan),
                                                   _col(table, "var_ties"))]
    out["MSE"] = table.apply(lambda r: fmt_ci(r["mse"], math.nan, math.nan), axis=1)
    out["cos(ĝ, ∇J)"] = table.apply(lambda r: fmt_ci(r["cos_ref"], math.nan, math.nan), axis=1)
    out["final return (IQM)"] = _ci_column(table, "return_iqm")
    out["runs"] = [f"{n} (+{words})" if words else str(n)
                   for n, words in zip(table["n_runs"], table["left_out"])]
    out["seed: bias / variance"] = table["seed_bias"] + " / " + table["seed_variance"]
    out["verdict kind"] = _col(table, "verdict_kind")
    out["agrees with seed?"] = table["agreement"] + ": " + table["agreement_detail"]
    out["bias vs critic data"] = _col(table, "critic_trend")
    return out


def compact_table(table: pd.DataFrame) -> pd.DataFrame:
    """The main table, read at a glance: the headline checkpoints, at most 7 columns, no
    sentences in cells.

    Relative bias (pooled, with its interval) and its yes/no from the same interval (on
    Monte Carlo rows with the reference's relative SE), the variance ratio to vanilla
    REINFORCE with its interval and the rank its paired intervals separate it into, the
    seed's words and the verdict in a word or two; ``display_table`` has everything else.
    """
    table = table[table["scope"] == HEADLINE]
    out = pd.DataFrame()
    if table["env"].nunique() > 1:
        out["env"] = _env_column(table)
    out["estimator"] = table["label"]
    out["relative bias [95% CI]"] = _ci_column(table, "rel_bias")
    out["bias ≠ 0?"] = [_bias_verdict_cell(r) + _ref_note(r) for _, r in table.iterrows()]
    ranks = _col(table, "var_rank", math.nan)
    out["variance / vanilla [95% CI] (rank)"] = [
        f"{cell} (#{rank:g})" if math.isfinite(rank) else cell
        for cell, rank in zip(_ci_column(table, "var_ratio"), ranks)]
    out["seed says (bias / variance)"] = table["seed_bias"] + " / " + table["seed_variance"]
    out["agrees with seed?"] = table["agreement_short"]
    return out


def _ref_note(row: pd.Series) -> str:
    """`` (ref SE 0.11)`` after a Monte Carlo row's bias verdict (`` circular`` when its
    reference was built from the tested estimator); empty on exact rows."""
    if row.get("reference") == "exact":
        return ""
    circular = " circular" if row.get("ref_circular") is True else ""
    rel_se = row.get("ref_rel_se")
    return f" (ref SE {_number_cell(rel_se)}{circular})" if not _isna(rel_se) or circular else ""


def critic_table(table: pd.DataFrame) -> pd.DataFrame:
    """Critic quality as a factor: every critic-based row with its critic's data and error,
    relative bias, variance ratio, its verdict and whether its bias falls with critic data."""
    rows = table[table["critic"].fillna("").astype(str).ne("")] if "critic" in table.columns else table.iloc[0:0]
    out = pd.DataFrame()
    out["checkpoints"] = rows["scope"]
    out["env"] = rows["env"]
    out["estimator"] = rows["label"]
    out["critic (data, error)"] = rows.apply(_critic_cell, axis=1) if not rows.empty else []
    out["relative bias [95% CI]"] = _ci_column(rows, "rel_bias") if not rows.empty else []
    out["variance / vanilla [95% CI]"] = _ci_column(rows, "var_ratio") if not rows.empty else []
    out["agrees with seed?"] = rows["agreement_short"]
    out["bias vs critic data"] = _col(rows, "critic_trend")
    return out


COMPACT_NOTE = (
    "Headline checkpoints: every measured step of the training runs, except a run's first "
    "when it has a training critic that was not yet fitted (those rows are in table_full.md). "
    "Relative bias: sqrt(mean squared bias / mean ‖∇J‖²) over those checkpoints and runs, "
    "95% interval: the score interval of the mean squared-bias estimate, its spread from the "
    "measurements' own models pooled (joined with their standard errors); 'bias ≠ 0?' is that "
    "interval's lower end > 0 ('>0': above 0 but possibly tiny), a one-sided test at 2.5%: "
    "{false_alarms} ref SE: a Monte Carlo reference's standard error over ‖∇J‖ "
    "('circular': built from the tested estimator, so its bias is not tested). Variance / "
    "vanilla: trace variance over vanilla REINFORCE's, paired per (run, step) on the same "
    "episodes when the runs logged paired measurements (else by seed), 95% bootstrap "
    "interval over runs; rank #k: 1 + the rows of the block whose variance is separated "
    "below this row's by their paired interval. Verdict tags: n < {k} too few runs for a seed "
    "bootstrap; M < {m} too few estimates per measurement for the bias test; band edge: the "
    "interval crosses the edge of the claimed band. Only tested verdicts count. Every "
    "column, and each verdict in words: table_full.md."
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
    note = COMPACT_NOTE.format(k=MIN_RUNS_FOR_SEED_BOOTSTRAP, m=MIN_ESTIMATES,
                               false_alarms=expected_false_alarms(table))
    return _markdown(compact_table(table)) + "\n" + note + "\n"


BIAS_TEST_LEVEL = 0.025  # one-sided: the pooled 95% interval's lower end above 0


def expected_false_alarms(table: pd.DataFrame) -> str:
    """How many of the headline rows' bias verdicts would say 'yes' by chance were every
    tested estimator unbiased (``BIAS_TEST_LEVEL`` of the tested rows): with tens of rows,
    one unbiased row reading 'yes' is what the test's level predicts, not a finding."""
    tested = table.loc[table["scope"] == HEADLINE, "bias_distinguishable"].dropna()
    n = len(tested)
    if n == 0:
        return "no row was tested here."
    return (f"were all {n} tested rows unbiased, about {n * BIAS_TEST_LEVEL:.1f} would read "
            f"'yes' by chance (here: {int(tested.astype(bool).sum())}).")


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
    column) into ``out_dir``, and where there are critic rows / paired comparisons
    ``table_critic.md`` and ``variance_separations.csv``; return their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"table.{ext}" for ext in ("md", "csv", "tex")}
    paths["full.md"] = out_dir / "table_full.md"
    paths["md"].write_text(to_markdown_compact(table))
    paths["full.md"].write_text(to_markdown(table))
    table.to_csv(paths["csv"], index=False)
    paths["tex"].write_text(to_latex(table))
    critics = critic_table(table)
    if not critics.empty:
        paths["critic.md"] = out_dir / "table_critic.md"
        paths["critic.md"].write_text(_markdown(critics))
    pairs = separations(table)
    if not pairs.empty:
        paths["separations.csv"] = out_dir / "variance_separations.csv"
        pairs.to_csv(paths["separations.csv"], index=False)
    return paths


def env_list(table: pd.DataFrame) -> Iterable[str]:
    return list(dict.fromkeys(table["env"]))
