"""Variance and bias against the batch size B, with an exact reference. The claim, the
design (a *replicate*: one env, instance ``env.seed`` and seed measured at every B) and
every check with its class are in README.md beside this file."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import experiment as xp
from analysis.figures import interval_grid
from analysis.render import format_columns, frame_table, yes_no
from analysis.stats import NAN_ESTIMATE, mean_ci

RTG, RLOO, MEAN = "reinforce_rtg", "rloo", "mean_baseline"
ESTIMATORS = (RTG, RLOO, MEAN)
MIN_REPLICATES = 3  # fewer: a bootstrap interval means nothing, the checks stay undecided
CLAIM = ("the variance of a batch estimate falls as 1/B for i.i.d. episodes, and a "
         "baseline that is the batch mean of the returns is biased by O(1/B) "
         "(E ĝ = (1 − 1/B) ∇J) where the leave-one-out mean is not (the source text "
         "itself says only “REINFORCE with mean baseline: bias 0”)")


def select(frame: pd.DataFrame) -> pd.DataFrame:
    """The first measurement of every run of the three estimators, with ``B`` and ``instance``."""
    rows = xp.first_measurements(frame, ESTIMATORS)
    return rows.assign(instance=xp.instance_column(rows), B=rows["training.batch_size"].astype(int))


def variance_matrix(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(batch sizes, V [replicates, batch sizes]) of one (env, estimator), replicates
    missing a B dropped; each row divided by its scale mean_B(B V(B)), so every replicate
    weighs the same whatever its variance."""
    bs, v = xp.paired_matrix(rows, "B", "grad_variance", ["instance", "seed"])
    return bs, v / (bs * v).mean(axis=1, keepdims=True)


def pooled_exponent(bs: np.ndarray, w: np.ndarray) -> float:
    """OLS slope of log(mean over replicates of the scaled variance) on log B. Averaging
    before the log avoids the Jensen bias of the log of a noisy variance, which is larger
    at small B for heavy-tailed episode terms and would tilt the slope."""
    return float(np.polyfit(np.log(bs), np.log(w.mean(axis=0)), 1)[0]) if bs.size >= 2 else math.nan


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


