"""PPO's update direction against the exact gradient, by epochs K and clip epsilon.

Measured iterations from ``MIN_STEP`` on (critic fitted), one number per run and statistic
(the mean over them), bootstrap intervals across seeds. Per (env, K, epsilon), against
g = grad J: ``cos_ref`` (one batch's direction), ``cos_mean`` = cos(E d, g) (the expected
direction, ``direction_columns`` and ``pooled_cosine``), ``rel_bias``, ``rel_variance``,
``reuse_gain`` = K <E d, g>/||g||^2 (the first-order gain of PPO's whole update in units
of one plain step of size ppo_lr) and ``displacement`` = ppo_lr K mean ||d||; paired
differences from GAE (same seed).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker

from analysis.experiment import (Experiment, Verdict, direction_columns, estimate_columns,
                                 inconclusive, paired_difference, pooled_cosine,
                                 pooled_cosine_difference, sqrt_estimate)
from analysis.figures import (PANEL_HEIGHT, PAPER_WIDTH, REL_BIAS_LABEL, REL_VAR_LABEL,
                              error_bars, legend_below, log_axis, save_figure)
from analysis.loader import measured_rows
from analysis.render import format_columns, markdown_table
from analysis.stats import mean_ci

NAME = "ppo_clip"
MIN_STEP = 1  # measured iterations used: from the first one after the critic's first fit
MIN_SEEDS = 3  # fewer seeds than this: no verdict (inconclusive)
FEW_EPOCHS = 4  # "a few gradient steps": the claim holds if K up to this keeps the direction
GAE_LABEL = "GAE"
CLAIM = ("“The clip operation stops any single update from moving the policy too far, "
         "while importance sampling allows re-use of old data for a few gradient steps.” "
         "(source text, on PPO's clipped surrogate)")
METRICS = ("cos_ref", "rel_bias_sq", "rel_variance", "reuse_gain", "displacement")


def per_run(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the mean of each statistic over its measured iterations >= MIN_STEP
    (all of them when a run has none there, e.g. smoke runs), with ``K`` (1 for GAE),
    ``clip`` (NaN where inactive: GAE and K = 1), ``ppo_lr`` and a row ``label``."""
    measured = measured_rows(frame)
    measured = measured[measured["estimator"].isin(["ppo", "gae"])]
    if measured.empty:
        return pd.DataFrame()
    late = measured[measured["step"] >= MIN_STEP]
    df = direction_columns(late if not late.empty else measured)
    is_ppo = df["estimator"] == "ppo"
    df["K"] = np.where(is_ppo, df.get("estimator.ppo_epochs", 1), 1).astype(int)
    df["clip"] = np.where(is_ppo & (df["K"] > 1), df.get("estimator.ppo_clip", np.nan), np.nan)
    df["ppo_lr"] = np.where(is_ppo, df.get("estimator.ppo_lr", np.nan), np.nan)
    df["label"] = [GAE_LABEL if e != "ppo" else f"PPO K={k}" if not np.isfinite(c)
                   else f"PPO K={k}, eps={c:g}" for e, k, c in zip(df["estimator"], df["K"], df["clip"])]
    df = df.assign(rel_variance=df["grad_rel_variance"], rel_bias_sq=df["grad_rel_bias_sq"])
    keys = ["env", "label", "estimator", "K", "clip", "ppo_lr", "seed", "run_id"]
    agg = (df.groupby(keys, dropna=False)[["cos_ref", "rel_proj", "rel_perp_sq", "rel_variance",
                                           "rel_bias_sq", "grad_norm_mean"]].mean().reset_index())
    # K = 1 runs that differ only in the (then inactive) clip are the same run, and so is a
    # configuration run twice (a sweep re-run into new job folders): keep one
    agg = agg.drop_duplicates(subset=["env", "label", "seed"], keep="first")
    return agg.assign(reuse_gain=agg["K"] * agg["rel_proj"],
                      displacement=agg["ppo_lr"] * agg["K"] * agg["grad_norm_mean"])


