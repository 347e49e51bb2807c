"""Figures for a sweep, written as PNG and PDF into ``DIR/figures/``.

- ``learning_curves``: IQM return against environment steps, 95% stratified bootstrap
  band, one panel per environment.
- ``gradient_stats``: relative variance and relative bias of the gradient estimate at
  every measured training iteration (mean across seeds, 95% bootstrap band).
- ``bias_variance``: one point per estimator row, relative variance against relative
  bias with 95% intervals on both axes, one panel per environment.
- ``gae_lambda``: GAE's bias and variance against lambda, when the sweep has several.

Sizes are for a paper: 7 inches wide (two columns), 8-9 pt text.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker

from analysis.stats import mean_ci

PAPER_WIDTH = 7.0
PANEL_HEIGHT = 2.6
REL_VAR_LABEL = "relative variance  tr Cov[ĝ] / ‖∇J‖²"
REL_BIAS_LABEL = "relative bias  ‖E ĝ − ∇J‖ / ‖∇J‖"


def apply_theme() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=0.95,
                  rc={"axes.titlesize": 9, "legend.fontsize": 7, "savefig.bbox": "tight"})


def _palette(labels: list[str]) -> dict[str, tuple]:
    """One tab10 colour per estimator (the text before ' ('); variants of one estimator,
    such as GAE's lambdas, get darker to lighter shades of its colour."""
    families = list(dict.fromkeys(label.split(" (")[0] for label in labels))
    base = dict(zip(families, sns.color_palette("tab10", max(len(families), 1)) * 3))
    colours = {}
    for family in families:
        members = [label for label in labels if label.split(" (")[0] == family]
        if len(members) == 1:
            colours[members[0]] = base[family]
            continue
        lightness = np.linspace(0.2, 0.75, len(members))
        colours.update((m, sns.set_hls_values(base[family], l=float(v))) for m, v in zip(members, lightness))
    return colours


