"""Calibration of the per-measurement intervals: ``simulate(out, preset, params)``.

Called by ``pgvar-reproduce calibration`` (``kind: simulation`` in sweep.yaml: no runs).
The machinery is ``analysis.calibration``; this file holds the experiment's grid (which
estimators at which environments stand for 'no', 'small' and 'large' bias), its figure
and its verdicts.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from analysis.calibration import (
    FP_TARGET,
    NOMINAL,
    TOLERANCE,
    Case,
    coverage_table,
    run_calibration,
)
from analysis.figures import PANEL_HEIGHT, PAPER_WIDTH, apply_theme, save_figure

TABULAR = {"n_states": 5, "n_actions": 3, "horizon": 8}
LQR = {"state_dim": 2, "action_dim": 1, "horizon": 20}
MC_EPISODES = {"tabular_mc": 1024, "cartpole": 2048}
BIAS_ORDER = ["zero", "small", "large"]
INTERVALS = {"bias_sq": "squared bias ‖E ĝ − ∇J‖²", "variance": "variance tr Cov ĝ",
             "ratio": "variance ratio to REINFORCE (paired)"}


def cases_for(env: str) -> list[Case]:
    """The grid of one environment: rloo (bias 0), mean_baseline at B = 8 (bias ∇J/8)
    and at B = 2 (bias ∇J/2); Monte Carlo environments skip the small bias."""
    if env in ("tabular", "lqr"):
        kw = TABULAR if env == "tabular" else LQR
        return [Case(env, "rloo", 4, "zero", env_kwargs=kw),
                Case(env, "mean_baseline", 8, "small", env_kwargs=kw),
                Case(env, "mean_baseline", 2, "large", env_kwargs=kw)]
    if env in MC_EPISODES:
        name, kw = ("tabular", TABULAR) if env == "tabular_mc" else ("cartpole", {})
        n = MC_EPISODES[env]
        return [Case(name, "rloo", 4, "zero", "monte_carlo", n, kw),
                Case(name, "mean_baseline", 2, "large", "monte_carlo", n, kw)]
    raise ValueError(f"unknown calibration environment {env!r}; use tabular, lqr, "
                     f"tabular_mc or cartpole")


def simulate(out: Path, preset: str, params: dict) -> str:
    """Run the grid, write result.md, result.csv, records.csv.gz and the figure."""
    cases = [c for env in params["envs"] for c in cases_for(env)]
    records = run_calibration(cases, Ms=params["Ms"], repeats=int(params["repeats"]),
                              mc_Ms=params.get("mc_Ms"), mc_repeats=params.get("mc_repeats"))
    table = coverage_table(records)
    out.mkdir(parents=True, exist_ok=True)
    records.to_csv(out / "records.csv.gz", index=False)
    table.to_csv(out / "result.csv", index=False)
    plot_coverage(table, out / "figures")
    text = render(table, preset)
    (out / "result.md").write_text(text)
    return text


# ----------------------------------------------------------------------------- verdicts


def overall_verdict(table: pd.DataFrame) -> str:
    """Targets met in every cell with M >= 16 whose intervals are not flagged, or which
    cells miss (a flagged cell is reported, not hidden)."""
    target = table[table["M"] >= 16]
    missed = target[target["verdict"] != "meets"]
    if missed.empty:
        return "targets met in every cell with M >= 16"
    return (f"targets met in {len(target) - len(missed)} of {len(target)} cells with "
            f"M >= 16; missed in: " + "; ".join(f"{r.case} M={r.M} ({r.verdict})"
                                              for r in missed.itertuples()))


def pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.1f}%"


def coverage_cell(row: pd.Series, name: str) -> str:
    return (f"{pct(row[f'{name}_coverage'])} [{pct(row[f'{name}_coverage_lo'])}, "
            f"{pct(row[f'{name}_coverage_hi'])}]")


def render(table: pd.DataFrame, preset: str) -> str:
    """result.md: the verdict, the coverage table, how to read it."""
    lines = [f"# Calibration of the per-measurement intervals ({preset} preset)", "",
             f"Verdict: {overall_verdict(table)}.", "",
             (f"Target: coverage {100 * NOMINAL:.0f}% ± {100 * TOLERANCE:.0f} points for every "
             f"interval; false positives of the bias verdict {100 * FP_TARGET[0]:.1f}-"
             f"{100 * FP_TARGET[1]:.1f}% where the bias is 0. Brackets: Wilson 95% "
             "binomial intervals over the repeats."), "",
             ("| case | M | repeats | squared bias | truth below / above | false positives | "
             "variance | variance ratio | flagged | squared bias, unflagged | pooled over 10: table / t | "
             "tail index | verdict |"),
             "| --- | ---: | ---: | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['case']} | {r['M']} | {r['repeats']} | {coverage_cell(r, 'bias_sq')} | "
            f"{pct(r['bias_sq_below'])} / {pct(r['bias_sq_above'])} | {pct(r['false_positive'])} | "
            f"{coverage_cell(r, 'variance')} | {coverage_cell(r, 'ratio')} | {pct(r['flagged'])} | "
            f"{pct(r['bias_sq_coverage_unflagged'])} | {pct(r['bias_sq_coverage_pooled'])} / "
            f"{pct(r['bias_sq_coverage_pooled_t'])} | "
            f"{r['tail_index_median']:.2f} | {r['verdict']} |")
    lines += ["", ("Columns: *truth below / above*: how often the true squared bias lay under the "
              "interval (the verdict's false alarms, when it is 0) or over it; *flagged*: "
              "measurements whose `ci_reliable` is False (M < 16 or tail index > 3); *pooled "
              "over 10*: the mean U of 10 measurements with the comparison table's interval "
              "(mean ± 1.96 √Σse² / 10, `analysis.stats.mean_with_known_se`) / with a "
              "Student-t interval across the 10 values; *tail index*: median of M Σ‖r‖⁴ / (Σ‖r‖²)²."), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figure


def plot_coverage(table: pd.DataFrame, fig_dir: Path) -> list[Path]:
    """Coverage against M, one panel per (interval, reference kind), a line per case:
    markers and line styles tell the bias sizes apart, the grey band is the target."""
    apply_theme()
    table = table.assign(panel=table["env"] + np.where(table["reference"] == "exact",
                                                       " (exact ∇J)", " (Monte Carlo ∇J)"))
    envs = list(dict.fromkeys(table["panel"]))
    fig, axes = plt.subplots(len(INTERVALS), len(envs), sharex=True, sharey=True,
                             figsize=(PAPER_WIDTH * 1.4, PANEL_HEIGHT * len(INTERVALS)),
                             squeeze=False)
    markers = {"zero": "o", "small": "s", "large": "^"}
    styles = {"zero": "-", "small": "--", "large": ":"}
    colours = {"zero": "C0", "small": "C1", "large": "C2"}
    for j, env in enumerate(envs):
        sub = table[table["panel"] == env]
        for i, (name, title) in enumerate(INTERVALS.items()):
            ax = axes[i, j]
            ax.axhspan(NOMINAL - TOLERANCE, NOMINAL + TOLERANCE, color="0.85", zorder=0,
                       label="target 95% ± 2")
            for bias in BIAS_ORDER:
                rows = sub[sub["bias"] == bias].sort_values("M")
                if rows.empty:
                    continue
                y = rows[f"{name}_coverage"].to_numpy()
                err = np.vstack([y - rows[f"{name}_coverage_lo"], rows[f"{name}_coverage_hi"] - y])
                ax.errorbar(rows["M"], y, yerr=err, marker=markers[bias], ls=styles[bias],
                            color=colours[bias], capsize=2, label=f"bias {bias}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(table["M"].unique()))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.minorticks_off()
            ax.set_ylim(0.6, 1.005)
            if i == 0:
                ax.set_title(env, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"coverage:\n{title}", fontsize=8)

    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.supxlabel("M, batch estimates per measurement", fontsize=9, y=0.06)
    fig.suptitle("Coverage of pgvar's 95% intervals (error bars: Wilson 95% over repeats)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return save_figure(fig, fig_dir, "calibration_coverage")
