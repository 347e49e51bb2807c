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

Per row, each statistic is first reduced to one number per run (seeds are the
independent replicates), then averaged across runs with a 95% percentile bootstrap
interval. Bias is averaged as the unbiased squared-bias estimate ``U`` (which can be
negative) and reported as ``sqrt(max(mean U, 0))``; the bias is 'distinguishable from
zero' when the interval of mean U lies above 0 (that interval is the hull of the
bootstrap one and one from the runs' logged standard errors: ``squared_bias_interval``).
Relative quantities divide by
``||grad J||^2`` (variance) or ``||grad J||`` (bias) at the same step. The variance ratio
to vanilla REINFORCE pairs runs by seed. ``analysis.claims`` turns the numbers into the
words of the seed's table and says whether they agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import claims as cl
from analysis.loader import ALIASES, SkippedRun, measured_rows
from analysis.render import format_ci
from analysis.stats import NAN_ESTIMATE, Estimate, mean_ci, ratio_ci, stratified_bootstrap_iqm

STEP_CHOICES = ("first", "last", "all")
ESTIMATOR_ORDER = ["reinforce", "reinforce_rtg", "mean_baseline", "rloo", "value_baseline",
                   "actor_critic", "gae", "ppo"]
# Config columns that never define a row: replicates, places, machinery.
_NOT_A_ROW_KEY = re.compile(r"(^|\.)(seed|.*dir|.*path|output.*|device|hydra|log.*|"
                            r"n_jobs|num_workers|threads?|versions?)(\.|$)")
RUN_STATS = ["grad_bias_sq", "grad_rel_bias_sq", "grad_variance", "grad_rel_variance",
             "grad_mse", "cos_ref", "cos_pairwise", "snr", "ref_norm"]
FINAL_FRACTION = 0.1
NUMBER_COLUMNS = ["bias_sq", "bias", "rel_bias", "variance", "rel_variance", "mse", "cos_ref",
                  "cos_pairwise", "snr", "ref_norm", "var_ratio", "return_iqm"]  # the learning curve's last 10% of iterations give the final return


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
    over its K steps, from the logged ``grad_bias_sq_se``)."""
    cols = [c for c in RUN_STATS if c in rows.columns]
    by_run = rows.groupby("run_dir", sort=False)
    values = by_run[cols].mean()
    values["seed"] = by_run["seed"].first()
    if "grad_bias_sq_se" in rows.columns:
        values["grad_bias_sq_se"] = by_run["grad_bias_sq_se"].apply(_se_of_mean)
        if "ref_norm" in rows.columns:
            rel_se = rows["grad_bias_sq_se"] / rows["ref_norm"].where(rows["ref_norm"] > 0) ** 2
            values["grad_rel_bias_sq_se"] = rel_se.groupby(rows["run_dir"], sort=False).apply(_se_of_mean)
    return values


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
                      "bias_distinguishable": None}
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
    b2 = squared_bias_interval(values, "grad_bias_sq")
    rel_b2 = squared_bias_interval(values, "grad_rel_bias_sq")
    _put(out, "bias_sq", b2)
    _put(out, "bias", b2.map(_sqrt0))
    _put(out, "rel_bias", rel_b2.map(_sqrt0))
    out["bias_distinguishable"] = _distinguishable(b2, rel_b2)
    for name, col in [("variance", "grad_variance"), ("rel_variance", "grad_rel_variance"),
                      ("mse", "grad_mse"), ("cos_ref", "cos_ref"),
                      ("cos_pairwise", "cos_pairwise"), ("snr", "snr"), ("ref_norm", "ref_norm")]:
        _put(out, name, _mean_of(values, col))
    _put(out, "var_ratio", _variance_ratio(row, keys, values, per_row))
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
    interval: the hull of two intervals for it.

    - the percentile bootstrap across runs (rough with few runs: it under-covers);
    - ``mean U +- 1.96 * pooled SE``, the pooled SE ``sqrt(sum_i se_i^2) / n`` from the
      runs' own standard errors (``<column>_se``, when logged). Under 'no bias' every U_i
      has mean 0, so this interval is right whatever the number of runs.

    'Bias distinguishable from zero' is this interval lying above 0, so both tests must
    agree: an unbiased estimator is rarely called biased.
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


def _distinguishable(b2: Estimate, rel_b2: Estimate) -> bool | None:
    """Bias distinguishable from 0: the squared-bias interval lies above 0, and so does
    the relative one when measured (they weight the steps differently; a verdict should
    not contradict either interval shown next to it)."""
    if not math.isfinite(b2.lo):
        return None
    return bool(b2.lo > 0 and (rel_b2.lo > 0 if math.isfinite(rel_b2.lo) else True))


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
    """The seed's words next to each row and whether the measurement agrees."""
    verdicts, details, seed_bias, seed_var, measured_var = [], [], [], [], []
    for _, row in table.iterrows():
        claim = cl.claim_for(str(row["estimator"]))
        ratio = Estimate(row["var_ratio"], row["var_ratio_lo"], row["var_ratio_hi"], 0)
        rel_bias = Estimate(row["rel_bias"], row["rel_bias_lo"], row["rel_bias_hi"], 0)
        is_ref = row["estimator"] == cl.REFERENCE_ESTIMATOR
        variance = cl.judge_variance(claim.variance, ratio, _others_above_one(table, row),
                                     is_reference=is_ref)
        dist = row["bias_distinguishable"]
        bias = cl.judge_bias(claim.bias, None if _isna(dist) else bool(dist), rel_bias,
                             _tunable(table, row) if claim.bias == "tunable" else None)
        overall = cl.combine(bias, variance)
        if row["n_runs"] == 0:
            overall = cl.Judgement("no data", f"no complete run ({row['left_out']})")
        verdicts.append(overall.verdict)
        details.append(overall.words)
        seed_bias.append(claim.bias or "-")
        seed_var.append(claim.variance or "-")
        measured_var.append(cl.variance_band(row["var_ratio"])
                            if math.isfinite(row["var_ratio"]) else "-")
    table["seed_bias"], table["seed_variance"] = seed_bias, seed_var
    table["measured_variance_word"] = measured_var
    table["agreement"], table["agreement_detail"] = verdicts, details
    return table


