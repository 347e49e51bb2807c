"""The bias of three habits of common policy-gradient code, against the exact gradient.

Each run measured once, at its initial policy. Runs are grouped into *cells* (env
settings, estimator, critic, policy init) and within a cell into habit and control runs,
paired by seed (same policy, same episodes). Habits: ``discount_weighting=false`` (drop
gamma^t), ``normalize_advantages=true``, ``truncation_as_termination=true`` (under the
discounted objective). Per run: relative squared bias, ``cos_ref``, ``scale`` =
<E g_hat, g>/||g||^2 and ``rel_perp_sq`` (``analysis.experiment.direction_columns``),
relative variance; across seeds: means with 95% intervals, ``cos_mean`` = cos(E g_hat, g)
(``pooled_cosine``) and paired habit - control differences. On tabular envs the exact
mean (``pgvar.exact_mean``) at each run's initial policy gives the exact relative bias
and the bias the habit adds to the control, ||E g_habit - E g_control|| / ||g||.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.experiment import (
    Experiment,
    Verdict,
    combined_word,
    config_of,
    direction_columns,
    estimate_columns,
    inconclusive,
    paired_difference,
    pooled_cosine,
    pooled_cosine_difference,
    sqrt_estimate,
)
from analysis.figures import PANEL_HEIGHT, PAPER_WIDTH, error_bars, legend_below, save_figure
from analysis.loader import measured_rows
from analysis.render import format_ci, format_columns, markdown_table
from analysis.stats import mean_ci
from pgvar.exact_mean import exact_gradient, expected_gradient
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


def habit_of(row: pd.Series) -> str:
    """The habit a run has switched on, ``control`` for none, ``mixed`` for several."""
    on = [h for h, (col, value) in FLAGS.items() if col in row and _as_bool(row[col]) == value]
    if len(on) > 1:
        return "mixed"
    return on[0] if on else "control"


def _as_bool(v: object) -> bool | None:
    if isinstance(v, str):
        return v.strip().lower() == "true"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return bool(v)


def cell_label(row: pd.Series) -> str:
    """A short name for a cell: env, its non-default settings, estimator."""
    bits = [str(row["env"])]
    if row.get("env.objective") == "discounted":
        bits.append("disc.")
    gamma = row.get("env.gamma")
    if gamma is not None and np.isfinite(gamma):
        bits.append(f"γ={gamma:g}")
    est = str(row["estimator"])
    if est == "gae" and np.isfinite(row.get("lam", np.nan)):
        est = f"gae({row['lam']:g})"
    return f"{' '.join(bits)} / {est}"


def per_run(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its first measured row with the derived columns, its habit and cell."""
    measured = measured_rows(frame)
    if measured.empty:
        return pd.DataFrame()
    first = measured.sort_values("step").groupby("run_id", sort=False).head(1)
    df = direction_columns(first).rename(columns={"rel_proj": "scale"}).reset_index(drop=True)
    df["habit"] = [habit_of(r) for _, r in df.iterrows()]
    keys = [k for k in CELL_KEYS if k in df.columns]
    df["cell"] = [cell_label(r) for _, r in df.iterrows()]
    df["cell_key"] = df[keys].astype(str).agg("|".join, axis=1)
    # the same configuration twice (a sweep re-run into new job folders) counts once
    df = df.drop_duplicates(subset=["cell_key", "habit", "seed"], keep="first")
    df["rel_bias_sq"] = df["grad_rel_bias_sq"]
    df["rel_variance"] = df["grad_rel_variance"]
    return df[df["habit"] != "mixed"]


def rebuild_initial(row: pd.Series):
    """The run's environment and initial policy (as ``pgvar-run`` built them), or None
    where the environment has no exact mean (not tabular)."""
    env, policy = initial_env_and_policy(config_of(row))
    return (env, policy) if hasattr(env, "expected_reward") else None


def predictable(row: pd.Series) -> bool:
    """Whether ``expected_gradient`` covers this run: a tabular env measured at step 0, no
    normalisation, an estimator whose weight has a known conditional mean (the critic ones
    with the exact, unperturbed critic)."""
    if row["step"] != 0 or row["env"] not in ("tabular", "chain"):
        return False
    if _as_bool(row.get("estimator.normalize_advantages")):
        return False
    est = row["estimator"]
    if est in ("reinforce_rtg", "rloo"):
        return True
    exact = row.get("training.critic.kind") == "exact" and not row.get(
        "training.critic.perturb_scale", 0.0)
    return est in ("value_baseline", "actor_critic", "gae") and exact