def _label_order(label: str) -> tuple:
    """Estimators in the table's order, then their settings with numbers compared as
    numbers (``gae (lam=0.5)`` before ``gae (lam=0.95)``)."""
    from analysis.table import ESTIMATOR_ORDER

    family, _, rest = label.partition(" (")
    rank = ESTIMATOR_ORDER.index(family) if family in ESTIMATOR_ORDER else len(ESTIMATOR_ORDER)
    parts = tuple((0, float(t), "") if _is_number(t) else (1, 0.0, t)
                  for t in re.split(r"([-+]?\d*\.?\d+(?:e[-+]?\d+)?)", rest) if t)
    return (rank, family, parts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def log_axis(ax, which: str, values) -> None:
    """Log scale with plain-number ticks at 1, 2, 5 x 10^k, limits from the point values
    (so a confidence band reaching towards 0 does not squash the plot)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    set_scale = ax.set_xscale if which == "x" else ax.set_yscale
    set_scale("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    decades = math.log10(v.max() / v.min()) if v.size else 0.0
    subs = (1.0, 2.0, 5.0) if decades < 2.5 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())
    if v.size:
        lim = (v.min() / 2.5, v.max() * 2.5)
        (ax.set_xlim if which == "x" else ax.set_ylim)(*lim)


def _panels(n: int, height: float = PANEL_HEIGHT) -> tuple[plt.Figure, np.ndarray]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PAPER_WIDTH, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def save_figure(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=200)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def spans_decades(values: pd.Series | np.ndarray, decades: float = 1.5) -> bool:
    """True when the positive values span more than ``decades`` powers of ten."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return v.size > 1 and math.log10(v.max() / v.min()) > decades


def legend_below(fig: plt.Figure, axes, labels=(), ncol: int = 4) -> None:
    """One legend for the figure, under the panels, with every label any panel shows:
    those in ``labels`` first, in that order, then the others as first seen."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    order = [label for label in labels if label in seen] + [k for k in seen if k not in labels]
    if order:
        fig.legend([seen[k] for k in order], order, loc="lower center", ncol=min(len(order), ncol),
                   frameon=False,
                   bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(order) / ncol)))


# ----------------------------------------------------------------------------- curves


def plot_learning_curves(curves: pd.DataFrame, labels: list[str], envs: list[str],
                         out_dir: Path) -> list[Path]:
    """IQM learning curves with 95% bands, one panel per environment."""
    colour = _palette(labels)
    fig, axes = _panels(len(envs))
    x_name = curves["x_name"].iloc[0]
    for ax, env in zip(axes, envs):
        for label in labels:
            c = curves[(curves["env"] == env) & (curves["label"] == label)]
            if c.empty:
                continue
            ax.plot(c["x"], c["iqm"], color=colour[label], label=label, lw=1.2)
            ax.fill_between(c["x"], c["lo"], c["hi"], color=colour[label], alpha=0.2, lw=0)
        ax.set_title(env)
        ax.set_xlabel("environment steps" if x_name == "env_steps" else "training iteration")
        ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
        ax.set_ylabel("discounted return (IQM, 95% CI)")
    legend_below(fig, axes, labels)
    fig.tight_layout()
    return save_figure(fig, out_dir, "learning_curves")


def gradient_stats_by_step(measured: pd.DataFrame) -> pd.DataFrame:
    """Mean across seeds and 95% interval of relative variance and relative bias at each
    (env, label, step). Bias is averaged as U / ||grad J||^2, then square-rooted."""
    records = []
    for (env, label, step), g in measured.groupby(["env", "label", "step"], sort=False):
        var = mean_ci(g["grad_rel_variance"].to_numpy())
        b2 = mean_ci(g["grad_rel_bias_sq"].to_numpy())
        root = [math.sqrt(max(v, 0.0)) if math.isfinite(v) else v for v in (b2.value, b2.lo, b2.hi)]
        records.append({"env": env, "label": label, "step": step, "rel_variance": var.value,
                        "rel_variance_lo": var.lo, "rel_variance_hi": var.hi,
                        "rel_bias": root[0], "rel_bias_lo": root[1], "rel_bias_hi": root[2],
                        "n": var.n})
    return pd.DataFrame.from_records(records)


def plot_gradient_stats(by_step: pd.DataFrame, labels: list[str], envs: list[str],
                        out_dir: Path) -> list[Path]:
    """Relative variance (log scale when it spans decades) and relative bias over training,
    one row of two panels per environment."""
    colour = _palette(labels)
    fig, axes = plt.subplots(len(envs), 2, figsize=(PAPER_WIDTH, PANEL_HEIGHT * len(envs)),
                             squeeze=False)
    for (ax_var, ax_bias), env in zip(axes, envs):
        data = by_step[by_step["env"] == env]
        for label in labels:
            c = data[data["label"] == label].sort_values("step")
            if c.empty:
                continue
            for ax, col in ((ax_var, "rel_variance"), (ax_bias, "rel_bias")):
                ax.plot(c["step"], c[col], color=colour[label], label=label, lw=1.2, marker=".")
                ax.fill_between(c["step"], c[f"{col}_lo"], c[f"{col}_hi"],
                                color=colour[label], alpha=0.2, lw=0)
        if spans_decades(data["rel_variance"]):
            log_axis(ax_var, "y", data["rel_variance"])
        ax_var.set_ylabel(REL_VAR_LABEL)
        ax_bias.set_ylabel(REL_BIAS_LABEL)
        for ax in (ax_var, ax_bias):
            ax.set_xlabel("training iteration")
            ax.set_title(env)
    legend_below(fig, axes.flat, labels)
    fig.tight_layout()
    return save_figure(fig, out_dir, "gradient_stats")


# ----------------------------------------------------------------------------- table plots


def _errorbar_point(ax, row: pd.Series, x: str, y: str, colour, label: str) -> None:
    xerr = _asym_err(row, x)
    yerr = _asym_err(row, y)
    ax.errorbar(row[x], row[y], xerr=xerr, yerr=yerr, fmt="o", color=colour, ms=4,
                capsize=2, lw=1, label=label)


def _asym_err(row: pd.Series, name: str) -> np.ndarray | None:
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if lo is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return error_bars(row, name).reshape(2, 1)


def error_bars(table, name: str) -> np.ndarray:
    """matplotlib's [2, n] ``yerr``/``xerr`` of ``name`` from its ``name_lo``/``name_hi``
    columns (a row or a table): the distances to the interval ends, never negative."""
    value = np.asarray(table[name], float)
    return np.vstack([value - np.asarray(table[f"{name}_lo"], float),
                      np.asarray(table[f"{name}_hi"], float) - value]).clip(0)


def plot_bias_variance(table: pd.DataFrame, labels: list[str], out_dir: Path) -> list[Path]:
    """One point per estimator row: relative variance (log x) against relative bias."""
    envs = list(dict.fromkeys(table["env"]))
    colour = _palette(labels)
    fig, axes = _panels(len(envs), height=3.0)
    for ax, env in zip(axes, envs):
        rows = table[table["env"] == env]
        for _, row in rows.iterrows():
            if np.isfinite(row["rel_variance"]):
                _errorbar_point(ax, row, "rel_variance", "rel_bias", colour[row["label"]], row["label"])
        if spans_decades(rows["rel_variance"], decades=0.7):
            log_axis(ax, "x", pd.concat([rows["rel_variance"], rows["rel_variance_lo"],
                                          rows["rel_variance_hi"]]))
        ax.set_xlabel(REL_VAR_LABEL)
        ax.set_ylabel(REL_BIAS_LABEL)
        ax.set_title(f"{env}: bias against variance (95% CI)")
    legend_below(fig, axes, labels)
    fig.tight_layout()
    return save_figure(fig, out_dir, "bias_variance")


def plot_gae_lambda(table: pd.DataFrame, out_dir: Path, estimator: str = "gae") -> list[Path]:
    """GAE's relative bias and relative variance against lambda, one line per env;
    vanilla REINFORCE's variance as a dashed line for scale. Empty when < 2 lambdas."""
    if "lam" not in table.columns:
        return []
    gae = table[(table["estimator"] == estimator) & table["lam"].notna()]
    envs = [e for e, g in gae.groupby("env", sort=False) if g["lam"].nunique() >= 2]
    if not envs:
        return []
    colour = _palette(envs)
    fig, (ax_bias, ax_var) = plt.subplots(1, 2, figsize=(PAPER_WIDTH, PANEL_HEIGHT + 0.3))
    for env in envs:
        rows = gae[gae["env"] == env].sort_values("lam")
        for ax, col in ((ax_bias, "rel_bias"), (ax_var, "rel_variance")):
            err = np.vstack([rows[col] - rows[f"{col}_lo"], rows[f"{col}_hi"] - rows[col]]).clip(0)
            ax.errorbar(rows["lam"], rows[col], yerr=np.nan_to_num(err), marker="o", ms=4,
                        capsize=2, lw=1.2, color=colour[env], label=env)
        vanilla = table[(table["env"] == env) & (table["estimator"] == "reinforce")]
        if not vanilla.empty:
            ax_var.axhline(vanilla["rel_variance"].iloc[0], color=colour[env], ls="--", lw=0.8,
                           label=f"{env}: vanilla REINFORCE")
    ax_bias.set_ylabel(REL_BIAS_LABEL)
    ax_var.set_ylabel(REL_VAR_LABEL)
    scale_values = pd.concat([gae["rel_variance"], table.loc[table["estimator"] == "reinforce", "rel_variance"]])
    if spans_decades(scale_values, decades=1.0):
        log_axis(ax_var, "y", scale_values)
    for ax in (ax_bias, ax_var):
        ax.set_xlabel("GAE λ")
    legend_below(fig, [ax_bias, ax_var], [*envs, *(f"{e}: vanilla REINFORCE" for e in envs)])
    ax_bias.set_title("GAE bias against λ (95% CI)")
    ax_var.set_title("GAE variance against λ (95% CI)")
    fig.tight_layout()
    return save_figure(fig, out_dir, "gae_lambda")


def make_figures(table: pd.DataFrame, measured: pd.DataFrame, curves: pd.DataFrame,
                 out_dir: Path) -> list[Path]:
    """Every figure above into ``out_dir``; returns the files written."""
    apply_theme()
    labels = sorted(dict.fromkeys(table["label"]), key=_label_order)
    envs = list(dict.fromkeys(table["env"]))
    paths: list[Path] = []
    if not curves.empty:
        paths += plot_learning_curves(curves, labels, envs, out_dir)
    if not measured.empty:
        paths += plot_gradient_stats(gradient_stats_by_step(measured), labels, envs, out_dir)
        paths += plot_bias_variance(table, labels, out_dir)
        paths += plot_gae_lambda(table, out_dir)
    return paths