def baseline_runs(runs: pd.DataFrame, env: str) -> pd.DataFrame:
    """The env's GAE runs, or its PPO K=1 runs (identical by construction) if it has none."""
    env_runs = runs[runs["env"] == env]
    gae = env_runs[env_runs["label"] == GAE_LABEL]
    return gae if not gae.empty else env_runs[env_runs["K"] == 1]


def row_record(env: str, label: str, g: pd.DataFrame, base: pd.DataFrame) -> dict:
    """One (env, label) row: each metric's mean across seeds with its 95% interval, the
    expected direction's cosine and the paired differences of both cosines from GAE."""
    first = g.iloc[0]
    rec = {"env": env, "label": label, "K": int(first["K"]), "clip": first["clip"],
           "ppo_lr": first["ppo_lr"], "n_seeds": int(g["seed"].nunique())}
    for metric in METRICS:
        est = mean_ci(g[metric].to_numpy())
        rec.update(estimate_columns("rel_bias", sqrt_estimate(est)) if metric == "rel_bias_sq"
                   else estimate_columns(metric, est))
    return {**rec, **estimate_columns("cos_mean", pooled_cosine(g)),
            **estimate_columns("d_cos_ref", paired_difference(g, base, "cos_ref")),
            **estimate_columns("d_cos_mean", pooled_cosine_difference(g, base))}


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (env, label) (``row_record``), GAE first, then by clip and K."""
    table = pd.DataFrame.from_records([row_record(env, label, g, baseline_runs(runs, env))
                                       for (env, label), g in runs.groupby(["env", "label"], sort=False)])
    return (table.assign(_o=table["label"].ne(GAE_LABEL).astype(int), _c=table["clip"].fillna(-1))
            .sort_values(["env", "_o", "_c", "K"]).drop(columns=["_o", "_c"]).reset_index(drop=True))


def k1_matches_gae(runs: pd.DataFrame) -> float:
    """Largest |cos_ref(PPO K=1) - cos_ref(GAE)| over envs and seeds (0 when they coincide,
    as they must); NaN when either is missing."""
    k1 = runs[(runs["estimator"] == "ppo") & (runs["K"] == 1)]
    joined = k1.merge(runs[runs["label"] == GAE_LABEL], on=["env", "seed"], suffixes=("_k1", "_gae"))
    return float((joined["cos_ref_k1"] - joined["cos_ref_gae"]).abs().max()) if len(joined) else math.nan


def safe_epochs(t: pd.DataFrame) -> int:
    """The largest K such that no K' <= K (of one clip) has cos_ref or cos_mean
    significantly below GAE's (paired interval entirely below 0); 1 when K = 2 drifts."""
    safe = 1
    for r in t.sort_values("K").itertuples():
        if any(np.isfinite(hi) and hi < 0 for hi in (r.d_cos_ref_hi, r.d_cos_mean_hi)):
            break
        safe = int(r.K)
    return safe


def displacement_growth(t: pd.DataFrame) -> pd.DataFrame:
    """Per clip: displacement at the largest K over that at the smallest K > 1, next to the
    ratio of those K (what an unclipped, undiminished direction would give)."""
    rows = []
    for clip, g in t[t["K"] > 1].groupby("clip"):
        lo, hi = g.sort_values("K").iloc[[0, -1]].itertuples()
        if lo.K != hi.K:
            rows.append({"clip": clip, "K_from": int(lo.K), "K_to": int(hi.K),
                         "growth": hi.displacement / lo.displacement, "free_growth": hi.K / lo.K})
    return pd.DataFrame(rows)


