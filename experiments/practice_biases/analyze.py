"""The bias of three habits of common policy-gradient code, against the exact gradient.

``analyze(frame, out, preset)`` is called by ``pgvar-reproduce practice_biases`` with the
tidy frame of ``analysis.loader.load_runs``. Each run measured once, at its initial
policy. Runs are grouped into *cells* (same env settings, estimator, critic and policy
init) and, within a cell, into the habit runs and the control runs (no habit), paired by
seed: the same seed means the same policy and the same measured episodes.

The habits (an estimator option each, see ``pgvar.estimators.EstimatorConfig``):

- ``drop gamma^t``: ``discount_weighting=false``;
- ``normalise advantages``: ``normalize_advantages=true``;
- ``truncation as termination``: ``truncation_as_termination=true`` (under the
  ``discounted`` objective; under ``finite`` it changes nothing).

Per run, against the exact gradient g = grad J: the relative squared bias U/||g||^2
(unbiased, may be < 0), the mean per-batch cosine ``cos_ref``, ``scale`` =
<E g_hat, g>/||g||^2 (1 when unbiased), the squared part across g ``rel_perp_sq`` =
||E g_hat - scale g||^2/||g||^2 (both from the logged statistics without the noise floor,
as in ``experiments/ppo_clip/analyze.py``) and the relative variance. Across seeds: means
with 95% bootstrap intervals (``analysis.stats.mean_ci``), the cosine of the expected
estimate ``cos_mean`` = p/sqrt(p^2 + q) from the means p of ``scale`` and q of
``rel_perp_sq``, and paired habit - control differences.

Where the expectation is computable by dynamic programming (tabular environments,
estimators whose per-step weight has a known conditional mean given (s_t, a_t) with the
exact critic, no normalisation) the analysis also predicts the relative bias exactly at
each run's initial policy (``expected_gradient``), and the bias the habit adds to the
control, ||E g_habit - E g_control|| / ||g||, which the logged statistics cannot give.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from analysis.figures import PANEL_HEIGHT, PAPER_WIDTH, apply_theme, save_figure
from analysis.loader import measured_rows
from analysis.stats import Estimate, bootstrap_interval, mean_ci

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


# ----------------------------------------------------------------------------- per run


def direction_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``scale`` = <g_bar, g>/||g||^2 and ``rel_sq_norm`` = (||g_bar||^2 - trCov/M)/||g||^2,
    both unbiased: ||g_bar||^2 = snr trCov, ||g_bar - g||^2 = U + trCov/M + SE_ref^2."""
    df = df.copy()
    var = df["grad_variance"].astype(float)
    m = df["n_estimates"].astype(float)
    se2 = df["ref_se"].fillna(0.0).astype(float) ** 2 if "ref_se" in df else 0.0
    ref2 = (df["ref_norm"].astype(float) ** 2).where(df["ref_norm"] > 0)
    mean_sq = df["snr"].astype(float) * var
    dist_sq = df["grad_bias_sq"].astype(float) + var / m + se2
    df["scale"] = (mean_sq + ref2 - dist_sq) / 2.0 / ref2
    df["rel_sq_norm"] = (mean_sq - var / m) / ref2
    df["rel_perp_sq"] = df["rel_sq_norm"] - df["scale"] ** 2  # ||E g_hat - scale g||^2/||g||^2
    return df


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
    df = direction_columns(first).reset_index(drop=True)
    df["habit"] = [habit_of(r) for _, r in df.iterrows()]
    keys = [k for k in CELL_KEYS if k in df.columns]
    df["cell"] = [cell_label(r) for _, r in df.iterrows()]
    df["cell_key"] = df[keys].astype(str).agg("|".join, axis=1)
    # the same configuration twice (a sweep re-run into new job folders) counts once
    df = df.drop_duplicates(subset=["cell_key", "habit", "seed"], keep="first")
    df["rel_bias_sq"] = df["grad_rel_bias_sq"]
    df["rel_variance"] = df["grad_rel_variance"]
    return df[df["habit"] != "mixed"]


# ----------------------------------------------------------------------------- exact expectations


def _env_kwargs(row: pd.Series) -> dict[str, object]:
    """``make_env`` keyword arguments from a run's flattened ``env.*`` config columns."""
    kwargs = {}
    for col, value in row.items():
        if not str(col).startswith("env.") or col == "env.name":
            continue
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, float) and value.is_integer() and col != "env.gamma":
            value = int(value)
        kwargs[str(col)[4:]] = value
    return kwargs


