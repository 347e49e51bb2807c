"""The bias of three habits of common policy-gradient code, against the exact gradient.

Each run measured once, at its initial policy. Runs are grouped into *cells* (env
settings, estimator, critic, policy init) and within a cell into habit and control runs,
paired by seed (same policy, same episodes). Habits: ``discount_weighting=false`` (drop
gamma^t), ``normalize_advantages=true``, ``truncation_as_termination=true`` (under the
discounted objective). Per run: relative squared bias, ``cos_ref``, ``scale`` =
<E g_hat, g>/||g||^2 and ``rel_perp_sq`` (``direction_columns``), relative variance; across
seeds: means with 95% intervals, cos(E g_hat, g) (``pooled_cosine``) and paired habit -
control differences. On tabular envs ``pgvar.exact_mean`` at each run's initial policy
gives the exact relative bias and the bias the habit adds, ||E g_habit - E g_control||/||g||.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.experiment import (Experiment, Verdict, combined_word, config_of,
                                 direction_columns, estimate_columns, inconclusive,
                                 paired_difference, pooled_cosine, pooled_cosine_difference,
                                 sqrt_estimate)
from analysis.figures import PANEL_HEIGHT, PAPER_WIDTH, error_bars, legend_below, save_figure
from analysis.loader import measured_rows
from analysis.render import format_ci, format_columns, markdown_table
from analysis.stats import mean_ci
from pgvar.exact_mean import ENVS_WITH_EXACT_MEAN, exact_gradient, expected_gradient
from pgvar.run import initial_env_and_policy
from pgvar.stats import sqrt_clipped

NAME = "practice_biases"
FLAGS = {  # habit -> (config column, value that switches the habit on)
    "drop gamma^t": ("estimator.discount_weighting", False),
    "normalise advantages": ("estimator.normalize_advantages", True),
    "truncation as termination": ("estimator.truncation_as_termination", True),
}
CELL_KEYS = ("env", "env.gamma", "env.horizon", "env.objective", "estimator", "estimator.lam",
             "training.critic.kind", "policy.init_scale")
CLAIMS = {
    "drop gamma^t": "The seed's update θ ← θ + α Σ_t ∇log π(a_t|s_t) G_t (no γ^t) is "
                    "presented as the unbiased REINFORCE estimator.",
    "normalise advantages": "The seed recommends “normalisation” against variance; common "
                            "code standardises advantages per batch.",
    "truncation as termination": "The seed's loop ends an episode on `done` and "
                                 "bootstraps nothing after it, time-limit cuts included.",
}
SMALL_REL_BIAS = 0.05  # a habit whose added relative bias stays below this is 'small'
MIN_SEEDS = 3  # fewer seeds than this: no verdict (inconclusive)
DIRECTION_TOL = 0.01  # |change of cos(E g_hat, grad J)| below this counts as 'same direction'


def as_bool(v: object) -> bool | None:
    """A logged flag as a bool (None when missing)."""
    if isinstance(v, str):
        return v.strip().lower() == "true"
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else bool(v)


def habit_of(row: pd.Series) -> str:
    """The habit a run has switched on, ``control`` for none, ``mixed`` for several."""
    on = [h for h, (col, value) in FLAGS.items() if col in row and as_bool(row[col]) == value]
    return "mixed" if len(on) > 1 else on[0] if on else "control"


def cell_label(row: pd.Series) -> str:
    """A short name for a cell: env, its non-default settings, estimator."""
    gamma = row.get("env.gamma")
    bits = [str(row["env"]), "disc." if row.get("env.objective") == "discounted" else "",
            f"γ={gamma:g}" if gamma is not None and np.isfinite(gamma) else ""]
    est = str(row["estimator"])
    if est == "gae" and np.isfinite(row.get("lam", np.nan)):
        est = f"gae({row['lam']:g})"
    return f"{' '.join(b for b in bits if b)} / {est}"


def per_run(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its first measured row with the derived columns, habit and cell;
    a configuration run twice (a sweep re-run into new job folders) counts once."""
    measured = measured_rows(frame)
    if measured.empty:
        return pd.DataFrame()
    first = measured.sort_values("step").groupby("run_id", sort=False).head(1)
    df = direction_columns(first).rename(columns={"rel_proj": "scale"}).reset_index(drop=True)
    df["habit"] = [habit_of(r) for _, r in df.iterrows()]
    df["cell"] = [cell_label(r) for _, r in df.iterrows()]
    df["cell_key"] = df[[k for k in CELL_KEYS if k in df.columns]].astype(str).agg("|".join, axis=1)
    df = df.drop_duplicates(subset=["cell_key", "habit", "seed"], keep="first")
    df = df.assign(rel_bias_sq=df["grad_rel_bias_sq"], rel_variance=df["grad_rel_variance"])
    return df[df["habit"] != "mixed"]