def predictions(runs: pd.DataFrame) -> pd.DataFrame:
    """Per predictable run: exact relative squared bias ``pred_rel_bias_sq`` and, for habit
    runs, the squared bias the habit adds to its control ``pred_added_sq`` (both / ||g||^2)."""
    out = []
    for _, row in runs.iterrows():
        if not predictable(row):
            continue
        built = rebuild_initial(row)
        if built is None:
            continue
        env, policy = built
        lam = float(row.get("lam", 0.95)) if np.isfinite(row.get("lam", np.nan)) else 0.95
        g = exact_gradient(env, policy)
        flags = {"discount_weighting": _as_bool(row.get("estimator.discount_weighting")) is not False,
                 "truncation_as_termination": bool(_as_bool(row.get(
                     "estimator.truncation_as_termination")))}
        e = expected_gradient(env, policy, row["estimator"], lam, **flags)
        control = expected_gradient(env, policy, row["estimator"], lam, True, False)
        ref2 = float(g @ g)
        out.append({"run_id": row["run_id"], "pred_rel_bias_sq": float((e - g) @ (e - g)) / ref2,
                    "pred_added_sq": float((e - control) @ (e - control)) / ref2})
    return pd.DataFrame(out, columns=["run_id", "pred_rel_bias_sq", "pred_added_sq"])


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (habit, cell, arm) with arm in {habit, control}: means and intervals of
    relative bias, scale, cosines and variance; habit rows add the paired differences from
    the control and the exact predictions where available."""
    pred = predictions(runs)
    runs = runs.merge(pred, on="run_id", how="left") if not pred.empty else runs.assign(
        pred_rel_bias_sq=np.nan, pred_added_sq=np.nan)
    records = []
    for (key, habit), h in runs[runs["habit"] != "control"].groupby(["cell_key", "habit"],
                                                                     sort=False):
        control = runs[(runs["cell_key"] == key) & (runs["habit"] == "control")]
        for arm, g in (("control", control), ("habit", h)):
            if g.empty:
                continue
            rec = {"habit": habit, "cell": h["cell"].iloc[0], "env": h["env"].iloc[0],
                   "estimator": h["estimator"].iloc[0], "arm": arm, "n_seeds": int(g["seed"].nunique())}
            b2 = mean_ci(g["rel_bias_sq"].to_numpy())
            rec.update(estimate_columns("rel_bias", sqrt_estimate(b2)))
            rec["bias_distinguishable"] = bool(np.isfinite(b2.lo) and b2.lo > 0)
            for metric in ("scale", "cos_ref", "rel_variance"):
                rec.update(estimate_columns(metric, mean_ci(g[metric].to_numpy())))
            rec.update(estimate_columns("cos_mean", pooled_cosine(g, "scale")))
            rec.update(estimate_columns("dir_bias", sqrt_estimate(mean_ci(g["rel_perp_sq"].to_numpy()))))
            rec["pred_rel_bias"] = _mean_root(g["pred_rel_bias_sq"])
            if arm == "habit":
                rec["pred_added_bias"] = _mean_root(g["pred_added_sq"])
                if not control.empty:
                    for metric in ("rel_bias_sq", "cos_ref"):
                        rec.update(estimate_columns(f"d_{metric}", paired_difference(h, control, metric)))
                    rec.update(estimate_columns("d_cos_mean", pooled_cosine_difference(h, control, "scale")))
            records.append(rec)
    return pd.DataFrame.from_records(records)


def _mean_root(x: pd.Series) -> float:
    x = x.dropna()
    return sqrt_clipped(float(x.mean())) if len(x) else math.nan


def habit_verdict(table: pd.DataFrame, habit: str) -> Verdict:
    """The verdict on one habit, from its cells.

    A cell shows the habit's bias when the paired difference of the relative squared bias
    from the control excludes 0. confirmed (the habit is a bias source of its own): every
    cell shows it and the control's bias is indistinguishable from 0 or the habit's added
    bias is at least SMALL_REL_BIAS; refuted: no cell shows it; qualified: otherwise.
    """
    t = table[(table["habit"] == habit)]
    hab, ctl = t[t["arm"] == "habit"], t[t["arm"] == "control"]
    if hab.empty or hab["n_seeds"].min() < MIN_SEEDS or "d_rel_bias_sq_lo" not in hab:
        return inconclusive("too few seeds or no control")
    shows = [bool(np.isfinite(r.d_rel_bias_sq_lo) and (r.d_rel_bias_sq_lo > 0 or r.d_rel_bias_sq_hi < 0))
             for r in hab.itertuples()]
    parts = []
    for r in hab.itertuples():
        c = ctl[ctl["cell"] == r.cell]
        ctl_txt = (f"control {format_columns(c.iloc[0], 'rel_bias', style='f')}"
                   if not c.empty else "no control")
        added = (f", exact added bias {r.pred_added_bias:.3f}"
                 if np.isfinite(getattr(r, "pred_added_bias", np.nan)) else "")
        row = r._asdict()
        parts.append(f"{r.cell}: relative bias {format_columns(row, 'rel_bias', style='f')} vs "
                     f"{ctl_txt}{added}; scale along ∇J {format_columns(row, 'scale', 2, style='f')}"
                     f", cos(E ĝ, ∇J) {format_columns(row, 'cos_mean', style='f')}")
    control_clean = all(not b for b in ctl["bias_distinguishable"]) if not ctl.empty else False
    big_added = [np.isfinite(a) and a >= SMALL_REL_BIAS for a in hab.get("pred_added_bias", [])]
    if not any(shows):
        word = "refuted"
    elif all(shows) and (control_clean or (big_added and all(big_added))):
        word = "confirmed"
    else:
        word = "qualified"
    return Verdict(word, "; ".join(parts) + "." + scale_clause(hab))


def scale_clause(hab: pd.DataFrame) -> str:
    """' Mostly a change of scale ...' when, in every cell, the habit's expected estimate
    points where the control's does (|Δ cos(E ĝ, ∇J)| < DIRECTION_TOL at both ends of its
    interval, or the interval contains 0) while its scale along ∇J differs."""
    d_lo, d_hi = hab["d_cos_mean_lo"].to_numpy(float), hab["d_cos_mean_hi"].to_numpy(float)
    same_direction = np.all(((d_lo <= 0) & (d_hi >= 0))
                            | ((np.abs(d_lo) < DIRECTION_TOL) & (np.abs(d_hi) < DIRECTION_TOL)))
    if not same_direction or not np.all(np.isfinite(d_lo)):
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
    summary = ", ".join(f"{h}: {w}" for h, w in judged.items())
    return Verdict(combined_word(list(judged.values())),
                   f"per habit ({summary}); numbers in the lines above")


def _cell(r: pd.Series, c: str) -> str:
    """A table cell: ``format_ci``, with ``0`` for an exact zero without interval."""
    v, lo, hi = r.get(c, np.nan), r.get(f"{c}_lo", np.nan), r.get(f"{c}_hi", np.nan)
    return "0" if np.isfinite(v) and abs(v) < 1e-9 and not np.isfinite(lo) else format_ci(
        v, lo, hi, missing="—")


def habit_table(t: pd.DataFrame) -> list[str]:
    cols = [("rel_bias", "‖E ĝ − ∇J‖/‖∇J‖"), ("pred_rel_bias", "exact"),
            ("scale", "scale s = ⟨E ĝ,∇J⟩/‖∇J‖²"), ("dir_bias", "‖E ĝ − s∇J‖/‖∇J‖"),
            ("cos_mean", "cos(E ĝ, ∇J)"),
            ("cos_ref", "cos(ĝ, ∇J) per batch"), ("rel_variance", "tr Cov/‖∇J‖²"),
            ("d_rel_bias_sq", "Δ rel. bias² vs control"), ("pred_added_bias", "exact added bias")]
    return markdown_table(["cell", "arm", *(h for _, h in cols)],
                          [[r["cell"], r["arm"], *(_cell(r, c) for c, _ in cols)]
                           for _, r in t.iterrows()])


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
            "two means over seeds."),
           ""]
    for habit in FLAGS:
        t = table[table["habit"] == habit]
        if t.empty:
            continue
        out += [f"## {habit}", "", f"Claim: {CLAIMS[habit]}", "", *habit_table(t), "",
                habit_verdict(table, habit).line(habit), ""]
    out += [verdict.line(), ""]
    return "\n".join(out)


SHORT_ESTIMATOR = {"reinforce_rtg": "rtg", "value_baseline": "V base", "actor_critic": "AC",
                   "rloo": "RLOO", "reinforce": "REINF."}
PLOT_ROWS = (("rel_bias", "relative bias\n‖E ĝ − ∇J‖ / ‖∇J‖"),
             ("scale", "scale along ∇J\n⟨E ĝ, ∇J⟩ / ‖∇J‖²"),
             ("cos_mean", "direction\ncos(E ĝ, ∇J)"))


SHORT_ENV = {"tabular": "MDP", "lqr": "LQR"}


def tick_label(cell: str) -> str:
    """A short env name over a short estimator name, for the x axis."""
    env_part, _, est = cell.partition(" / ")
    est = SHORT_ESTIMATOR.get(est, "GAE" if est.startswith("gae") else est)
    env = env_part.split()[0]
    return f"{SHORT_ENV.get(env, env)}\n{est}"


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
            if col == "rel_bias":
                ax.set_ylim(bottom=0)
            if col == "scale":
                ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
            if col == "cos_mean":
                low = np.nanmin(t["cos_mean_lo"].to_numpy(dtype=float), initial=1.0)
                ax.set_ylim(min(0.9, low - 0.01), 1.01)
            ax.set_xlim(-0.6, len(cells) - 0.4)
            ax.set_xticks(np.arange(len(cells)))
            ax.set_xticklabels([tick_label(c) for c in cells], fontsize=7)
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(habit)
    legend_below(fig, axes.flat, ncol=3)
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}_bias")


EXPERIMENT = Experiment("Biases of common-code habits", summarise, verdict, markdown,
                        select=per_run, figures=lambda table, runs, out_dir: plot(table, out_dir),
                        empty_reason="no run with a habit and its control")
analyze = EXPERIMENT.analyze
