"""Does gradient variance scale as horizon x action dimension (LQR)?

Each run is one measurement at the initial policy for one (gamma, estimator, horizon T,
action dimension d, seed), each seed its own random system. For the variance tr Cov, the
relative variance tr Cov / ||grad J||^2 and the variance per squared return tr Cov / J^2
(J exact at the run's initial policy), it fits ``log y = c + a log T + b log d`` over every
(T, d, seed), with 95% intervals for a and b from a bootstrap over seeds (whole systems)
next to the regression's own. The product law is ``a = b = 1``: rejected when an interval
excludes 1, held when both contain 1 and are narrower than ``MAX_CI_WIDTH``. Also writes
``cells.csv`` (every cell's geometric mean) and ``local_exponents.csv``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from scipy import stats

from analysis.experiment import (
    Experiment,
    Verdict,
    config_of,
    inconclusive,
    percentile_ends,
    replicate_resamples,
)
from analysis.figures import PAPER_WIDTH, log_axis, save_figure
from analysis.render import format_ci, markdown_table
from analysis.stats import N_RESAMPLES
from pgvar.run import initial_env_and_policy

QUANTITIES = {"grad_variance": "variance", "grad_rel_variance": "relative variance",
              "grad_variance_per_J2": "variance / J²"}
AXIS_LABELS = {"grad_variance": "variance  tr Cov[ĝ]",
               "grad_rel_variance": "relative variance  tr Cov[ĝ] / ‖∇J‖²",
               "grad_variance_per_J2": "variance / J²  (per squared return)"}
ESTIMATOR_NAMES = {"reinforce": "REINFORCE (full return)", "reinforce_rtg": "reward-to-go"}
CLAIM = ("\"Variance scales with trajectory length times action dimensionality. A 100-step "
         "episode with a 20-dimensional continuous action space produces a gradient estimate "
         "with noise that swamps the signal\" (source text, *When it falls down*).")
MIN_SEEDS = 3  # fewer systems than this: the bootstrap over seeds says nothing
MAX_CI_WIDTH = 1.0  # an exponent interval wider than this cannot tell 1 from 2


def per_run_values(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its first measured step, with T, d, gamma, seed and the statistics."""
    measured = frame[np.isfinite(frame["grad_variance"].to_numpy(dtype=float))]
    first = measured.sort_values("step").groupby("run_id", sort=False).head(1)
    runs = pd.DataFrame({
        "gamma": first["env.gamma"].astype(float),
        "estimator": first["estimator"].astype(str),
        "T": first["env.horizon"].astype(int),
        "d": first["env.action_dim"].astype(int),
        "state_dim": first["env.state_dim"].astype(int),
        "seed": first["seed"].astype(int),
        "grad_variance": first["grad_variance"].astype(float),
        "grad_rel_variance": first["grad_rel_variance"].astype(float),
        "ref_norm": first["ref_norm"].astype(float),
        "M": first["n_estimates"].astype(float) if "n_estimates" in first else math.nan,
        "B": first["training.batch_size"].astype(int),
    })
    runs["J"] = [exact_objective(row) for _, row in first.iterrows()]
    runs["grad_variance_per_J2"] = runs["grad_variance"] / runs["J"] ** 2
    return runs.reset_index(drop=True)


def exact_objective(row: pd.Series) -> float:
    """J at the run's initial policy, exactly (the env's moment propagation), the policy
    rebuilt as pgvar-run built it: the return scale that variance / J^2 divides out."""
    env, policy = initial_env_and_policy(config_of(row))
    with torch.no_grad():
        return float(env.exact_objective(policy))


def cell_means(runs: pd.DataFrame) -> pd.DataFrame:
    """Geometric mean over seeds of each quantity per (gamma, estimator, T, d) cell."""
    logs = runs.assign(**{q: np.log(runs[q]) for q in QUANTITIES})
    cells = logs.groupby(["gamma", "estimator", "T", "d"], as_index=False).agg(
        **{q: (q, "mean") for q in QUANTITIES}, ref_norm=("ref_norm", "mean"),
        J=("J", "mean"), seeds=("seed", "nunique"))
    for q in QUANTITIES:
        cells[q] = np.exp(cells[q])
    return cells