def predictable(row: pd.Series) -> bool:
    """Whether ``expected_gradient`` covers this run: a tabular env measured at step 0, no
    normalisation, an estimator whose weight has a known conditional mean (the critic ones
    with the exact, unperturbed critic)."""
    if row["step"] != 0 or row["env"] not in ENVS_WITH_EXACT_MEAN:
        return False
    if as_bool(row.get("estimator.normalize_advantages")):
        return False
    exact = row.get("training.critic.kind") == "exact" and not row.get(
        "training.critic.perturb_scale", 0.0)
    return row["estimator"] in ("reinforce_rtg", "rloo") or (
        row["estimator"] in ("value_baseline", "actor_critic", "gae") and exact)


def prediction(row: pd.Series) -> dict:
    """The exact relative squared bias of the run and the squared bias its habit adds to
    the control (both / ||g||^2), at its initial policy rebuilt from its config."""
    env, policy = initial_env_and_policy(config_of(row))
    lam = float(row["lam"]) if np.isfinite(row.get("lam", np.nan)) else 0.95
    g = exact_gradient(env, policy)
    e = expected_gradient(env, policy, row["estimator"], lam,
                          as_bool(row.get("estimator.discount_weighting")) is not False,
                          bool(as_bool(row.get("estimator.truncation_as_termination"))))
    control = expected_gradient(env, policy, row["estimator"], lam, True, False)
    ref2 = float(g @ g)
    return {"run_id": row["run_id"], "pred_rel_bias_sq": float((e - g) @ (e - g)) / ref2,
            "pred_added_sq": float((e - control) @ (e - control)) / ref2}


