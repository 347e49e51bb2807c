"""Variance and bias against the batch size B.

One measurement per run (``reinforce_rtg``, ``rloo``, ``mean_baseline`` at several B, exact
reference); a *replicate* is one (env, instance = ``env.seed``, seed) measured at every B.
Variance: the exponent k of Var ~ B^k, fitted to the replicate-mean scaled variance with
a bootstrap over replicates (-1 for i.i.d. terms; RLOO, a U-statistic of order 2, has
``Var = (4 (B-2) zeta_1 + 2 zeta_2) / (B (B-1))``: the excess r = zeta_2/(2 zeta_1) is
fitted too). Bias: the de-noised relative squared bias per B
(``analysis.table.squared_bias_interval``) and the coefficient c^2 of U_rel = c^2/B^2;
the batch mean has E g = (1 - 1/B) grad J (c = 1, Var ratio to RLOO (1 - 1/B)^2), RLOO c = 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.experiment import (
    Experiment,
    Verdict,
    combined_word,
    estimate_columns,
    first_measurements,
    inconclusive,
    instance_column,
    percentile_ends,
    replicate_resamples,
    sqrt_estimate,
)
from analysis.figures import (
    PANEL_HEIGHT,
    PAPER_WIDTH,
    REL_VAR_LABEL,
    error_bars,
    legend_below,
    log_axis,
    save_figure,
)
from analysis.render import format_ci, format_columns, markdown_table, yes_no
from analysis.stats import N_RESAMPLES, mean_ci
from analysis.table import per_run_values, squared_bias_interval

RTG, RLOO, MEAN = "reinforce_rtg", "rloo", "mean_baseline"
ESTIMATORS = (RTG, RLOO, MEAN)
SLOPE_ESTIMATORS = (RTG, RLOO)  # the i.i.d.-type estimators whose exponent is tested
LABELS = {RTG: "reward-to-go (reinforce_rtg)", RLOO: "leave-one-out baseline (rloo)",
          MEAN: "batch-mean baseline (mean_baseline)"}
SHORT = {RTG: "reward-to-go", RLOO: "leave-one-out (rloo)", MEAN: "batch mean"}
COLOURS = {RTG: "tab:orange", RLOO: "tab:green", MEAN: "tab:red"}
REPLICATE = ["env", "instance", "seed"]
LARGE_B = 8  # the exponent is also fitted on B >= LARGE_B only, where RLOO's 1/B^2 term fades
MIN_REPLICATES = 3  # fewer: a bootstrap interval means nothing, the checks stay undecided
CLAIM = ("the variance of a batch estimate falls as 1/B for i.i.d. episodes, and a "
         "baseline that is the batch mean of the returns is biased by O(1/B) "
         "(E ĝ = (1 − 1/B) ∇J) where the leave-one-out mean is not (the source text "
         "itself says only “REINFORCE with mean baseline: bias 0”)")


def select(frame: pd.DataFrame) -> pd.DataFrame:
    """The first measurement of every run of the three estimators, with ``B`` and ``instance``."""
    rows = first_measurements(frame, ESTIMATORS)
    return rows.assign(instance=instance_column(rows), B=rows["training.batch_size"].astype(int))


def loglog_slope(batch_sizes: np.ndarray, variances: np.ndarray) -> float:
    """OLS slope of log variance on log B (NaN with fewer than two distinct B)."""
    x, y = np.log(np.asarray(batch_sizes, float)), np.log(np.asarray(variances, float))
    ok = np.isfinite(x) & np.isfinite(y)
    if np.unique(x[ok]).size < 2:
        return math.nan
    return float(np.polyfit(x[ok], y[ok], 1)[0])


def variance_matrix(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(batch sizes, V [replicates, batch sizes]) of one (env, estimator); replicates
    missing a batch size are dropped. Each row is divided by its scale mean_B(B V(B)),
    so every replicate weighs the same whatever its variance."""
    wide = rows.pivot_table(index=["instance", "seed"], columns="B", values="grad_variance")
    wide = wide.dropna()
    bs = wide.columns.to_numpy(float)
    v = wide.to_numpy(float)
    return bs, v / (bs * v).mean(axis=1, keepdims=True)


