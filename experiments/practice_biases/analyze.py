"""The bias of three habits of common policy-gradient code against the exact gradient, each
habit's runs paired by seed with its control's within a *cell* (README.md: the design)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import experiment as xp
from analysis.figures import interval_grid
from analysis.render import format_ci, format_columns, frame_table
from analysis.stats import mean_ci
from pgvar.exact_mean import ENVS_WITH_EXACT_MEAN, exact_gradient, expected_gradient
from pgvar.stats import sqrt_clipped

FLAGS = {  # habit -> (config column, value that switches the habit on)
    "drop gamma^t": ("estimator.discount_weighting", False),
    "normalise advantages": ("estimator.normalize_advantages", True),
    "truncation as termination": ("estimator.truncation_as_termination", True),
}
CELL_KEYS = ("env", "env.gamma", "env.horizon", "env.objective", "estimator", "estimator.lam",
             "training.critic.kind", "policy.init_scale")
CLAIMS = {"drop gamma^t": "The text's update θ ← θ + α Σ_t ∇log π(a_t|s_t) G_t (no γ^t) is "
                          "presented as the unbiased REINFORCE estimator.",
          "normalise advantages": "The text recommends “normalisation” against variance.",
          "truncation as termination": "The text's loop ends an episode on `done`, time-limit "
                                       "cuts included, and bootstraps nothing after it."}
SMALL_REL_BIAS = 0.05  # a habit whose added relative bias stays below this is 'small'
MIN_SEEDS = 3  # fewer seeds than this: no verdict (inconclusive)
DIRECTION_TOL = 0.01  # |change of cos(E g_hat, grad J)| below this counts as 'same direction'


def cell_label(row: pd.Series) -> str:
    """A short name for a cell: env, its non-default settings, estimator."""
    gamma, est = row.get("env.gamma"), str(row["estimator"])
    bits = [str(row["env"]), "disc." if row.get("env.objective") == "discounted" else "",
            f"γ={gamma:g}" if gamma is not None and np.isfinite(gamma) else ""]
    est = f"gae({row['lam']:g})" if est == "gae" and np.isfinite(row.get("lam", np.nan)) else est
    return f"{' '.join(b for b in bits if b)} / {est}"


def per_run(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its first measured row with the derived columns, ``habit``
    (``control`` for none; runs with several are left out) and ``cell``; a configuration
    run twice (a sweep re-run into new job folders) counts once."""
    df = xp.direction_columns(xp.first_measurements(frame)).rename(columns={"rel_proj": "scale"})
    on = [[h for h, (col, value) in FLAGS.items() if col in r and xp.logged_bool(r[col]) == value]
          for _, r in df.iterrows()]
    df = df.assign(habit=[h[0] if len(h) == 1 else "control" if not h else "mixed" for h in on],
                   cell=[cell_label(r) for _, r in df.iterrows()],
                   cell_key=df[[k for k in CELL_KEYS if k in df]].astype(str).agg("|".join, axis=1),
                   rel_bias_sq=df["grad_rel_bias_sq"], rel_variance=df["grad_rel_variance"])
    return xp.one_run_each(df[df["habit"] != "mixed"], ["cell_key", "habit", "seed"])


def prediction(row: pd.Series) -> dict:
    """The run's exact relative squared bias and the one its habit adds to the control, at
    its rebuilt initial policy, where ``expected_gradient`` covers it; NaN elsewhere."""
    est, exact = row["estimator"], row.get("training.critic.kind") == "exact" and not row.get(
        "training.critic.perturb_scale", 0)
    known = est in ("reinforce_rtg", "rloo") or exact and est in ("value_baseline", "actor_critic", "gae")
    if row["step"] != 0 or row["env"] not in ENVS_WITH_EXACT_MEAN or not known or xp.logged_bool(
            row.get("estimator.normalize_advantages")):
        return {"pred_rel_bias_sq": math.nan, "pred_added_sq": math.nan}
    env, policy = xp.run_env_and_policy(row)
    lam = float(row["lam"]) if np.isfinite(row.get("lam", np.nan)) else 0.95
    g = exact_gradient(env, policy)
    e = expected_gradient(env, policy, row["estimator"], lam,
                          xp.logged_bool(row.get("estimator.discount_weighting")) is not False,
                          bool(xp.logged_bool(row.get("estimator.truncation_as_termination"))))
    control = expected_gradient(env, policy, row["estimator"], lam, True, False)
    return {"pred_rel_bias_sq": float((e - g) @ (e - g) / (g @ g)),
            "pred_added_sq": float((e - control) @ (e - control) / (g @ g))}


