"""Variance and bias against the batch size B.

One measurement per run (``reinforce_rtg``, ``rloo``, ``mean_baseline`` at several B, exact
reference); a *replicate* is one (env, instance = ``env.seed``, seed) measured at every B.
Tested: the exponent k of Var ~ B^k of reward-to-go (a mean of i.i.d. terms: -1), fitted
to the replicate-mean scaled variance with a bootstrap over replicates; and RLOO against
its own law: an order-2 U-statistic (Hoeffding) has ``Var = (4 (B-2) zeta_1 + 2 zeta_2) /
(B (B-1))``, whose two constants, solved from the smallest and largest B, predict every B
between. By construction (algebra of the estimators, shown as sanity checks): the batch
mean's E g = (1 - 1/B) grad J (relative bias c/B, c^2 = 1), its variance (1 - 1/B)^2 times
RLOO's, and RLOO's zero bias.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.experiment import (
    BY_CONSTRUCTION, Experiment, bias_columns, bootstrap_rows, check, checks_verdict, estimate_columns,
    first_measurements, instance_column)
from analysis.figures import PANEL_HEIGHT, PAPER_WIDTH, error_bars, legend_below, save_figure
from analysis.render import checks_table, format_columns, frame_table, yes_no
from analysis.stats import NAN_ESTIMATE, mean_ci
from analysis.table import squared_bias_interval

RTG, RLOO, MEAN = "reinforce_rtg", "rloo", "mean_baseline"
ESTIMATORS = (RTG, RLOO, MEAN)
COLOURS = {RTG: "tab:orange", RLOO: "tab:green", MEAN: "tab:red"}
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


def variance_matrix(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(batch sizes, V [replicates, batch sizes]) of one (env, estimator), replicates
    missing a B dropped; each row divided by its scale mean_B(B V(B)), so every replicate
    weighs the same whatever its variance."""
    wide = rows.pivot_table(index=["instance", "seed"], columns="B", values="grad_variance").dropna()
    bs, v = wide.columns.to_numpy(float), wide.to_numpy(float)
    return bs, v / (bs * v).mean(axis=1, keepdims=True)


def pooled_exponent(bs: np.ndarray, w: np.ndarray, min_b: float = 0) -> float:
    """OLS slope of log(mean over replicates of the scaled variance) on log B, B >= min_b.
    Averaging before the log avoids the Jensen bias of the log of a noisy variance, which
    is larger at small B for heavy-tailed episode terms and would tilt the slope."""
    keep = bs >= min_b
    y = np.log(w[:, keep].mean(axis=0))
    return float(np.polyfit(np.log(bs[keep]), y, 1)[0]) if keep.sum() >= 2 else math.nan


def ustat_excess(bs: np.ndarray, w: np.ndarray) -> float:
    """r = zeta_2 / (2 zeta_1) of the order-2 U-statistic law, fitted by least squares of
    ``Var(B) B (B-1)`` on ``B - 2`` (weights 1/B: its noise sd grows about as B) to the
    replicate-mean scaled variance; r = 1 is the exact 1/B law, and the variance at B = 2
    is r times what the 1/B law predicts from large B. NaN without two B >= 2."""
    b = bs[bs >= 2]
    if b.size < 2:
        return math.nan
    slope, intercept = np.polyfit(b - 2, w[:, bs >= 2].mean(axis=0) * b * (b - 1), 1, w=1 / b)
    return float(intercept / slope)


def ustat_curve(bs: np.ndarray, r: float) -> np.ndarray:
    """B Var(B) / (B_max Var(B_max)) under the U-statistic law with excess r."""
    m = 1 + (r - 1) / (bs - 1)
    return m / m[-1]


def ustat_prediction_gap(bs: np.ndarray, w: np.ndarray) -> float:
    """Mean over the inner B of log(measured / predicted) replicate-mean variance, the
    prediction the U-statistic law with zeta_1, zeta_2 solved from the smallest and the
    largest B (``V(B) B (B-1) = 4 (B-2) zeta_1 + 2 zeta_2``): 0 when the law holds; NaN
    without an inner B."""
    v = w.mean(axis=0)
    ends = [0, -1]
    if bs.size < 3:
        return math.nan
    z1, z2 = np.linalg.solve(np.column_stack([4 * (bs[ends] - 2), 2 * np.ones(2)]),
                             v[ends] * bs[ends] * (bs[ends] - 1))
    predicted = (4 * (bs - 2) * z1 + 2 * z2) / (bs * (bs - 1))
    return float(np.mean(np.log(v[1:-1] / predicted[1:-1])))


