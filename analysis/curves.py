"""Learning-curve aggregates: interquartile mean across runs with stratified bootstrap CIs.

Runs of one row log returns at their own environment-step counts (episode lengths
differ), so each run's curve is first interpolated onto a common grid of environment
steps, from 0 to the shortest run's end; then at every grid point the IQM across runs
and its stratified bootstrap interval (``analysis.stats.stratified_bootstrap_iqm``, one
stratum per environment) are computed, as rliable does for its curves.

``final_return_summary`` pools environments for one IQM per estimator: each run's final
return is min-max normalised by the range of all final returns on its environment, so
environments of different scales can share one number; the strata keep each
environment's runs together in the bootstrap.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.stats import stratified_bootstrap_iqm

N_POINTS = 40


def x_column(df: pd.DataFrame) -> str:
    """Environment steps when logged for every row, else the training iteration."""
    if "env_steps" in df.columns and df["env_steps"].notna().all():
        return "env_steps"
    return "step"


def run_curves(group: pd.DataFrame, x: str, grid: np.ndarray) -> dict[str, np.ndarray]:
    """Each run's ``return_mean`` interpolated onto ``grid`` (run_dir -> values)."""
    curves = {}
    for run_dir, run in group.groupby("run_dir", sort=False):
        run = run.sort_values(x)
        curves[run_dir] = np.interp(grid, run[x].to_numpy(float), run["return_mean"].to_numpy(float))
    return curves


def common_grid(group: pd.DataFrame, x: str, n_points: int = N_POINTS) -> np.ndarray:
    """``n_points`` from the latest first point to the earliest last point of the runs."""
    ends = group.groupby("run_dir")[x].agg(["min", "max"])
    start, stop = float(ends["min"].max()), float(ends["max"].min())
    if stop <= start:
        return np.array([start])
    return np.linspace(start, stop, n_points)


def learning_curve_iqm(df: pd.DataFrame, row_keys: list[str],
                       n_points: int = N_POINTS) -> pd.DataFrame:
    """IQM return and 95% interval per row and grid point: columns ``*row_keys, x, iqm,
    lo, hi, n`` plus ``x_name`` saying which column x is."""
    x = x_column(df)
    records = []
    for key, group in df.groupby(row_keys, dropna=False, sort=False):
        grid = common_grid(group, x, n_points)
        curves = run_curves(group, x, grid)
        env_of_run = group.groupby("run_dir", sort=False)["env"].first()
        for i, xv in enumerate(grid):
            by_env: dict[object, list[float]] = {}
            for run_dir, curve in curves.items():
                by_env.setdefault(env_of_run[run_dir], []).append(curve[i])
            est = stratified_bootstrap_iqm(by_env, seed=i, n_resamples=500)
            records.append({**dict(zip(row_keys, key)), "x": xv, "iqm": est.value,
                            "lo": est.lo, "hi": est.hi, "n": est.n})
    out = pd.DataFrame.from_records(records)
    out["x_name"] = x
    return out


def final_return_summary(table: pd.DataFrame, df: pd.DataFrame, finals: pd.Series) -> pd.DataFrame:
    """One normalised-return IQM per estimator label, pooled over environments.

    ``finals`` maps run_dir to its final return; ``table`` gives the labels' runs via the
    row keys used to build it.
    """
    runs = df.drop_duplicates("run_dir").set_index("run_dir")
    runs = runs.assign(final=finals.reindex(runs.index))
    env_range = runs.groupby("env")["final"].agg(["min", "max"])
    span = (env_range["max"] - env_range["min"]).replace(0, np.nan)
    runs["normalised"] = (runs["final"] - runs["env"].map(env_range["min"])) / runs["env"].map(span)
    records = []
    for label, group in runs.groupby("label", sort=False):
        by_env = {env: g["normalised"].dropna().to_numpy() for env, g in group.groupby("env")}
        est = stratified_bootstrap_iqm(by_env)
        records.append({"label": label, "normalised_return_iqm": est.value,
                        "lo": est.lo, "hi": est.hi, "n_runs": est.n, "n_envs": len(by_env)})
    return pd.DataFrame.from_records(records)
