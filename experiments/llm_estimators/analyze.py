"""Language-model fine-tuning estimators against the exact gradient: one verdict per claim.

``analyze(frame, out, preset)`` is called by ``pgvar-reproduce llm_estimators`` with the
runs of ``sweep.yaml``; the sweep of a run is the first folder of its ``run_id``. Each
claim has a small ``claim_*`` function returning ``(table, verdict word, sentence)``;
the figures have one ``plot_*`` function each.

Statistics read from metrics.csv (``pgvar.sequence_measure`` documents them): the
exact ``exact_mean_cos`` / ``exact_rel_bias`` / ``exact_length_bias`` / ``prompt_weight_q``
where the estimator's mean has a closed form (reinforce, rloo, grpo, dr_grpo), and for
every estimator the Monte Carlo ones. The Monte Carlo cosine of the mean is de-noised
here: with ``||g_bar - g_ref||^2 = U + trCov/M`` (U = ``grad_bias_sq``) and
``||g_bar||^2 = snr trCov``, ``<g_bar, g_ref>`` is unbiased for ``<E g, g_ref>`` and
``||g_bar||^2 - trCov/M`` for ``||E g||^2``. Intervals are 95% bootstrap intervals over
seeds (``analysis.stats.mean_ci``).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.experiment import sections_frame, write_inconclusive
from analysis.figures import PANEL_HEIGHT, PAPER_WIDTH, apply_theme, save_figure
from analysis.loader import measured_rows
from analysis.render import format_ci
from analysis.stats import mean_ci

NAME = "llm_estimators"
TITLE = "Language-model fine-tuning estimators against the exact gradient"
ORDER = ["reinforce", "rloo", "grpo", "dr_grpo", "dapo", "bnpo"]
EXACT_COS_TOL = 1e-4  # float32 enumeration: an exact cosine within this of 1 is "along grad J"


# ----------------------------------------------------------------------------- data


def with_sweep(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with a ``sweep_name`` column: the first folder of the run id."""
    return frame.assign(sweep_name=frame["run_id"].astype(str).str.split("/").str[0])


def first_rows(frame: pd.DataFrame, sweep_prefix: str) -> pd.DataFrame:
    """The first measured row of every run of the sweeps whose name starts with the prefix."""
    rows = measured_rows(frame)
    rows = rows[rows["sweep_name"].str.startswith(sweep_prefix)]
    return rows[rows["step"] == rows.groupby("run_dir")["step"].transform("min")]


def denoised_cosine(rows: pd.DataFrame) -> pd.Series:
    """cos(E g, g_ref) from the logged statistics (module docstring); nan where the de-noised
    squared norm of the mean is not positive."""
    tv, M = rows["grad_variance"], rows["n_estimates"]
    gbar2 = rows["snr"] * tv
    r2 = rows["ref_norm"] ** 2
    dist2 = rows["grad_bias_sq"] + tv / M
    inner = (gbar2 + r2 - dist2) / 2
    mean2 = gbar2 - tv / M
    return (inner / np.sqrt(mean2.where(mean2 > 0) * r2)).clip(-1, 1)


def denoised_length_bias(rows: pd.DataFrame) -> pd.Series:
    """<grad E|y|, E g>/||E g|| - <grad E|y|, g_ref>/||g_ref||: the logged slope along
    g_bar rescaled from ||g_bar|| to the de-noised ||E g|| (noise inflates ||g_bar|| and
    would pull the slope towards 0)."""
    tv, M = rows["grad_variance"], rows["n_estimates"]
    gbar2 = rows["snr"] * tv
    mean2 = gbar2 - tv / M
    return rows["len_slope_est"] * np.sqrt(gbar2 / mean2.where(mean2 > 0)) - rows["len_slope_ref"]