@dataclass
class PowerFit:
    """``log y = c + a log T + b log d``: exponents with 95% intervals."""

    gamma: float
    estimator: str
    quantity: str
    a: float
    a_lo: float
    a_hi: float
    b: float
    b_lo: float
    b_hi: float
    c: float
    a_ols_lo: float
    a_ols_hi: float
    b_ols_lo: float
    b_ols_hi: float
    interaction: float  # coefficient of log T * log d in the fit with that term added
    interaction_lo: float
    interaction_hi: float
    r2: float
    n_points: int
    n_seeds: int

    @property
    def precise(self) -> bool:
        """Both intervals finite and narrow enough to tell an exponent of 1 from 2."""
        widths = (self.a_hi - self.a_lo, self.b_hi - self.b_lo)
        return all(np.isfinite(w) and w <= MAX_CI_WIDTH for w in widths)

    @property
    def status(self) -> str:
        """``rejected`` (an interval excludes 1), ``holds`` (both contain 1 and are
        precise) or ``unclear`` (both contain 1 but are too wide, or too few systems)."""
        if self.n_seeds < MIN_SEEDS or not (np.isfinite(self.a_lo) and np.isfinite(self.b_lo)):
            return "unclear"
        if not (self.a_is_one and self.b_is_one):
            return "rejected"
        return "holds" if self.precise else "unclear"

    @property
    def a_is_one(self) -> bool:
        return bool(self.a_lo <= 1.0 <= self.a_hi)

    @property
    def b_is_one(self) -> bool:
        return bool(self.b_lo <= 1.0 <= self.b_hi)

    @property
    def product_law(self) -> bool:
        """True when both intervals contain 1."""
        return self.a_is_one and self.b_is_one


def design(T: np.ndarray, d: np.ndarray, interaction: bool = False) -> np.ndarray:
    """Columns 1, log T, log d (and log T * log d)."""
    cols = [np.ones_like(T, dtype=float), np.log(T), np.log(d)]
    if interaction:
        cols.append(np.log(T) * np.log(d))
    return np.column_stack(cols)


