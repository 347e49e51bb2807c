"""How much gradient signal is left when a sparse reward is far (chain, uniform policy)?
Per (T, L, estimator) cell, seeds pooled; README.md states the bound and the tested slope."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis import experiment as xp
from analysis.render import format_columns, frame_table
from analysis.stats import NAN_ESTIMATE, mean_ci, proportion_ci, ratio_ci
from pgvar.envs.registry import make_env

CLAIM = ("\"Sparse rewards. If reward appears only at episode termination (e.g., winning a "
         "game), REINFORCE receives no gradient signal until an episode completes. Random "
         "exploration rarely stumbles onto rewarding trajectories, and without reward, the "
         "gradient is zero everywhere.\" (source text, *When it falls down*)")
SPARSE = 0.1  # cells with p_reach at most this are the sparse regime the slope is fitted on
MIN_POINTS = 3  # sparse cells a slope needs
MIN_HITS = 10  # rewarded episodes a seed expects in a cell (p M B) for its N1 to be measured


def reach_probability(length: int, horizon: int, slip: float = 0.0) -> float:
    """P(an episode of the uniform policy enters the goal within ``horizon`` steps), exactly:
    J with gamma = 1 on the chain, by the environment's dynamic programming."""
    env = make_env("chain", length=int(length), horizon=int(horizon), gamma=1.0, slip=float(slip))
    uniform = torch.full((env.n_states, env.n_actions), 1.0 / env.n_actions, dtype=torch.float64)
    return float(env.objective_from_probs(uniform))


def predicted_zero_fraction(p_reach: float, batch_size: int) -> float:
    """P(no episode of a batch reaches the goal) = (1 - p_reach)^B."""
    return float((1.0 - p_reach) ** batch_size)


