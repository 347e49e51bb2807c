"""PPO's update direction against the exact gradient, by epochs K and clip epsilon.

Measured iterations from ``MIN_STEP`` on (critic fitted), one number per run and statistic
(the mean over them), bootstrap intervals across seeds. Per (env, K, epsilon), against
g = grad J: ``cos_ref`` (one batch's direction), ``cos_mean`` = cos(E d, g) (the expected
direction, from the logged statistics by ``analysis.experiment.direction_columns`` and
``pooled_cosine``), ``rel_bias``, ``rel_variance``, ``reuse_gain`` = K <E d, g>/||g||^2
(the first-order gain of PPO's whole update in units of one plain step of size ppo_lr)
and ``displacement`` = ppo_lr K mean ||d||; paired differences from GAE (same seed).
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
from matplotlib import ticker

from analysis.experiment import (
    Experiment,
    Verdict,
    direction_columns,
    inconclusive,
    paired_difference,
    pooled_cosine,
    pooled_cosine_difference,
    sqrt_estimate,
)
from analysis.figures import (
    PANEL_HEIGHT,
    PAPER_WIDTH,
    REL_BIAS_LABEL,
    REL_VAR_LABEL,
    error_bars,
    legend_below,
    log_axis,
    save_figure,
)
from analysis.loader import measured_rows
from analysis.render import format_ci, format_columns, markdown_table
from analysis.stats import mean_ci

NAME = "ppo_clip"
MIN_STEP = 1  # measured iterations used: from the first one after the critic's first fit
MIN_SEEDS = 3  # fewer seeds than this: no verdict (inconclusive)
GAE_LABEL = "GAE"
CLAIM = ("“The clip operation stops any single update from moving the policy too far, "
         "while importance sampling allows re-use of old data for a few gradient steps.” "
         "(source text, on PPO's clipped surrogate)")
METRICS = ("cos_ref", "rel_bias_sq", "rel_variance", "reuse_gain", "displacement")


def config_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``K`` (1 for GAE), ``clip`` (NaN where it cannot act: GAE and K = 1), ``ppo_lr``
    (NaN for GAE) and a row ``label``."""
    df = df.copy()
    is_ppo = df["estimator"] == "ppo"
    df["K"] = np.where(is_ppo, df.get("estimator.ppo_epochs", 1), 1).astype(int)
    df["clip"] = np.where(is_ppo & (df["K"] > 1), df.get("estimator.ppo_clip", np.nan), np.nan)
    df["ppo_lr"] = np.where(is_ppo, df.get("estimator.ppo_lr", np.nan), np.nan)
    df["label"] = [row_label(e, k, c) for e, k, c in zip(df["estimator"], df["K"], df["clip"])]
    return df


def row_label(estimator: str, K: int, clip: float) -> str:
    """``GAE``, ``PPO K=1`` or ``PPO K=4, eps=0.2``."""
    if estimator != "ppo":
        return GAE_LABEL
    return f"PPO K={K}" if not np.isfinite(clip) else f"PPO K={K}, eps={clip:g}"


def per_run(frame: pd.DataFrame, min_step: int = MIN_STEP) -> pd.DataFrame:
    """One row per run: the mean of each statistic over its measured iterations >= min_step
    (all of them when a run has none there, e.g. smoke runs)."""
    measured = measured_rows(frame)
    measured = measured[measured["estimator"].isin(["ppo", "gae"])]
    if measured.empty:
        return pd.DataFrame()
    late = measured[measured["step"] >= min_step]
    if not late.empty:
        measured = late
    df = config_columns(direction_columns(measured))
    keys = ["env", "label", "estimator", "K", "clip", "ppo_lr", "seed", "run_id"]
    df["rel_variance"] = df["grad_rel_variance"]
    df["rel_bias_sq"] = df["grad_rel_bias_sq"]
    agg = (df.groupby(keys, dropna=False)[["cos_ref", "rel_proj", "rel_perp_sq", "rel_variance",
                                           "rel_bias_sq", "grad_norm_mean"]]
           .mean().reset_index())
    # K = 1 runs that differ only in the (then inactive) clip are the same run, and so is a
    # configuration run twice (a sweep re-run into new job folders): keep one
    agg = agg.drop_duplicates(subset=["env", "label", "seed"], keep="first")
    agg["reuse_gain"] = agg["K"] * agg["rel_proj"]
    agg["displacement"] = agg["ppo_lr"] * agg["K"] * agg["grad_norm_mean"]
    return agg