def arm_record(g: pd.DataFrame, h: pd.DataFrame, control: pd.DataFrame, arm: str) -> dict:
    """One (habit, cell, arm) row: means and intervals; the habit arm adds the paired
    differences from the control and the exact predictions."""
    b2 = mean_ci(g["rel_bias_sq"].to_numpy())
    rec = {"habit": h["habit"].iloc[0], "cell": h["cell"].iloc[0], "env": h["env"].iloc[0],
           "estimator": h["estimator"].iloc[0], "arm": arm, "n_seeds": int(g["seed"].nunique()),
           **estimate_columns("rel_bias", sqrt_estimate(b2)),
           "bias_distinguishable": bool(np.isfinite(b2.lo) and b2.lo > 0),
           **{k: v for m in ("scale", "cos_ref", "rel_variance")
              for k, v in estimate_columns(m, mean_ci(g[m].to_numpy())).items()},
           **estimate_columns("cos_mean", pooled_cosine(g, "scale")),
           **estimate_columns("dir_bias", sqrt_estimate(mean_ci(g["rel_perp_sq"].to_numpy()))),
           "pred_rel_bias": mean_root(g["pred_rel_bias_sq"])}
    if arm == "habit":
        rec["pred_added_bias"] = mean_root(g["pred_added_sq"])
        if not control.empty:
            for metric in ("rel_bias_sq", "cos_ref"):
                rec.update(estimate_columns(f"d_{metric}", paired_difference(h, control, metric)))
            rec.update(estimate_columns("d_cos_mean", pooled_cosine_difference(h, control, "scale")))
    return rec


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (habit, cell, arm), arm in {control, habit} (``arm_record``)."""
    pred = pd.DataFrame([prediction(r) for _, r in runs.iterrows() if predictable(r)],
                        columns=["run_id", "pred_rel_bias_sq", "pred_added_sq"])
    runs = runs.merge(pred, on="run_id", how="left")
    records = []
    for (key, _), h in runs[runs["habit"] != "control"].groupby(["cell_key", "habit"], sort=False):
        control = runs[(runs["cell_key"] == key) & (runs["habit"] == "control")]
        records += [arm_record(g, h, control, arm) for arm, g in (("control", control), ("habit", h))
                    if not g.empty]
    return pd.DataFrame.from_records(records)


def mean_root(x: pd.Series) -> float:
    x = x.dropna()
    return sqrt_clipped(float(x.mean())) if len(x) else math.nan


def habit_verdict(table: pd.DataFrame, habit: str) -> Verdict:
    """The verdict on one habit, from its cells. A cell shows the habit's bias when the
    paired difference of the relative squared bias from the control excludes 0.
    confirmed: every cell shows it and the control's bias is indistinguishable from 0 or
    the habit's added bias is at least SMALL_REL_BIAS; refuted: no cell shows it;
    qualified: otherwise."""
    t = table[(table["habit"] == habit)]
    hab, ctl = t[t["arm"] == "habit"], t[t["arm"] == "control"]
    if hab.empty or hab["n_seeds"].min() < MIN_SEEDS or "d_rel_bias_sq_lo" not in hab:
        return inconclusive("too few seeds or no control")
    shows = [bool(np.isfinite(r.d_rel_bias_sq_lo) and (r.d_rel_bias_sq_lo > 0 or r.d_rel_bias_sq_hi < 0))
             for r in hab.itertuples()]
    parts = []
    for _, r in hab.iterrows():
        c = ctl[ctl["cell"] == r["cell"]]
        added = (f", exact added bias {r['pred_added_bias']:.3f}"
                 if np.isfinite(r.get("pred_added_bias", np.nan)) else "")
        parts.append(f"{r['cell']}: relative bias {format_columns(r, 'rel_bias', style='f')} vs "
                     + (f"control {format_columns(c.iloc[0], 'rel_bias', style='f')}" if not c.empty
                        else "no control")
                     + f"{added}; scale along ∇J {format_columns(r, 'scale', 2, style='f')}"
                     f", cos(E ĝ, ∇J) {format_columns(r, 'cos_mean', style='f')}")
    control_clean = not ctl.empty and not ctl["bias_distinguishable"].any()
    big_added = [np.isfinite(a) and a >= SMALL_REL_BIAS for a in hab.get("pred_added_bias", [])]
    word = ("refuted" if not any(shows) else "confirmed" if all(shows) and (
        control_clean or (big_added and all(big_added))) else "qualified")
    return Verdict(word, "; ".join(parts) + "." + scale_clause(hab))


def scale_clause(hab: pd.DataFrame) -> str:
    """' In every cell the bias is a change of scale ...' when, in every cell, the habit's
    expected estimate points where the control's does (|Δ cos(E ĝ, ∇J)| < DIRECTION_TOL at
    both ends of its interval, or the interval holds 0)."""
    d_lo, d_hi = hab["d_cos_mean_lo"].to_numpy(float), hab["d_cos_mean_hi"].to_numpy(float)
    same = ((d_lo <= 0) & (d_hi >= 0)) | ((np.abs(d_lo) < DIRECTION_TOL) & (np.abs(d_hi) < DIRECTION_TOL))
    if not np.all(same) or not np.all(np.isfinite(d_lo)):
        return ""
    worst = float(np.nanmax(np.abs(np.concatenate([d_lo, d_hi]))))
    return (f" In every cell the bias is a change of scale (×{hab['scale'].min():.2f} to "
            f"×{hab['scale'].max():.2f} along ∇J) with the direction of E ĝ unchanged "
            f"(|Δ cos(E ĝ, ∇J)| ≤ {worst:.3f} at 95%).")


def verdict(table: pd.DataFrame) -> Verdict:
    """confirmed when every judged habit is, refuted when every one is, else qualified."""
    judged = {h: habit_verdict(table, h).word for h in FLAGS if h in set(table["habit"])}
    judged = {h: w for h, w in judged.items() if w != "inconclusive"}
    if not judged:
        return inconclusive("no habit could be judged")
    return Verdict(combined_word(list(judged.values())), "per habit ("
                   + ", ".join(f"{h}: {w}" for h, w in judged.items()) + "); numbers in the lines above")


TABLE_COLUMNS = [("rel_bias", "‖E ĝ − ∇J‖/‖∇J‖"), ("pred_rel_bias", "exact"),
                 ("scale", "scale s = ⟨E ĝ,∇J⟩/‖∇J‖²"), ("dir_bias", "‖E ĝ − s∇J‖/‖∇J‖"),
                 ("cos_mean", "cos(E ĝ, ∇J)"), ("cos_ref", "cos(ĝ, ∇J) per batch"),
                 ("rel_variance", "tr Cov/‖∇J‖²"), ("d_rel_bias_sq", "Δ rel. bias² vs control"),
                 ("pred_added_bias", "exact added bias")]


def markdown(table: pd.DataFrame, verdict: Verdict, preset: str) -> str:
    n = table["n_seeds"]
    out = [f"# Biases of common-code habits against the exact gradient ({preset} preset)", "",
           ("Each habit next to the same estimator without it (control), same seeds: same "
            "policy, same episodes. Mean over seeds (random initial policies) with 95% "
            f"bootstrap intervals; {n.min()}–{n.max()} seeds per row. 'exact' columns: the "
            "expectation by dynamic programming at the same policies (tabular envs, exact "
            "critic, no normalisation); 'exact added bias' = ‖E ĝ_habit − E ĝ_control‖/‖∇J‖. "
            "The relative bias splits into a part along ∇J (scale s, 1 when unbiased) and a "
            "part across it (‖E ĝ − s∇J‖/‖∇J‖, the bias left after the best rescaling): "
            "‖E ĝ − ∇J‖² = (s − 1)²‖∇J‖² + ‖E ĝ − s∇J‖²; cos(E ĝ, ∇J) is computed from the "
            "two means over seeds."), ""]
    for habit in [h for h in FLAGS if h in set(table["habit"])]:
        t = table[table["habit"] == habit]
        cells = [[r["cell"], r["arm"], *(format_ci(r.get(c, np.nan), r.get(f"{c}_lo", np.nan),
                                                   r.get(f"{c}_hi", np.nan), missing="—")
                                         for c, _ in TABLE_COLUMNS)] for _, r in t.iterrows()]
        out += [f"## {habit}", "", f"Claim: {CLAIMS[habit]}", "",
                *markdown_table(["cell", "arm", *(h for _, h in TABLE_COLUMNS)], cells), "",
                habit_verdict(table, habit).line(habit), ""]
    return "\n".join(out + [verdict.line(), ""])


PLOT_ROWS = (("rel_bias", "relative bias\n‖E ĝ − ∇J‖ / ‖∇J‖"),
             ("scale", "scale along ∇J\n⟨E ĝ, ∇J⟩ / ‖∇J‖²"),
             ("cos_mean", "direction\ncos(E ĝ, ∇J)"))
SHORT = {"reinforce_rtg": "rtg", "value_baseline": "V base", "actor_critic": "AC", "rloo": "RLOO",
         "reinforce": "REINF.", "tabular": "MDP", "lqr": "LQR"}


def tick_label(cell: str) -> str:
    """A short env name over a short estimator name, for the x axis."""
    env, _, est = cell.partition(" / ")
    env = env.split()[0]
    return f"{SHORT.get(env, env)}\n{'GAE' if est.startswith('gae') else SHORT.get(est, est)}"


def plot(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Rows: relative bias, scale along grad J, cosine of the expected estimate; one column
    per habit; control and habit side by side per cell with 95% intervals, the exact
    expectation as a cross where it is known."""
    habits = [h for h in FLAGS if h in set(table["habit"])]
    widths = [max(2, table.loc[table["habit"] == h, "cell"].nunique()) for h in habits]
    fig, axes = plt.subplots(len(PLOT_ROWS), len(habits), squeeze=False, sharex="col",
                             gridspec_kw={"width_ratios": widths},
                             figsize=(PAPER_WIDTH, 1.05 * PANEL_HEIGHT * len(PLOT_ROWS)))
    colours = dict(zip(("control", "habit"), sns.color_palette("tab10", 2)))
    for j, habit in enumerate(habits):
        t = table[table["habit"] == habit]
        cells = list(dict.fromkeys(t["cell"]))
        for i, (col, ylabel) in enumerate(PLOT_ROWS):
            ax = axes[i][j]
            for k, arm in enumerate(("control", "habit")):
                rows = t[t["arm"] == arm].set_index("cell").reindex(cells)
                x = np.arange(len(cells)) + (k - 0.5) * 0.3
                ax.errorbar(x, rows[col], yerr=np.nan_to_num(error_bars(rows, col)), fmt="o", ms=4,
                            capsize=2, color=colours[arm],
                            label="control (no habit)" if arm == "control" else "with the habit")
                if col == "rel_bias":
                    ax.plot(x, rows["pred_rel_bias"], "x", color="k", ms=5,
                            label="exact expectation (DP)")
            if col == "scale":
                ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
            if col == "cos_mean":
                ax.set_ylim(min(0.9, np.nanmin(t["cos_mean_lo"].to_numpy(float), initial=1.0) - 0.01), 1.01)
            ax.set_xticks(np.arange(len(cells)), [tick_label(c) for c in cells], fontsize=7)
            ax.set_ylabel(ylabel if j == 0 else "")
            ax.set_title(habit if i == 0 else "")
        axes[0][j].set_ylim(bottom=0)
    legend_below(fig, axes.flat, ncol=3)
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}_bias")


EXPERIMENT = Experiment("Biases of common-code habits", summarise, verdict, markdown,
                        select=per_run, figures=lambda table, runs, out_dir: plot(table, out_dir),
                        empty_reason="no run with a habit and its control")
analyze = EXPERIMENT.analyze
