"""Figures for a sweep, written as PNG and PDF into ``DIR/figures/``.

- ``learning_curves``: IQM return against environment steps, 95% stratified bootstrap
  band, one panel per environment.
- ``gradient_stats``: relative variance and relative bias of the gradient estimate at
  every measured training iteration, pooled over seeds as the table pools them (bands:
  95% bootstrap over seeds for the variance, 95% from the per-measurement standard
  errors for the bias; the panel titles say so).
- ``table_rows``: the comparison table as a figure, one labelled line per row (so no
  two rows can hide each other): relative bias and variance / vanilla with their 95%
  intervals, one row of panels per environment.
- ``bias_variance``: one point per estimator row, relative variance against relative
  bias with 95% intervals on both axes, one panel per environment; every row has its
  own marker, and an inset magnifies points that pile up.
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
from analysis.validate import is_number

PAPER_WIDTH = 7.0
PANEL_HEIGHT = 2.6
REL_VAR_LABEL = "relative variance  tr Cov[ĝ] / ‖∇J‖²"
REL_BIAS_LABEL = "relative bias  ‖E ĝ − ∇J‖ / ‖∇J‖"


def apply_theme() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=0.95,
                  rc={"axes.titlesize": 9, "legend.fontsize": 7, "savefig.bbox": "tight"})


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p", "d", "8"]


def _family(label: str) -> str:
    """The estimator of a row label: ``gae (lam=0.5) [fit:320]`` -> ``gae``."""
    return re.split(r" [(\[]", label, maxsplit=1)[0]


def _palette(labels: list[str]) -> dict[str, tuple]:
    """One tab10 colour per estimator (the text before ' ('); variants of one estimator,
    such as GAE's lambdas, get a dark-to-light ramp of its hue wide enough to tell apart
    (and each its own marker, ``_markers``: colour is never the only cue)."""
    families = list(dict.fromkeys(_family(label) for label in labels))
    base = dict(zip(families, sns.color_palette("tab10", max(len(families), 1)) * 3))
    colours = {}
    for family in families:
        members = [label for label in labels if _family(label) == family]
        if len(members) == 1:
            colours[members[0]] = base[family]
            continue
        lightness = np.linspace(0.18, 0.78, len(members))
        saturation = np.linspace(1.0, 0.65, len(members))
        colours.update((m, sns.set_hls_values(base[family], l=float(v), s=float(sat)))
                       for m, v, sat in zip(members, lightness, saturation))
    return colours


def _markers(labels: list[str]) -> dict[str, str]:
    """A marker of its own for every label (cycling only past 14 rows)."""
    return {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(labels)}


def _label_order(label: str) -> tuple:
    """Estimators in the table's order, then their settings with numbers compared as
    numbers (``gae (lam=0.5)`` before ``gae (lam=0.95)``)."""
    from analysis.table import ESTIMATOR_ORDER

    family = _family(label)
    rest = label[len(family):]
    rank = ESTIMATOR_ORDER.index(family) if family in ESTIMATOR_ORDER else len(ESTIMATOR_ORDER)
    parts = tuple((0, float(t), "") if is_number(t) else (1, 0.0, t)
                  for t in re.split(r"([-+]?\d*\.?\d+(?:e[-+]?\d+)?)", rest) if t)
    return (rank, family, parts)


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
    """Per (env, label, step), pooled over seeds as the table pools over steps and seeds
    (``analysis.table``): relative variance = mean variance / mean ``||grad J||^2`` with a
    bootstrap interval over seeds, relative bias = sqrt(mean U / mean ``||grad J||^2``)
    with the interval from the logged per-measurement standard errors."""
    from analysis.table import per_run_values, pooled_bias

    records = []
    for (env, label, step), g in measured.groupby(["env", "label", "step"], sort=False):
        pooled = pooled_bias(per_run_values(g))
        var = pooled.relative(mean_ci(g["grad_variance"].to_numpy()))
        bias = pooled.relative(pooled.bias_sq).map(_root)
        records.append({"env": env, "label": label, "step": step, "rel_variance": var.value,
                        "rel_variance_lo": var.lo, "rel_variance_hi": var.hi,
                        "rel_bias": bias.value, "rel_bias_lo": bias.lo, "rel_bias_hi": bias.hi,
                        "n": var.n})
    return pd.DataFrame.from_records(records)


def _root(x: float) -> float:
    return math.sqrt(max(x, 0.0)) if math.isfinite(x) else x


def plot_gradient_stats(by_step: pd.DataFrame, labels: list[str], envs: list[str],
                        out_dir: Path) -> list[Path]:
    """Relative variance (log scale when it spans decades) and relative bias over training,
    one row of two panels per environment; each line its own marker; the titles say what
    the bands are."""
    colour, marker = _palette(labels), _markers(labels)
    fig, axes = plt.subplots(len(envs), 2, figsize=(PAPER_WIDTH, (PANEL_HEIGHT + 0.2) * len(envs)),
                             squeeze=False)
    for (ax_var, ax_bias), env in zip(axes, envs):
        data = by_step[by_step["env"] == env]
        for label in labels:
            c = data[data["label"] == label].sort_values("step")
            if c.empty:
                continue
            for ax, col in ((ax_var, "rel_variance"), (ax_bias, "rel_bias")):
                ax.plot(c["step"], c[col], color=colour[label], label=label, lw=1.1,
                        marker=marker[label], ms=3.5)
                ax.fill_between(c["step"], c[f"{col}_lo"], c[f"{col}_hi"],
                                color=colour[label], alpha=0.15, lw=0)
        if spans_decades(data["rel_variance"]):
            log_axis(ax_var, "y", data["rel_variance"])
        ax_var.set_ylabel(REL_VAR_LABEL)
        ax_bias.set_ylabel(REL_BIAS_LABEL)
        ax_var.set_title(f"{env}: variance, mean over seeds\n"
                         "band: 95% bootstrap CI over seeds", fontsize=8)
        ax_bias.set_title(f"{env}: bias, sqrt(mean U / mean ‖∇J‖²) over seeds\n"
                          "band: 95% CI from the per-measurement SEs", fontsize=8)
        for ax in (ax_var, ax_bias):
            ax.set_xlabel("training iteration")
    legend_below(fig, axes.flat, labels)
    fig.tight_layout()
    return save_figure(fig, out_dir, "gradient_stats")


# ----------------------------------------------------------------------------- table plots


def _errorbar_point(ax, row: pd.Series, x: str, y: str, colour, label: str,
                    marker: str = "o") -> None:
    xerr = _asym_err(row, x)
    yerr = _asym_err(row, y)
    ax.errorbar(row[x], row[y], xerr=xerr, yerr=yerr, fmt=marker, color=colour, ms=4.5,
                capsize=2, lw=1, label=label, mec="black", mew=0.4)


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


def piled_up(x: np.ndarray, y: np.ndarray, log_x: bool, within: float = 0.06) -> np.ndarray:
    """Which points lie within ``within`` of another, in axis fractions (x on a log scale
    when ``log_x``): the ones an inset should magnify."""
    x = np.log10(x) if log_x else np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    span = [max(np.ptp(v), 1e-12) for v in (x, y)]
    pts = np.column_stack([x / span[0], y / span[1]])
    dist = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    return (dist < within).any(axis=1)


def plot_bias_variance(table: pd.DataFrame, labels: list[str], out_dir: Path) -> list[Path]:
    """One point per estimator row: relative variance (log x) against relative bias; every
    row its own marker; an inset magnifies the points that pile up."""
    envs = list(dict.fromkeys(table["env"]))
    colour, marker = _palette(labels), _markers(labels)
    fig, axes = _panels(len(envs), height=3.2)
    for ax, env in zip(axes, envs):
        rows = table[(table["env"] == env) & np.isfinite(table["rel_variance"])
                     & np.isfinite(table["rel_bias"])]
        for _, row in rows.iterrows():
            _errorbar_point(ax, row, "rel_variance", "rel_bias", colour[row["label"]],
                            row["label"], marker[row["label"]])
        log_x = spans_decades(rows["rel_variance"], decades=0.7)
        if log_x:
            log_axis(ax, "x", pd.concat([rows["rel_variance"], rows["rel_variance_lo"],
                                          rows["rel_variance_hi"]]))
        if len(rows) > 2:
            _inset_where_piled(ax, rows, colour, marker, log_x)
        ax.set_xlabel(REL_VAR_LABEL)
        ax.set_ylabel(REL_BIAS_LABEL)
        ax.set_title(f"{env}: bias against variance\n(bars: 95% CIs as in the table)", fontsize=8)
    legend_below(fig, axes, labels)
    fig.tight_layout()
    return save_figure(fig, out_dir, "bias_variance")


def _inset_where_piled(ax, rows: pd.DataFrame, colour: dict, marker: dict, log_x: bool) -> None:
    """An inset in the panel's emptiest corner magnifying the piled-up points (bars
    dropped there: the main panel and the table carry them)."""
    crowd = rows[piled_up(rows["rel_variance"].to_numpy(), rows["rel_bias"].to_numpy(), log_x)]
    if len(crowd) < 2:
        return
    main_span = np.subtract(*ax.get_ylim()[::-1])
    x, y = crowd["rel_variance"], crowd["rel_bias"]
    pad_y = max(np.ptp(y) * 0.15, 0.03 * main_span)
    if log_x:
        lo_x, hi_x = x.min() / 1.08, x.max() * 1.08
    else:
        lo_x, hi_x = x.min() - 0.05 * np.ptp(x), x.max() + 0.05 * np.ptp(x)
    crowd = rows[rows["rel_variance"].between(lo_x, hi_x)
                 & rows["rel_bias"].between(y.min() - pad_y, y.max() + pad_y)]
    inset = ax.inset_axes(_emptiest_corner(ax, rows, log_x))
    for _, row in crowd.iterrows():
        inset.plot(row["rel_variance"], row["rel_bias"], marker=marker[row["label"]], ls="",
                   color=colour[row["label"]], ms=5, mec="black", mew=0.4)
    if log_x:
        inset.set_xscale("log")
        inset.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        inset.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    inset.set_ylim(y.min() - pad_y, y.max() + pad_y)
    inset.set_xlim(lo_x, hi_x)
    inset.tick_params(which="both", labelsize=6, length=2)
    inset.set_title("zoom", fontsize=6, pad=2)
    ax.indicate_inset_zoom(inset, edgecolor="0.4", lw=0.6)


def _emptiest_corner(ax, rows: pd.DataFrame, log_x: bool) -> list[float]:
    """Inset bounds [x0, y0, w, h] in axis fractions at the corner with fewest points."""
    ax.figure.canvas.draw()  # settle the limits
    to_axes = ax.transAxes.inverted()
    pts = to_axes.transform(ax.transData.transform(
        np.column_stack([rows["rel_variance"], rows["rel_bias"]])))
    corners = {(0.04, 0.52): (0, 0.5, 0.5, 1), (0.52, 0.52): (0.5, 0.5, 1, 1),
               (0.04, 0.06): (0, 0, 0.5, 0.5), (0.52, 0.06): (0.5, 0, 1, 0.5)}
    def crowding(box: tuple) -> int:
        x0, y0, x1, y1 = box
        inside = ((pts[:, 0] >= x0) & (pts[:, 0] <= x1)
                  & (pts[:, 1] >= y0) & (pts[:, 1] <= y1))
        return int(inside.sum())
    (cx, cy), _ = min(corners.items(), key=lambda kv: crowding(kv[1]))
    return [cx, cy, 0.44, 0.4]


def plot_table_rows(table: pd.DataFrame, labels: list[str], out_dir: Path) -> list[Path]:
    """The table as a figure: per environment, relative bias and variance / vanilla with
    95% intervals, one labelled line per row (rows cannot hide each other); a filled
    marker when the bias is distinguishable from 0, hollow when not."""
    envs = list(dict.fromkeys(table["env"]))
    colour, marker = _palette(labels), _markers(labels)
    n_rows = max(len(table[table["env"] == env]) for env in envs)
    fig, axes = plt.subplots(len(envs), 2, squeeze=False, sharey="row",
                             figsize=(PAPER_WIDTH, len(envs) * (0.6 + 0.22 * n_rows)))
    for (ax_bias, ax_var), env in zip(axes, envs):
        rows = table[table["env"] == env]
        rows = rows.iloc[sorted(range(len(rows)), key=lambda i: _label_order(rows["label"].iloc[i]))]
        for y, (_, row) in enumerate(rows.iterrows()):
            filled = str(row.get("bias_distinguishable")) == "True"
            for ax, col in ((ax_bias, "rel_bias"), (ax_var, "var_ratio")):
                if not np.isfinite(row[col]):
                    continue
                err = _asym_err(row, col)
                ax.errorbar(row[col], y, xerr=err, fmt=marker[row["label"]], ms=5, capsize=2,
                            lw=1, color=colour[row["label"]], mec="black", mew=0.4,
                            mfc=colour[row["label"]] if (filled or col == "var_ratio") else "white")
        ax_bias.set_yticks(range(len(rows)), list(rows["label"]))
        ax_bias.invert_yaxis()
        ax_bias.set_xlabel(REL_BIAS_LABEL + "  (hollow: not distinguishable from 0)", fontsize=7)
        ax_var.set_xlabel("variance / vanilla REINFORCE (paired per run and step, or by seed)", fontsize=7)
        if spans_decades(rows["var_ratio"], decades=1.0):
            log_axis(ax_var, "x", pd.concat([rows["var_ratio"], rows["var_ratio_lo"],
                                              rows["var_ratio_hi"]]))
        ax_var.axvline(1.0, color="0.5", lw=0.6, ls="--")
        ax_var.tick_params(axis="x", labelsize=6)
        reference = rows["reference"].iloc[0] if "reference" in rows.columns else ""
        ax_bias.set_title(f"{env} ({reference} ∇J): relative bias, 95% CI", fontsize=8)
        ax_var.set_title(f"{env}: variance ratio, 95% CI", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_dir, "table_rows")


def plot_gae_lambda(table: pd.DataFrame, out_dir: Path, estimator: str = "gae") -> list[Path]:
    """GAE's relative bias and relative variance against lambda, one line per env (and
    critic, when rows were measured with several); vanilla REINFORCE's variance as a
    dashed line for scale. Empty when no line has 2 lambdas."""
    if "lam" not in table.columns:
        return []
    name = table["estimator_name"] if "estimator_name" in table.columns else table["estimator"]
    gae = table[(name == estimator) & table["lam"].notna()].copy()
    critic = gae["critic"].fillna("").astype(str) if "critic" in gae.columns else ""
    gae["line"] = gae["env"] + np.where(critic != "", " [" + critic + "]", "") if len(gae) else []
    lines = [k for k, g in gae.groupby("line", sort=False) if g["lam"].nunique() >= 2]
    if not lines:
        return []
    envs = list(dict.fromkeys(gae.loc[gae["line"].isin(lines), "env"]))
    colour, marker = _palette(lines + envs), _markers(lines)
    fig, (ax_bias, ax_var) = plt.subplots(1, 2, figsize=(PAPER_WIDTH, PANEL_HEIGHT + 0.3))
    for line in lines:
        rows = gae[gae["line"] == line].sort_values("lam")
        for ax, col in ((ax_bias, "rel_bias"), (ax_var, "rel_variance")):
            err = np.vstack([rows[col] - rows[f"{col}_lo"], rows[f"{col}_hi"] - rows[col]]).clip(0)
            ax.errorbar(rows["lam"], rows[col], yerr=np.nan_to_num(err), marker=marker[line],
                        ms=4, capsize=2, lw=1.2, color=colour[line], label=line)
    vanilla_rows = table[name == "reinforce"]
    for env in envs:
        vanilla = vanilla_rows[vanilla_rows["env"] == env]
        if not vanilla.empty:
            ax_var.axhline(vanilla["rel_variance"].iloc[0], color=colour[env], ls="--", lw=0.8,
                           label=f"{env}: vanilla REINFORCE")
    ax_bias.set_ylabel(REL_BIAS_LABEL)
    ax_var.set_ylabel(REL_VAR_LABEL)
    scale_values = pd.concat([gae["rel_variance"], vanilla_rows["rel_variance"]])
    if spans_decades(scale_values, decades=1.0):
        log_axis(ax_var, "y", scale_values)
    for ax in (ax_bias, ax_var):
        ax.set_xlabel("GAE λ")
    legend_below(fig, [ax_bias, ax_var], [*lines, *(f"{e}: vanilla REINFORCE" for e in envs)])
    ax_bias.set_title("GAE bias against λ (95% CI)")
    ax_var.set_title("GAE variance against λ (95% CI)")
    fig.tight_layout()
    return save_figure(fig, out_dir, "gae_lambda")


def headline_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The table rows the figures draw: the headline checkpoints (``analysis.table``
    shows the unfitted-critic first checkpoint apart, in its files only); every row when
    no checkpoint is a headline one (a run measured only before its critic's first fit)."""
    if "scope" not in table.columns:
        return table
    headline = table[table["scope"] == "headline"]
    return headline if not headline.empty else table