def per_batch_size(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (env, estimator, B): relative variance, normalised variance and bias."""
    records = []
    for (env, est), g_est in rows.groupby(["env", "estimator"], sort=True):
        bs, w = variance_matrix(g_est)
        norm = dict(zip(bs.astype(int), xp.bootstrap_estimates(w, partial(normalised_curve, bs))))
        for b, g in g_est.groupby("B", sort=True):
            records.append({"env": env, "estimator": est, "B": int(b), "n_replicates": len(g),
                            "grad_variance": g["grad_variance"].mean(),
                            **xp.estimate_columns("rel_variance", mean_ci(g["grad_rel_variance"])),
                            **xp.estimate_columns("norm_variance", norm.get(int(b), NAN_ESTIMATE)),
                            **xp.bias_columns(g)})
    return pd.DataFrame.from_records(records)


def exponents(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (env, estimator): k and the gap to the U-statistic law (bootstrap over replicates)."""
    records = []
    for (env, est), g in rows.groupby(["env", "estimator"], sort=False):
        bs, w = variance_matrix(g)
        fits = {"k": partial(pooled_exponent, bs), "ustat_gap": partial(ustat_prediction_gap, bs)}
        record = {"env": env, "estimator": est, "n_replicates": w.shape[0],  # the batch mean: no U law
                  **xp.estimate_columns("ustat_gap", NAN_ESTIMATE)}
        for name, fit in list(fits.items())[:1 if est == MEAN else 2]:
            record.update(xp.estimate_columns(name, xp.bootstrap_estimates(w, fit)[0]))
        records.append(record)
    return pd.DataFrame.from_records(records)


def checks(exps: pd.DataFrame, by_b: pd.DataFrame) -> list:
    """Each statement per environment: pass, fail or None (undecided: fewer than
    MIN_REPLICATES replicates, or no interval), and its class."""
    records = []
    for env, e in exps.groupby("env", sort=False):
        e = e.set_index("estimator")
        r, u = e.loc[RTG], e.loc[RLOO]
        records.append(xp.check(env, f"Var({RTG}) ~ 1/B: k = -1 in the interval",
                                xp.interval_check(r, "k", xp.holds(-1), r["n_replicates"], MIN_REPLICATES),
                                f"k = {format_columns(r, 'k')}"))
        records.append(xp.check(env, "Var(rloo) follows its U-statistic law: the law through the smallest "
                                     "and largest B predicts the others (mean log gap 0 in the interval)",
                                xp.interval_check(u, "ustat_gap", xp.holds(0), u["n_replicates"], MIN_REPLICATES),
                                f"gap = {format_columns(u, 'ustat_gap')}"))
        b = by_b[by_b["env"] == env].set_index(["estimator", "B"])
        m = b.loc[MEAN].iloc[0]
        enough = m["n_replicates"] >= MIN_REPLICATES
        records.append(xp.check(env, f"mean_baseline relative bias at B={m.name} covers 1/B",
                                xp.interval_check(m, "rel_bias", xp.holds(1 / m.name), m["n_replicates"], MIN_REPLICATES),
                                f"{format_columns(m, 'rel_bias')}, 1/B = {1 / m.name:.3g}", xp.BY_CONSTRUCTION))
        biased = list(b.loc[RLOO].index[b.loc[RLOO]["bias_distinguishable"].eq(True)])
        records.append(xp.check(env, "rloo bias not distinguishable at any B", not biased if enough else None,
                                f"distinguishable at B = {biased}", xp.BY_CONSTRUCTION))
        gap = (b.loc[MEAN]["grad_variance"] / b.loc[RLOO]["grad_variance"] / (1 - 1 / b.loc[MEAN].index) ** 2 - 1).abs().max()
        records.append(xp.check(env, "Var(mean)/Var(rloo) = (1 − 1/B)² at every B", gap < 1e-4,  # float32 estimates
                                f"largest relative gap {gap:.1e}", xp.BY_CONSTRUCTION))
    return records


def summarise(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The exponents, the per-B table and the checks."""
    exps, by_b = exponents(rows), per_batch_size(rows)
    return {"exps": exps, "by_b": by_b, "checks": checks(exps, by_b)}


def verdict(s: dict) -> object:
    """From the checks (``headline_verdict``), with the exponents and the bias at B = 2."""
    e, m = s["exps"].set_index(["env", "estimator"]), s["by_b"].set_index(["env", "estimator", "B"])
    return xp.headline_verdict(s["checks"], "; ".join(
        f"{env}: k({RTG}) = {format_columns(e.loc[(env, RTG)], 'k')}, rloo's gap to its U-statistic "
        f"law {format_columns(e.loc[(env, RLOO)], 'ustat_gap')} (k = {format_columns(e.loc[(env, RLOO)], 'k')}), "
        f"mean_baseline rel. bias at B={m.loc[(env, MEAN)].index[0]} "
        f"{format_columns(m.loc[(env, MEAN)].iloc[0], 'rel_bias')} (theory {1 / m.loc[(env, MEAN)].index[0]:.3g})"
        for env in e.index.unique(0)))


def render(s: dict, verdict, preset: str) -> str:
    """result.md: the claim, the exponents, the per-B bias table, the checks, the verdict."""
    exps, by_b = s["exps"], s["by_b"]
    wide = pd.concat([by_b[by_b["estimator"] == e].set_index(["env", "B"]).add_prefix(f"{e}_")
                      for e in (MEAN, RLOO)], axis=1).reset_index()
    return "\n".join([
        f"# Variance and bias against batch size B ({preset} preset)", "", f"Claim: {CLAIM}.", "",
        ("One measurement per run at a random initial policy, exact gradient; 95% bootstrap intervals "
         "over replicates (env instance, seed). k: slope of log tr Cov on log B; gap: mean over the "
         "inner B of log(measured / predicted) variance, the U-statistic law Var(B) = (4(B−2)ζ₁ + "
         "2ζ₂)/(B(B−1)) with ζ₁, ζ₂ solved from the smallest and largest B."), "",
        *frame_table(exps, {"env": "env", "estimator": "estimator", "replicates": "n_replicates",
                            "k": "k", "gap to the U law": "ustat_gap"}),
        "", "## Relative bias ‖E ĝ − ∇J‖ / ‖∇J‖ and variance against B", "",
        *frame_table(wide, {"env": "env", "B": "B", "mean_baseline rel. bias": f"{MEAN}_rel_bias",
                            "theory 1/B": lambda r: f"{1 / r['B']:.3g}",
                            "distinguishable": lambda r: yes_no(r[f"{MEAN}_bias_distinguishable"]),
                            "rloo rel. bias": f"{RLOO}_rel_bias",
                            "distinguishable ": lambda r: yes_no(r[f"{RLOO}_bias_distinguishable"]),
                            "Var(mean)/Var(rloo)": lambda r: f"{r[f'{MEAN}_grad_variance'] / r[f'{RLOO}_grad_variance']:.3g}",
                            "theory (1-1/B)²": lambda r: f"{(1 - 1 / r['B']) ** 2:.3g}",
                            "B·Var(B) / (B_max·Var(B_max)), rloo": f"{RLOO}_norm_variance"}),
        "", *xp.findings_section(s["checks"], verdict)])


def figures(s: dict, rows: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per environment: B Var(B) / (B_max Var(B_max)) (1 = exact 1/B) and the relative
    bias against B, the batch mean's theory 1/B as crosses."""
    by_b = s["by_b"]
    theory = np.where(by_b["estimator"] == MEAN, 1 / by_b["B"], np.nan)
    return interval_grid(by_b.assign(theory_rel_bias=theory), "env", "B", [
        ("norm_variance", "B·Var(B) / (B_max·Var(B_max))"), ("rel_bias", "relative bias (95% CI)")],
        out_dir, "batch_size_variance", hue="estimator", log_x=True,
        levels={"norm_variance": 1.0}, marks={"rel_bias": "theory_rel_bias"})


EXPERIMENT = xp.Experiment("Variance and bias against batch size B", summarise, verdict, render,
                        select=select, figures=figures,
                        result_frame=lambda s: s["by_b"].merge(s["exps"].drop(columns="n_replicates"),
                                                               on=["env", "estimator"], how="left"),
                        more_tables=lambda s: {"checks": xp.findings_frame(s["checks"])},
                        empty_reason="no run of reinforce_rtg, rloo or mean_baseline")
analyze = EXPERIMENT.analyze