def env_sentence(t: pd.DataFrame) -> str:
    """The numbers a verdict rests on, for one env's rows with K > 1."""
    best = t.loc[t["reuse_gain"].idxmax()]
    last = {clip: g.sort_values("K").iloc[-1] for clip, g in t.groupby("clip")}
    safe = ", ".join(f"{safe_epochs(g)} (ε={clip:g})" for clip, g in t.groupby("clip"))
    delta = "; ".join(f"ε={clip:g}: {format_columns(r, 'd_cos_ref', 3, style='f', sign=True)} per "
                      f"batch, {format_columns(r, 'd_cos_mean', 3, style='f', sign=True)} expected"
                      for clip, r in last.items())
    return (f"{t['env'].iloc[0]}: re-use gain up to {format_columns(best, 'reuse_gain', 2, style='f')} "
            f"plain steps per batch ({best['label']}); cosine with ∇J (per batch and expected) "
            f"no worse than GAE's up to K = {safe}; at K = {int(t['K'].max())} the cosine minus "
            f"GAE's is {delta}")


def verdict(summary: tuple) -> Verdict:
    """confirmed: in every env PPO's epochs gain more than one plain step (re-use gain's
    interval above 1) and, for every clip, FEW_EPOCHS epochs leave cos_ref no worse than
    GAE's; refuted: no env shows a gain above 1; qualified: otherwise."""
    table = summary[0]
    envs = [table[(table["env"] == e) & (table["K"] > 1)] for e in dict.fromkeys(table["env"])]
    envs = [t for t in envs if len(t) and t["n_seeds"].min() >= MIN_SEEDS]
    if not envs:
        return inconclusive("too few seeds or no PPO run with K > 1")
    gains = [bool(np.isfinite(b["reuse_gain_lo"]) and b["reuse_gain_lo"] > 1)
             for b in (t.loc[t["reuse_gain"].idxmax()] for t in envs)]
    few_ok = all(safe_epochs(g) >= FEW_EPOCHS for t in envs for _, g in t.groupby("clip"))
    word = ("confirmed" if all(gains) and few_ok else "refuted" if not any(gains) else "qualified")
    return Verdict(word, "; ".join(env_sentence(t) for t in envs))


TABLE_COLUMNS = [("cos_ref", "cos(d, ∇J), per batch"), ("d_cos_ref", "Δ vs GAE"),
                 ("cos_mean", "cos(E d, ∇J)"), ("d_cos_mean", "Δ vs GAE"),
                 ("rel_bias", "‖E d − ∇J‖/‖∇J‖"), ("rel_variance", "tr Cov/‖∇J‖²"),
                 ("reuse_gain", "re-use gain K⟨E d,∇J⟩/‖∇J‖²"), ("displacement", "‖θ_K − θ_0‖")]


def markdown(summary: tuple, verdict: Verdict, preset: str) -> str:
    """result.md: the claim, one table per env, the checks and the verdict."""
    table, runs = summary
    n = runs.groupby(["env", "label"])["seed"].nunique()
    out = [f"# PPO's update direction against the exact gradient ({preset} preset)", "",
           f"Claim: {CLAIM}", "",
           ("d = (θ_K − θ_0)/(ppo_lr·K) after K full-batch epochs on the clipped surrogate "
            "(GAE(λ) advantages); K = 1 is GAE itself. Mean over seeds with 95% bootstrap "
            "intervals; Δ is the paired difference from GAE (same seed). Measured iterations "
            f">= {MIN_STEP} of each run (critic fitted). Seeds per row: {n.min()}–{n.max()}."), ""]
    for env, t in table.groupby("env", sort=False):
        rows = [[r["label"], *(format_columns(r, c, 2 if c.startswith("d_") else 3, missing="—")
                               for c, _ in TABLE_COLUMNS)] for _, r in t.iterrows()]
        lr = runs.loc[runs["env"] == env, "ppo_lr"].dropna()
        out += [f"## {env} (ppo_lr = {lr.iloc[0] if len(lr) else math.nan:g})", "",
                *markdown_table(["row", *(h for _, h in TABLE_COLUMNS)], rows), ""]
    gap = k1_matches_gae(runs)
    if np.isfinite(gap):
        out += [(f"Check: PPO with K = 1 and GAE give the same cos_ref to within {gap:.1e} "
                 "(same seeds), as they must."), ""]
    growth = {env: displacement_growth(t) for env, t in table.groupby("env", sort=False)}
    lines = [f"- {env}: from K = {s['K_from'].iloc[0]} to K = {s['K_to'].iloc[0]} "
             f"(×{s['free_growth'].iloc[0]:g} the epochs) the parameter displacement per batch "
             "grows " + ", ".join(f"×{r.growth:.2f} at ε = {r.clip:g}" for r in s.itertuples()) + "."
             for env, s in growth.items() if not s.empty]
    if lines:
        out += ["How the clip bounds the update:", "", *lines, ""]
    return "\n".join(out + [verdict.line(), ""])