def baseline_runs(runs: pd.DataFrame, env: str) -> pd.DataFrame:
    """The env's GAE runs, or its PPO K=1 runs (identical by construction) if it has none."""
    env_runs = runs[runs["env"] == env]
    gae = env_runs[env_runs["label"] == GAE_LABEL]
    return gae if not gae.empty else env_runs[env_runs["K"] == 1]


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (env, label): each metric's mean across seeds with its 95% interval, and
    the paired difference of cos_ref and cos_mean from GAE (same seed)."""
    records = []
    for (env, label), g in runs.groupby(["env", "label"], sort=False):
        first = g.iloc[0]
        rec = {"env": env, "label": label, "K": int(first["K"]), "clip": first["clip"],
               "ppo_lr": first["ppo_lr"], "n_seeds": int(g["seed"].nunique())}
        for metric in METRICS:
            est = mean_ci(g[metric].to_numpy())
            if metric == "rel_bias_sq":
                est, metric = sqrt_estimate(est), "rel_bias"
            rec.update({metric: est.value, f"{metric}_lo": est.lo, f"{metric}_hi": est.hi})
        base = baseline_runs(runs, env)
        diffs = {"cos_ref": paired_difference(g, base, "cos_ref"),
                 "cos_mean": pooled_cosine_difference(g, base)}
        for metric, est in (("cos_mean", pooled_cosine(g)), *((f"d_{m}", d) for m, d in diffs.items())):
            rec.update({metric: est.value, f"{metric}_lo": est.lo, f"{metric}_hi": est.hi})
        records.append(rec)
    table = pd.DataFrame.from_records(records)
    order = table["label"].ne(GAE_LABEL).astype(int)
    return (table.assign(_o=order, _c=table["clip"].fillna(-1))
            .sort_values(["env", "_o", "_c", "K"]).drop(columns=["_o", "_c"]).reset_index(drop=True))


def k1_matches_gae(runs: pd.DataFrame) -> float:
    """Largest |cos_ref(PPO K=1) - cos_ref(GAE)| over envs and seeds (0 when they coincide,
    as they must); NaN when either is missing."""
    k1 = runs[(runs["estimator"] == "ppo") & (runs["K"] == 1)]
    gae = runs[runs["label"] == GAE_LABEL]
    joined = k1.merge(gae, on=["env", "seed"], suffixes=("_k1", "_gae"))
    if joined.empty:
        return math.nan
    return float((joined["cos_ref_k1"] - joined["cos_ref_gae"]).abs().max())


FEW_EPOCHS = 4  # "a few gradient steps": the claim holds if K up to this keeps the direction


def safe_epochs(t: pd.DataFrame) -> int:
    """The largest K such that no K' <= K (of one clip) has cos_ref or cos_mean
    significantly below GAE's (paired interval entirely below 0); 1 when K = 2 already
    drifts."""
    safe = 1
    for r in t.sort_values("K").itertuples():
        if any(np.isfinite(hi) and hi < 0 for hi in (r.d_cos_ref_hi, r.d_cos_mean_hi)):
            break
        safe = int(r.K)
    return safe


def env_findings(table: pd.DataFrame, env: str) -> dict[str, object]:
    """The numbers a verdict rests on, for one env: the best re-use gain over K > 1 (and
    whether its interval lies above 1), per clip the safe number of epochs and the cos_ref
    change at the largest K, and how the displacement grows with K per clip."""
    t = table[(table["env"] == env) & (table["K"] > 1)]
    if t.empty:
        return {"env": env, "n": 0}
    best = t.loc[t["reuse_gain"].idxmax()]
    per_clip = {clip: {"safe": safe_epochs(g), "last": g.sort_values("K").iloc[-1]}
                for clip, g in t.groupby("clip")}
    return {"env": env, "n": int(t["n_seeds"].min()), "best_gain": best,
            "gain_above_1": bool(np.isfinite(best["reuse_gain_lo"]) and best["reuse_gain_lo"] > 1),
            "per_clip": per_clip, "saturation": displacement_saturation(t)}


def displacement_saturation(t: pd.DataFrame) -> pd.DataFrame:
    """Per clip: displacement at the largest K over displacement at the smallest K > 1, next
    to the ratio of those K (what an unclipped, undiminished direction would give)."""
    rows = []
    for clip, g in t.groupby("clip"):
        g = g.sort_values("K")
        if len(g) < 2:
            continue
        lo, hi = g.iloc[0], g.iloc[-1]
        rows.append({"clip": clip, "K_from": int(lo["K"]), "K_to": int(hi["K"]),
                     "growth": hi["displacement"] / lo["displacement"],
                     "free_growth": hi["K"] / lo["K"]})
    return pd.DataFrame(rows)


def _env_sentence(f: dict[str, object]) -> str:
    b = f["best_gain"]
    safe = ", ".join(f"{c['safe']} (ε={clip:g})" for clip, c in f["per_clip"].items())
    last = "; ".join(f"ε={clip:g}: {_delta(c['last'], 'd_cos_ref')} per batch, "
                     f"{_delta(c['last'], 'd_cos_mean')} expected"
                     for clip, c in f["per_clip"].items())
    k_max = int(max(c["last"]["K"] for c in f["per_clip"].values()))
    return (f"{f['env']}: re-use gain up to {format_columns(b, 'reuse_gain', 2, style='f')} "
            f"plain steps per batch ({b['label']}); cosine with ∇J "
            f"(per batch and expected) no worse than GAE's up to K = {safe}; at K = {k_max} "
            f"the cosine minus GAE's is {last}")


def _delta(row: pd.Series, col: str) -> str:
    return format_columns(row, col, 3, style="f", sign=True)


def verdict(summary: tuple) -> Verdict:
    """The verdict from the intervals. confirmed: in every env PPO's epochs gain more
    than one plain step (re-use gain's interval above 1) and, for every clip, FEW_EPOCHS
    epochs leave cos_ref indistinguishable from GAE's or better; refuted: no env shows a
    gain above 1; qualified: otherwise."""
    table = summary[0]
    found = [env_findings(table, e) for e in dict.fromkeys(table["env"])]
    found = [f for f in found if f.get("n", 0) >= MIN_SEEDS]
    if not found:
        return inconclusive("too few seeds or no PPO run with K > 1")
    gains = [f["gain_above_1"] for f in found]
    few_ok = [all(c["safe"] >= FEW_EPOCHS for c in f["per_clip"].values()) for f in found]
    if all(gains) and all(few_ok):
        word = "confirmed"
    elif not any(gains):
        word = "refuted"
    else:
        word = "qualified"
    return Verdict(word, "; ".join(_env_sentence(f) for f in found))


def env_table(table: pd.DataFrame, env: str) -> str:
    """The rows of one env as a markdown table."""
    cols = [("cos_ref", "cos(d, ∇J), per batch"), ("d_cos_ref", "Δ vs GAE"),
            ("cos_mean", "cos(E d, ∇J)"), ("d_cos_mean", "Δ vs GAE"),
            ("rel_bias", "‖E d − ∇J‖/‖∇J‖"), ("rel_variance", "tr Cov/‖∇J‖²"),
            ("reuse_gain", "re-use gain K⟨E d,∇J⟩/‖∇J‖²"), ("displacement", "‖θ_K − θ_0‖")]
    rows = [[r["label"], *(format_ci(r[c], r[f"{c}_lo"], r[f"{c}_hi"], 2 if c.startswith("d_") else 3,
                                     missing="—") for c, _ in cols)]
            for _, r in table[table["env"] == env].iterrows()]
    return "\n".join(markdown_table(["row", *(h for _, h in cols)], rows))


def saturation_lines(table: pd.DataFrame) -> list[str]:
    """One sentence per env on how the clip bounds the displacement."""
    lines = []
    for env in dict.fromkeys(table["env"]):
        sat = displacement_saturation(table[(table["env"] == env) & (table["K"] > 1)])
        if sat.empty:
            continue
        bits = ", ".join(f"×{r.growth:.2f} at ε = {r.clip:g}" for r in sat.itertuples())
        r0 = next(sat.itertuples())
        lines.append(f"- {env}: from K = {int(r0.K_from)} to K = {int(r0.K_to)} (×{r0.free_growth:g} "
                     f"the epochs) the parameter displacement per batch grows {bits}.")
    return lines


def markdown(summary: tuple, verdict: Verdict, preset: str) -> str:
    """result.md: the claim, one table per env, the checks and the verdict."""
    table, runs = summary
    lrs = runs.dropna(subset=["ppo_lr"]).groupby("env")["ppo_lr"].first()
    n = runs.groupby(["env", "label"])["seed"].nunique()
    out = [f"# PPO's update direction against the exact gradient ({preset} preset)", "",
           f"Claim: {CLAIM}", "",
           ("d = (θ_K − θ_0)/(ppo_lr·K) after K full-batch epochs on the clipped surrogate "
            "(GAE(λ) advantages); K = 1 is GAE itself. Mean over seeds with 95% bootstrap "
            "intervals; Δ is the paired difference from GAE (same seed). Measured iterations "
            f">= {MIN_STEP} of each run (critic fitted). Seeds per row: {n.min()}–{n.max()}."), ""]
    for env in dict.fromkeys(table["env"]):
        lr = lrs.get(env, math.nan)
        out += [f"## {env} (ppo_lr = {lr:g})", "", env_table(table, env), ""]
    gap = k1_matches_gae(runs)
    if np.isfinite(gap):
        out += [(f"Check: PPO with K = 1 and GAE give the same cos_ref to within {gap:.1e} "
                "(same seeds), as they must."), ""]
    sat = saturation_lines(table)
    if sat:
        out += ["How the clip bounds the update:", "", *sat, ""]
    out += [verdict.line(), ""]
    return "\n".join(out)


def _k_axis(ax, ks: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(ticker.FixedLocator(ks))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("PPO epochs K per batch")


def plot_metric_grid(table: pd.DataFrame, rows: list[tuple[str, str, bool]], name: str,
                     out_dir: Path) -> list[Path]:
    """One row of panels per metric (column, y label, log y), one column per env: the metric
    against K, one line per clip epsilon (K = 1, where the clip is inactive, starts every
    line), GAE as a dashed line with its band."""
    envs = list(dict.fromkeys(table["env"]))
    fig, axes = plt.subplots(len(rows), len(envs), squeeze=False,
                             figsize=(PAPER_WIDTH, PANEL_HEIGHT * len(rows)))
    clips = sorted(c for c in table["clip"].dropna().unique())
    colours = dict(zip(clips, sns.color_palette("viridis", len(clips))))
    for j, env in enumerate(envs):
        t = table[table["env"] == env]
        k1 = t[(t["K"] == 1) & (t["label"] != GAE_LABEL)]
        gae = t[t["label"] == GAE_LABEL]
        ks = sorted(t["K"].unique())
        for i, (col, ylabel, log) in enumerate(rows):
            ax = axes[i][j]
            if not gae.empty and np.isfinite(gae[col].iloc[0]):
                g = gae.iloc[0]
                ax.axhline(g[col], color="0.3", ls="--", lw=1, label="GAE (95% CI)")
                if np.isfinite(g[f"{col}_lo"]):
                    ax.axhspan(g[f"{col}_lo"], g[f"{col}_hi"], color="0.5", alpha=0.15, lw=0)
            if col == "reuse_gain":
                ax.plot(ks, ks, color="0.6", ls=":", lw=1, label="K (K plain steps of ∇J)")
            for n_clip, clip in enumerate(clips):
                line = pd.concat([k1, t[t["clip"] == clip]]).sort_values("K")
                line = line[np.isfinite(line[col])]
                if line.empty:
                    continue
                err = error_bars(line, col)
                jitter = 2.0 ** (0.04 * (n_clip - (len(clips) - 1) / 2))  # keep bars apart
                ax.errorbar(line["K"] * jitter, line[col], yerr=np.nan_to_num(err), marker="o",
                            ms=3.5, capsize=2, lw=1.2, color=colours[clip],
                            label=f"PPO, ε = {clip:g}")
            _k_axis(ax, ks)
            if log:
                log_axis(ax, "y", pd.concat([t[col], t[f"{col}_lo"], t[f"{col}_hi"]]))
            ax.set_ylabel(ylabel)
            ax.set_title(env)
    legend_below(fig, axes.flat, ncol=3)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def make_figures(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The direction figure (cosines), the bias/variance figure and the re-use figure."""
    figures = out_dir
    paths = plot_metric_grid(table, [("cos_ref", "cos(d, ∇J): one batch, mean", False),
                                     ("cos_mean", "cos(E d, ∇J): expected direction", False)],
                             f"{NAME}_cosine", figures)
    paths += plot_metric_grid(table, [("rel_bias", REL_BIAS_LABEL, False),
                                      ("rel_variance", REL_VAR_LABEL, True)],
                              f"{NAME}_bias_variance", figures)
    paths += plot_metric_grid(table, [("reuse_gain", "re-use gain  K⟨E d, ∇J⟩ / ‖∇J‖²", True),
                                      ("displacement", "‖θ_K − θ_0‖ per batch (parameters)",
                                       True)],
                              f"{NAME}_reuse", figures)
    return paths


EXPERIMENT = Experiment(
    "PPO's update direction", lambda runs: (summarise(runs), runs), verdict, markdown,
    select=per_run, result_frame=lambda summary: summary[0],
    figures=lambda summary, runs, out_dir: make_figures(summary[0], out_dir),
    empty_reason="no measured PPO or GAE run")
analyze = EXPERIMENT.analyze
