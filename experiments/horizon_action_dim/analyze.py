"""Does gradient variance scale as horizon x action dimension (LQR)? Per quantity, the
exponents of T and d over every cell; tested on tr Cov / (J² P) (README.md: the design)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import experiment as xp
from analysis.figures import interval_rows
from analysis.render import format_columns, frame_table

HEADLINE = "grad_variance_per_J2P"
QUANTITIES = {HEADLINE: "variance / (J² P)", "grad_variance": "variance",
              "grad_rel_variance": "relative variance", "grad_variance_per_J2": "variance / J²"}
NAMES = {"reinforce": "REINFORCE (full return)", "reinforce_rtg": "reward-to-go"}
CLAIM = ("\"Variance scales with trajectory length times action dimensionality. A 100-step "
         "episode with a 20-dimensional continuous action space produces a gradient estimate "
         "with noise that swamps the signal\" (source text, *When it falls down*).")
MIN_SEEDS = 3  # fewer systems than this: the bootstrap over seeds says nothing
MAX_CI_WIDTH = 1.0  # an exponent interval wider than this cannot tell 1 from 2


def per_run_values(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run (its first measurement): T, d, gamma, seed, the statistics and J."""
    first = xp.first_measurements(frame)
    runs = pd.DataFrame({
        "gamma": first["env.gamma"].astype(float), "estimator": first["estimator"].astype(str),
        "T": first["env.horizon"].astype(int), "d": first["env.action_dim"].astype(int),
        "state_dim": first["env.state_dim"].astype(int), "seed": first["seed"].astype(int),
        "grad_variance": first["grad_variance"].astype(float),
        "grad_rel_variance": first["grad_rel_variance"].astype(float),
        "M": first["n_estimates"].astype(float), "B": first["training.batch_size"].astype(int),
        "J": [xp.initial_exact_objective(row) for _, row in first.iterrows()]})
    runs["grad_variance_per_J2"] = runs["grad_variance"] / runs["J"] ** 2
    runs[HEADLINE] = runs["grad_variance_per_J2"] / (runs["d"] * (runs["state_dim"] + 2))
    return runs.reset_index(drop=True)


def fit_power_law(group: pd.DataFrame, quantity: str) -> dict | None:
    """The fit of one (gamma, estimator, quantity), bootstrap over seeds (whole systems);
    None when T and d do not both vary."""
    group = group[np.isfinite(group[quantity]) & (group[quantity] > 0)]
    if group["T"].nunique() < 2 or group["d"].nunique() < 2:
        return None
    return {"gamma": float(group["gamma"].iloc[0]), "estimator": group["estimator"].iloc[0],
            "quantity": quantity, "quantity_label": QUANTITIES[quantity],
            **xp.log_linear_fit(group, quantity, {"a": "T", "b": "d"}), "n_points": len(group),
            "n_seeds": int(group["seed"].nunique())}


def exponent_is_one(fit, name: str) -> bool | None:
    """Whether the exponent's interval holds 1: False when it excludes 1, None when it
    cannot tell (fewer than MIN_SEEDS systems, or wider than MAX_CI_WIDTH)."""
    lo, hi = fit[f"{name}_lo"], fit[f"{name}_hi"]
    if fit["n_seeds"] < MIN_SEEDS or not np.isfinite(lo):
        return None
    if not lo <= 1 <= hi:
        return False
    return True if hi - lo <= MAX_CI_WIDTH else None


def all_fits(runs: pd.DataFrame) -> pd.DataFrame:
    """Fits for every (gamma, estimator) and quantity."""
    return pd.DataFrame([fit for _, group in runs.groupby(["gamma", "estimator"], sort=True)
                         for q in QUANTITIES for fit in [fit_power_law(group, q)] if fit is not None])