def per_run_values(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its first measurement with the chain's settings and statistics."""
    names = {"env.horizon": "T", "env.length": "L", "training.batch_size": "B", "n_estimates": "M"}
    runs = xp.first_measurements(frame).rename(columns=names).astype({c: int for c in ("T", "L", "B", "M", "seed")})
    runs = runs.assign(slip=runs["env.slip"].astype(float) if "env.slip" in runs else 0.0, distance=runs["L"] - 1)
    runs["zeros"] = np.rint(runs["zero_grad_fraction"] * runs["M"]).astype(int)
    return runs.reset_index(drop=True)


def cell_summary(cell: pd.DataFrame) -> dict:
    """Pooled zero-gradient count against its prediction, and the signal statistics."""
    first = cell.iloc[0]
    p_reach = reach_probability(first["L"], first["T"], first["slip"])
    predicted = predicted_zero_fraction(p_reach, int(first["B"]))
    k = int(cell["zeros"].sum())
    zero = proportion_ci(k, int(cell["M"].sum()))  # Clopper-Pearson
    by_seed = lambda col: dict(zip(cell["seed"], cell[col]))
    exact_snr = (ratio_ci(by_seed("ref_sq"), by_seed("grad_variance"))  # every batch zero: no SNR
                 if cell["grad_variance"].sum() > 0 else NAN_ESTIMATE)
    return {"T": int(first["T"]), "L": int(first["L"]), "distance": int(first["distance"]),
            "estimator": first["estimator"], "B": int(first["B"]), "seeds": cell["seed"].nunique(),
            "p_reach": p_reach, "batches": zero.n, "zero_batches": k,
            **xp.estimate_columns("zero_fraction", zero), "predicted_zero_fraction": predicted,
            "excess": zero.value - predicted, "below_prediction": bool(zero.hi < predicted),
            "above_prediction": bool(zero.lo > predicted),
            "ref_norm": cell["ref_norm"].mean(),
            **xp.estimate_columns("grad_norm_mean", mean_ci(cell["grad_norm_mean"].to_numpy())),
            **xp.estimate_columns("exact_snr", exact_snr),
            **xp.estimate_columns("episodes_snr1", xp.reciprocal(exact_snr, first["B"]))}  # B / SNR


def sparsity_slope(runs: pd.DataFrame) -> dict:
    """Slope s of log N1 = log(B mean tr Cov / ||grad J||^2) on log(1/p_reach) over one
    (T, estimator)'s sparse cells where each seed expects MIN_HITS rewarded episodes (a
    cell kept only when a rare hit happened would bias N1 up), with its bootstrap over
    seeds (the same draws for every cell); NaN below MIN_POINTS cells."""
    wide = runs.pivot_table(index="seed", columns="L", values="grad_variance").dropna(axis=1)
    p = pd.Series({L: reach_probability(L, runs["T"].iloc[0], runs["slip"].iloc[0]) for L in wide.columns})
    hits = p * (runs["M"] * runs["B"]).min()
    keep = [L for L in wide.columns if MIN_HITS <= hits[L] and p[L] <= SPARSE and wide[L].sum() > 0]
    if len(keep) < MIN_POINTS:
        return {**xp.estimate_columns("slope", NAN_ESTIMATE), "points": len(keep)}
    x = np.log(1 / p[keep].to_numpy())
    ref_sq = runs.groupby("L")["ref_norm"].mean()[keep].to_numpy() ** 2

    def slope(var):  # least squares on the seeds' mean variance (NaN stays NaN)
        y = np.log(np.where(var > 0, var, np.nan) / ref_sq)
        return ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    (value,), (lo,), (hi,) = xp.bootstrap_rows(wide[keep].to_numpy(), lambda v: slope(v.mean(axis=0)))
    return {"slope": float(value), "slope_lo": lo, "slope_hi": hi, "points": len(keep)}


def checks(cells: pd.DataFrame, slopes: pd.DataFrame) -> list:
    """Tested: N1 ∝ 1/p_reach per (T, estimator); by construction: the zero-fraction bound."""
    out = [xp.check(f"T = {r['T']}, {r['estimator']}", "episodes for SNR 1 grow as 1/p_reach: slope 1 in the interval",
                 None if np.isnan(r["slope_lo"]) else bool(r["slope_lo"] <= 1 <= r["slope_hi"]),
                 f"s = {format_columns(r, 'slope')} over {r['points']} cells with p_reach ≤ {SPARSE}")
           for _, r in slopes.iterrows()]
    below = cells[cells["below_prediction"]]
    return out + [xp.check("all cells", "zero-gradient fraction not below (1 − p_reach)^B", below.empty,
                                     f"{len(below)} of {len(cells)} cells below, "
                                     f"{int(cells['above_prediction'].sum())} above", xp.BY_CONSTRUCTION)]


def summarise(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One row per (T, estimator, L), sorted; the slopes per (T, estimator); the checks."""
    runs = runs.assign(ref_sq=runs["ref_norm"] ** 2)
    cells = pd.DataFrame([cell_summary(c) for _, c in runs.groupby(["T", "estimator", "L"], sort=True)])
    slopes = pd.DataFrame([{"T": T, "estimator": est, **sparsity_slope(g)}
                           for (T, est), g in runs.groupby(["T", "estimator"], sort=True)])
    return {"cells": cells, "slopes": slopes, "checks": checks(cells, slopes)}


def main_horizon(cells: pd.DataFrame) -> int:
    """The horizon with the most distances (the fixed-horizon sweep)."""
    return int(cells.groupby("T")["L"].nunique().idxmax())


def verdict(s: dict):
    """From the tested checks, with the zero fractions and the episodes needed for SNR 1."""
    cells = s["cells"]
    T = main_horizon(cells)
    main = cells[(cells["T"] == T) & (cells["estimator"] == cells["estimator"].min())]
    finite = main[main["p_reach"] * main["batches"] / main["seeds"] * main["B"] >= MIN_HITS]  # N1 measurable
    far = finite.iloc[-1] if len(finite) else main.iloc[-1]
    return xp.headline_verdict(s["checks"], (
        f"at T = {T} ({far['estimator']}) the fraction of batches (B = {far['B']}) with an exactly "
        f"zero gradient rises to {format_columns(main.iloc[-1], 'zero_fraction', style='f')} at "
        f"distance {main.iloc[-1]['distance']} (predicted {main.iloc[-1]['predicted_zero_fraction']:.3f}); "
        f"the episodes needed for SNR 1 reach {format_columns(far, 'episodes_snr1')} at distance "
        f"{far['distance']} (p_reach = {far['p_reach']:.1e}, 1/p_reach = {1 / far['p_reach']:.3g}); "
        "slope of log N1 on log(1/p_reach): " + ", ".join(
            f"T = {r['T']} {r['estimator']} {format_columns(r, 'slope')}" for _, r in s["slopes"].iterrows())))


def render(s: dict, verdict, preset: str) -> str:
    """result.md: the claim, the setup, the fixed-horizon table, the checks, the verdict."""
    cells = s["cells"]
    T = main_horizon(cells)
    main = cells[cells["T"] == T].sort_values(["estimator", "distance"])
    return "\n".join([
        "# Sparse rewards: gradient signal against the distance to the reward (chain)", "",
        f"**Claim.** {CLAIM}", "",
        (f"**Measured** (preset `{preset}`): the sparse chain, uniform policy, gamma = 1, T ∈ "
        f"{sorted(cells['T'].unique())}, B = {cells['B'].max()}, {cells['seeds'].max()} seeds pooled; "
        "p_reach exact (DP); Clopper-Pearson intervals for fractions, bootstrap over seeds otherwise."),
        "", f"Fixed horizon T = {T}:", "",
        *frame_table(main, {"estimator": "estimator", "distance": "distance",
                            "p_reach": lambda c: f"{c['p_reach']:.2e}",
                            "zero-grad fraction [95% CI]": lambda c: format_columns(c, "zero_fraction", style="f"),
                            "predicted": lambda c: f"{c['predicted_zero_fraction']:.3f}",
                            "‖∇J‖": lambda c: f"{c['ref_norm']:.2e}",
                            "mean ‖ĝ‖": lambda c: f"{c['grad_norm_mean']:.2e}",
                            "SNR ‖∇J‖²/trCov": lambda c: format_columns(c, "exact_snr", 2, "– (all ĝ = 0)"),
                            "episodes for SNR 1": lambda c: format_columns(c, "episodes_snr1", 2),
                            "1/p_reach": lambda c: f"{1 / c['p_reach']:.2g}" if c["p_reach"] > 0 else "∞"}), "",
        (f"All {len(cells)} cells (every horizon) are in `result.csv`; cells whose zero fraction "
        f"lies above its prediction: {int(cells['above_prediction'].sum())}, below: "
        f"{int(cells['below_prediction'].sum())}."), "",
        (f"Episodes for SNR 1: N1 = B·tr Cov/‖∇J‖² (ratio of means over seeds); its slope s on "
        f"log(1/p_reach) over the cells with p_reach ≤ {SPARSE} (bootstrap over seeds):"), "",
        *frame_table(s["slopes"], {"T": "T", "estimator": "estimator", "cells": "points", "slope s": "slope"}),
        "", *xp.findings_section(s["checks"], verdict)])


def figures(s: dict, runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One line per (T, estimator): the zero-gradient fraction (95% CI) with its prediction
    (dotted) against the distance, and the episodes for SNR 1 against 1/p_reach (dashed)."""
    cells = s["cells"].assign(inverse_p=1 / s["cells"]["p_reach"], line=[
        f"T = {T}, {est}" for T, est in zip(s["cells"]["T"], s["cells"]["estimator"])])
    n1 = cells[np.isfinite(cells["episodes_snr1"]) & (cells["p_reach"] < 1)]
    return xp.plot_estimate_panels([
        {"frame": cells, "x": "distance", "y": "zero_fraction", "by": "line",
         "prediction": "predicted_zero_fraction", "xlabel": "distance to the reward (steps)",
         "ylabel": "fraction of batches with ĝ = 0", "title": "zero-gradient batches; dotted: (1 − p_reach)^B"},
        {"frame": n1, "x": "inverse_p", "y": "episodes_snr1", "by": "line", "xscale": "log",
         "yscale": "log", "diagonal": (1, cells.loc[cells["p_reach"] > 0, "inverse_p"].max()),
         "xlabel": "1 / p_reach", "ylabel": "episodes for SNR 1 (95% CI)", "title": "dashed: N1 = 1/p_reach"}],
        out_dir, "sparse_reward_signal", ncols=2)


EXPERIMENT = xp.Experiment("Sparse rewards: gradient signal against the distance to the reward (chain)",
                        summarise, verdict, render, per_run=per_run_values, figures=figures,
                        result_frame=lambda s: s["cells"],
                        more_tables=lambda s: {"slopes": s["slopes"], "checks": xp.findings_frame(s["checks"])})
analyze = EXPERIMENT.analyze