def pooled_exponent(bs: np.ndarray, w: np.ndarray, min_b: float = 0) -> float:
    """Slope of log(mean over replicates of the scaled variance) on log B, for B >= min_b.

    Averaging before the log keeps the estimate unbiased: the log of one noisy variance
    estimate is biased low by about half its squared relative error (Jensen), an error
    that is larger at small B when the episode terms are heavy-tailed, which would tilt
    per-replicate slopes towards 0."""
    keep = bs >= min_b
    return loglog_slope(bs[keep], w[:, keep].mean(axis=0))


def ustat_excess(bs: np.ndarray, w: np.ndarray) -> float:
    """r = zeta_2 / (2 zeta_1) of the order-2 U-statistic law
    ``Var(B) = (4 (B-2) zeta_1 + 2 zeta_2) / (B (B-1))``, fitted (least squares of
    ``Var(B) B (B-1)`` on ``B - 2``, weights 1/B^2) to the replicate-mean scaled variance; NaN without
    B >= 2 at two sizes. r = 1 is the exact 1/B law (a mean of i.i.d. terms); the
    variance at B = 2 is r times what the 1/B law predicts from large B."""
    keep = bs >= 2
    if np.unique(bs[keep]).size < 2:
        return math.nan
    b = bs[keep]
    # Var(B) B (B-1) has a noise sd about proportional to B: weighted least squares
    slope, intercept = np.polyfit(b - 2, w[:, keep].mean(axis=0) * b * (b - 1), 1, w=1 / b)
    return float(intercept / slope)


def ustat_curve(bs: np.ndarray, r: float) -> np.ndarray:
    """The normalised variance B Var(B) / (B_max Var(B_max)) under the U-statistic law
    with excess r: ``B Var(B)`` is proportional to ``1 + (r - 1) / (B - 1)``."""
    m = 1 + (r - 1) / (bs - 1)
    return m / m[-1]