def arm_record(g: pd.DataFrame, h: pd.DataFrame, control: pd.DataFrame, arm: str) -> dict:
    """One (habit, cell, arm) row: means and intervals; the habit arm adds the paired
    differences from the control and the exact added bias."""
    b2 = mean_ci(g["rel_bias_sq"].to_numpy())
    mean_root = {c: sqrt_clipped(float(g[c].mean())) for c in ("pred_rel_bias_sq", "pred_added_sq")}
    rec = {**h.iloc[0][["habit", "cell", "env", "estimator"]].to_dict(), "arm": arm,
           "n_seeds": int(g["seed"].nunique()), **xp.estimate_columns("rel_bias", xp.sqrt_estimate(b2)),
           "bias_distinguishable": bool(np.isfinite(b2.lo) and b2.lo > 0),
           **xp.mean_columns(g, ("scale", "cos_ref", "rel_variance")),
           **xp.estimate_columns("cos_mean", xp.pooled_cosine(g, "scale")),
           **xp.estimate_columns("dir_bias", xp.sqrt_estimate(mean_ci(g["rel_perp_sq"].to_numpy()))),
           "pred_rel_bias": mean_root["pred_rel_bias_sq"]}
    if arm == "habit" and not control.empty:
        rec.update({"pred_added_bias": mean_root["pred_added_sq"],
                    **xp.paired_difference_columns(h, control, ("rel_bias_sq", "cos_ref"), "scale")})
    return rec


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (habit, cell, arm), arm in {control, habit} (``arm_record``)."""
    runs = pd.concat([runs, pd.DataFrame([prediction(r) for _, r in runs.iterrows()], index=runs.index)], axis=1)
    records = []
    for (key, _), h in runs[runs["habit"] != "control"].groupby(["cell_key", "habit"], sort=False):
        control = runs[(runs["cell_key"] == key) & (runs["habit"] == "control")]
        records += [arm_record(g, h, control, arm) for arm, g in (("control", control), ("habit", h))
                    if not g.empty]
    return pd.DataFrame.from_records(records)


def habit_rows(table: pd.DataFrame, habit: str) -> pd.DataFrame | None:
    """The habit arm's rows of ``habit``, or None when they cannot be judged."""
    hab = table[(table["habit"] == habit) & (table["arm"] == "habit")]
    return hab if len(hab) and hab["n_seeds"].min() >= MIN_SEEDS and "d_rel_bias_sq_lo" in hab else None


def bias_verdict(table: pd.DataFrame, habit: str) -> xp.Verdict:
    """Adds bias: confirmed when every cell's paired Δ relative squared bias excludes 0 and
    the control is unbiased or the exact added bias >= SMALL_REL_BIAS; refuted when none does."""
    hab, ctl = habit_rows(table, habit), table[(table["habit"] == habit) & (table["arm"] == "control")]
    if hab is None:
        return xp.inconclusive("too few seeds or no control")
    shows = [xp.estimate_of(r, "d_rel_bias_sq").excludes(0.0) for _, r in hab.iterrows()]
    big = [np.isfinite(a) and a >= SMALL_REL_BIAS for a in hab.get("pred_added_bias", [])]
    clean = not ctl.empty and not ctl["bias_distinguishable"].any()
    word = "refuted" if not any(shows) else "confirmed" if all(shows) and (
        clean or (big and all(big))) else "qualified"
    ctl = ctl.set_index("cell")
    return xp.Verdict(word, "; ".join(
        f"{r['cell']}: relative bias {format_columns(r, 'rel_bias', style='f')} vs control "
        f"{format_columns(ctl.reindex([r['cell']]).iloc[0], 'rel_bias', style='f')}, exact added "
        f"{format_ci(r.get('pred_added_bias', math.nan), math.nan, math.nan)}; "
        f"scale {format_columns(r, 'scale', 2, style='f')}" for _, r in hab.iterrows()))


