"""PPO's update against the exact gradient and the exact objective, by epochs K and clip ε
(README.md beside this file: the claim, the statistics and the classes of the findings)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis import experiment as xp
from analysis.figures import REL_BIAS_LABEL, REL_VAR_LABEL, interval_grid
from analysis.render import format_columns, format_estimate, frame_table
from analysis.stats import mean_ci
from pgvar.envs.base import is_exact
from pgvar.estimators import EstimatorConfig, estimate_gradients
from pgvar.reference import exact_reference
from pgvar.rollout import rollout
from pgvar.run import initial_env_and_policy, run_config_from
from pgvar.seeding import derive_seed

NAME, GAE_LABEL = "ppo_clip", "GAE"
MIN_STEP = 1  # measured iterations used: from the first one after the critic's first fit
MIN_SEEDS = 3  # fewer seeds than this: no verdict (inconclusive)
FEW_EPOCHS = 4  # "a few gradient steps"
REUSE_BATCHES = 8  # fresh batches per run for the exact-J comparison
REUSE_INDEX = 10 ** 6  # their episodes: the measure stream at an index no run step reaches
CRITIC_EPISODES = 512  # held-out episodes that fit the critic where no exact V exists (LQR)
CLAIM = ("“The clip operation stops any single update from moving the policy too far, "
         "while importance sampling allows re-use of old data for a few gradient steps.”")
GAINS = {"gain_one": "one epoch", "gain_ppo": "PPO, K epochs",
         "gain_plain": "plain step, same length", "gain_exact": "exact ∇J, same length",
         "reuse_edge": "PPO − plain (re-use)", "over_one": "PPO − one epoch"}
METRICS = ("cos_ref", "rel_variance", "displacement", *GAINS)


def per_run(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: each statistic's mean over its measured iterations >= MIN_STEP
    (``late_measurements``), ``K`` (1 for GAE), ``clip`` (NaN where it cannot act: GAE,
    K = 1), ``ppo_lr``, a ``label`` and, for PPO, ``exact_steps``."""
    rows = xp.late_measurements(frame, MIN_STEP)
    df = xp.direction_columns(rows[rows["estimator"].isin(["ppo", "gae"])])
    ppo = df["estimator"] == "ppo"
    df["K"] = np.where(ppo, df.get("estimator.ppo_epochs", 1), 1).astype(int)
    df["clip"] = np.where(ppo & (df["K"] > 1), df.get("estimator.ppo_clip", np.nan), np.nan)
    df["ppo_lr"] = np.where(ppo, df.get("estimator.ppo_lr", np.nan), np.nan)
    df["label"] = [GAE_LABEL if e != "ppo" else f"PPO K={k}" if not np.isfinite(c)
                   else f"PPO K={k}, eps={c:g}" for e, k, c in zip(df["estimator"], df["K"], df["clip"])]
    df = df.assign(rel_variance=df["grad_rel_variance"], rel_bias_sq=df["grad_rel_bias_sq"])
    keys = ["env", "label", "estimator", "K", "clip", "ppo_lr", "seed", "run_id"]
    runs = (df.groupby(keys, dropna=False)[["cos_ref", "rel_proj", "rel_perp_sq", "rel_variance",
                                            "rel_bias_sq", "grad_norm_mean"]].mean().reset_index()
            # K = 1 runs differing only in the inactive clip, or a run repeated, count once
            .drop_duplicates(subset=["env", "label", "seed"], keep="first"))
    runs["displacement"] = runs["ppo_lr"] * runs["K"] * runs["grad_norm_mean"]
    first = df.drop_duplicates("run_id").set_index("run_id")
    gains = [exact_steps(xp.config_of(first.loc[r])) if e == "ppo" else {}
             for r, e in zip(runs["run_id"], runs["estimator"])]
    return pd.concat([runs, pd.DataFrame(gains, index=runs.index, columns=list(GAINS))], axis=1)