def rebuild_initial(row: pd.Series):
    """The run's environment and its initial policy (as ``pgvar-run`` built them), or None."""
    from pgvar.config import PolicySettings, build_policy
    from pgvar.envs.registry import make_env
    from pgvar.seeding import derive_seed

    env = make_env(str(row["env.name"]), **_env_kwargs(row))
    if not hasattr(env, "expected_reward"):
        return None
    settings = PolicySettings(init_scale=float(row.get("policy.init_scale", 0.0) or 0.0))
    policy = build_policy(env, settings, derive_seed(int(row["seed"]), "policy"))
    return env, policy


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


def step_weights(env, pi: torch.Tensor, estimator: str, lam: float, discounted: bool,
                 bootstrap_cut: bool) -> list[torch.Tensor]:
    """W_t(s, a) = E[weight_t | s_t = s, a_t = a] for t < T (before gamma^t), exact critic.

    Under "finite" (or a tail that is not bootstrapped) an estimator of the reward-to-go
    family has mean Q^(T-t), the value with T-t steps left. Under "discounted" with the
    bootstrap, Q (infinite horizon). With the truncation habit, a critic estimator whose
    advantage is GAE(lam) (value_baseline: lam = 1, actor_critic: 0) loses the cut's tail:
    Q - (gamma lam)^(T-1-t) gamma E[V(s_T) | s_t, a_t].
    """
    T, gamma = env.horizon, env.gamma
    P, r = env.P, env.expected_reward
    P_pi = torch.einsum("sa,sat->st", pi, P)
    finite_q, v = [], torch.zeros(env.n_states, dtype=P.dtype)
    for _ in range(T):  # finite_q[k-1] = Q^(k)
        q = r + gamma * P @ v
        finite_q.append(q)
        v = (pi * q).sum(-1)
    if not discounted:
        return [finite_q[T - 1 - t] for t in range(T)]
    V = torch.linalg.solve(torch.eye(env.n_states, dtype=P.dtype) - gamma * P_pi, (pi * r).sum(-1))
    Q = r + gamma * P @ V
    if bootstrap_cut:
        return [Q] * T
    if estimator in ("reinforce_rtg", "rloo"):
        return [finite_q[T - 1 - t] for t in range(T)]
    lam_eff = {"value_baseline": 1.0, "actor_critic": 0.0}.get(estimator, lam)
    weights, future_v = [], V.clone()  # future_v = P_pi^(T-1-t) V, built from t = T-1 down
    for t in reversed(range(T)):
        weights.append(Q - (gamma * lam_eff) ** (T - 1 - t) * gamma * (P @ future_v))
        future_v = P_pi @ future_v
    return weights[::-1]


def expected_gradient(env, policy, estimator: str, lam: float, discount_weighting: bool,
                      truncation_as_termination: bool) -> torch.Tensor:
    """E[g_hat] exactly: grad over theta of sum_{t<T} c_t E_{s~d_t, a~pi}[log pi(a|s) W_t(s, a)]
    with d_t and W_t held fixed, c_t = gamma^t (or 1 without discount weighting)."""
    theta = _logits64(policy)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    discounted = env.objective == "discounted"
    W = step_weights(env, pi, estimator, lam, discounted,
                     bootstrap_cut=discounted and not truncation_as_termination)
    P_pi = torch.einsum("sa,sat->st", pi, env.P)
    d, total = env.mu.clone(), torch.zeros((), dtype=torch.float64)
    for t in range(env.horizon):
        c = env.gamma ** t if discount_weighting else 1.0
        total = total + c * (d[:, None] * pi * logp * W[t]).sum()
        d = d @ P_pi
    return torch.autograd.grad(total, theta)[0].reshape(-1)


def exact_gradient(env, policy) -> torch.Tensor:
    """grad J at the tabular softmax policy's logits, in float64."""
    theta = _logits64(policy)
    J = env.objective_from_probs(torch.softmax(theta, -1))
    return torch.autograd.grad(J, theta)[0].reshape(-1)


def _logits64(policy) -> torch.Tensor:
    """The tabular softmax policy's logits as a float64 leaf tensor (gradients in float64)."""
    return next(policy.parameters()).detach().to(torch.float64).requires_grad_(True)


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


# ----------------------------------------------------------------------------- across seeds


def _root(est: Estimate) -> Estimate:
    return est.map(lambda v: math.sqrt(max(v, 0.0)) if np.isfinite(v) else v)