def normalised_curve(bs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """B mean V(B) / (B_max mean V(B_max)): 1 at every B under an exact 1/B law."""
    m = bs * w.mean(axis=0)
    return m / m[-1]


def variance_ratios(rows: pd.DataFrame) -> pd.DataFrame:
    """Var(mean_baseline) / Var(rloo) per (env, B), geometric mean over replicates."""
    wide = rows.pivot_table(index=["env", "instance", "seed", "B"], columns="estimator",
                            values="grad_variance").reset_index()
    if not {MEAN, RLOO} <= set(wide.columns):
        return pd.DataFrame(columns=["env", "B"])
    return pd.DataFrame([{"env": env, "B": int(b), **estimate_columns(
        "var_ratio_mean_rloo", mean_ci(np.log(g[MEAN] / g[RLOO]).to_numpy()).map(math.exp))}
        for (env, b), g in wide.dropna(subset=[MEAN, RLOO]).groupby(["env", "B"])])


def per_batch_size(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (env, estimator, B): relative variance, normalised variance and bias."""
    records = []
    for (env, est), g_est in rows.groupby(["env", "estimator"], sort=True):
        bs, w = variance_matrix(g_est)
        norm = dict(zip(bs.astype(int), zip(*bootstrap_rows(w, lambda x: normalised_curve(bs, x)))))
        for b, g in g_est.groupby("B", sort=True):
            nv = norm.get(int(b), (math.nan,) * 3)
            records.append({"env": env, "estimator": est, "B": int(b), "n_replicates": len(g),
                            **estimate_columns("rel_variance", mean_ci(g["grad_rel_variance"])),
                            "norm_variance": nv[0], "norm_variance_lo": nv[1],
                            "norm_variance_hi": nv[2], **bias_columns(g)})
    return pd.DataFrame.from_records(records)


def bias_coefficient(g: pd.DataFrame) -> pd.Series:
    """Least squares through 0 of one replicate's U_rel(B) = c^2 / B^2: its c^2 (relative
    bias c/B) and the standard error ``c2_se`` from the logged ones of U. The weights
    (1/B^2) / sum(1/B^4) lean on the smallest B, where a 1/B bias stands out most."""
    x = 1.0 / g["B"].to_numpy(float) ** 2
    y = g["grad_rel_bias_sq"].to_numpy(float)
    se = (g["grad_bias_sq_se"] / g["ref_norm"].where(g["ref_norm"] > 0) ** 2).to_numpy(float)
    ok = np.isfinite(y)
    w = x[ok] / (x[ok] ** 2).sum()
    return pd.Series({"c2": (w * y[ok]).sum() if ok.any() else math.nan,
                      "c2_se": math.sqrt(((w * se[ok]) ** 2).sum()) if ok.any() else math.nan})


def exponents(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (env, estimator): k over all B and over B >= LARGE_B, the U-statistic excess r
    (bootstrap over replicates) and the replicate-mean bias coefficient c^2."""
    records = []
    for (env, est), g in rows.groupby(["env", "estimator"], sort=False):
        bs, w = variance_matrix(g)
        fits = {"k": lambda x: pooled_exponent(bs, x), "k_large": lambda x: pooled_exponent(bs, x, LARGE_B),
                "ustat_r": lambda x: ustat_excess(bs, x), "ustat_gap": lambda x: ustat_prediction_gap(bs, x)}
        record = {"env": env, "estimator": est, "n_replicates": w.shape[0],  # the batch mean: no U law
                  **estimate_columns("ustat_r", NAN_ESTIMATE), **estimate_columns("ustat_gap", NAN_ESTIMATE)}
        for name in ("ustat_r", "ustat_gap") if est == MEAN else ():
            fits.pop(name)
        for name, fit in fits.items():
            value, lo, hi = bootstrap_rows(w, fit)
            record.update({name: value[0], f"{name}_lo": lo[0], f"{name}_hi": hi[0]})
        c2 = g.groupby(["instance", "seed"], sort=False).apply(bias_coefficient, include_groups=False)
        records.append({**record, **estimate_columns("c2", squared_bias_interval(c2, "c2"))})
    return pd.DataFrame.from_records(records)


def _decided(flag: bool | None, n: int) -> bool | None:
    """A check's outcome, or None below MIN_REPLICATES replicates or without an interval."""
    return None if n < MIN_REPLICATES or flag is None or pd.isna(flag) else bool(flag)


def checks(exps: pd.DataFrame, by_b: pd.DataFrame) -> pd.DataFrame:
    """Each statement per environment: pass, fail or None (undecided), and its class."""
    records = []
    for env, e in exps.groupby("env", sort=False):
        e = e.set_index("estimator")
        r, u = e.loc[RTG], e.loc[RLOO]
        records.append(check(env, f"Var({RTG}) ~ 1/B: k = -1 in the interval",
                             _decided(r["k_lo"] <= -1 <= r["k_hi"] if np.isfinite(r["k_lo"]) else None,
                                      r["n_replicates"]), f"k = {format_columns(r, 'k')}"))
        records.append(check(env, "Var(rloo) follows its U-statistic law: the law through the smallest "
                                  "and largest B predicts the others (mean log gap 0 in the interval)",
                             _decided(u["ustat_gap_lo"] <= 0 <= u["ustat_gap_hi"] if np.isfinite(u["ustat_gap_lo"])
                                      else None, u["n_replicates"]), f"gap = {format_columns(u, 'ustat_gap')}"))
        for est, statement, c2 in ((MEAN, "mean_baseline relative bias = c/B with c² = 1 (fit over all B)", 1.0),
                                   (RLOO, "rloo bias not distinguishable: c² (fit over all B) not above 0", 0.0)):
            r = e.loc[est]
            ok = (r["c2_lo"] <= c2 <= r["c2_hi"] if c2 else r["c2_lo"] <= 0) if np.isfinite(r["c2_lo"]) else None
            records.append(check(env, statement, _decided(ok, r["n_replicates"]),
                                 f"c² = {format_columns(r, 'c2')}", BY_CONSTRUCTION))
        m = by_b[(by_b["env"] == env) & (by_b["estimator"] == MEAN)].sort_values("B")
        records.append(check(env, f"mean_baseline bias distinguishable at B={m['B'].iloc[0]}",
                             _decided(m["bias_distinguishable"].iloc[0], m["n_replicates"].iloc[0]),
                             f"rel. bias {format_columns(m.iloc[0], 'rel_bias')}", BY_CONSTRUCTION))
        gap = (m["var_ratio_mean_rloo"] / (1 - 1 / m["B"]) ** 2 - 1).abs().max()
        records.append(check(env, "Var(mean)/Var(rloo) = (1 − 1/B)² at every B", gap < 1e-6,
                             f"largest relative gap {gap:.1e}", BY_CONSTRUCTION))
    return pd.DataFrame.from_records(records)


def summarise(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The exponents, the per-B table (with the variance ratio) and the checks."""
    exps, by_b = exponents(rows), per_batch_size(rows)
    by_b = by_b.merge(variance_ratios(rows), on=["env", "B"], how="left")
    return {"exps": exps, "by_b": by_b, "checks": checks(exps, by_b)}


def verdict(s: dict) -> object:
    """From the checks (``checks_verdict``), with the exponents and the bias at B = 2."""
    parts = []
    for env, e in s["exps"].groupby("env", sort=False):
        r, u = e.set_index("estimator").loc[RTG], e.set_index("estimator").loc[RLOO]
        ks = (f"k({RTG}) = {format_columns(r, 'k')}, rloo's gap to its U-statistic law "
              f"{format_columns(u, 'ustat_gap')} (B=2 excess r = {format_columns(u, 'ustat_r')}, "
              f"k = {format_columns(u, 'k')})")
        m = s["by_b"][(s["by_b"]["env"] == env) & (s["by_b"]["estimator"] == MEAN)].iloc[0]
        parts.append(f"{env}: {ks}, mean_baseline rel. bias at B={m['B']} "
                     f"{format_columns(m, 'rel_bias')} (theory {1 / m['B']:.3g})")
    return checks_verdict(s["checks"], "; ".join(parts))


def render(s: dict, verdict, preset: str) -> str:
    """result.md: the claim, the exponents, the per-B bias table, the checks, the verdict."""
    exps, by_b = s["exps"], s["by_b"]
    wide = pd.concat([by_b[by_b["estimator"] == e].set_index(["env", "B"]).add_prefix(f"{e}_")
                      for e in (MEAN, RLOO)], axis=1).reset_index()
    return "\n".join([
        f"# Variance and bias against batch size B ({preset} preset)", "", f"Claim: {CLAIM}.", "",
        "One measurement per run at a random initial policy, exact gradient; a replicate is one "
        "(env instance, run seed) measured at every B; 95% bootstrap intervals across replicates. "
        "k: slope of log tr Cov on log B of the replicate-mean scaled variance; r = ζ₂/(2ζ₁): the "
        "excess at B = 2 of the U-statistic law Var(B) = (4(B−2)ζ₁ + 2ζ₂)/(B(B−1)); c²: fit of the "
        "relative squared bias by c²/B² per replicate, averaged. Gap to the U law: mean over the "
        "inner B of log(measured / predicted) variance, the law's ζ₁, ζ₂ solved from the "
        "smallest and largest B (0 when RLOO follows its law).", "",
        *frame_table(exps, {"env": "env", "estimator": "estimator", "replicates": "n_replicates",
                            "k (all B)": "k", f"k (B ≥ {LARGE_B})": "k_large", "r = ζ₂/(2ζ₁)": "ustat_r",
                            "gap to the U law": "ustat_gap",
                            "c²": "c2", "expected c²": lambda r: int(r["estimator"] == MEAN)}),
        "", "## Relative bias ‖E ĝ − ∇J‖ / ‖∇J‖ and variance against B", "",
        *frame_table(wide, {"env": "env", "B": "B", "mean_baseline rel. bias": f"{MEAN}_rel_bias",
                            "theory 1/B": lambda r: f"{1 / r['B']:.3g}",
                            "distinguishable": lambda r: yes_no(r[f"{MEAN}_bias_distinguishable"]),
                            "rloo rel. bias": f"{RLOO}_rel_bias",
                            "distinguishable ": lambda r: yes_no(r[f"{RLOO}_bias_distinguishable"]),
                            "Var(mean)/Var(rloo)": f"{RLOO}_var_ratio_mean_rloo",
                            "theory (1-1/B)²": lambda r: f"{(1 - 1 / r['B']) ** 2:.3g}",
                            "B·Var(B) / (B_max·Var(B_max)), rloo": f"{RLOO}_norm_variance"}),
        "", "## Checks (only `tested` ones count toward the verdict; `by construction` ones are "
            "identities of the estimators, shown as sanity checks)", "",
        *checks_table(s["checks"]), "", verdict.line(), ""])


def figures(s: dict, rows: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per environment: the normalised variance B Var(B) / (B_max Var(B_max)) (1 = exact
    1/B; dashed: RLOO's fitted U-statistic law) and the relative bias against B (theory
    1/B for the batch mean)."""
    by_b, exps = s["by_b"], s["exps"].set_index(["env", "estimator"])
    envs = list(dict.fromkeys(by_b["env"]))
    fig, axes = plt.subplots(len(envs), 2, figsize=(PAPER_WIDTH, (PANEL_HEIGHT + 0.2) * len(envs)), squeeze=False)
    for (ax_var, ax_bias), env in zip(axes, envs):
        for est in ESTIMATORS:
            d = by_b[(by_b["env"] == env) & (by_b["estimator"] == est)].sort_values("B")
            ax_var.errorbar(d["B"], d["norm_variance"], yerr=error_bars(d, "norm_variance"), marker="o",
                            ms=3, capsize=2, color=COLOURS[est], label=est)
            if est != RTG:
                ax_bias.errorbar(d["B"], d["rel_bias"], yerr=error_bars(d, "rel_bias"), fmt="o", ms=3,
                                 capsize=2, color=COLOURS[est])
        bs = np.sort(by_b.loc[by_b["env"] == env, "B"].unique()).astype(float)
        if np.isfinite(exps.loc[(env, RLOO), "ustat_r"]):
            ax_var.plot(bs, ustat_curve(bs, exps.loc[(env, RLOO), "ustat_r"]), color=COLOURS[RLOO],
                        ls="--", lw=0.9, label="U-statistic law fitted to rloo")
        ax_bias.plot(bs, 1 / bs, color="0.3", ls="--", lw=1, label="1/B (batch-mean theory)")
        for ax in (ax_var, ax_bias):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size B (episodes)")
        ax_var.axhline(1.0, color="0.4", ls=":", lw=1)
        ax_var.set_ylabel("B·Var(B) / (B_max·Var(B_max))")
        ax_bias.set_ylabel("relative bias (95% CI)")
        ax_var.set_title(f"{env}: departure from 1/B")
        ax_bias.set_title(f"{env}: bias of mean_baseline and rloo")
    legend_below(fig, axes.flat, ncol=3)
    fig.tight_layout()
    return save_figure(fig, out_dir, "batch_size_variance")


EXPERIMENT = Experiment("Variance and bias against batch size B", summarise, verdict, render,
                        select=select, figures=figures,
                        result_frame=lambda s: s["by_b"].merge(s["exps"].drop(columns="n_replicates"),
                                                               on=["env", "estimator"], how="left"),
                        more_tables=lambda s: {"checks": s["checks"]},
                        empty_reason="no run of reinforce_rtg, rloo or mean_baseline")
analyze = EXPERIMENT.analyze