@torch.no_grad()
def exact_steps(config: dict) -> dict[str, float]:
    """At the run's initial policy, mean over REUSE_BATCHES fresh batches, the exact gain
    J(θ') − J(θ_0) of one epoch (a plain step ppo_lr along the batch gradient), of PPO's K
    epochs and of one step as long as PPO's update along the batch gradient and along ∇J
    (``GAINS``). Advantages from the exact V (tabular) or a critic fitted on
    CRITIC_EPISODES other episodes; {} where J is not exact."""
    run_cfg, (env, policy) = run_config_from(config), initial_env_and_policy(config)
    if not is_exact(env):
        return {}
    seed, B = run_cfg.seed, run_cfg.training.batch_size
    critic = xp.held_out_critic(run_cfg, env, policy, REUSE_INDEX, CRITIC_EPISODES)
    batch = rollout(env, policy, REUSE_BATCHES * B, derive_seed(seed, "measure", REUSE_INDEX))
    cfg = EstimatorConfig(**run_cfg.estimator.core_kwargs())
    with torch.enable_grad():
        d, g1 = (estimate_gradients("ppo", env, policy, batch, REUSE_BATCHES, critic, c).double()
                 for c in (cfg, replace(cfg, ppo_epochs=1)))
    g = exact_reference(env, policy).grad.double()
    length = (step := cfg.ppo_lr * cfg.ppo_epochs * d).norm(dim=1, keepdim=True)
    out = xp.exact_gains(env, policy, {
        "gain_one": cfg.ppo_lr * g1, "gain_ppo": step,
        "gain_plain": length * g1 / g1.norm(dim=1, keepdim=True), "gain_exact": length * g / g.norm()})
    return {**out, "reuse_edge": out["gain_ppo"] - out["gain_plain"],
            "over_one": out["gain_ppo"] - out["gain_one"]}


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per (env, label): each metric's mean across seeds with its interval, the
    expected direction's cosine and both cosines' paired differences from GAE, GAE first,
    then by clip and K; the runs)."""
    records = []
    for (env, label), g in runs.groupby(["env", "label"], sort=False):
        env_runs = runs[runs["env"] == env]
        base = env_runs[env_runs["label"] == GAE_LABEL]
        base = base if len(base) else env_runs[env_runs["K"] == 1]  # the same by construction
        root = xp.sqrt_estimate(mean_ci(g["rel_bias_sq"].to_numpy()))
        records.append({"env": env, "label": label, **g.iloc[0][["K", "clip", "ppo_lr"]].to_dict(),
                        "n_seeds": g["seed"].nunique(), **xp.mean_columns(g, METRICS),
                        **xp.estimate_columns("rel_bias", root),
                        **xp.estimate_columns("cos_mean", xp.pooled_cosine(g)),
                        **xp.paired_difference_columns(g, base, ["cos_ref"])})
    table = pd.DataFrame.from_records(records)
    table = table.assign(_o=table["label"].ne(GAE_LABEL), _c=table["clip"].fillna(-1))
    return table.sort_values(["env", "_o", "_c", "K"]).drop(columns=["_o", "_c"]), runs


def clip_finding(runs: pd.DataFrame) -> xp.Finding:
    """At the largest K, ‖θ_K − θ_0‖ at the smallest ε over the largest lies below 1."""
    words, bits = [], []
    for env, t in runs[runs["K"] == runs.groupby("env")["K"].transform("max")].groupby("env", sort=False):
        lo, hi = (t[t["clip"] == c] for c in (t["clip"].min(), t["clip"].max()))
        r = xp.paired_geometric_ratio(lo, hi, "displacement", MIN_SEEDS)
        words.append(xp.side_of(r, 1.0, "bounded", "not bounded"))
        bits.append(f"{env}: ‖θ_K − θ_0‖ at K = {t['K'].max()}, ε = {t['clip'].min():g} over ε = "
                    f"{t['clip'].max():g}: {format_estimate(r)}")
    return xp.Finding("the clip bounds the update", xp.share_word(words, "bounded"),
                      "; ".join(bits) or "no K > 1")


def gain_finding(table: pd.DataFrame, column: str, claim: str, kind: str) -> xp.Finding:
    """An exact-J difference above 0 for every (env, 1 < K <= FEW_EPOCHS, ε): ``share_word``."""
    t = table[(table["K"] > 1) & (table["K"] <= FEW_EPOCHS)]
    words = [xp.side_of(xp.estimate_of(r, column), 0.0, "worse", "beats", "tie")
             for _, r in t.iterrows()]
    return xp.Finding(claim, xp.share_word(words, "beats"), "ΔJ " + "; ".join(
        f"{r['env']} {r['label']}: {format_columns(r, column, 2, sign=True)}" for _, r in t.iterrows())
        if len(t) else "no PPO run with 1 < K ≤ 4", kind)


def findings(summary: tuple) -> list[xp.Finding]:
    """K = 1 is GAE (by construction); the clip bounds the update, the direction holds for a
    few epochs, re-use beats a longer step (tested); K epochs beat one (extra: step length)."""
    table, runs = summary
    k1 = runs[(runs["estimator"] == "ppo") & (runs["K"] == 1)].merge(
        runs[runs["label"] == GAE_LABEL], on=["env", "seed"], suffixes=("", "_gae"))
    gap = float((k1["cos_ref"] - k1["cos_ref_gae"]).abs().max()) if len(k1) else math.nan
    t = table[(table["K"] > 1) & (table["n_seeds"] >= MIN_SEEDS)].sort_values("K")
    # per (env, ε): the largest K with no K' <= K whose cosine (per batch or expected) is
    # significantly below GAE's (paired interval below 0); 1 when K = 2 already drifts
    ok = ~((t["d_cos_ref_hi"] < 0) | (t["d_cos_mean_hi"] < 0)).groupby([t["env"], t["clip"]]).cummax()
    safe = t["K"].where(ok).fillna(1).groupby([t["env"], t["clip"]], sort=False).max().astype(int).to_dict()
    same = "inconclusive" if math.isnan(gap) else "confirmed" if gap < 1e-6 else "refuted"
    holds = xp.share_word(["holds" if k >= FEW_EPOCHS else "drifts" for k in safe.values()], "holds")
    return [xp.Finding("K = 1 is GAE", same, f"largest |Δ cos_ref| over seeds {gap:.1e}", xp.BY_CONSTRUCTION),
            clip_finding(runs),
            xp.Finding(f"direction holds for K ≤ {FEW_EPOCHS}", holds,
                       "largest K with both cosines no worse than GAE's: " + ", ".join(
                           f"{env} ε={clip:g}: {k}" for (env, clip), k in safe.items())),
            gain_finding(table, "reuse_edge", "re-use beats a plain step of equal length", xp.TESTED),
            gain_finding(table, "over_one", "K epochs beat one epoch", xp.EXTRA)]


def markdown(summary: tuple, verdict: xp.Verdict, preset: str) -> str:
    """result.md: the claim, per env the direction table and the exact-J table, findings."""
    table, runs = summary
    n = runs.groupby(["env", "label"])["seed"].nunique()
    out = [f"# PPO's update against the exact gradient and objective ({preset} preset)", "",
           f"Claim: {CLAIM}", "",
           ("d = (θ_K − θ_0)/(ppo_lr·K) after K epochs on the clipped surrogate (GAE(λ) "
            f"advantages); K = 1 is GAE. Mean over {n.min()}–{n.max()} seeds, 95% intervals; "
            f"Δ: paired difference from GAE; measured iterations >= {MIN_STEP}. Exact gains "
            f"J(θ') − J(θ_0) at each run's initial policy, mean over {REUSE_BATCHES} fresh "
            "batches: one epoch, PPO's K epochs, one step as long as PPO's along the batch's "
            "gradient and along ∇J (advantages from the exact or a fitted V)."), ""]
    for env, t in table.groupby("env", sort=False):
        out += [f"## {env} (ppo_lr = {runs.loc[runs['env'] == env, 'ppo_lr'].max():g})", "",
                *frame_table(t, {"row": "label", "cos(d, ∇J), per batch": "cos_ref", "Δ vs GAE": "d_cos_ref",
                                 "cos(E d, ∇J)": "cos_mean", "Δ vs GAE ": "d_cos_mean",
                                 "‖E d − ∇J‖/‖∇J‖": "rel_bias", "tr Cov/‖∇J‖²": "rel_variance",
                                 "‖θ_K − θ_0‖": "displacement"}, missing="—"),
                "", "Exact gains J(θ') − J(θ_0):", "",
                *frame_table(t[t["gain_ppo"].notna()], {"row": "label", **{h: c for c, h in GAINS.items()}},
                             missing="—", sign=True), ""]
    return "\n".join(out + xp.findings_section(findings(summary), verdict))


FIGURES = {"cosine": [("cos_ref", "cos(d, ∇J): one batch"), ("cos_mean", "cos(E d, ∇J)")],
           "bias_variance": [("rel_bias", REL_BIAS_LABEL), ("rel_variance", REL_VAR_LABEL)],
           "reuse": [("displacement", "‖θ_K − θ_0‖ per batch"),
                     ("reuse_edge", "ΔJ: PPO − plain step\nof the same length")]}


def make_figures(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Each FIGURES pair against K, one line per ε (PPO's K = 1 rows, where ε cannot act,
    repeated under every ε so each line starts there; GAE is K = 1)."""
    ppo = table[table["label"] != GAE_LABEL]
    rows = pd.concat([ppo[ppo["K"] > 1], *(ppo[ppo["K"] == 1].assign(clip=c) for c in ppo["clip"].dropna().unique())])
    rows = rows.rename(columns={"clip": "ε", "K": "epochs K"}).sort_values("ε")
    return [p for name, panels in FIGURES.items() for p in interval_grid(
        rows, "env", "epochs K", panels, out_dir, f"{NAME}_{name}", hue="ε", log_x=True,
        log_y=("rel_variance", "displacement"), levels={"reuse_edge": 0.0})]


EXPERIMENT = xp.Experiment(
    "PPO's update against the exact gradient and objective", summarise,
    lambda summary: xp.headline_verdict(findings(summary)), markdown, select=per_run,
    result_frame=lambda summary: summary[0], empty_reason="no measured PPO or GAE run",
    figures=lambda summary, runs, out_dir: make_figures(summary[0], out_dir))
analyze = EXPERIMENT.analyze
