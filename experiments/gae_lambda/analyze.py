"""GAE(lambda): bias, variance and MSE of the gradient against lambda, with a fitted critic.

The policy is held fixed (``lr=1e-12``) while the critic is fitted; the runs of one seed
share policy, critic, episodes and reference, so lambdas are compared *paired* over seeds,
at measured steps >= ``MIN_STEP``. Per (env, lambda): relative bias (root of
``squared_bias_interval``), relative variance and MSE. Trends: the Spearman correlation
of lambda with the mean curve (bootstrap over seeds, jointly across lambdas), the paired
endpoint comparison lambda=1 against lambda=0, and the MSE-optimal lambda with its
bootstrap interval and the share of resamples choosing each lambda. Verdict per env:
confirmed when bias falls and variance rises with lambda, refuted when either goes the
other way (interval excluding 0), qualified in part; overall: their common word, else
qualified.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from analysis.experiment import (
    Experiment,
    Verdict,
    combined_word,
    estimate_columns,
    percentile_ends,
    replicate_resamples,
    sections_frame,
    sqrt_estimate,
)
from analysis.figures import (
    PANEL_HEIGHT,
    PAPER_WIDTH,
    apply_theme,
    log_axis,
    save_figure,
    spans_decades,
)
from analysis.loader import measured_rows
from analysis.render import format_columns, markdown_table
from analysis.stats import Estimate, mean_ci
from analysis.table import per_run_values, squared_bias_interval

MIN_STEP = 1
ESTIMATOR = "gae"
CLAIM = ("The seed's table: GAE (Schulman et al. 2016), baseline 'V^λ-weighted', bias "
         "'tunable', variance 'very low'; Schulman et al.: λ trades bias (small λ, which "
         "bootstraps from an imperfect V) against variance (λ → 1, Monte Carlo returns).")
MIN_SEEDS = 3  # fewer paired seeds: no interval, so no verdict
TRENDS = {"rel_bias_sq": "bias", "rel_variance": "variance", "rel_mse": "MSE"}


def usable_measurements(frame: pd.DataFrame, min_step: int = MIN_STEP) -> pd.DataFrame:
    """GAE's measured rows at steps >= ``min_step`` with a known lambda."""
    rows = measured_rows(frame)
    rows = rows[(rows["estimator"] == ESTIMATOR) & (rows["step"] >= min_step)]
    return rows[rows["lam"].notna()].copy()