def checks(fits: pd.DataFrame) -> list:
    """On the headline quantity, per estimator at the largest gamma: grows with T and with
    d (interval above 0), and the product law's a = 1 and b = 1."""
    main = fits[(fits["gamma"] == fits["gamma"].max()) & (fits["quantity"] == HEADLINE)]
    grows = lambda r, name: xp.interval_check(r, name, lambda lo, hi: lo > 0, r["n_seeds"], MIN_SEEDS)
    return [xp.check(f"{NAMES.get(r['estimator'], r['estimator'])}, γ = {r['gamma']:g}",
                               f"{QUANTITIES[HEADLINE]} ∝ T^a d^b with {name} {law}", test(r, name),
                               f"{name} = {format_columns(r, name, 2, style='f')} over {r['n_seeds']} systems")
                         for _, r in main.iterrows() for name in "ab"
                         for law, test in (("> 0", grows), ("= 1", exponent_is_one))]


def verdict(s: tuple) -> object:
    """From the tested checks, with every quantity's exponents at the largest gamma."""
    fits = s[0]
    if fits.empty:
        return xp.headline_verdict(s[2], "no fit: the runs do not vary both T and d")
    main = fits[fits["gamma"] == fits["gamma"].max()]
    summary = "; ".join(f"{NAMES.get(r['estimator'], r['estimator'])} {r['quantity_label']}: "
                        f"a = {format_columns(r, 'a', 2, style='f')}, "
                        f"b = {format_columns(r, 'b', 2, style='f')}" for _, r in main.iterrows())
    return xp.headline_verdict(s[2], f"gamma = {main['gamma'].iloc[0]:g}, 95% bootstrap over "
                                f"{main['n_seeds'].max()} systems: {summary}")


def render(s: tuple, verdict, preset: str) -> str:
    """result.md: the claim, the setup, the exponents, the checks (runs.csv: every run)."""
    fits, runs, tests = s
    values = lambda col: "{" + ", ".join(f"{v:g}" for v in sorted(runs[col].unique())) + "}"
    return "\n".join([
        "# Gradient variance against horizon and action dimension (LQR)", "", f"**Claim.** {CLAIM}", "",
        (f"**Measured** (preset `{preset}`): linear-quadratic control, state dimension "
        f"{values('state_dim')}, at the initial policy (K = 0, k = 0, log σ = -0.5), horizons "
        f"T ∈ {values('T')}, action dimensions d ∈ {values('d')}, gamma ∈ {values('gamma')}; "
        f"M = {int(runs['M'].median())} batches of B = {int(runs['B'].median())} episodes per "
        f"cell, {runs['seed'].nunique()} random systems (seeds). Exact gradient by autograd of J. "
        "Fit `log y = c + a log T + b log d` over all cells and seeds; 95% intervals from a "
        "bootstrap over systems. The product law is a = b = 1, tested on the scale-free "
        f"{QUANTITIES[HEADLINE]} (P = d·(n + 2) parameters; the other quantities carry the "
        "return's scale, E R² ~ T² at gamma = 1, and the parameter count)."), "",
        *frame_table(fits, {"gamma": lambda r: f"{r['gamma']:g}",
                            "estimator": lambda r: NAMES.get(r["estimator"], r["estimator"]),
                            "quantity": "quantity_label", "a (T exponent)": ("a", 2),
                            "b (d exponent)": ("b", 2), "R²": lambda r: f"{r['r2']:.3f}"}, style="f"),
        "", *xp.findings_section(tests, verdict)])


def figures(s: tuple, runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Fitted exponents a and b with 95% intervals, one row per (gamma, estimator,
    quantity), against the product law's 1."""
    fits = s[0]
    if fits.empty:
        return []
    return interval_rows(fits, [(name, f"{name} in  y ∝ T^a · d^b  (95% CI)", f"exponent of {what}")
                                for name, what in (("a", "horizon T"), ("b", "action dimension d"))],
                         [f"{NAMES.get(r['estimator'], r['estimator'])}, {r['quantity_label']}, "
                          f"γ = {r['gamma']:g}" for _, r in fits.iterrows()],
                         out_dir, "horizon_action_dim_exponents", level=1.0)


EXPERIMENT = xp.Experiment(
    "Gradient variance against horizon and action dimension (LQR)",
    lambda runs: (fits := all_fits(runs), runs, checks(fits) if len(fits) else []),
    verdict, render,
    per_run=per_run_values, figures=figures, result_frame=lambda s: s[0],
    more_tables=lambda s: {"runs": s[1], "checks": xp.findings_frame(s[2])})
analyze = EXPERIMENT.analyze
