"""How much gradient signal is left when a sparse reward is far (chain, uniform policy)?

Each run measures once, for one (T, L, estimator, seed). Per (T, L, estimator) cell, seeds
pooled: the fraction of batches with an exactly zero estimate (Clopper-Pearson interval)
against ``(1 - p_reach)^B``, p_reach exact (J with gamma = 1, by the chain's dynamic
programming). The prediction is a lower bound: with gamma = 1 the scores of episodes that
reach the goal can also cancel exactly, so the excess is reported too. Also the mean norm
of one estimate, ||grad J||, and two SNRs: the harness' ``||g_bar||^2 / tr Cov`` (floored
near 1/M) and the exact per-batch ``||grad J||^2 / tr Cov`` (ratio of means over seeds).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from scipy.stats import binomtest

from analysis.experiment import (
    Experiment,
    Verdict,
    estimate_columns,
    first_measurements,
    inconclusive,
)
from analysis.figures import PAPER_WIDTH, error_bars, log_axis, save_figure
from analysis.render import format_columns, markdown_table
from analysis.stats import NAN_ESTIMATE, mean_ci, ratio_ci

CLAIM = ("\"Sparse rewards. If reward appears only at episode termination (e.g., winning a "
         "game), REINFORCE receives no gradient signal until an episode completes. Random "
         "exploration rarely stumbles onto rewarding trajectories, and without reward, the "
         "gradient is zero everywhere.\" (source text, *When it falls down*)")
ALPHA = 0.05
VANISHED = 0.9  # a zero-gradient fraction above this: the signal has all but vanished


def reach_probability(length: int, horizon: int, slip: float = 0.0) -> float:
    """P(an episode of the uniform policy enters the goal within ``horizon`` steps), exactly:
    J with gamma = 1 on the chain, by the environment's dynamic programming."""
    from pgvar.envs.registry import make_env

    env = make_env("chain", length=int(length), horizon=int(horizon), gamma=1.0, slip=float(slip))
    uniform = torch.full((env.n_states, env.n_actions), 1.0 / env.n_actions, dtype=torch.float64)
    return float(env.objective_from_probs(uniform))


def predicted_zero_fraction(p_reach: float, batch_size: int) -> float:
    """P(no episode of a batch reaches the goal) = (1 - p_reach)^B."""
    return float((1.0 - p_reach) ** batch_size)