def least_squares(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ordinary least-squares coefficients."""
    return np.linalg.lstsq(X, y, rcond=None)[0]


def ols_intervals(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Coefficients, their 95% t-intervals (lo, hi) and R^2 of an OLS fit."""
    beta = least_squares(X, y)
    resid = y - X @ beta
    dof = max(len(y) - X.shape[1], 1)
    sigma2 = float(resid @ resid) / dof
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cov = sigma2 * np.linalg.pinv(X.T @ X)
    half = stats.t.ppf(0.975, dof) * np.sqrt(np.clip(np.diag(cov), 0, None))
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(resid @ resid) / total if total > 0 else math.nan
    return beta, beta - half, beta + half, r2


def bootstrap_over_seeds(group: pd.DataFrame, quantity: str, interaction: bool = False,
                         n_resamples: int = N_RESAMPLES, rng_seed: int = 0
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval (expanded for few seeds) of the fit's coefficients when whole
    seeds (systems, with all their cells) are resampled with replacement.

    Least squares is additive over seeds in X^T X and X^T y, so a resample is a
    count-weighted sum of each seed's pair: all resamples are solved at once."""
    seeds = np.array(sorted(group["seed"].unique()))
    n_coef = 4 if interaction else 3
    nan = np.full(n_coef, math.nan)
    if len(seeds) < 2:
        return nan, nan
    xtx, xty = [], []
    for s in seeds:
        g = group[group["seed"] == s]
        X = design(g["T"].to_numpy(), g["d"].to_numpy(), interaction)
        xtx.append(X.T @ X)
        xty.append(X.T @ np.log(g[quantity].to_numpy()))
    picks = replicate_resamples(len(seeds), rng_seed, n_resamples)
    counts = np.stack([np.bincount(p, minlength=len(seeds)) for p in picks]).astype(float)
    A = np.einsum("rs,sij->rij", counts, np.array(xtx))
    b = counts @ np.array(xty)
    ok = np.linalg.matrix_rank(A) == n_coef
    if not ok.any():
        return nan, nan
    draws = np.linalg.solve(A[ok], b[ok][..., None])[..., 0]
    return percentile_ends(draws, len(seeds))


def fit_power_law(group: pd.DataFrame, quantity: str) -> PowerFit | None:
    """The fit of one (gamma, estimator, quantity); None when T and d do not both vary."""
    group = group[np.isfinite(group[quantity]) & (group[quantity] > 0)]
    if group["T"].nunique() < 2 or group["d"].nunique() < 2:
        return None
    X = design(group["T"].to_numpy(), group["d"].to_numpy())
    y = np.log(group[quantity].to_numpy())
    beta, lo, hi, r2 = ols_intervals(X, y)
    boot_lo, boot_hi = bootstrap_over_seeds(group, quantity)
    Xi = design(group["T"].to_numpy(), group["d"].to_numpy(), interaction=True)
    beta_i = least_squares(Xi, y)
    boot_i_lo, boot_i_hi = bootstrap_over_seeds(group, quantity, interaction=True)
    return PowerFit(
        gamma=float(group["gamma"].iloc[0]), estimator=str(group["estimator"].iloc[0]),
        quantity=quantity, a=float(beta[1]), a_lo=float(boot_lo[1]), a_hi=float(boot_hi[1]),
        b=float(beta[2]), b_lo=float(boot_lo[2]), b_hi=float(boot_hi[2]), c=float(beta[0]),
        a_ols_lo=float(lo[1]), a_ols_hi=float(hi[1]), b_ols_lo=float(lo[2]), b_ols_hi=float(hi[2]),
        interaction=float(beta_i[3]), interaction_lo=float(boot_i_lo[3]),
        interaction_hi=float(boot_i_hi[3]), r2=r2, n_points=len(group),
        n_seeds=int(group["seed"].nunique()))


def all_fits(runs: pd.DataFrame) -> list[PowerFit]:
    """Fits for every (gamma, estimator) and both quantities."""
    fits = []
    for (_, _), group in runs.groupby(["gamma", "estimator"], sort=True):
        for quantity in QUANTITIES:
            fit = fit_power_law(group, quantity)
            if fit is not None:
                fits.append(fit)
    return fits


def local_exponents(cells: pd.DataFrame, quantity: str) -> pd.DataFrame:
    """Slope of log y against log T between successive horizons, per (gamma, estimator, d):
    shows whether one power law describes the whole range."""
    rows = []
    for (gamma, est, d), g in cells.groupby(["gamma", "estimator", "d"]):
        g = g.sort_values("T")
        T, y = g["T"].to_numpy(float), np.log(g[quantity].to_numpy())
        for i in range(1, len(T)):
            rows.append({"gamma": gamma, "estimator": est, "d": d, "T_from": T[i - 1],
                         "T_to": T[i], "quantity": quantity,
                         "slope": (y[i] - y[i - 1]) / math.log(T[i] / T[i - 1])})
    return pd.DataFrame(rows)


def _ci(value: float, lo: float, hi: float) -> str:
    return format_ci(value, lo, hi, 2, style="f")


def verdict(fits: list[PowerFit]) -> Verdict:
    """The verdict line, from the gamma = 1 fits (else the largest gamma present).

    The claim is about the variance itself: ``confirmed`` when its fits hold a = b = 1,
    ``qualified`` when the law is rejected but the variance still grows with both T and
    d (both intervals above 0), ``refuted`` when it does not grow with one of them,
    ``inconclusive`` when the intervals cannot tell."""
    if not fits:
        return inconclusive("no fit: the runs do not vary both T and d")
    gamma = max(f.gamma for f in fits)
    main = [f for f in fits if f.gamma == gamma]
    variance = [f for f in main if f.quantity == "grad_variance"]
    summary = "; ".join(f"{_fit_name(f)}: a = {_ci(f.a, f.a_lo, f.a_hi)}, "
                        f"b = {_ci(f.b, f.b_lo, f.b_hi)}" for f in main)
    where = f"(gamma = {gamma:g}, 95% bootstrap over {main[0].n_seeds} systems)"
    statuses = [f.status for f in variance]
    if min(f.n_seeds for f in main) < MIN_SEEDS or all(s == "unclear" for s in statuses):
        return inconclusive(f"the intervals cannot tell whether a = b = 1 {where}: {summary}")
    if all(s == "holds" for s in statuses):
        return Verdict("confirmed", f"the variance scales as T·d {where}: {summary}")
    grows = all(f.a_lo > 0 and f.b_lo > 0 for f in variance)
    if grows:
        kept = [_fit_name(f) for f in main if f.status == "holds"]
        also = f"; a = b = 1 fits only {', '.join(kept)}" if kept else "; no quantity fits a = b = 1"
        return Verdict("qualified", f"the variance grows with both T and d, but not as T·d"
                                    f"{also} {where}: {summary}")
    return Verdict("refuted", f"the variance does not grow with both T and d {where}: {summary}")


def _fit_name(fit: PowerFit) -> str:
    return f"{ESTIMATOR_NAMES.get(fit.estimator, fit.estimator)} {QUANTITIES[fit.quantity]}"


def fits_table(fits: list[PowerFit]) -> pd.DataFrame:
    """One row per fit, every number (result.csv)."""
    rows = []
    for f in fits:
        row = asdict(f)
        row.update(quantity_label=QUANTITIES[f.quantity], a_is_one=f.a_is_one,
                   b_is_one=f.b_is_one, product_law=f.product_law, status=f.status)
        rows.append(row)
    return pd.DataFrame(rows)


def _ints(values: pd.Series) -> str:
    """Sorted distinct values as plain numbers: ``{1, 2, 4}``."""
    return "{" + ", ".join(f"{v:g}" for v in sorted(values.unique())) + "}"


def markdown(summary: tuple, verdict: Verdict, preset: str) -> str:
    """result.md: the claim, the setup, the exponents table, a cell table and the verdict."""
    fits, cells, runs = summary
    M = int(runs["M"].median()) if runs["M"].notna().any() else "?"
    lines = [
        "# Gradient variance against horizon and action dimension (LQR)", "",
        f"**Claim.** {CLAIM}", "",
        (f"**Measured** (preset `{preset}`): linear-quadratic control, state dimension "
         f"{_ints(runs['state_dim'])}, at the initial policy (K = 0, k = 0, "
         f"log σ = -0.5), horizons T ∈ {_ints(runs['T'])}, action dimensions "
         f"d ∈ {_ints(runs['d'])}, gamma ∈ {_ints(runs['gamma'])}; "
         f"M = {M} batches of B = {int(runs['B'].median())} episodes per cell, "
         f"{runs['seed'].nunique()} random systems (seeds). Exact gradient by autograd of J. "
         "Fit `log y = c + a log T + b log d` over all cells and seeds; 95% intervals "
         "from a bootstrap over systems. The product law is a = b = 1."), "",
        *markdown_table(
            ["gamma", "estimator", "quantity", "a (T exponent)", "b (d exponent)",
             "log T·log d term", "R²", "a = b = 1?"],
            [[f"{f.gamma:g}", ESTIMATOR_NAMES.get(f.estimator, f.estimator),
              QUANTITIES[f.quantity], _ci(f.a, f.a_lo, f.a_hi), _ci(f.b, f.b_lo, f.b_hi),
              _ci(f.interaction, f.interaction_lo, f.interaction_hi), f"{f.r2:.3f}",
              {"holds": "yes", "rejected": "no"}.get(f.status, "unclear")] for f in fits]),
    ]
    lines += ["", cell_table(cells), "", verdict.line(), ""]
    return "\n".join(lines)


def cell_table(cells: pd.DataFrame) -> str:
    """Relative variance (geometric mean over systems) per T (rows) and d (columns), for
    each estimator at the largest gamma: the raw numbers behind the fit."""
    gamma = cells["gamma"].max()
    out = []
    for est, g in cells[cells["gamma"] == gamma].groupby("estimator"):
        pivot = g.pivot(index="T", columns="d", values="grad_rel_variance")
        out += [(f"Relative variance tr Cov / ‖∇J‖², {ESTIMATOR_NAMES.get(est, est)}, "
                 f"gamma = {gamma:g} (geometric mean over systems):"), "",
                *markdown_table(["T \\ d", *(str(d) for d in pivot.columns)],
                                [[T, *(f"{v:.3g}" for v in row.to_numpy())]
                                 for T, row in pivot.iterrows()]), ""]
    return "\n".join(out)


def plot_grid(runs: pd.DataFrame, cells: pd.DataFrame, fits: list[PowerFit], gamma: float,
              out_dir: Path) -> list[Path]:
    """Variance and relative variance against T (log-log), a line per d, a column per
    estimator; points are systems, lines the cell geometric means, dashes the fit."""
    sub_cells = cells[cells["gamma"] == gamma]
    sub_runs = runs[runs["gamma"] == gamma]
    estimators = sorted(sub_cells["estimator"].unique())
    ds = sorted(sub_cells["d"].unique())
    colours = dict(zip(ds, sns.color_palette("viridis", len(ds))))
    fig, axes = plt.subplots(len(QUANTITIES), len(estimators), figsize=(PAPER_WIDTH, 2.6 * len(QUANTITIES)),
                             squeeze=False)
    for col, est in enumerate(estimators):
        for row, quantity in enumerate(QUANTITIES):
            ax = axes[row, col]
            fit = next((f for f in fits if f.gamma == gamma and f.estimator == est
                        and f.quantity == quantity), None)
            for d in ds:
                c = sub_cells[(sub_cells["estimator"] == est) & (sub_cells["d"] == d)].sort_values("T")
                r = sub_runs[(sub_runs["estimator"] == est) & (sub_runs["d"] == d)]
                ax.scatter(r["T"] * np.exp(0.03 * np.log2(d)), r[quantity], s=4, alpha=0.35,
                           color=colours[d], lw=0)
                ax.plot(c["T"], c[quantity], marker="o", ms=3, lw=1.2, color=colours[d], label=f"d = {d}")
                if fit is not None:
                    T = np.geomspace(c["T"].min(), c["T"].max(), 20)
                    ax.plot(T, np.exp(fit.c + fit.a * np.log(T) + fit.b * np.log(d)), ls="--",
                            lw=0.8, color=colours[d])
            log_axis(ax, "x", sub_cells["T"])
            ax.set_xlim(sub_cells["T"].min() / 1.3, sub_cells["T"].max() * 1.3)
            log_axis(ax, "y", sub_runs.loc[sub_runs["estimator"] == est, quantity])
            ax.set_xlabel("horizon T (steps)")
            ax.set_ylabel(AXIS_LABELS[quantity])
            title = ESTIMATOR_NAMES.get(est, est)
            if fit is not None:
                title += f": a = {fit.a:.2f}, b = {fit.b:.2f}"
            ax.set_title(title)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(ds), frameon=False,
               bbox_to_anchor=(0.5, -0.04), title=f"action dimension (gamma = {gamma:g}; "
                                                  "dashed: fit c + a log T + b log d)")
    fig.tight_layout()
    return save_figure(fig, out_dir, f"horizon_action_dim_grid_gamma{gamma:g}")


SHORT_QUANTITY = {"grad_variance": "variance", "grad_rel_variance": "relative variance",
                  "grad_variance_per_J2": "variance / J²"}
SHORT_ESTIMATOR = {"reinforce": "REINFORCE", "reinforce_rtg": "reward-to-go"}


def plot_exponents(fits: list[PowerFit], out_dir: Path) -> list[Path]:
    """Fitted exponents a (horizon) and b (action dimension) with 95% intervals, one
    colour per quantity, against the product law's value 1."""
    fits = sorted(fits, key=lambda f: (-f.gamma, f.estimator, list(QUANTITIES).index(f.quantity)))
    colours = dict(zip(QUANTITIES, sns.color_palette("tab10", len(QUANTITIES))))
    fig, axes = plt.subplots(1, 2, figsize=(PAPER_WIDTH, 0.26 * len(fits) + 1.3), sharey=True)
    labels = [f"{SHORT_ESTIMATOR.get(f.estimator, f.estimator)}, γ = {f.gamma:g}" for f in fits]
    y = np.arange(len(fits))[::-1]
    for ax, name, title in ((axes[0], "a", "exponent a of horizon T"),
                            (axes[1], "b", "exponent b of action dimension d")):
        for quantity, colour in colours.items():
            idx = [i for i, f in enumerate(fits) if f.quantity == quantity]
            if not idx:
                continue
            v = np.array([getattr(fits[i], name) for i in idx])
            lo = np.array([getattr(fits[i], f"{name}_lo") for i in idx])
            hi = np.array([getattr(fits[i], f"{name}_hi") for i in idx])
            err = np.nan_to_num(np.vstack([v - lo, hi - v]).clip(0))
            ax.errorbar(v, y[idx], xerr=err, fmt="o", ms=4, capsize=2, lw=1, color=colour,
                        label=SHORT_QUANTITY[quantity])
        ax.axvline(1.0, color="tab:red", ls="--", lw=1, label="product law T·d (exponent 1)")
        ax.set_title(title)
        ax.set_xlabel(f"{name} in  y ∝ T^a · d^b  (95% CI)")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels)
    fig.tight_layout()
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), frameon=False,
               bbox_to_anchor=(0.55, -0.08))
    return save_figure(fig, out_dir, "horizon_action_dim_exponents")


def figures(summary: tuple, runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The (T, d) grid per gamma and the fitted exponents."""
    fits, cells, runs = summary
    paths = [p for gamma in sorted(runs["gamma"].unique(), reverse=True)
             for p in plot_grid(runs, cells, fits, gamma, out_dir)]
    return paths + (plot_exponents(fits, out_dir) if fits else [])


EXPERIMENT = Experiment(
    "Gradient variance against horizon and action dimension (LQR)",
    lambda runs: (all_fits(runs), cell_means(runs), runs), lambda summary: verdict(summary[0]),
    markdown, per_run=per_run_values, figures=figures,
    result_frame=lambda summary: fits_table(summary[0]),
    more_tables=lambda summary: {"cells": summary[1], "local_exponents": pd.concat(
        [local_exponents(summary[1], q) for q in QUANTITIES], ignore_index=True)})
analyze = EXPERIMENT.analyze