def scale_free_mse(rows: pd.DataFrame) -> pd.Series:
    """E||g/c - g_ref||^2 / ||g_ref||^2 at the best scale c = <g_bar, g_ref>/||g_ref||^2:
    E||g||^2 ||g_ref||^2 / <g_bar, g_ref>^2 - 1 (direction error and noise, not scale)."""
    tv, M = rows["grad_variance"], rows["n_estimates"]
    gbar2 = rows["snr"] * tv
    r2 = rows["ref_norm"] ** 2
    inner = (gbar2 + r2 - rows["grad_bias_sq"] - tv / M) / 2
    second_moment = tv * (M - 1) / M + gbar2
    return second_moment * r2 / inner ** 2 - 1


def policy_kind(rows: pd.DataFrame) -> pd.Series:
    """table or transformer, from the run's config."""
    col = "env.policy" if "env.policy" in rows.columns else None
    return rows[col].fillna("table") if col else pd.Series("table", index=rows.index)


def prompt_columns(frame: pd.DataFrame, prefix: str) -> list[str]:
    """``prefix0..prefixQ-1`` present in the frame, in prompt order."""
    cols = [c for c in frame.columns if c.startswith(prefix) and c[len(prefix):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(prefix):]))


def ci_of(values) -> tuple[float, float, float]:
    est = mean_ci(np.asarray(values, dtype=float))
    return est.value, est.lo, est.hi


def summarise(rows: pd.DataFrame, keys: list[str], columns: tuple[str, ...]) -> pd.DataFrame:
    """Per group of ``keys``: the number of runs and, for every column, its mean over the
    group with a 95% bootstrap interval (``COL``, ``COL_lo``, ``COL_hi``)."""
    out = []
    for key, g in rows.groupby(keys):
        rec = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        rec["runs"] = len(g)
        for col in columns:
            v = g[col] if col in g.columns else pd.Series(dtype=float)
            rec[col], rec[f"{col}_lo"], rec[f"{col}_hi"] = ci_of(v)
        out.append(rec)
    return pd.DataFrame(out)


def excludes(lo: float, hi: float, x: float) -> bool:
    return math.isfinite(lo) and math.isfinite(hi) and not lo <= x <= hi


# ----------------------------------------------------------------------------- claims


def direction_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per policy and estimator: exact cos(E g, grad J), de-noised Monte Carlo cosine, the
    exact relative bias, the Monte Carlo length bias and relative variance."""
    rows = first_rows(frame, "at_init")
    rows = rows.assign(policy=policy_kind(rows), mc_cos=denoised_cosine(rows),
                       mc_length_bias=denoised_length_bias(rows))
    table = summarise(rows, ["policy", "estimator"],
                      ("exact_mean_cos", "mc_cos", "exact_rel_bias", "exact_length_bias",
                       "mc_length_bias", "grad_rel_variance", "len_slope_ref",
                       "bias_distinguishable"))
    if not table.empty:
        table["order"] = table["estimator"].map({e: i for i, e in enumerate(ORDER)})
        table = table.sort_values(["policy", "order"]).drop(columns="order")
    return table


def claim_direction(table: pd.DataFrame) -> tuple[str, str]:
    """(1) RLOO and Dr. GRPO point along grad J (exact cosine 1), GRPO does not."""
    if table.empty:
        return "inconclusive", "no at-initialisation runs"
    parts, ok = [], True
    for _, r in table.iterrows():
        if r["estimator"] in ("rloo", "dr_grpo"):
            along = r["exact_mean_cos"] >= 1 - EXACT_COS_TOL
            ok = ok and along
            parts.append(f"{r['policy']} {r['estimator']}: exact cos {r['exact_mean_cos']:.6f}")
        elif r["estimator"] in ("grpo", "dapo", "bnpo"):
            cos = r["exact_mean_cos"] if math.isfinite(r["exact_mean_cos"]) else r["mc_cos"]
            kind = "exact" if math.isfinite(r["exact_mean_cos"]) else "de-noised MC"
            parts.append(f"{r['policy']} {r['estimator']}: {kind} cos {cos:.3f}")
    return ("confirmed" if ok else "refuted"), "; ".join(parts)


def weights_table(frame: pd.DataFrame, sweep_prefix: str) -> pd.DataFrame:
    """One line per (run, prompt) of the table policy at initialisation: success rate p,
    the implied weight of the run's estimator (exact), 1/sqrt(p(1-p)) and the exact
    std-scaled group-advantage gap abar(1) - abar(0) at the run's G."""
    import torch

    from pgvar.sequence_estimators import SEQUENCE_ESTIMATORS, mean_advantage

    rows = first_rows(frame, sweep_prefix)
    weights, success = prompt_columns(rows, "prompt_weight_"), prompt_columns(rows, "success_")
    out = []
    for _, r in rows.iterrows():
        G = int(r["estimator.group_size"])
        for q, (wc, sc) in enumerate(zip(weights, success)):
            if not math.isfinite(r[wc]):
                continue
            p = float(r[sc])
            gap = mean_advantage(SEQUENCE_ESTIMATORS["dr_grpo"],
                                 torch.tensor([p], dtype=torch.float64), G, scaled=True)[0]
            out.append({"estimator": r["estimator"], "G": G, "seed": r["seed"], "prompt": q,
                        "success": p, "weight": float(r[wc]),
                        "inv_std": 1 / math.sqrt(max(p * (1 - p), 1e-12)),
                        "std_gap": float(gap[1] - gap[0])})
    return pd.DataFrame(out)