def _others_above_one(table: pd.DataFrame, row: pd.Series) -> bool | None:
    """For the vanilla row: does another seed-table row on its env have Var ratio > 1?"""
    others = table[(table["env"] == row["env"]) & (table["estimator"] != row["estimator"])
                   & table["estimator"].isin(cl.SEED_TABLE_ROWS)]
    lows = others["var_ratio_lo"].dropna()
    if others.empty or lows.empty:
        return None
    return bool((lows > 1).any())


def _tunable(table: pd.DataFrame, row: pd.Series) -> cl.Judgement:
    """Does lambda move GAE's bias on this env? Compare the smallest and largest lambda."""
    lam_col = "lam" if "lam" in table.columns else None
    rows = table[(table["env"] == row["env"]) & (table["estimator"] == row["estimator"])]
    if lam_col is None or rows[lam_col].nunique() < 2:
        return cl.Judgement("inconclusive", "bias: tunable untested (one lambda in the sweep)")
    lo_row = rows.loc[rows[lam_col].idxmin()]
    hi_row = rows.loc[rows[lam_col].idxmax()]
    apart = lo_row["bias_sq_lo"] > hi_row["bias_sq_hi"] or hi_row["bias_sq_lo"] > lo_row["bias_sq_hi"]
    words = (f"bias: seed says tunable, relative bias {lo_row['rel_bias']:.3g} at "
             f"lambda={lo_row[lam_col]:g} vs {hi_row['rel_bias']:.3g} at lambda={hi_row[lam_col]:g}")
    return cl.Judgement("agrees" if apart else "inconclusive", words)


# ----------------------------------------------------------------------------- writing


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The human-facing columns, numbers formatted with their intervals."""
    def ci(name: str) -> pd.Series:
        return table.apply(lambda r: format_ci(r[name], r[f"{name}_lo"], r[f"{name}_hi"], missing="-"), axis=1)

    several_envs = table["env"].nunique() > 1
    out = pd.DataFrame()
    if several_envs:
        out["env"] = table["env"] + " (" + table["reference"] + " ∇J)"
    out["estimator"] = table["label"]
    out["variant"] = table["variant"]
    out["baseline"] = table["baseline"]
    out["bias ‖E ĝ − ∇J‖"] = ci("bias")
    out["relative bias"] = ci("rel_bias")
    out["bias distinguishable from 0"] = table["bias_distinguishable"].map(
        lambda v: "-" if _isna(v) else ("yes" if v else "no"))
    out["variance tr Cov"] = ci("variance")
    out["relative variance"] = ci("rel_variance")
    out["variance / vanilla"] = ci("var_ratio")
    out["MSE"] = table.apply(lambda r: format_ci(r["mse"], math.nan, math.nan, missing="-"), axis=1)
    out["cos(ĝ, ∇J)"] = table.apply(lambda r: format_ci(r["cos_ref"], math.nan, math.nan, missing="-"), axis=1)
    out["final return (IQM)"] = ci("return_iqm")
    out["runs"] = [f"{n} (+{words})" if words else str(n)
                   for n, words in zip(table["n_runs"], table["left_out"])]
    out["seed: bias / variance"] = table["seed_bias"] + " / " + table["seed_variance"]
    out["agrees with seed?"] = table["agreement"] + ": " + table["agreement_detail"]
    return out


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table (written by hand: no optional ``tabulate`` dependency)."""
    shown = display_table(table)
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(c) for c in shown.columns) + " |",
             "| " + " | ".join("---" for _ in shown.columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in rec) + " |" for rec in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


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
    """Write ``table.md``, ``table.csv`` (all numbers, interval ends as columns) and
    ``table.tex`` into ``out_dir``; return their paths by suffix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"table.{ext}" for ext in ("md", "csv", "tex")}
    paths["md"].write_text(to_markdown(table))
    table.to_csv(paths["csv"], index=False)
    paths["tex"].write_text(to_latex(table))
    return paths


def env_list(table: pd.DataFrame) -> Iterable[str]:
    return list(dict.fromkeys(table["env"]))