def direction_verdict(table: pd.DataFrame, habit: str) -> xp.Verdict:
    """Turns E ĝ from the control's direction: confirmed when every cell's Δ cos(E ĝ, ∇J)
    lies beyond ±DIRECTION_TOL, refuted when every one holds 0 or lies within it."""
    hab = habit_rows(table, habit)
    if hab is None or not np.isfinite(hab["d_cos_mean_lo"].to_numpy(float)).all():
        return xp.inconclusive("too few seeds or no control")
    lo, hi = hab["d_cos_mean_lo"].to_numpy(float), hab["d_cos_mean_hi"].to_numpy(float)
    kept = ((lo <= 0) & (hi >= 0)) | ((np.abs(lo) < DIRECTION_TOL) & (np.abs(hi) < DIRECTION_TOL))
    word = "confirmed" if ((hi < -DIRECTION_TOL) | (lo > DIRECTION_TOL)).all() else (
        "refuted" if kept.all() else "qualified")
    return xp.Verdict(word, "; ".join(f"{r['cell']}: Δ cos(E ĝ, ∇J) {format_columns(r, 'd_cos_mean', 2, sign=True)}"
                                      for _, r in hab.iterrows()))


FINDINGS = [("drop gamma^t", "adds bias", bias_verdict, xp.TESTED),
            ("drop gamma^t", "turns E ĝ", direction_verdict, xp.EXTRA),
            ("normalise advantages", "adds bias", bias_verdict, xp.BY_CONSTRUCTION),
            ("normalise advantages", "turns E ĝ", direction_verdict, xp.TESTED),
            ("truncation as termination", "adds bias", bias_verdict, xp.TESTED),
            ("truncation as termination", "turns E ĝ", direction_verdict, xp.EXTRA)]


def findings(table: pd.DataFrame) -> list[xp.Finding]:
    """Every habit's findings (``FINDINGS``) for the habits the runs hold."""
    return [xp.Finding(f"{habit}: {what}", v.word, v.reason, kind)
            for habit, what, judge, kind in FINDINGS if habit in set(table["habit"])
            for v in [judge(table, habit)]]


COLUMNS = [("rel_bias", "‖E ĝ − ∇J‖/‖∇J‖"), ("pred_rel_bias", "exact"),
           ("scale", "scale s = ⟨E ĝ,∇J⟩/‖∇J‖²"), ("dir_bias", "‖E ĝ − s∇J‖/‖∇J‖"),
           ("cos_mean", "cos(E ĝ, ∇J)"), ("cos_ref", "cos(ĝ, ∇J) per batch"),
           ("rel_variance", "tr Cov/‖∇J‖²"), ("d_rel_bias_sq", "Δ rel. bias² vs control"),
           ("d_cos_mean", "Δ cos(E ĝ, ∇J)"), ("pred_added_bias", "exact added bias")]


def markdown(table: pd.DataFrame, verdict: xp.Verdict, preset: str) -> str:
    out = [f"# Biases of common-code habits against the exact gradient ({preset} preset)", "",
           (f"Each habit beside its control (same seeds, policies, episodes); {table['n_seeds'].min()}+ "
            "seeds per row, 95% intervals. 'exact': by dynamic programming (tabular, exact "
            "critic); 'exact added bias' = ‖E ĝ_habit − E ĝ_control‖/‖∇J‖. ‖E ĝ − ∇J‖² = "
            "(s − 1)²‖∇J‖² + ‖E ĝ − s∇J‖²: bias along ∇J (scale s) and across it."), ""]
    for habit in [h for h in FLAGS if h in set(table["habit"])]:
        out += [f"## {habit}", "", f"Claim: {CLAIMS[habit]}", "", *frame_table(
            table[table["habit"] == habit], {"cell": "cell", "arm": "arm", **{h: c for c, h in COLUMNS}},
            missing="—"), ""]
    return "\n".join(out + xp.findings_section(findings(table), verdict))


SHORT = {"tabular": "MDP", "lqr": "LQR", "reinforce_rtg": "rtg", "value_baseline": "V base",
         "actor_critic": "AC", "gae": "GAE", "rloo": "RLOO"}  # tick labels: env over estimator
EXPERIMENT = xp.Experiment(
    "Biases of common-code habits", summarise, lambda table: xp.headline_verdict(findings(table)),
    markdown, select=per_run, empty_reason="no run with a habit and its control",
    figures=lambda table, runs, out_dir: interval_grid(
        table.assign(cell=[f"{SHORT.get(e, e)}\n{SHORT.get(s, s)}" for e, s in zip(table["env"], table["estimator"])]), "habit", "cell",
        [("rel_bias", "relative bias\n‖E ĝ − ∇J‖ / ‖∇J‖"), ("scale", "scale along ∇J\n⟨E ĝ, ∇J⟩ / ‖∇J‖²"),
         ("cos_mean", "direction\ncos(E ĝ, ∇J)")], out_dir, "practice_biases_bias", hue="arm",
        levels={"scale": 1.0}, marks={"rel_bias": "pred_rel_bias"}))
analyze = EXPERIMENT.analyze