def per_run_values(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its first measured step with the chain's settings and statistics."""
    first = first_measurements(frame)
    slip = first["env.slip"].astype(float) if "env.slip" in first else 0.0
    runs = pd.DataFrame({
        "estimator": first["estimator"].astype(str),
        "T": first["env.horizon"].astype(int),
        "L": first["env.length"].astype(int),
        "slip": slip,
        "gamma": first["env.gamma"].astype(float),
        "seed": first["seed"].astype(int),
        "B": first["training.batch_size"].astype(int),
        "M": first["n_estimates"].astype(int),
        "zero_grad_fraction": first["zero_grad_fraction"].astype(float),
        "grad_norm_mean": first["grad_norm_mean"].astype(float),
        "ref_norm": first["ref_norm"].astype(float),
        "grad_variance": first["grad_variance"].astype(float),
        "snr": first["snr"].astype(float),
    })
    runs["distance"] = runs["L"] - 1
    runs["zeros"] = np.rint(runs["zero_grad_fraction"] * runs["M"]).astype(int)
    return runs.reset_index(drop=True)


def cell_summary(cell: pd.DataFrame) -> dict:
    """Pooled zero-gradient count against its prediction, and the signal statistics."""
    first = cell.iloc[0]
    p_reach = reach_probability(first["L"], first["T"], first["slip"])
    predicted = predicted_zero_fraction(p_reach, int(first["B"]))
    k, n = int(cell["zeros"].sum()), int(cell["M"].sum())
    test = binomtest(k, n, min(max(predicted, 0.0), 1.0))
    ci = test.proportion_ci(confidence_level=1 - ALPHA, method="exact")
    norm = mean_ci(cell["grad_norm_mean"].to_numpy())
    snr = mean_ci(cell["snr"].to_numpy())
    by_seed_ref = dict(zip(cell["seed"], cell["ref_norm"] ** 2))
    by_seed_var = dict(zip(cell["seed"], cell["grad_variance"]))
    exact_snr = (ratio_ci(by_seed_ref, by_seed_var) if cell["grad_variance"].sum() > 0
                 else None)
    return {
        "T": int(first["T"]), "L": int(first["L"]), "distance": int(first["distance"]),
        "estimator": first["estimator"], "B": int(first["B"]), "seeds": int(cell["seed"].nunique()),
        "p_reach": p_reach, "batches": n, "zero_batches": k,
        "zero_fraction": k / n, "zero_fraction_lo": float(ci.low), "zero_fraction_hi": float(ci.high),
        "predicted_zero_fraction": predicted, "excess": k / n - predicted,
        "binom_pvalue": float(test.pvalue),
        "below_prediction": bool(ci.high < predicted), "above_prediction": bool(ci.low > predicted),
        "ref_norm": float(cell["ref_norm"].mean()),
        **estimate_columns("grad_norm_mean", norm), **estimate_columns("snr", snr),
        # every batch exactly zero: no spread to measure, so no SNR either (NaN)
        **estimate_columns("exact_snr", exact_snr or NAN_ESTIMATE),
    }


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (T, estimator, L), sorted."""
    rows = [cell_summary(cell) for _, cell in runs.groupby(["T", "estimator", "L"], sort=True)]
    return pd.DataFrame(rows)


def main_horizon(cells: pd.DataFrame) -> int:
    """The horizon with the most distances (the fixed-horizon sweep)."""
    return int(cells.groupby("T")["L"].nunique().idxmax())


def verdict(cells: pd.DataFrame) -> Verdict:
    """The verdict, computed from the cell table."""
    if cells.empty:
        return inconclusive("no measured runs")
    T = main_horizon(cells)
    est = "reinforce" if "reinforce" in set(cells["estimator"]) else cells["estimator"].iloc[0]
    main = cells[(cells["T"] == T) & (cells["estimator"] == est)].sort_values("distance")
    reachable = main[main["p_reach"] > 0]
    below = cells[cells["below_prediction"]]
    above = cells[cells["above_prediction"]]
    if reachable.empty:
        return inconclusive(f"no cell at T = {T} where the goal is reachable")
    far = reachable.iloc[-1]
    low = reachable.loc[reachable["zero_fraction"].idxmin()]
    inside = int((~cells["below_prediction"] & ~cells["above_prediction"]).sum())
    law = (f"the fraction of batches (B = {int(far['B'])}) with an exactly zero {est} gradient "
           f"matches (1 - p_reach)^B (prediction inside the 95% interval in {inside} of "
           f"{len(cells)} cells, the observed fraction never below it), rising from {low['zero_fraction']:.3f} at "
           f"distance {int(low['distance'])} to {format_columns(far, 'zero_fraction', style='f')} "
           f"at distance "
           f"{int(far['distance'])} (predicted {far['predicted_zero_fraction']:.3f}, "
           f"p_reach = {far['p_reach']:.1e}, T = {T})")
    if not below.empty:
        worst = below.iloc[0]
        return Verdict("refuted", f"the zero-gradient fraction falls below its exact lower "
                f"bound (1 - p_reach)^B in {len(below)} cell(s), e.g. T = {worst['T']}, "
                f"L = {worst['L']}: {worst['zero_fraction']:.3f} < {worst['predicted_zero_fraction']:.3f}.")
    if far["zero_fraction_lo"] < VANISHED or cells["seeds"].min() < 2:
        return inconclusive(f"{law}; the farthest cell's interval does not "
                f"clear {VANISHED} or there are too few seeds.")
    peak = reachable.loc[reachable["ref_norm"].idxmax()]
    measurable = reachable[np.isfinite(reachable["exact_snr"])]
    snr_peak = measurable.loc[measurable["exact_snr"].idxmax()]
    snr_far = measurable.iloc[-1]
    unmeasured = reachable[~np.isfinite(reachable["exact_snr"])]
    all_zero = (f" (beyond it every batch was exactly zero, distance "
                f"{int(unmeasured['distance'].min())}+)" if len(unmeasured)
                and unmeasured["distance"].min() > snr_far["distance"] else "")
    cancel = (f"; {len(above)} cell(s) have more zero batches than predicted: batches that "
              f"reach the goal but whose scores cancel exactly"
              if len(above) else "")
    if far["ref_norm"] > 0:
        return Verdict("qualified", f"{law}{cancel}; but the exact gradient is not zero while "
                f"p_reach > 0, only small: ||∇J|| = {far['ref_norm']:.1e} at distance "
                f"{int(far['distance'])}, {peak['ref_norm'] / far['ref_norm']:.0f}x below its peak "
                f"{peak['ref_norm']:.2f} at distance {int(peak['distance'])}, and the per-batch "
                f"SNR ||∇J||²/trCov falls from {snr_peak['exact_snr']:.1f} (distance "
                f"{int(snr_peak['distance'])}) to {snr_far['exact_snr']:.1e} (distance "
                f"{int(snr_far['distance'])}){all_zero}: the signal is rare, not absent, and "
                f"comes back once B·p_reach ≳ 1.")
    return Verdict("confirmed", f"{law}{cancel}")


def markdown(cells: pd.DataFrame, verdict: Verdict, preset: str) -> str:
    """result.md: the claim, the setup, the fixed-horizon table and the verdict."""
    T = main_horizon(cells) if not cells.empty else 0
    main = cells[cells["T"] == T].sort_values(["estimator", "distance"])
    header = ["estimator", "distance", "p_reach", "zero-grad fraction [95% CI]", "predicted",
              "‖∇J‖", "mean ‖ĝ‖", "SNR ‖ĝ̄‖²/trCov", "SNR ‖∇J‖²/trCov"]
    rows = [[c["estimator"], c["distance"], f"{c['p_reach']:.2e}",
             format_columns(c, "zero_fraction", style="f"),
             f"{c['predicted_zero_fraction']:.3f}", f"{c['ref_norm']:.2e}",
             f"{c['grad_norm_mean']:.2e}", _snr(c["snr"]), _snr(c["exact_snr"])]
            for _, c in main.iterrows()]
    return "\n".join([
        "# Sparse rewards: gradient signal against the distance to the reward (chain)", "",
        f"**Claim.** {CLAIM}", "",
        (f"**Measured** (preset `{preset}`): the sparse chain, uniform initial policy, gamma = 1, "
         f"horizons T ∈ {{{', '.join(str(t) for t in sorted(cells['T'].unique()))}}}, goal 1 to "
         f"{int(cells['distance'].max())} steps away, M batches of B = {int(cells['B'].max())} "
         f"episodes per run, {int(cells['seeds'].max())} seeds pooled. Prediction of the "
         "zero-gradient fraction: (1 - p_reach)^B with p_reach exact (DP). Intervals: "
         "Clopper-Pearson for fractions, bootstrap over seeds otherwise."), "",
        f"Fixed horizon T = {T}:", "", *markdown_table(header, rows), "",
        (f"All {len(cells)} cells (every horizon) are in `result.csv`; cells whose "
         f"zero fraction lies above its prediction: {int(cells['above_prediction'].sum())}, "
         f"below: {int(cells['below_prediction'].sum())}."), "", verdict.line(), ""])


def _snr(value: float) -> str:
    """An SNR for the table; NaN when every batch was zero (nothing to measure)."""
    return f"{value:.2g}" if np.isfinite(value) else "– (all ĝ = 0)"


def _series_style(cells: pd.DataFrame) -> dict[tuple[int, str], dict]:
    """Colour by horizon, line style by estimator."""
    horizons = sorted(cells["T"].unique())
    colours = dict(zip(horizons, sns.color_palette("viridis", len(horizons) + 1)))
    dashes = {"reinforce": "-", "rloo": ":", "reinforce_rtg": "-."}
    markers = {"reinforce": "o", "rloo": "s", "reinforce_rtg": "^"}
    return {(T, est): {"color": colours[T], "ls": dashes.get(est, "--"),
                       "marker": markers.get(est, "D")}
            for T, est in cells[["T", "estimator"]].drop_duplicates().itertuples(index=False)}


def plot_signal(cells: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Four panels against the distance to the goal: zero-gradient fraction with its
    prediction, observed against predicted, gradient norms, and SNR."""
    style = _series_style(cells)
    fig, axes = plt.subplots(2, 2, figsize=(PAPER_WIDTH, 5.6))
    ax_zero, ax_pred, ax_norm, ax_snr = axes.flat
    handles: list[Line2D] = []
    # REINFORCE last, so its filled markers sit on top of the baselines' open ones
    for (T, est), kw in sorted(style.items(), key=lambda item: (item[0][1] == "reinforce", item[0])):
        c = cells[(cells["T"] == T) & (cells["estimator"] == est)].sort_values("distance")
        label = f"T = {T}, {est}"
        err = error_bars(c, "zero_fraction")
        ax_zero.errorbar(c["distance"], c["zero_fraction"], yerr=err, fmt=kw["marker"], ms=3,
                         capsize=2, color=kw["color"], mfc="none" if est != "reinforce" else None)
        ax_zero.plot(c["distance"], c["predicted_zero_fraction"], color=kw["color"], ls=kw["ls"], lw=1)
        ax_pred.errorbar(c["predicted_zero_fraction"], c["zero_fraction"], yerr=err,
                         fmt=kw["marker"], ms=3, capsize=2, color=kw["color"],
                         mfc="none" if est != "reinforce" else None)
        handles.append(Line2D([], [], color=kw["color"], ls=kw["ls"], marker=kw["marker"], ms=4,
                              mfc="none" if est != "reinforce" else kw["color"], label=label))
        pos = c[c["ref_norm"] > 0]
        ax_norm.plot(pos["distance"], pos["ref_norm"], color=kw["color"], ls=kw["ls"], lw=1.2)
        ax_norm.plot(pos["distance"], pos["grad_norm_mean"], color=kw["color"], ls="none",
                     marker=kw["marker"], ms=3, mfc="none" if est != "reinforce" else None)
        snr = pos[np.isfinite(pos["exact_snr"]) & (pos["exact_snr"] > 0)]
        ax_snr.plot(snr["distance"], snr["exact_snr"], color=kw["color"], ls=kw["ls"],
                    marker=kw["marker"], ms=3, lw=1.2, mfc="none" if est != "reinforce" else None)
    ax_zero.set_xlabel("distance to the reward (steps)")
    ax_zero.set_ylabel("fraction of batches with ĝ = 0")
    ax_zero.set_title("zero-gradient batches (dots, 95% CI)\nand (1 − p_reach)^B (lines)")
    ax_pred.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax_pred.set_xlabel("predicted  (1 − p_reach)^B")
    ax_pred.set_ylabel("observed fraction with ĝ = 0")
    ax_pred.set_title("observed against exact prediction")
    ax_norm.set_xlabel("distance to the reward (steps)")
    ax_norm.set_ylabel("gradient norm")
    ax_norm.set_title("‖∇J‖ exact (lines), mean ‖ĝ‖ per batch (dots)")
    ax_snr.set_xlabel("distance to the reward (steps)")
    ax_snr.set_ylabel("per-batch SNR  ‖∇J‖² / tr Cov[ĝ]")
    ax_snr.set_title("signal-to-noise ratio of one batch")
    positive = pd.concat([cells.loc[cells["ref_norm"] > 0, "ref_norm"],
                          cells.loc[cells["ref_norm"] > 0, "grad_norm_mean"]])
    if positive.size:
        log_axis(ax_norm, "y", positive)
    finite_snr = cells["exact_snr"][np.isfinite(cells["exact_snr"]) & (cells["exact_snr"] > 0)]
    if finite_snr.size:
        log_axis(ax_snr, "y", finite_snr)
    for ax in (ax_zero, ax_norm, ax_snr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles.sort(key=lambda h: (int(h.get_label().split(",")[0].removeprefix("T = ")), h.get_label()))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False,
               bbox_to_anchor=(0.5, -0.05))
    fig.tight_layout()
    return save_figure(fig, out_dir, "sparse_reward_signal")


EXPERIMENT = Experiment(
    "Sparse rewards: gradient signal against the distance to the reward (chain)", summarise,
    verdict, markdown, per_run=per_run_values,
    figures=lambda cells, runs, out_dir: plot_signal(cells, out_dir))
analyze = EXPERIMENT.analyze