def normalised_curve(bs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """B mean V(B) / (B_max mean V(B_max)): 1 at every B under an exact 1/B law."""
    m = bs * w.mean(axis=0)
    return m / m[-1]


def bootstrap_rows(w: np.ndarray, statistic, n_resamples: int = N_RESAMPLES,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``statistic(w)`` and its expanded-percentile 95% interval (``expanded_level``,
    as ``analysis.stats`` uses) from resampling the replicates (rows) of ``w``."""
    value = np.atleast_1d(np.asarray(statistic(w), float))
    n = w.shape[0]
    if n < 2:
        nan = np.full_like(value, math.nan)
        return value, nan, nan
    draws = np.array([np.atleast_1d(statistic(w[idx]))
                      for idx in replicate_resamples(n, seed, n_resamples)], float)
    return (value, *percentile_ends(draws, n))


def mean_baseline_variance_ratio(rows: pd.DataFrame) -> pd.DataFrame:
    """Var(mean_baseline) / Var(rloo) per (env, B), geometric mean over replicates with
    its interval; theory (1 - 1/B)^2 exactly."""
    wide = rows.pivot_table(index=REPLICATE + ["B"], columns="estimator",
                            values="grad_variance").reset_index()
    if not {MEAN, RLOO} <= set(wide.columns):
        return pd.DataFrame(columns=["env", "B", "var_ratio_mean_rloo"])
    wide = wide.dropna(subset=[MEAN, RLOO])
    records = []
    for (env, b), g in wide.groupby(["env", "B"], sort=True):
        est = mean_ci(np.log(g[MEAN] / g[RLOO]).to_numpy()).map(math.exp)
        records.append({"env": env, "B": int(b), **estimate_columns("var_ratio_mean_rloo", est),
                        "var_ratio_theory": (1 - 1 / b) ** 2})
    return pd.DataFrame.from_records(records)


def bias_at(rows: pd.DataFrame) -> dict[str, object]:
    """De-noised relative squared bias of one (env, estimator, B) across replicates, its
    interval, the relative bias (square root) and whether the bias is distinguishable
    (absolute and relative squared-bias intervals both above 0)."""
    values = per_run_values(rows)
    b2 = squared_bias_interval(values, "grad_bias_sq")
    rel = squared_bias_interval(values, "grad_rel_bias_sq")
    distinguishable = (bool(b2.lo > 0 and rel.lo > 0)
                       if math.isfinite(b2.lo) and math.isfinite(rel.lo) else None)
    return {**estimate_columns("rel_bias_sq", rel),
            **estimate_columns("rel_bias", sqrt_estimate(rel)),
            "bias_distinguishable": distinguishable}


def per_batch_size(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (env, estimator, B): relative variance, normalised variance and bias."""
    records = []
    for (env, est), g_est in rows.groupby(["env", "estimator"], sort=True):
        bs, w = variance_matrix(g_est)
        norm, norm_lo, norm_hi = bootstrap_rows(w, lambda x, bs=bs: normalised_curve(bs, x))
        normalised = {int(b): (norm[i], norm_lo[i], norm_hi[i]) for i, b in enumerate(bs)}
        for b, g in g_est.groupby("B", sort=True):
            nv = normalised.get(int(b), (math.nan,) * 3)
            records.append({"env": env, "estimator": est, "B": int(b), "n_replicates": len(g),
                            **estimate_columns("rel_variance", mean_ci(g["grad_rel_variance"])),
                            "norm_variance": nv[0], "norm_variance_lo": nv[1],
                            "norm_variance_hi": nv[2],
                            "rel_bias_theory": 1 / b if est == MEAN else 0.0, **bias_at(g)})
    return pd.DataFrame.from_records(records)


def bias_coefficient(batch_sizes: np.ndarray, rel_bias_sq: np.ndarray,
                     rel_bias_sq_se: np.ndarray) -> tuple[float, float]:
    """Least squares through the origin of U_rel(B) = c^2 / B^2 for one replicate: its c^2
    (a relative bias of c/B; the batch mean has c = 1, an unbiased estimator c = 0) and
    the standard error of c^2 from the logged standard errors of U. The weights
    ``(1/B^2) / sum(1/B^4)`` put most of the fit on the smallest B, where a 1/B bias
    stands out most against the noise."""
    x = 1.0 / np.asarray(batch_sizes, float) ** 2
    y, se = np.asarray(rel_bias_sq, float), np.asarray(rel_bias_sq_se, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return math.nan, math.nan
    w = x[ok] / (x[ok] ** 2).sum()
    return float((w * y[ok]).sum()), float(math.sqrt(((w * se[ok]) ** 2).sum()))


def replicate_fits(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (env, estimator, instance, seed): the bias coefficient c^2 of
    U_rel ~ c^2 / B^2 with its standard error ``c2_se``."""
    records = []
    rel_se = rows["grad_bias_sq_se"] / rows["ref_norm"].where(rows["ref_norm"] > 0) ** 2
    rows = rows.assign(rel_se=rel_se)
    for key, g in rows.groupby(["env", "estimator", "instance", "seed"], sort=False):
        b = g["B"].to_numpy()
        c2, c2_se = bias_coefficient(b, g["grad_rel_bias_sq"].to_numpy(), g["rel_se"].to_numpy())
        records.append(dict(zip(["env", "estimator", "instance", "seed"], key), c2=c2, c2_se=c2_se))
    return pd.DataFrame.from_records(records)


def exponents(rows: pd.DataFrame, fits: pd.DataFrame) -> pd.DataFrame:
    """Per (env, estimator): the exponent k of Var ~ B^k over all B and over B >= LARGE_B
    (``pooled_exponent``, bootstrap over replicates), and the bias coefficient c^2 averaged
    over replicates (``squared_bias_interval``: bootstrap hull pooled-SE interval)."""
    records = []
    for (env, est), g in rows.groupby(["env", "estimator"], sort=False):
        bs, w = variance_matrix(g)
        k, k_lo, k_hi = bootstrap_rows(w, lambda x, bs=bs: pooled_exponent(bs, x))
        kl, kl_lo, kl_hi = bootstrap_rows(w, lambda x, bs=bs: pooled_exponent(bs, x, LARGE_B))
        r, r_lo, r_hi = ((np.array([math.nan]),) * 3 if est == MEAN else
                         bootstrap_rows(w, lambda x, bs=bs: ustat_excess(bs, x)))
        c2 = squared_bias_interval(fits[(fits["env"] == env) & (fits["estimator"] == est)], "c2")
        records.append({"env": env, "estimator": est, "n_replicates": w.shape[0],
                        "k": k[0], "k_lo": k_lo[0], "k_hi": k_hi[0],
                        "k_large": kl[0], "k_large_lo": kl_lo[0], "k_large_hi": kl_hi[0],
                        "ustat_r": r[0], "ustat_r_lo": r_lo[0], "ustat_r_hi": r_hi[0],
                        **estimate_columns("c2", c2)})
    return pd.DataFrame.from_records(records)


def _contains(lo: float, hi: float, x: float, n: int) -> bool | None:
    """Whether [lo, hi] holds x; None when the interval is missing or rests on fewer
    than MIN_REPLICATES replicates."""
    if n < MIN_REPLICATES or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return bool(lo <= x <= hi)


def _not_above_zero(lo: float, n: int) -> bool | None:
    """A squared bias is not distinguishable from 0 when its interval reaches 0 or below;
    None when undecidable (too few replicates, no interval)."""
    if n < MIN_REPLICATES or not math.isfinite(lo):
        return None
    return bool(lo <= 0)


def _decided(flag: bool | None, n: int) -> bool | None:
    """A distinguishability verdict, or None below MIN_REPLICATES replicates."""
    return None if n < MIN_REPLICATES or flag is None else bool(flag)


def checks(exps: pd.DataFrame, by_b: pd.DataFrame) -> pd.DataFrame:
    """Each testable statement per environment, with pass (True), fail (False) or None
    (not measurable at these sizes), and the numbers that decided it."""
    records = []
    for env in dict.fromkeys(by_b["env"]):
        for est in SLOPE_ESTIMATORS:
            e = exps[(exps["env"] == env) & (exps["estimator"] == est)]
            if e.empty:
                continue
            r = e.iloc[0]
            records.append({"env": env, "check": f"Var({est}) ~ 1/B: k = -1 in the interval",
                            "passed": _contains(r["k_lo"], r["k_hi"], -1.0, r["n_replicates"]),
                            "numbers": f"k = {format_ci(r['k'], r['k_lo'], r['k_hi'])}"})
        e = exps[(exps["env"] == env) & (exps["estimator"] == MEAN)]
        if not e.empty:
            r = e.iloc[0]
            records.append({"env": env,
                            "check": "mean_baseline relative bias = c/B with c² = 1 (fit over all B)",
                            "passed": _contains(r["c2_lo"], r["c2_hi"], 1.0, r["n_replicates"]),
                            "numbers": f"c² = {format_ci(r['c2'], r['c2_lo'], r['c2_hi'])}"})
        e = exps[(exps["env"] == env) & (exps["estimator"] == RLOO)]
        if not e.empty:
            r = e.iloc[0]
            records.append({"env": env,
                            "check": "rloo bias not distinguishable: c² (fit over all B) not above 0",
                            "passed": _not_above_zero(r["c2_lo"], r["n_replicates"]),
                            "numbers": f"c² = {format_ci(r['c2'], r['c2_lo'], r['c2_hi'])}"})
        mean = by_b[(by_b["env"] == env) & (by_b["estimator"] == MEAN)].sort_values("B")
        if not mean.empty:
            smallest = mean.iloc[0]
            records.append({"env": env,
                            "check": f"mean_baseline bias distinguishable at B={int(smallest['B'])}",
                            "passed": _decided(smallest["bias_distinguishable"],
                                               smallest["n_replicates"]),
                            "numbers": f"rel. bias {format_ci(smallest['rel_bias'], smallest['rel_bias_lo'], smallest['rel_bias_hi'])}"})
    return pd.DataFrame.from_records(records)


def verdict(summary: tuple) -> Verdict:
    """confirmed (every check passes), refuted (none does), qualified (some do), or
    inconclusive (a check could not be decided at these sizes), with the numbers."""
    exps, by_b, _, chk = summary
    reason = verdict_sentence(exps, by_b, chk)
    if chk.empty or chk["passed"].isna().any():
        return inconclusive(reason)
    return Verdict(combined_word(["confirmed" if p else "refuted" for p in chk["passed"]]), reason)


def _cell(d: pd.DataFrame, column: str) -> str:
    """``column`` of the first row of ``d`` with its interval, or n/a when ``d`` is empty."""
    return format_columns(d.iloc[0], column) if len(d) else "n/a"


def verdict_sentence(exps: pd.DataFrame, by_b: pd.DataFrame, chk: pd.DataFrame) -> str:
    """The exponents, the mean baseline's bias at the smallest B and the failed checks."""
    if exps.empty:
        return "no estimator was measured at two batch sizes"
    parts = []
    for env, e in exps.groupby("env", sort=False):
        ks = ", ".join(f"k({r['estimator']}) = {format_ci(r['k'], r['k_lo'], r['k_hi'], 3)}"
                       f" (B ≥ {LARGE_B}: {format_ci(r['k_large'], r['k_large_lo'], r['k_large_hi'], 3)};"
                       f" B=2 excess r = {format_ci(r['ustat_r'], r['ustat_r_lo'], r['ustat_r_hi'], 3)})"
                       for _, r in e.iterrows() if r["estimator"] in SLOPE_ESTIMATORS)
        mean = by_b[(by_b["env"] == env) & (by_b["estimator"] == MEAN)].sort_values("B")
        bias = ""
        if not mean.empty:
            r = mean.iloc[0]
            bias = (f", mean_baseline rel. bias at B={int(r['B'])} "
                    f"{format_ci(r['rel_bias'], r['rel_bias_lo'], r['rel_bias_hi'], 3)} (theory {1 / r['B']:.3g})")
        parts.append(f"{env}: {ks}{bias}")
    failed = chk[chk["passed"].eq(False)] if not chk.empty else chk
    tail = ("; failed: " + "; ".join(f"{r['env']}: {r['check']} ({r['numbers']})"
                                     for _, r in failed.iterrows())) if len(failed) else ""
    return "; ".join(parts) + tail


def markdown(summary: tuple, verdict: Verdict, preset: str) -> str:
    """result.md: the claim, the exponents, the per-B bias table, the checks, the verdict."""
    exps, by_b, ratios, chk = summary
    lines = [f"# Variance and bias against batch size B ({preset} preset)", "",
             f"Claim: {CLAIM}.", "",
             ("One measurement per run at a random initial policy, exact gradient; a replicate "
              "is one (env instance, run seed) measured at every B; 95% bootstrap intervals "
              "across replicates."), "",
             "## Fits over B = " + ", ".join(str(b) for b in sorted(by_b["B"].unique())), "",
             ("k: OLS slope of log tr Cov on log B (Var ∝ B^k), fitted to the mean over "
              "replicates of each replicate's variance divided by its scale mean_B(B·Var(B)), "
              "bootstrap over replicates. c²: least-squares fit through 0 of the relative "
              "squared bias on 1/B² per replicate (relative bias = c/B), averaged over "
              "replicates; the fit weighs the smallest B most."), "",
             ("r: the excess at B = 2 over the 1/B law, ζ₂/(2ζ₁) of the U-statistic law "
              "Var(B) = (4(B−2)ζ₁ + 2ζ₂)/(B(B−1)) fitted to the same curve (r = 1: exactly "
              "1/B; not defined for the batch mean, whose variance is (1−1/B)² that of RLOO)."), "",
             *markdown_table(
                 ["env", "estimator", "replicates", "k (all B)", f"k (B ≥ {LARGE_B})",
                  "expected k", "r = ζ₂/(2ζ₁)", "c²", "expected c²"],
                 [[r["env"], r["estimator"], r["n_replicates"], format_columns(r, "k"),
                   format_columns(r, "k_large"),
                   "-1" if r["estimator"] != MEAN else "-1 (times (1-1/B)²)",
                   format_columns(r, "ustat_r"), format_columns(r, "c2"),
                   1 if r["estimator"] == MEAN else 0] for _, r in exps.iterrows()])]
    lines += ["", "## Relative bias ‖E ĝ − ∇J‖ / ‖∇J‖ against B", "",
              *markdown_table(
                  ["env", "B", "mean_baseline rel. bias", "theory 1/B", "distinguishable",
                   "rloo rel. bias", "distinguishable", "Var(mean)/Var(rloo)", "theory (1-1/B)²",
                   "B·Var(B) / (B_max·Var(B_max)), rloo"],
                  [_bias_row(env, b, g, ratios) for (env, b), g in by_b.groupby(["env", "B"])]),
              "", "## Checks", "",
              *markdown_table(["env", "check", "passed", "numbers"],
                              [[r["env"], r["check"], yes_no(r["passed"]), r["numbers"]]
                               for _, r in chk.iterrows()])]
    lines += ["", verdict.line(), ""]
    return "\n".join(lines)


def _bias_row(env: str, b: int, g: pd.DataFrame, ratios: pd.DataFrame) -> list[str]:
    """One line of the bias-against-B table."""
    m, o = g[g["estimator"] == MEAN], g[g["estimator"] == RLOO]
    rr = ratios[(ratios["env"] == env) & (ratios["B"] == b)] if not ratios.empty else ratios
    return [env, b, _cell(m, "rel_bias"), f"{1 / b:.3g}",
            yes_no(m.iloc[0]["bias_distinguishable"]) if len(m) else "n/a", _cell(o, "rel_bias"),
            yes_no(o.iloc[0]["bias_distinguishable"]) if len(o) else "n/a",
            _cell(rr, "var_ratio_mean_rloo"), f"{(1 - 1 / b) ** 2:.3g}", _cell(o, "norm_variance")]


def _band(ax, d: pd.DataFrame, col: str, est: str, **kw) -> None:
    ax.plot(d["B"], d[col], marker="o", ms=3, lw=1.2, color=COLOURS[est], label=LABELS[est], **kw)
    ax.fill_between(d["B"], d[f"{col}_lo"], d[f"{col}_hi"], color=COLOURS[est], alpha=0.2, lw=0)


def _batch_axis(ax, bs: pd.Series) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(bs.unique()), [str(int(b)) for b in sorted(bs.unique())])
    ax.minorticks_off()
    ax.set_xlabel("batch size B (episodes)")


def plot_variance(by_b: pd.DataFrame, exps: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per environment: relative variance against B (log-log, with a 1/B guide) and the
    normalised variance B Var(B) / (B_max Var(B_max))."""
    envs = list(dict.fromkeys(by_b["env"]))
    fig, axes = plt.subplots(len(envs), 2, figsize=(PAPER_WIDTH, (PANEL_HEIGHT + 0.2) * len(envs)),
                             squeeze=False)
    for (ax_var, ax_norm), env in zip(axes, envs):
        d_env = by_b[by_b["env"] == env]
        for est in ESTIMATORS:
            d = d_env[d_env["estimator"] == est].sort_values("B")
            if d.empty:
                continue
            _band(ax_var, d, "rel_variance", est)
            _band(ax_norm, d, "norm_variance", est)
            fit = exps[(exps["env"] == env) & (exps["estimator"] == est)]
            if est == RLOO and len(fit) and math.isfinite(fit.iloc[0]["ustat_r"]):
                grid = np.geomspace(d["B"].min(), d["B"].max(), 50)
                curve = ustat_curve(np.append(grid, d["B"].max()), fit.iloc[0]["ustat_r"])[:-1]
                ax_norm.plot(grid, curve, color=COLOURS[est], ls="--", lw=0.9,
                             label="U-statistic law (4(B−2)ζ₁ + 2ζ₂)/(B(B−1)) fitted to rloo")
        rtg = d_env[d_env["estimator"] == RTG].sort_values("B")
        if not rtg.empty:
            b0, v0 = rtg["B"].iloc[0], rtg["rel_variance"].iloc[0]
            ax_var.plot(rtg["B"], v0 * b0 / rtg["B"], color="0.4", ls=":", lw=1,
                        label="1/B through reward-to-go at the smallest B")
        log_axis(ax_var, "y", d_env["rel_variance"])
        _batch_axis(ax_var, d_env["B"])
        _batch_axis(ax_norm, d_env["B"])
        ax_norm.axhline(1.0, color="0.4", ls=":", lw=1)
        ax_var.set_ylabel(REL_VAR_LABEL)
        ax_norm.set_ylabel("B·Var(B) / (B_max·Var(B_max))")
        ax_var.set_title(f"{env}: variance against B (95% CI)")
        ax_norm.set_title(f"{env}: departure from 1/B (1 = exact 1/B)")
    legend_below(fig, axes.flat, ncol=2)
    fig.tight_layout()
    return save_figure(fig, out_dir, "batch_size_variance")


def plot_bias(by_b: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per environment: relative bias of the batch-mean and leave-one-out baselines
    against B (log-log) with the theory 1/B. A bias distinguishable from 0 (the table's
    verdict) is a point with its 95% interval; one that is not is drawn as its 95% upper
    bound (open triangle): the bias lies below it."""
    envs = list(dict.fromkeys(by_b["env"]))
    fig, axes = plt.subplots(1, len(envs), figsize=(PAPER_WIDTH, PANEL_HEIGHT + 0.5), squeeze=False)
    for ax, env in zip(axes.flat, envs):
        d_env = by_b[by_b["env"] == env]
        bs = np.array(sorted(d_env["B"].unique()), float)
        ax.plot(bs, 1 / bs, color="0.3", ls="--", lw=1, label="theory for the batch mean: 1/B")
        for j, est in enumerate((MEAN, RLOO)):
            d = d_env[d_env["estimator"] == est].sort_values("B")
            if d.empty:
                continue
            shift = 1.0 + 0.04 * (2 * j - 1)  # side by side on the log axis
            seen = d["bias_distinguishable"].eq(True)  # the table's verdict
            hit = d[seen]
            if len(hit):
                ax.errorbar(hit["B"] * shift, hit["rel_bias"], yerr=error_bars(hit, "rel_bias"), fmt="o", ms=4,
                            capsize=2, lw=1.2, color=COLOURS[est],
                            label=f"{SHORT[est]}: bias ≠ 0, 95% CI")
            bound = d[~seen & (d["rel_bias_hi"] > 0)]
            if len(bound):
                ax.scatter(bound["B"] * shift, bound["rel_bias_hi"], marker="v", s=22,
                           facecolors="none", edgecolors=COLOURS[est],
                           label=f"{SHORT[est]}: not ≠ 0, 95% upper bound")
        _batch_axis(ax, d_env["B"])
        ax.set_yscale("log")
        shown = pd.concat([d_env["rel_bias_hi"], d_env["rel_bias_lo"], pd.Series(1 / bs)])
        ax.set_ylim(max(shown[shown > 0].min(), 1e-4) / 2, 1.0)
        ax.set_ylabel("relative bias  ‖E ĝ − ∇J‖ / ‖∇J‖")
        ax.set_title(f"{env}: bias against B (95% CI)")
    legend_below(fig, axes.flat, ["theory for the batch mean: 1/B"], ncol=3)
    fig.tight_layout()
    return save_figure(fig, out_dir, "batch_size_bias")


def summarise(rows: pd.DataFrame) -> tuple:
    """(exponents, per-B table, Var(mean)/Var(rloo) ratios, checks)."""
    exps, by_b = exponents(rows, replicate_fits(rows)), per_batch_size(rows)
    return exps, by_b, mean_baseline_variance_ratio(rows), checks(exps, by_b)


def result_frame(summary: tuple) -> pd.DataFrame:
    """result.csv: the per-B table with its estimator's exponents and the variance ratio."""
    exps, by_b, ratios, _ = summary
    result = by_b.merge(exps.drop(columns="n_replicates"), on=["env", "estimator"], how="left")
    return result.merge(ratios, on=["env", "B"], how="left") if not ratios.empty else result


def figures(summary: tuple, rows: pd.DataFrame, out_dir: Path) -> list[Path]:
    exps, by_b, _, _ = summary
    return [*plot_variance(by_b, exps, out_dir), *plot_bias(by_b, out_dir)]


EXPERIMENT = Experiment("Variance and bias against batch size B", summarise, verdict, markdown,
                        select=select, figures=figures, result_frame=result_frame,
                        empty_reason="no run of reinforce_rtg, rloo or mean_baseline")
analyze = EXPERIMENT.analyze