def paired(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> Estimate:
    """Mean over seeds of metric(a) - metric(b), same seed, 95% interval."""
    j = a.set_index("seed")[metric].to_frame("a").join(b.set_index("seed")[metric].rename("b"),
                                                       how="inner")
    return mean_ci((j["a"] - j["b"]).to_numpy())


def _cosine_of_means(scale: np.ndarray, perp_sq: np.ndarray, axis: int = -1) -> np.ndarray:
    """p / sqrt(p^2 + q) with p the mean scale <E g_hat, g>/||g||^2 and q the mean squared
    perpendicular part ||E g_hat - p g||^2/||g||^2 over seeds (means of unbiased estimates)."""
    p = np.mean(scale, axis=axis)
    return p / np.sqrt(p ** 2 + np.clip(np.mean(perp_sq, axis=axis), 0.0, None))


def pooled_cosine(g: pd.DataFrame) -> Estimate:
    """cos(E g_hat, g) from the mean scale and mean squared perpendicular part over seeds
    (the per-seed ratio of two noisy estimates would be biased upwards where ||E g_hat||^2
    is poorly determined), with a paired bootstrap interval over seeds."""
    a, b = g["scale"].to_numpy(float), g["rel_perp_sq"].to_numpy(float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2:
        return Estimate(float(_cosine_of_means(a, b)) if a.size else math.nan, math.nan,
                        math.nan, int(a.size))
    lo, hi = bootstrap_interval((a, b), _cosine_of_means, paired=True, seed=0)
    return Estimate(float(_cosine_of_means(a, b)), lo, hi, int(a.size))


def pooled_cosine_difference(h: pd.DataFrame, c: pd.DataFrame) -> Estimate:
    """pooled_cosine(h) - pooled_cosine(c) over the seeds both have, paired bootstrap."""
    cols = ["scale", "rel_perp_sq"]
    j = h[["seed", *cols]].merge(c[["seed", *cols]], on="seed", suffixes=("", "_c")).dropna()
    arrays = tuple(j[col].to_numpy(float) for col in ("scale", "rel_perp_sq", "scale_c",
                                                       "rel_perp_sq_c"))

    def diff(a, b, x, y, axis=-1):
        return _cosine_of_means(a, b, axis) - _cosine_of_means(x, y, axis)

    if len(j) < 2:
        return Estimate(float(diff(*arrays)) if len(j) else math.nan, math.nan, math.nan, len(j))
    lo, hi = bootstrap_interval(arrays, diff, paired=True, seed=0)
    return Estimate(float(diff(*arrays)), lo, hi, len(j))


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
            rec.update(_columns("rel_bias", _root(b2)))
            rec["bias_distinguishable"] = bool(np.isfinite(b2.lo) and b2.lo > 0)
            for metric in ("scale", "cos_ref", "rel_variance"):
                rec.update(_columns(metric, mean_ci(g[metric].to_numpy())))
            rec.update(_columns("cos_mean", pooled_cosine(g)))
            rec.update(_columns("dir_bias", _root(mean_ci(g["rel_perp_sq"].to_numpy()))))
            rec["pred_rel_bias"] = _mean_root(g["pred_rel_bias_sq"])
            if arm == "habit":
                rec["pred_added_bias"] = _mean_root(g["pred_added_sq"])
                if not control.empty:
                    for metric in ("rel_bias_sq", "cos_ref"):
                        rec.update(_columns(f"d_{metric}", paired(h, control, metric)))
                    rec.update(_columns("d_cos_mean", pooled_cosine_difference(h, control)))
            records.append(rec)
    return pd.DataFrame.from_records(records)


def _columns(name: str, est: Estimate) -> dict[str, float]:
    return {name: est.value, f"{name}_lo": est.lo, f"{name}_hi": est.hi}


def _mean_root(x: pd.Series) -> float:
    x = x.dropna()
    return math.sqrt(max(float(x.mean()), 0.0)) if len(x) else math.nan


# ----------------------------------------------------------------------------- verdicts


def habit_verdict(table: pd.DataFrame, habit: str) -> str:
    """One verdict line for a habit, from its cells.

    A cell shows the habit's bias when the paired difference of the relative squared bias
    from the control excludes 0. confirmed (the habit is a bias source of its own): every
    cell shows it and the control's bias is indistinguishable from 0 or the habit's added
    bias is at least SMALL_REL_BIAS; refuted: no cell shows it; qualified: otherwise.
    """
    t = table[(table["habit"] == habit)]
    hab, ctl = t[t["arm"] == "habit"], t[t["arm"] == "control"]
    if hab.empty or hab["n_seeds"].min() < MIN_SEEDS or "d_rel_bias_sq_lo" not in hab:
        return f"Verdict ({habit}): inconclusive — too few seeds or no control."
    shows = [bool(np.isfinite(r.d_rel_bias_sq_lo) and (r.d_rel_bias_sq_lo > 0 or r.d_rel_bias_sq_hi < 0))
             for r in hab.itertuples()]
    parts = []
    for r in hab.itertuples():
        c = ctl[ctl["cell"] == r.cell]
        ctl_txt = (f"control {c.rel_bias.iloc[0]:.3f} [{c.rel_bias_lo.iloc[0]:.3f}, "
                   f"{c.rel_bias_hi.iloc[0]:.3f}]") if not c.empty else "no control"
        added = (f", exact added bias {r.pred_added_bias:.3f}"
                 if np.isfinite(getattr(r, "pred_added_bias", np.nan)) else "")
        parts.append(f"{r.cell}: relative bias {r.rel_bias:.3f} [{r.rel_bias_lo:.3f}, "
                     f"{r.rel_bias_hi:.3f}] vs {ctl_txt}{added}; scale along ∇J {r.scale:.2f} "
                     f"[{r.scale_lo:.2f}, {r.scale_hi:.2f}], cos(E ĝ, ∇J) {r.cos_mean:.3f} "
                     f"[{r.cos_mean_lo:.3f}, {r.cos_mean_hi:.3f}]")
    control_clean = all(not b for b in ctl["bias_distinguishable"]) if not ctl.empty else False
    big_added = [np.isfinite(a) and a >= SMALL_REL_BIAS for a in hab.get("pred_added_bias", [])]
    if not any(shows):
        word = "refuted"
    elif all(shows) and (control_clean or (big_added and all(big_added))):
        word = "confirmed"
    else:
        word = "qualified"
    return f"Verdict ({habit}): {word} — " + "; ".join(parts) + "." + scale_clause(hab)


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


def overall_verdict(lines: list[str]) -> str:
    """confirmed when every habit is, refuted when every habit is, else qualified."""
    words = [line.split(":")[1].split("—")[0].strip() for line in lines]
    words = [w for w in words if w != "inconclusive"]
    if not words:
        return "Verdict: inconclusive — no habit could be judged."
    word = words[0] if len(set(words)) == 1 else "qualified"
    summary = ", ".join(f"{h}: {w}" for h, w in zip(
        [line.split("(")[1].split(")")[0] for line in lines if "inconclusive" not in line], words))
    return f"Verdict: {word} — per habit ({summary}); numbers in the lines above."


# ----------------------------------------------------------------------------- outputs


def _fmt(v: float, lo: float = math.nan, hi: float = math.nan, digits: int = 3) -> str:
    if not np.isfinite(v):
        return "—"
    if abs(v) < 1e-9 and not np.isfinite(lo):  # an exact zero up to rounding
        return "0"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def markdown_table(t: pd.DataFrame) -> str:
    cols = [("rel_bias", "‖E ĝ − ∇J‖/‖∇J‖"), ("pred_rel_bias", "exact"),
            ("scale", "scale s = ⟨E ĝ,∇J⟩/‖∇J‖²"), ("dir_bias", "‖E ĝ − s∇J‖/‖∇J‖"),
            ("cos_mean", "cos(E ĝ, ∇J)"),
            ("cos_ref", "cos(ĝ, ∇J) per batch"), ("rel_variance", "tr Cov/‖∇J‖²"),
            ("d_rel_bias_sq", "Δ rel. bias² vs control"), ("pred_added_bias", "exact added bias")]
    lines = ["| cell | arm | " + " | ".join(h for _, h in cols) + " |",
             "|" + " --- |" * (len(cols) + 2)]
    for _, r in t.iterrows():
        cells = [_fmt(r.get(c, np.nan), r.get(f"{c}_lo", np.nan), r.get(f"{c}_hi", np.nan))
                 for c, _ in cols]
        lines.append(f"| {r['cell']} | {r['arm']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(table: pd.DataFrame, preset: str) -> str:
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
    lines = []
    for habit in FLAGS:
        t = table[table["habit"] == habit]
        if t.empty:
            continue
        out += [f"## {habit}", "", f"Claim: {CLAIMS[habit]}", "", markdown_table(t), ""]
        line = habit_verdict(table, habit)
        lines.append(line)
        out += [line, ""]
    out += [overall_verdict(lines), ""]
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
    apply_theme()
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
                err = np.vstack([rows[col] - rows[f"{col}_lo"], rows[f"{col}_hi"] - rows[col]])
                ax.errorbar(x, rows[col], yerr=np.nan_to_num(err.clip(0)), fmt="o", ms=4,
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
    handles, labels = [], []
    for ax in axes.flat:
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            if lb not in labels:
                handles.append(hd)
                labels.append(lb)
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False,
               bbox_to_anchor=(0.5, -0.03))
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}_bias")


def analyze(frame: pd.DataFrame, out: Path, preset: str) -> str:
    """Write result.csv, result.md and figures/practice_biases_bias.{png,pdf}; return the md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = per_run(frame)
    table = summarise(runs) if not runs.empty else pd.DataFrame()
    if table.empty:
        text = (f"# Biases of common-code habits ({preset} preset)\n\n"
                "Verdict: inconclusive — no run with a habit and its control.\n")
        (out / "result.md").write_text(text)
        return text
    table.to_csv(out / "result.csv", index=False)
    text = markdown(table, preset)
    (out / "result.md").write_text(text)
    plot(table, out / "figures")
    return text