def trajectory_rows(measured: pd.DataFrame) -> pd.DataFrame:
    """The measurements drawn over training: estimators without a critic or with the
    run's own (``train``) one; fitted and exact critics are in the table figures."""
    if "critic" not in measured.columns:
        return measured
    return measured[measured["critic"].fillna("").astype(str).isin(["", "train"])]


def make_figures(table: pd.DataFrame, measured: pd.DataFrame, curves: pd.DataFrame,
                 out_dir: Path) -> list[Path]:
    """Every figure above into ``out_dir``; returns the files written."""
    apply_theme()
    table = headline_rows(table)
    labels = sorted(dict.fromkeys(table["label"]), key=_label_order)
    envs = list(dict.fromkeys(table["env"]))
    paths: list[Path] = []
    if not curves.empty:
        curve_labels = sorted(dict.fromkeys(curves["label"]), key=_label_order)
        paths += plot_learning_curves(curves, curve_labels, envs, out_dir)
    measured = trajectory_rows(measured)
    if not measured.empty:
        drawn = sorted(dict.fromkeys(measured["label"]), key=_label_order)
        paths += plot_gradient_stats(gradient_stats_by_step(measured), drawn, envs, out_dir)
        paths += plot_bias_variance(table, labels, out_dir)
        paths += plot_table_rows(table, labels, out_dir)
        paths += plot_gae_lambda(table, out_dir)
    return paths