def weight_slopes(weights: pd.DataFrame, label: str) -> pd.DataFrame:
    """Per estimator and G: the range of the implied weights, the slope of log weight on
    log(1/std) with a bootstrap interval, and the correlation with the exact gap."""
    out = []
    if weights.empty:
        return pd.DataFrame()
    for (est, G), g in weights.groupby(["estimator", "G"]):
        x, y = np.log(g["inv_std"].to_numpy()), np.log(g["weight"].clip(lower=1e-12).to_numpy())
        lo, hi = bootstrap_slopes(x, y)
        out.append({"setting": label, "estimator": est, "G": int(G), "points": len(g),
                    "weight_min": g["weight"].min(), "weight_max": g["weight"].max(),
                    "slope": float(np.polyfit(x, y, 1)[0]) if np.ptp(x) > 0 else math.nan,
                    "slope_lo": lo, "slope_hi": hi,
                    "corr_with_gap": float(np.corrcoef(g["weight"], g["std_gap"])[0, 1])
                    if g["weight"].std() > 0 else math.nan})
    return pd.DataFrame(out)


def claim_prompt_weights(std_only: pd.DataFrame, as_used: pd.DataFrame
                         ) -> tuple[pd.DataFrame, str, str]:
    """(2) GRPO's std normalisation reweights prompts by ~1/std: measured with the std
    alone (dr_grpo, scale_rewards=group), and as GRPO uses it (with 1/|y|)."""
    table = pd.concat([weight_slopes(std_only, "std scaling only (dr_grpo, scale_rewards=group)"),
                       weight_slopes(as_used, "as used (G = 4)")], ignore_index=True)
    if std_only.empty or table.empty:
        return table, "inconclusive", "no std-scaling runs"
    rows = table[table["setting"].str.startswith("std")].sort_values("G")
    reweights = bool((rows["slope_lo"] > 0).all())
    near_one = bool(((rows["slope_lo"] <= 1) & (rows["slope_hi"] >= 1)).any())
    parts = [f"G = {int(r['G'])}: weights {r['weight_min']:.3g}-{r['weight_max']:.3g}, slope of log "
             f"weight on log(1/std) {format_ci(r['slope'], r['slope_lo'], r['slope_hi'])}, "
             f"correlation with the exact gap {r['corr_with_gap']:.3f}" for _, r in rows.iterrows()]
    grpo = table[(table["estimator"] == "grpo")]
    if len(grpo):
        g = grpo.iloc[0]
        parts.append(f"GRPO as used (1/|y| too): slope {format_ci(g['slope'], g['slope_lo'], g['slope_hi'])}")
    verdict = "confirmed" if reweights and near_one else ("qualified" if reweights else "refuted")
    return table, verdict, "; ".join(parts)