def per_run(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per run: mean statistics over its steps, its env, lambda and seed."""
    ref_se2 = rows["ref_se"].fillna(0.0) ** 2 if "ref_se" in rows else 0.0
    rows = rows.assign(grad_rel_mse=(rows["grad_mse"] - ref_se2) / rows["ref_norm"] ** 2)
    values = per_run_values(rows)
    groups = rows.groupby("run_dir", sort=False)
    values["grad_rel_mse"] = groups["grad_rel_mse"].mean()
    values["env"] = groups["env"].first()
    values["lam"] = groups["lam"].first().astype(float)
    values["batch_size"] = groups["training.batch_size"].first() if "training.batch_size" in rows else np.nan
    return values.reset_index()


def seed_matrix(runs: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(lambdas [L], values [S, L]) for the seeds that have every lambda (the pairs)."""
    wide = runs.pivot_table(index="seed", columns="lam", values=column, aggfunc="mean")
    wide = wide.dropna(axis=0, how="any")
    return wide.columns.to_numpy(float), wide.to_numpy(float)


def lambda_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One line per (env, lambda): relative bias, variance and MSE with 95% intervals."""
    records = []
    for (env, lam), sel in runs.groupby(["env", "lam"], sort=True):
        rec: dict[str, object] = {"env": env, "lam": lam, "n_runs": len(sel),
                                  "batch_size": sel["batch_size"].iloc[0]}
        b2 = without_interval_below_min_seeds(squared_bias_interval(sel, "grad_rel_bias_sq"))
        rec.update(estimate_columns("rel_bias_sq", b2))
        rec.update(estimate_columns("rel_bias", sqrt_estimate(b2)))
        rec["bias_distinguishable"] = bool(math.isfinite(b2.lo) and b2.lo > 0)
        rec.update(estimate_columns("rel_variance", mean_ci(sel["grad_rel_variance"].to_numpy())))
        rec.update(estimate_columns("rel_mse", mean_ci(sel["grad_rel_mse"].to_numpy())))
        rec.update(estimate_columns("cos_ref", mean_ci(sel["cos_ref"].to_numpy())))
        records.append(rec)
    return pd.DataFrame.from_records(records)


def without_interval_below_min_seeds(est: Estimate) -> Estimate:
    """The estimate, without its interval when it rests on fewer than MIN_SEEDS seeds."""
    return est if est.n >= MIN_SEEDS else Estimate(est.value, math.nan, math.nan, est.n)


def spearman_trend(lams: np.ndarray, values: np.ndarray) -> Estimate:
    """Spearman correlation of lambda with the mean curve, bootstrap CI over seeds."""
    if values.shape[0] < 1 or values.shape[1] < 3:
        return Estimate(math.nan, math.nan, math.nan, values.shape[0])
    point = float(stats.spearmanr(lams, values.mean(0)).statistic)
    if values.shape[0] < MIN_SEEDS:
        return Estimate(point, math.nan, math.nan, values.shape[0])
    curves = values[replicate_resamples(values.shape[0])].mean(1)     # [n, L]
    ranks = stats.rankdata(curves, axis=1)
    lam_ranks = stats.rankdata(lams)
    rho = np.array([np.corrcoef(lam_ranks, r)[0, 1] if np.ptp(r) > 0 else 0.0 for r in ranks])
    lo, hi = map(float, percentile_ends(rho, values.shape[0]))
    return Estimate(point, lo, hi, values.shape[0])


def endpoint_ratio(lams: np.ndarray, values: np.ndarray) -> Estimate:
    """Value at the largest lambda over value at the smallest: the geometric mean over
    seeds of the per-seed ratios (paired, scale-free), with the bootstrap interval of the
    mean log ratio mapped back by exp."""
    if values.shape[0] < 1 or values.shape[1] < 2:
        return Estimate(math.nan, math.nan, math.nan, 0)
    hi, lo = values[:, int(np.argmax(lams))], values[:, int(np.argmin(lams))]
    ok = (hi > 0) & (lo > 0)
    if not ok.any():
        return Estimate(math.nan, math.nan, math.nan, 0)
    return without_interval_below_min_seeds(mean_ci(np.log(hi[ok] / lo[ok])).map(math.exp))


def ratio_between(lams: np.ndarray, values: np.ndarray, num: float, den: float) -> Estimate:
    """Value at lambda ``num`` over value at lambda ``den``, as ``endpoint_ratio`` (geometric
    mean over seeds of the per-seed ratio). Used from lambda=0 to the variance-minimising
    lambda and on to lambda=1: that lambda is picked from the same data, so these
    intervals describe the curve's shape, not a test."""
    if values.shape[0] < 1 or not (math.isfinite(num) and math.isfinite(den)):
        return Estimate(math.nan, math.nan, math.nan, 0)
    a, b = values[:, int(np.argmin(np.abs(lams - num)))], values[:, int(np.argmin(np.abs(lams - den)))]
    ok = (a > 0) & (b > 0)
    if not ok.any():
        return Estimate(math.nan, math.nan, math.nan, 0)
    return without_interval_below_min_seeds(mean_ci(np.log(a[ok] / b[ok])).map(math.exp))


def endpoint_difference(lams: np.ndarray, values: np.ndarray) -> Estimate:
    """mean at the smallest lambda minus mean at the largest, paired bootstrap over seeds
    (for the squared bias, which may be negative or 0, where a ratio is meaningless)."""
    if values.shape[0] < 1 or values.shape[1] < 2:
        return Estimate(math.nan, math.nan, math.nan, 0)
    d = values[:, int(np.argmin(lams))] - values[:, int(np.argmax(lams))]
    return without_interval_below_min_seeds(mean_ci(d))


def argmin_lambda(lams: np.ndarray, mse: np.ndarray) -> dict[str, object]:
    """The MSE-optimal lambda of the mean curve, its bootstrap interval and shares."""
    if mse.shape[0] < 1:
        return {"argmin": math.nan, "lo": math.nan, "hi": math.nan, "shares": {}}
    best = float(lams[int(np.argmin(mse.mean(0)))])
    if mse.shape[0] < MIN_SEEDS:
        return {"argmin": best, "lo": math.nan, "hi": math.nan, "shares": {}}
    picks = lams[np.argmin(mse[replicate_resamples(mse.shape[0], seed=1)].mean(1), axis=1)]
    lo, hi = map(float, percentile_ends(picks, mse.shape[0]))
    shares = {float(l): float(np.mean(picks == l)) for l in lams if np.any(picks == l)}
    return {"argmin": best, "lo": lo, "hi": hi, "shares": shares}


def trends(runs: pd.DataFrame) -> pd.DataFrame:
    """Per env: Spearman trends and endpoint comparisons of bias, variance and MSE, and the
    MSE-optimal lambda."""
    records = []
    for env, sel in runs.groupby("env", sort=False):
        rec: dict[str, object] = {"env": env}
        columns = {"rel_bias_sq": "grad_rel_bias_sq", "rel_variance": "grad_rel_variance",
                   "rel_mse": "grad_rel_mse"}
        for name, column in columns.items():
            lams, values = seed_matrix(sel, column)
            rec["n_paired_seeds"] = values.shape[0]
            rec.update(estimate_columns(f"spearman_{name}", spearman_trend(lams, values)))
        lams, var = seed_matrix(sel, "grad_rel_variance")
        rec.update(estimate_columns("variance_ratio_1_over_0", endpoint_ratio(lams, var)))
        rec["variance_argmin"] = float(lams[int(np.argmin(var.mean(0)))]) if var.size else math.nan
        rec.update(estimate_columns("variance_ratio_min_over_0", ratio_between(lams, var, rec["variance_argmin"], lams.min())))
        rec.update(estimate_columns("variance_ratio_1_over_min", ratio_between(lams, var, lams.max(), rec["variance_argmin"])))
        lams, b2 = seed_matrix(sel, "grad_rel_bias_sq")
        rec.update(estimate_columns("bias_sq_drop_0_minus_1", endpoint_difference(lams, b2)))
        lams, mse = seed_matrix(sel, "grad_rel_mse")
        best = argmin_lambda(lams, mse)
        rec.update(mse_argmin=best["argmin"], mse_argmin_lo=best["lo"], mse_argmin_hi=best["hi"],
                   mse_argmin_shares=";".join(f"{k:g}:{v:.2f}" for k, v in best["shares"].items()))
        rec.update(argmin_at_other_batch_sizes(sel))
        records.append(rec)
    return pd.DataFrame.from_records(records)


OTHER_BATCH_SIZES = (1, 4, 64, 256)


def argmin_at_other_batch_sizes(runs: pd.DataFrame) -> dict[str, float]:
    """The MSE-optimal lambda had each batch held B' episodes instead of B: the MSE of a
    batch mean of i.i.d. episodes is bias^2 + trCov_B * B / B', built per seed from the
    de-noised squared bias U and the measured variance (keys ``mse_argmin_B<B'>``, with
    ``_lo``/``_hi``)."""
    out: dict[str, float] = {}
    batch = float(runs["batch_size"].iloc[0]) if runs["batch_size"].notna().any() else math.nan
    lams, b2 = seed_matrix(runs, "grad_rel_bias_sq")
    _, var = seed_matrix(runs, "grad_rel_variance")
    for other in OTHER_BATCH_SIZES:
        if not math.isfinite(batch) or b2.size == 0:
            best = {"argmin": math.nan, "lo": math.nan, "hi": math.nan}
        else:
            best = argmin_lambda(lams, b2 + var * batch / other)
        out[f"mse_argmin_B{other}"] = best["argmin"]
        out[f"mse_argmin_B{other}_lo"] = best["lo"]
        out[f"mse_argmin_B{other}_hi"] = best["hi"]
    return out


def direction(est_lo: float, est_hi: float, zero: float = 0.0) -> str:
    """'up' / 'down' / 'flat?' from an interval against ``zero``."""
    if not (math.isfinite(est_lo) and math.isfinite(est_hi)):
        return "n/a"
    return "up" if est_lo > zero else "down" if est_hi < zero else "unclear"


def env_verdict(t: pd.Series) -> tuple[str, str, str]:
    """(verdict, bias direction, variance direction) of one environment.

    Bias falls: Spearman CI below 0 and the lambda=0 minus lambda=1 squared-bias
    difference above 0; variance rises: Spearman CI above 0 and endpoint ratio above 1.
    """
    bias_rank = direction(t["spearman_rel_bias_sq_lo"], t["spearman_rel_bias_sq_hi"])
    bias_end = direction(t["bias_sq_drop_0_minus_1_lo"], t["bias_sq_drop_0_minus_1_hi"])
    var_rank = direction(t["spearman_rel_variance_lo"], t["spearman_rel_variance_hi"])
    var_end = direction(t["variance_ratio_1_over_0_lo"], t["variance_ratio_1_over_0_hi"], 1.0)
    bias_falls = bias_rank == "down" and bias_end == "up"
    bias_rises = bias_rank == "up" or bias_end == "down"
    var_rises = var_rank == "up" and var_end == "up"
    var_falls = var_rank == "down" or var_end == "down"
    bias_dir = "falls" if bias_falls else "rises" if bias_rises else "unclear"
    var_dir = "rises" if var_rises else "falls" if var_falls else "unclear"
    if var_dir == "unclear" and is_u_shaped(t):
        var_dir = f"falls to λ={t['variance_argmin']:g}, then rises"
    if bias_falls and var_rises:
        return "confirmed", bias_dir, var_dir
    if bias_rises or var_falls:
        return "refuted" if not (bias_falls or var_rises) else "qualified", bias_dir, var_dir
    if bias_falls or var_rises:
        return "qualified", bias_dir, var_dir
    return "inconclusive", bias_dir, var_dir


def is_u_shaped(t: pd.Series) -> bool:
    """The variance falls from lambda=0 to an inner minimum and rises from it to lambda=1,
    both intervals excluding 1."""
    lo_side, hi_side = t.get("variance_ratio_min_over_0_hi"), t.get("variance_ratio_1_over_min_lo")
    return bool(0.0 < t.get("variance_argmin", math.nan) < 1.0 and lo_side is not None
                and math.isfinite(lo_side) and math.isfinite(hi_side)
                and lo_side < 1.0 < hi_side)


def markdown_lambda_table(table: pd.DataFrame) -> list[str]:
    return markdown_table(
        ["env", "λ", "rel. bias ‖E ĝ − ∇J‖/‖∇J‖", "bias ≠ 0?", "rel. variance", "rel. MSE",
         "cos(ĝ, ∇J)"],
        [[r["env"], f"{r['lam']:g}", format_columns(r, "rel_bias", 2),
          "yes" if r["bias_distinguishable"] else "no", format_columns(r, "rel_variance"),
          format_columns(r, "rel_mse"), format_columns(r, "cos_ref", 2)]
         for _, r in table.iterrows()])


def markdown_trends(tr: pd.DataFrame) -> list[str]:
    return markdown_table(
        ["env", "seeds", "Spearman(λ, bias²)", "Spearman(λ, variance)",
         "variance λ=1 / λ=0 (geo. mean)", "bias²(λ=0) − bias²(λ=1), relative",
         "MSE-optimal λ [95% CI]", "bootstrap share of each λ"],
        [[t["env"], t["n_paired_seeds"], format_columns(t, "spearman_rel_bias_sq", 2),
          format_columns(t, "spearman_rel_variance", 2), format_columns(t, "variance_ratio_1_over_0"),
          format_columns(t, "bias_sq_drop_0_minus_1"), format_columns(t, "mse_argmin"),
          t["mse_argmin_shares"]] for _, t in tr.iterrows()])


def markdown_other_batch_sizes(tr: pd.DataFrame) -> list[str]:
    sizes = [b for b in OTHER_BATCH_SIZES if f"mse_argmin_B{b}" in tr.columns]
    return markdown_table(["env", *(f"B' = {b}" for b in sizes)],
                          [[t["env"], *(format_columns(t, f"mse_argmin_B{b}") for b in sizes)]
                           for _, t in tr.iterrows()])


def shape_text(t: pd.Series) -> str:
    """', ×a from λ=0 to it, ×b from it to λ=1' when the variance minimum is inside."""
    if not (0.0 < t["variance_argmin"] < 1.0) or not math.isfinite(t["variance_ratio_min_over_0"]):
        return ""
    return (f": ×{format_columns(t, 'variance_ratio_min_over_0', 2)} from λ=0 to it, "
            f"×{format_columns(t, 'variance_ratio_1_over_min', 2)} from it to λ=1")


def verdict_sentence(table: pd.DataFrame, tr: pd.DataFrame) -> str:
    parts = []
    for _, t in tr.iterrows():
        env = t["env"]
        sub = table[table["env"] == env]
        lo_row, hi_row = sub.loc[sub["lam"].idxmin()], sub.loc[sub["lam"].idxmax()]
        parts.append(
            f"{env}: relative bias {lo_row['rel_bias']:.2g} at λ={lo_row['lam']:g} vs "
            f"{hi_row['rel_bias']:.2g} at λ={hi_row['lam']:g} (bias {t['bias_direction']}), "
            f"variance ×{format_columns(t, 'variance_ratio_1_over_0', 2)} "
            f"from λ={lo_row['lam']:g} to {hi_row['lam']:g} (variance {t['variance_direction']}; "
            f"lowest at λ={t['variance_argmin']:g}{shape_text(t)}), "
            f"MSE-optimal λ = {format_columns(t, 'mse_argmin')}"
            f" at B = {int(lo_row['batch_size']) if math.isfinite(lo_row['batch_size']) else '?'}")
    return "; ".join(parts)


def verdict(summary: tuple) -> Verdict:
    """The environments' common word, else qualified, with the numbers behind it."""
    table, tr = summary
    return Verdict(combined_word(tr["verdict"].tolist()), verdict_sentence(table, tr))


def write_markdown(summary: tuple, verdict: Verdict, preset: str) -> str:
    table, tr = summary
    return "\n".join([
        f"# GAE λ: bias, variance and the MSE-optimal λ ({preset} preset)", "",
        f"**Claim.** {CLAIM}", "",
        ("Relative bias √(mean U)/‖∇J‖, relative variance tr Cov[ĝ]/‖∇J‖² and relative MSE "
         "of one batch estimate, each λ at the same held-fixed policy, critic and episodes "
         "per seed (paired); 95% intervals."), "",
        *markdown_lambda_table(table), "",
        "Trends over λ (bootstrap over seeds, paired across λ):", "",
        *markdown_trends(tr), "",
        ("MSE-optimal λ had each batch held B' episodes (bias² + variance · B/B', from the "
         "measured per-seed bias² and variance, the critic unchanged; 95% bootstrap CI over "
         "seeds):"), "",
        *markdown_other_batch_sizes(tr), "",
        "Per environment: " + "; ".join(f"**{t['env']}** {t['verdict']} (bias {t['bias_direction']}, "
                                         f"variance {t['variance_direction']})"
                                         for _, t in tr.iterrows()) + ".", "",
        verdict.line(), ""])


def plot_lambda(table: pd.DataFrame, tr: pd.DataFrame, runs: pd.DataFrame,
                out_dir: Path) -> list[Path]:
    """Per environment (rows): relative bias, relative variance and relative MSE against
    lambda (evenly spaced positions): mean over seeds with its 95% CI, each seed's own
    curve in grey behind it (the seeds are paired across lambda); the MSE-optimal lambda
    marked."""
    apply_theme()
    envs = list(dict.fromkeys(table["env"]))
    fig, axes = plt.subplots(len(envs), 3, figsize=(PAPER_WIDTH, PANEL_HEIGHT * len(envs)),
                             squeeze=False)
    columns = [("rel_bias", "grad_rel_bias_sq", "relative bias ‖E ĝ − ∇J‖ / ‖∇J‖", "tab:red"),
               ("rel_variance", "grad_rel_variance", "relative variance tr Cov / ‖∇J‖²", "tab:blue"),
               ("rel_mse", "grad_rel_mse", "relative MSE E‖ĝ − ∇J‖² / ‖∇J‖²", "tab:purple")]
    for row, env in zip(axes, envs):
        t = table[table["env"] == env].sort_values("lam")
        x = np.arange(len(t))
        position = dict(zip(t["lam"], x))
        for ax, (col, run_col, ylabel, colour) in zip(row, columns):
            for _, seed_runs in runs[runs["env"] == env].groupby("seed"):
                seed_runs = seed_runs.sort_values("lam")
                y = seed_runs[run_col].to_numpy(float)
                y = np.sqrt(np.clip(y, 0, None)) if col == "rel_bias" else y
                ax.plot(seed_runs["lam"].map(position), y, color="0.75", lw=0.6, zorder=1)
            lo = np.clip(t[col] - t[f"{col}_lo"], 0, None).fillna(0)
            hi = np.clip(t[f"{col}_hi"] - t[col], 0, None).fillna(0)
            ax.errorbar(x, t[col], yerr=[lo, hi], fmt="o-", color=colour, ms=3, lw=1.2,
                        capsize=2, zorder=3)
            ax.set_xticks(x)
            ax.set_xticklabels([f"{v:g}" for v in t["lam"]], fontsize=7)
            ax.set_xlabel("GAE λ (evenly spaced)")
            ax.set_ylabel(ylabel, fontsize=7)
            ax.set_title(f"{env}: {TRENDS[col if col != 'rel_bias' else 'rel_bias_sq']}")
            if col != "rel_bias" and spans_decades(t[col], decades=1.0):
                log_axis(ax, "y", t[col])
        best = tr[tr["env"] == env]
        if not best.empty and math.isfinite(best["mse_argmin"].iloc[0]):
            i = int(np.argmin(np.abs(t["lam"].to_numpy() - best["mse_argmin"].iloc[0])))
            row[2].axvline(x[i], color="0.4", ls="--", lw=0.8)
            row[2].annotate(f"argmin λ = {best['mse_argmin'].iloc[0]:g}", (x[i], 0.95),
                            xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=7,
                            bbox={"fc": "white", "ec": "none", "alpha": 0.8})
    fig.tight_layout()
    fig.text(0.5, -0.01, "coloured: mean over seeds with 95% CI; grey: each seed (paired "
             "across λ: same policy, critic and episodes)", ha="center", va="top", fontsize=7)
    return save_figure(fig, out_dir, "gae_lambda_bias_variance")


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one line per env and lambda, one line per env: trends and verdicts)."""
    tr = trends(runs)
    judged = [env_verdict(t) for _, t in tr.iterrows()]
    for i, column in enumerate(("verdict", "bias_direction", "variance_direction")):
        tr[column] = [j[i] for j in judged]
    return lambda_table(runs), tr


EXPERIMENT = Experiment(
    "GAE λ", summarise, verdict, write_markdown, select=usable_measurements, per_run=per_run,
    result_frame=lambda summary: sections_frame(**{"lambda": summary[0], "trend": summary[1]}),
    figures=lambda summary, runs, out_dir: plot_lambda(*summary, runs, out_dir),
    empty_reason=f"no GAE measurement at step >= {MIN_STEP}")
analyze = EXPERIMENT.analyze