def plot_metric_grid(table: pd.DataFrame, rows: list[tuple[str, str, bool]], name: str,
                     out_dir: Path) -> list[Path]:
    """One row of panels per metric (column, y label, log y), one column per env: the metric
    against K, one line per clip (K = 1, where the clip is inactive, starts every line),
    GAE as a dashed line with its band."""
    envs = list(dict.fromkeys(table["env"]))
    fig, axes = plt.subplots(len(rows), len(envs), squeeze=False,
                             figsize=(PAPER_WIDTH, PANEL_HEIGHT * len(rows)))
    clips = sorted(table["clip"].dropna().unique())
    colours = dict(zip(clips, sns.color_palette("viridis", len(clips))))
    for j, env in enumerate(envs):
        t = table[table["env"] == env]
        k1, gae = t[(t["K"] == 1) & (t["label"] != GAE_LABEL)], t[t["label"] == GAE_LABEL]
        ks = sorted(t["K"].unique())
        for i, (col, ylabel, log) in enumerate(rows):
            ax = axes[i][j]
            if len(gae) and np.isfinite(gae[col].iloc[0]):
                ax.axhline(gae[col].iloc[0], color="0.3", ls="--", lw=1, label="GAE (95% CI)")
                ax.axhspan(gae[f"{col}_lo"].iloc[0], gae[f"{col}_hi"].iloc[0], color="0.5",
                           alpha=0.15, lw=0)
            if col == "reuse_gain":
                ax.plot(ks, ks, color="0.6", ls=":", lw=1, label="K (K plain steps of ∇J)")
            for n_clip, clip in enumerate(clips):
                line = pd.concat([k1, t[t["clip"] == clip]]).sort_values("K")
                line = line[np.isfinite(line[col])]
                jitter = 2.0 ** (0.04 * (n_clip - (len(clips) - 1) / 2))  # keep bars apart
                ax.errorbar(line["K"] * jitter, line[col], yerr=np.nan_to_num(error_bars(line, col)),
                            marker="o", ms=3.5, capsize=2, lw=1.2, color=colours[clip],
                            label=f"PPO, ε = {clip:g}")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(ticker.FixedLocator(ks))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            if log:
                log_axis(ax, "y", pd.concat([t[col], t[f"{col}_lo"], t[f"{col}_hi"]]))
            ax.set(xlabel="PPO epochs K per batch", ylabel=ylabel, title=env)
    legend_below(fig, axes.flat, ncol=3)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


FIGURES = {"cosine": [("cos_ref", "cos(d, ∇J): one batch, mean", False),
                      ("cos_mean", "cos(E d, ∇J): expected direction", False)],
           "bias_variance": [("rel_bias", REL_BIAS_LABEL, False), ("rel_variance", REL_VAR_LABEL, True)],
           "reuse": [("reuse_gain", "re-use gain  K⟨E d, ∇J⟩ / ‖∇J‖²", True),
                     ("displacement", "‖θ_K − θ_0‖ per batch (parameters)", True)]}

EXPERIMENT = Experiment(
    "PPO's update direction", lambda runs: (summarise(runs), runs), verdict, markdown,
    select=per_run, result_frame=lambda summary: summary[0],
    figures=lambda summary, runs, out_dir: [p for name, rows in FIGURES.items() for p in
                                            plot_metric_grid(summary[0], rows, f"{NAME}_{name}", out_dir)],
    empty_reason="no measured PPO or GAE run")
analyze = EXPERIMENT.analyze