def bootstrap_slopes(x: np.ndarray, y: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the least-squares slope of y on x."""
    if len(x) < 3 or np.ptp(x) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    slopes = []
    for _ in range(n):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0:
            slopes.append(np.polyfit(x[i], y[i], 1)[0])
    return float(np.percentile(slopes, 2.5)), float(np.percentile(slopes, 97.5))


def claim_length(table: pd.DataFrame) -> tuple[str, str]:
    """(3) per-completion length normalisation (GRPO) biases the expected length."""
    t = table[table["policy"] == "table"] if not table.empty else table
    if t.empty or "grpo" not in set(t["estimator"]):
        return "inconclusive", "no GRPO runs at initialisation"
    by = t.set_index("estimator")
    g = by.loc["grpo"]
    biased = excludes(g["exact_length_bias_lo"], g["exact_length_bias_hi"], 0.0)
    parts = [f"{e}: {format_ci(by.loc[e, 'exact_length_bias'], by.loc[e, 'exact_length_bias_lo'], by.loc[e, 'exact_length_bias_hi'])} (exact)"
             for e in ("grpo", "rloo", "dr_grpo") if e in by.index]
    parts += [f"{e}: {format_ci(by.loc[e, 'mc_length_bias'], by.loc[e, 'mc_length_bias_lo'], by.loc[e, 'mc_length_bias_hi'])} (MC, de-noised)"
              for e in ("dapo", "bnpo") if e in by.index]
    sentence = ("length bias, d E|y| along the unit mean estimate minus along the unit grad J "
                f"(true: {format_ci(g['len_slope_ref'], g['len_slope_ref_lo'], g['len_slope_ref_hi'])}): "
                + "; ".join(parts))
    return ("confirmed" if biased else "refuted"), sentence


def group_size_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per estimator and G at 16 completions per batch: relative variance, relative MSE
    and the scale-free relative MSE, means over seeds with intervals."""
    rows = first_rows(frame, "group_size")
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(G=rows["estimator.group_size"].astype(int), sf_mse=scale_free_mse(rows),
                       rel_mse=rows["grad_mse"] / rows["ref_norm"] ** 2)
    table = summarise(rows, ["estimator", "G"], ("grad_rel_variance", "rel_mse", "sf_mse"))
    return table.assign(prompts_per_batch=int(rows["training.batch_size"].iloc[0]) // table["G"])


def claim_group_size(table: pd.DataFrame) -> tuple[str, str]:
    """(4) variance and MSE against G at a fixed budget; the MSE-optimal G."""
    if table.empty:
        return "inconclusive", "no group-size runs"
    parts = []
    for est, g in table.groupby("estimator"):
        best = g.loc[g["sf_mse"].idxmin()]
        parts.append(f"{est}: MSE-optimal G = {int(best['G'])} (scale-free relative MSE "
                     f"{format_ci(best['sf_mse'], best['sf_mse_lo'], best['sf_mse_hi'])}; "
                     f"over G = {', '.join(str(int(x)) for x in g['G'])}: "
                     f"{', '.join(f'{v:.3g}' for v in g['sf_mse'])})")
    return "measured", "; ".join(parts)


def kl_table(frame: pd.DataFrame) -> pd.DataFrame:
    """k1-in-reward against k3-in-loss: bias against grad (J - beta KL) at measured steps
    after the first (pi != pi_ref), per mode and step."""
    rows = measured_rows(frame)
    rows = rows[(rows["sweep_name"] == "kl") & (rows["step"] > 0)]
    if rows.empty:
        return pd.DataFrame()
    rows = rows.rename(columns={"estimator.kl_mode": "kl_mode"})
    return summarise(rows, ["kl_mode", "step"], ("exact_rel_bias", "grad_rel_bias",
                                                 "exact_mean_cos", "exact_kl", "bias_distinguishable"))


def claim_kl(table: pd.DataFrame) -> tuple[str, str]:
    """(5) k3 in the loss is biased for grad (J - beta KL); k1 in the reward is not."""
    if table.empty:
        return "inconclusive", "no KL runs measured after the first step"
    k1, k3 = table[table["kl_mode"] == "k1_reward"], table[table["kl_mode"] == "k3_loss"]
    if k1.empty or k3.empty:
        return "inconclusive", "one of the two KL modes is missing"
    k1_unbiased = bool((k1["exact_rel_bias"] < 1e-3).all())
    k3_biased = bool((k3["exact_rel_bias_lo"] > 1e-3).all())
    last3, last1 = k3.iloc[-1], k1.iloc[-1]
    sentence = (f"at step {int(last3['step'])} (KL(pi||pi_ref) = {last3['exact_kl']:.3g}): exact relative "
                f"bias of the mean, k3 in the loss "
                f"{format_ci(last3['exact_rel_bias'], last3['exact_rel_bias_lo'], last3['exact_rel_bias_hi'])}, "
                f"k1 in the reward {last1['exact_rel_bias']:.1g}; Monte Carlo bias distinguishable "
                f"in {last3['bias_distinguishable']:.0%} (k3) and {last1['bias_distinguishable']:.0%} "
                f"(k1) of the runs")
    return ("confirmed" if k1_unbiased and k3_biased else "qualified"), sentence


def training_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean exact J and expected length per estimator and step, with intervals over seeds."""
    rows = frame[frame["sweep_name"] == "training"]
    return summarise(rows, ["estimator", "step"], ("exact_J", "exact_length"))


def claim_training(curves: pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    """(6) learning curves: final exact J and expected length per estimator."""
    if curves.empty:
        return pd.DataFrame(), "inconclusive", "no training runs"
    last = curves[curves["step"] == curves.groupby("estimator")["step"].transform("max")]
    first = curves[curves["step"] == 0].set_index("estimator")
    parts = [f"{r['estimator']}: J {format_ci(r['exact_J'], r['exact_J_lo'], r['exact_J_hi'])}, "
             f"E|y| {format_ci(r['exact_length'], r['exact_length_lo'], r['exact_length_hi'])}"
             for _, r in last.iterrows()]
    start = first.iloc[0]
    sentence = (f"from J = {start['exact_J']:.3g}, E|y| = {start['exact_length']:.3g} to, after "
                f"{int(last['step'].max()) + 1} updates: " + "; ".join(parts))
    return last.reset_index(drop=True), "measured", sentence


# ----------------------------------------------------------------------------- figures


def plot_direction(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """cos(E g, grad J) per estimator (exact where available, else de-noised Monte Carlo)
    and the length bias, one row of panels per policy."""
    policies = list(dict.fromkeys(table["policy"]))
    fig, axes = plt.subplots(len(policies), 2, figsize=(PAPER_WIDTH, PANEL_HEIGHT * len(policies)),
                             squeeze=False)
    for row, policy in zip(axes, policies):
        t = table[table["policy"] == policy]
        x = np.arange(len(t))
        exact = t["exact_mean_cos"].to_numpy()
        mc = t["mc_cos"].to_numpy()
        row[0].bar(x - 0.2, np.where(np.isfinite(exact), exact, np.nan), 0.4, label="exact")
        row[0].bar(x + 0.2, mc, 0.4, label="Monte Carlo (de-noised)")
        row[0].set_ylim(min(0.5, np.nanmin(np.r_[exact, mc]) - 0.05), 1.01)
        row[0].set_ylabel(f"{policy}: cos(E ĝ, ∇J)")
        lb = np.where(np.isfinite(t["exact_length_bias"]), t["exact_length_bias"], t["mc_length_bias"])
        row[1].bar(x, lb, color="tab:green")
        row[1].axhline(0, color="0.3", lw=0.8)
        row[1].set_ylabel("length bias (tokens / unit step)")
        for ax in row:
            ax.set_xticks(x, t["estimator"], rotation=30)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Direction and length bias of the mean estimate at random initial policies", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}_direction")


def plot_prompt_weights(weights: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Implied per-prompt weight against 1/std of the prompt's reward, per estimator."""
    fig, ax = plt.subplots(figsize=(PAPER_WIDTH / 2, PANEL_HEIGHT + 0.4))
    for G, g in weights.groupby("G"):
        ax.scatter(g["inv_std"], g["weight"] / g["weight"].median(), s=8, alpha=0.6, label=f"G = {G}")
    x = np.geomspace(weights["inv_std"].min(), weights["inv_std"].max(), 20)
    ax.plot(x, x / weights["inv_std"].median(), color="0.3", ls="--", lw=0.8, label="∝ 1/std")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("1 / sqrt(p (1 - p)) of the prompt")
    ax.set_ylabel("implied weight / its median")
    ax.set_title("std scaling alone (dr_grpo, scale_rewards=group)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}_prompt_weights")


def plot_group_size(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Relative variance and scale-free relative MSE against G at 16 completions per batch."""
    fig, axes = plt.subplots(1, 2, figsize=(PAPER_WIDTH, PANEL_HEIGHT + 0.3))
    for est, g in table.groupby("estimator"):
        for ax, col in zip(axes, ("grad_rel_variance", "sf_mse")):
            ax.errorbar(g["G"], g[col], yerr=[g[col] - g[f"{col}_lo"], g[f"{col}_hi"] - g[col]],
                        marker="o", ms=3, capsize=2, label=est)
    for ax, label in zip(axes, ("relative variance tr Cov / ‖∇J‖²",
                                "scale-free relative MSE")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("group size G (16 completions per batch)")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}_group_size")


def plot_training(curves: pd.DataFrame, kl: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Exact J and expected completion length over training, and the KL modes' bias."""
    fig, axes = plt.subplots(1, 3, figsize=(PAPER_WIDTH, PANEL_HEIGHT + 0.3))
    for est, g in curves.groupby("estimator"):
        for ax, col in zip(axes[:2], ("exact_J", "exact_length")):
            ax.plot(g["step"], g[col], label=est)
            ax.fill_between(g["step"], g[f"{col}_lo"], g[f"{col}_hi"], alpha=0.2)
    axes[0].set_ylabel("exact J (mean success)")
    axes[1].set_ylabel("expected length E|y|")
    for ax in axes[:2]:
        ax.set_xlabel("update")
    axes[0].legend(fontsize=7)
    for mode, g in kl.groupby("kl_mode") if not kl.empty else []:
        axes[2].errorbar(g["step"], g["exact_rel_bias"],
                         yerr=[g["exact_rel_bias"] - g["exact_rel_bias_lo"],
                               g["exact_rel_bias_hi"] - g["exact_rel_bias"]],
                         marker="o", ms=3, capsize=2, label=mode)
    axes[2].set_xlabel("update")
    axes[2].set_ylabel("‖E ĝ − ∇(J − βKL)‖ / ‖∇(J − βKL)‖")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}_training")


# ----------------------------------------------------------------------------- report


def direction_markdown(table: pd.DataFrame) -> list[str]:
    """The per-estimator block (the comparison table of these estimators)."""
    lines = [("| policy | estimator | runs | cos(E ĝ, ∇J) exact | cos, Monte Carlo (de-noised) | "
              "rel. bias exact ‖E ĝ − ∇J‖/‖∇J‖ | length bias exact | length bias MC (de-noised) | "
              "rel. variance | bias distinguishable (share of runs) |"),
             "|" + " --- |" * 10]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['policy']} | {r['estimator']} | {r['runs']} | "
            f"{r['exact_mean_cos']:.6g} | {format_ci(r['mc_cos'], r['mc_cos_lo'], r['mc_cos_hi'])} | "
            f"{format_ci(r['exact_rel_bias'], r['exact_rel_bias_lo'], r['exact_rel_bias_hi'])} | "
            f"{format_ci(r['exact_length_bias'], r['exact_length_bias_lo'], r['exact_length_bias_hi'])} | "
            f"{format_ci(r['mc_length_bias'], r['mc_length_bias_lo'], r['mc_length_bias_hi'])} | "
            f"{format_ci(r['grad_rel_variance'], r['grad_rel_variance_lo'], r['grad_rel_variance_hi'])} | "
            f"{r['bias_distinguishable']:.0%} |")
    return lines