# --- added for baselines/ppo_clip/practice_biases


def interval_grid(table: pd.DataFrame, panels: str, x: str, rows: list[tuple[str, str]],
                  out_dir: Path, name: str, hue: str | None = None, log_x: bool = False,
                  log_y: tuple[str, ...] = (), levels: dict[str, float] | None = None,
                  marks: dict[str, str] | None = None) -> list[Path]:
    """An experiment's summary as points with 95% intervals: one column of panels per value
    of ``panels``, one row per ``(column, y label)`` of ``rows``, ``column`` against ``x``
    (its interval from ``column_lo``/``column_hi``), one colour per value of ``hue``.

    A text ``x`` is categorical (evenly spaced ticks, the hues side by side); a numeric
    ``x`` is joined by lines (log base 2 with ``log_x``). ``levels`` draws a dashed
    reference level per column, ``marks`` a black cross per row at the value of another
    column (a theory or exact value: ``{"rel_bias": "pred_rel_bias"}``)."""
    levels, marks = levels or {}, marks or {}
    cols = list(dict.fromkeys(table[panels]))
    hues = list(dict.fromkeys(table[hue])) if hue else [None]
    colours = dict(zip(hues, sns.color_palette("viridis" if len(hues) > 2 else "tab10", len(hues))))
    fig, axes = plt.subplots(len(rows), len(cols), squeeze=False,
                             figsize=(PAPER_WIDTH, PANEL_HEIGHT * len(rows)))
    for j, panel in enumerate(cols):
        t = table[table[panels] == panel]
        categorical = not pd.api.types.is_numeric_dtype(t[x])
        ticks = list(dict.fromkeys(t[x])) if categorical else sorted(t[x].unique())
        for i, (col, ylabel) in enumerate(rows):
            ax = axes[i][j]
            for k, h in enumerate(hues):
                s = (t if h is None else t[t[hue] == h]).sort_values(x, key=lambda v: v.map(
                    ticks.index) if categorical else v)
                shift = k - (len(hues) - 1) / 2
                pos = (s[x].map(ticks.index) + 0.6 * shift / len(hues) if categorical
                       else s[x] * 2.0 ** (0.04 * shift))
                ax.errorbar(pos, s[col], yerr=np.nan_to_num(error_bars(s, col)), marker="o", ms=3.5,
                            capsize=2, lw=0 if categorical else 1.2, elinewidth=1, color=colours[h],
                            label=f"{hue} = {h}" if hue else None)
                if col in marks:
                    ax.plot(pos, s[marks[col]], "x", color="k", ms=5, label="exact / theory")
            if col in levels:
                ax.axhline(levels[col], color="0.4", lw=0.8, ls="--")
            if categorical:  # long one-line labels tilted
                tilt = len(ticks) > 4 and not any("\n" in str(v) for v in ticks)
                ax.set_xticks(range(len(ticks)), [str(v) for v in ticks], fontsize=7,
                              rotation=30 if tilt else 0, ha="right" if tilt else "center")
            elif log_x:
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_locator(ticker.NullLocator())
            if col in log_y:
                log_axis(ax, "y", pd.concat([t[col], t[f"{col}_lo"], t[f"{col}_hi"]]))
            ax.set(ylabel=ylabel if j == 0 else "", title=str(panel) if i == 0 else "",
                   xlabel=x if i == len(rows) - 1 and not categorical else "")
    legend_below(fig, axes.flat, ncol=4)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def interval_rows(table: pd.DataFrame, panels: list[tuple[str, str, str]], labels: list[str],
                  out_dir: Path, name: str, level: float | None = None) -> list[Path]:
    """A forest plot: one line per row of ``table`` (named by ``labels``, first at the top),
    one panel per ``(column, x label, title)`` of ``panels``, each point with its 95%
    interval (``column_lo``/``column_hi``), and a dashed line at ``level`` (a law's value)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(PAPER_WIDTH, 0.26 * len(table) + 1.3),
                             sharey=True, squeeze=False)
    y = np.arange(len(table))[::-1]
    for ax, (column, xlabel, title) in zip(axes[0], panels):
        ax.errorbar(table[column], y, xerr=error_bars(table, column), fmt="o", ms=4, capsize=2)
        if level is not None:
            ax.axvline(level, color="tab:red", ls="--", lw=1)
        ax.set(xlabel=xlabel, title=title)
    axes[0][0].set_yticks(y, labels)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def scatter_with_identity(ax, x: pd.Series, y: pd.Series, xlabel: str, ylabel: str,
                          title: str = "") -> None:
    """Paired values, y against x, as points on log axes (``log_axis``) with the dashed
    line y = x across their span: a point below it is a pair whose y is the smaller."""
    both = pd.concat([x, y])
    ax.scatter(x, y, s=10)
    ax.plot([both.min(), both.max()], [both.min(), both.max()], color="0.4", ls="--", lw=0.8)
    log_axis(ax, "x", both)
    log_axis(ax, "y", both)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)


def category_intervals(ax, record, columns: dict[str, str], ylabel: str, title: str = "",
                       level: float = 0.0) -> None:
    """One point per category with its 95% interval: ``columns`` maps a tick label to the
    column of ``record`` (with ``_lo``/``_hi``) it shows; a solid line at ``level``."""
    for j, column in enumerate(columns.values()):
        ax.errorbar(j, record[column], yerr=error_bars(record, column), fmt="o", capsize=3)
    ax.axhline(level, color="0.3", lw=0.8)
    ax.set_xticks(range(len(columns)), list(columns))
    ax.set(xlim=(-0.6, len(columns) - 0.4), ylabel=ylabel, title=title)