def frame_markdown(table: pd.DataFrame, columns: list[str]) -> list[str]:
    """A small markdown table of the given columns (numbers to 3 significant digits)."""
    if table.empty:
        return ["(no data)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for _, r in table.iterrows():
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def analyze(frame: pd.DataFrame, out: Path, preset: str) -> str:
    """Write result.md, result.csv and figures/llm_estimators_*.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if frame.empty or "exact_J" not in frame.columns:
        return write_inconclusive(out, TITLE, "no sequence runs to analyse")
    frame = with_sweep(frame)
    direction = direction_table(frame)
    weights = weights_table(frame, "std_weights")
    weight_summary, v2, s2 = claim_prompt_weights(weights, weights_table(frame, "at_init_table"))
    group = group_size_table(frame)
    kl = kl_table(frame)
    curves = training_curves(frame)
    final, v6, s6 = claim_training(curves)
    verdicts = [("(1) RLOO and Dr. GRPO point along ∇J", *claim_direction(direction)),
                ("(2) GRPO's std normalisation reweights prompts by 1/std", v2, s2),
                ("(3) per-completion length normalisation biases the expected length",
                 *claim_length(direction)),
                ("(4) variance and MSE against G at a fixed budget", *claim_group_size(group)),
                ("(5) k3 in the loss is biased for ∇(J − βKL), k1 in the reward is not",
                 *claim_kl(kl)),
                ("(6) learning curves with expected length", v6, s6)]
    sections_frame(direction=direction, prompt_weights=weight_summary, group_size=group, kl=kl,
                   training=final).to_csv(out / "result.csv", index=False)
    lines = [f"# {TITLE} ({preset} preset)", "",
             "## Per estimator at random initial policies (G = 4, 16 completions per batch)", "",
             *direction_markdown(direction), "", "## Prompt weights (table policy)", "",
             *frame_markdown(weight_summary, ["setting", "estimator", "G", "points", "weight_min",
                                              "weight_max", "slope", "slope_lo", "slope_hi",
                                              "corr_with_gap"]),
             "", "## Group size at 16 completions per batch", "",
             *frame_markdown(group, ["estimator", "G", "prompts_per_batch", "runs",
                                     "grad_rel_variance", "rel_mse", "sf_mse"]),
             "", "## KL penalty (beta = 0.2): bias against ∇(J − βKL)", "",
             *frame_markdown(kl, ["kl_mode", "step", "runs", "exact_kl", "exact_rel_bias",
                                  "grad_rel_bias", "bias_distinguishable"]),
             "", "## Training (final update)", "",
             *frame_markdown(final, ["estimator", "step", "runs", "exact_J", "exact_length"]),
             "", "## Verdicts", ""]
    lines += [f"- Verdict {claim}: **{word}** — {sentence}." for claim, word, sentence in verdicts]
    text = "\n".join(lines) + "\n"
    (out / "result.md").write_text(text)
    apply_theme()
    figures = out / "figures"
    if not direction.empty:
        plot_direction(direction, figures)
    if not weights.empty:
        plot_prompt_weights(weights, figures)
    if not group.empty:
        plot_group_size(group, figures)
    if not curves.empty:
        plot_training(curves, kl, figures)
    return text
