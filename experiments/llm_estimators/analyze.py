"""Language-model fine-tuning estimators against the exact gradient: one finding per claim
of README.md beside this file (``claim_*``), from the sweep named by the first folder of a
run's ``run_id``. Where a claim restates the identity the exact columns are computed from
(``pgvar.sequence_estimators.exact_mean``) its exact finding is *by construction*, and the
sampled estimator tests it (``mc_bias_gap``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import experiment as ex
from analysis.loader import measured_rows
from analysis.render import format_columns, table_sections

TITLE = "Language-model fine-tuning estimators against the exact gradient"
ORDER = {e: i for i, e in enumerate(["reinforce", "rloo", "grpo", "dr_grpo", "dapo", "bnpo"])}
EXACT_COS_TOL = 1e-4  # float32 enumeration: an exact cosine within this of 1 is "along grad J"
STD_ONLY = "std scaling only (dr_grpo, scale_rewards=group)"


def first_rows(frame: pd.DataFrame, sweep_prefix: str) -> pd.DataFrame:
    """The first measured row of every run of the sweeps whose name starts with the prefix
    (``denoised``)."""
    return denoised(ex.first_measurements(frame[frame["sweep_name"].str.startswith(sweep_prefix)]))


def denoised(rows: pd.DataFrame) -> pd.DataFrame:
    """``mc_cos`` = cos(E g, g_ref) from ``analysis.experiment.direction_columns``;
    ``mc_length_bias``: the logged slope along g_bar rescaled to the de-noised ||E g||,
    minus the slope along g_ref; ``sf_mse`` = E||g/c - g_ref||^2/||g_ref||^2 at the best
    scale c; ``mc_bias_gap`` = U/||g_ref||^2 - exact relative bias^2, unbiased for 0 when
    the sampled mean is the exact one (U = ``grad_bias_sq``, with its logged SE)."""
    d = ex.direction_columns(rows)
    r2, tv, M = d["ref_norm"] ** 2, d["grad_variance"], d["n_estimates"]
    norm2 = d["rel_sq_norm"].where(d["rel_sq_norm"] > 0)
    return d.assign(
        mc_cos=(d["rel_proj"] / np.sqrt(norm2)).clip(-1, 1), rel_mse=d["grad_mse"] / r2,
        mc_length_bias=d["len_slope_est"] * np.sqrt(d["snr"] * tv / r2 / norm2) - d["len_slope_ref"],
        sf_mse=(tv * (M - 1) / M + d["snr"] * tv) / r2 / d["rel_proj"] ** 2 - 1,
        mc_bias_gap=d["grad_bias_sq"] / r2 - d.get("exact_rel_bias", np.nan) ** 2,
        mc_bias_gap_se=d["grad_bias_sq_se"] / r2,
        policy=d.get("env.policy", pd.Series("table", d.index)).fillna("table"))


def direction_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per policy and estimator at initialisation: cosines, exact relative bias, length
    biases, relative variance and the sampled-exact bias gap."""
    table = ex.means_by_group(first_rows(frame, "at_init"), ["policy", "estimator"], [
        "exact_mean_cos", "mc_cos", "exact_rel_bias", "exact_length_bias", "mc_length_bias",
        "grad_rel_variance", "len_slope_ref", "bias_distinguishable", "mc_bias_gap"])
    return table.sort_values(["policy", "estimator"], key=lambda c: c.map(ORDER)
                             if c.name == "estimator" else c) if len(table) else table


def gaps(t: pd.DataFrame, *keys: str) -> str:
    """Each line's sampled-exact bias gap, whose interval holds 0 when the two means agree."""
    return "U/‖∇J‖² − exact relative bias² (0 when they agree): " + "; ".join(
        f"{' '.join(str(r[k]) for k in keys)} {format_columns(r, 'mc_bias_gap', 2)}"
        for _, r in t.iterrows())


def claim_direction(table: pd.DataFrame) -> list[ex.Finding]:
    """(1) RLOO and Dr. GRPO point along grad J, GRPO does not; the sampled means agree."""
    exact = table[table["exact_mean_cos"].notna()] if len(table) else table
    if exact.empty:
        return [ex.Finding("(1) directions", "inconclusive", "no exact means")]
    along = exact[exact["estimator"].isin(["rloo", "dr_grpo"])]
    grpo = exact[exact["estimator"] == "grpo"]
    cos = lambda t: "; ".join(f"{r.policy} {r.estimator} {r.exact_mean_cos:.6f}"
                              for r in t.itertuples())
    return [
        ex.check("", "(1) exact means of RLOO and Dr. GRPO along ∇J",
                 (along["exact_mean_cos"] >= 1 - EXACT_COS_TOL).all(),
                 f"exact cos {cos(along)} (abar(1) − abar(0) is the same for every prompt)",
                 ex.BY_CONSTRUCTION),
        ex.check("", "(1) GRPO's exact mean is not along ∇J",
                 (grpo["exact_mean_cos"] < 1 - EXACT_COS_TOL).all(), f"exact cos {cos(grpo)}"),
        ex.check("", "(1) the sampled means agree with the exact ones",
                 ex.in_interval(exact, "mc_bias_gap", 0).all(), gaps(exact, "policy", "estimator"))]


def weight_slopes(frame: pd.DataFrame, sweep_prefix: str, label: str) -> pd.DataFrame:
    """Per estimator and G: the range of the exact implied prompt weights, the slope of
    log weight on log(1/std) of the prompt's reward (bootstrap over (run, prompt) points)
    and the correlation with the exact std-scaled gap abar(1) - abar(0) of
    ``mean_advantage`` (1 by construction for the std scaling alone)."""
    import torch

    from pgvar.sequence_estimators import SEQUENCE_ESTIMATORS, mean_advantage

    rows = first_rows(frame, sweep_prefix)
    points = pd.DataFrame([
        {"estimator": r["estimator"], "G": int(r["estimator.group_size"]),
         "p": r[f"success_{q}"], "w": r[f"prompt_weight_{q}"]} for _, r in rows.iterrows()
        for q in range(sum(c.startswith("prompt_weight_") for c in rows.columns))]).dropna()
    out = []
    for (est, G), g in points.groupby(["estimator", "G"]) if len(points) else []:
        gap = mean_advantage(SEQUENCE_ESTIMATORS["dr_grpo"], torch.tensor(g["p"].to_numpy()), G,
                             scaled=True).numpy()
        slope = ex.slope_estimate(-0.5 * np.log((g["p"] * (1 - g["p"])).clip(lower=1e-12)),
                                  np.log(g["w"].clip(lower=1e-12)))
        corr = np.corrcoef(g["w"], gap[:, 1] - gap[:, 0])[0, 1] if g["w"].std() > 0 else math.nan
        out.append({"setting": label, "estimator": est, "G": G, "points": len(g),
                    "weight_min": g["w"].min(), "weight_max": g["w"].max(),
                    **ex.estimate_columns("slope", slope), "corr_with_gap": corr})
    return pd.DataFrame(out)


def claim_prompt_weights(table: pd.DataFrame) -> list[ex.Finding]:
    """(2) GRPO's std normalisation reweights prompts by ~1/std: slope > 0 at every G
    (it reweights), an interval holding 1 at some G (as 1/std)."""
    claim = "(2) GRPO's std normalisation reweights prompts by 1/std"
    rows = table[table["setting"] == STD_ONLY].sort_values("G") if len(table) else table
    if rows.empty:
        return [ex.Finding(claim, "inconclusive", "no std-scaling runs")]
    reweights = bool((rows["slope_lo"] > 0).all())
    near_one = bool(ex.in_interval(rows, "slope", 1).any())
    grpo = table[(table["estimator"] == "grpo") & (table["setting"] != STD_ONLY)]
    verdict = "qualified" if reweights and not near_one else "confirmed" if reweights else "refuted"
    return [ex.Finding(claim, verdict, "; ".join(
        [f"G = {r['G']}: weights {r['weight_min']:.3g}-{r['weight_max']:.3g}, slope of log "
         f"weight on log(1/std) {format_columns(r, 'slope')}, correlation with the exact gap "
         f"{r['corr_with_gap']:.3f}" for _, r in rows.iterrows()]
        + [f"GRPO as used (1/|y| too): slope {format_columns(r, 'slope')}"
           for _, r in grpo.iterrows()]))]


def claim_length(table: pd.DataFrame) -> list[ex.Finding]:
    """(3) per-completion length normalisation (GRPO) biases the expected length."""
    claim = "(3) per-completion length normalisation biases the expected length"
    by = table[table["policy"] == "table"].set_index("estimator") if len(table) else table
    if "grpo" not in by.index:
        return [ex.Finding(claim, "inconclusive", "no GRPO runs at initialisation")]
    g = by.loc["grpo"]
    parts = [f"{e}: {format_columns(by.loc[e], col)} ({kind})" for e, col, kind in
             [(e, "exact_length_bias", "exact") for e in ("grpo", "rloo", "dr_grpo")]
             + [(e, "mc_length_bias", "MC, de-noised") for e in ("dapo", "bnpo")] if e in by.index]
    return [ex.check("", claim, not ex.in_interval(g, "exact_length_bias", 0),
                     "length bias, d E|y| along the unit mean estimate minus along the unit ∇J "
                     f"(true: {format_columns(g, 'len_slope_ref')}): " + "; ".join(parts))]


def group_size_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per estimator and G at a fixed number of completions per batch: relative variance,
    relative MSE and the scale-free relative MSE."""
    rows = first_rows(frame, "group_size")
    if rows.empty:
        return pd.DataFrame()
    table = ex.means_by_group(rows.assign(G=rows["estimator.group_size"].astype(int)),
                              ["estimator", "G"], ["grad_rel_variance", "rel_mse", "sf_mse"])
    return table.assign(prompts_per_batch=int(rows["training.batch_size"].iloc[0]) // table["G"])


def claim_group_size(table: pd.DataFrame) -> list[ex.Finding]:
    """(4) variance and MSE against G at a fixed budget; the MSE-optimal G."""
    parts = [f"{est}: MSE-optimal G = {best['G']} (scale-free relative MSE "
             f"{format_columns(best, 'sf_mse')}; over G = {', '.join(map(str, g['G']))}: "
             f"{', '.join(f'{v:.3g}' for v in g['sf_mse'])})"
             for est, g in (table.groupby("estimator") if len(table) else [])
             for best in [g.loc[g["sf_mse"].idxmin()]]]
    return [ex.Finding("(4) variance and MSE against G at a fixed budget", ex.MEASURED,
                       "; ".join(parts) or "no group-size runs", ex.MEASURED)]


def kl_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per KL mode and measured step after the first (pi != pi_ref): bias against
    grad (J - beta KL), exact and sampled."""
    rows = measured_rows(frame)
    rows = rows[(rows["sweep_name"] == "kl") & (rows["step"] > 0)]
    if rows.empty:
        return pd.DataFrame()
    return ex.means_by_group(denoised(rows).rename(columns={"estimator.kl_mode": "kl_mode"}),
                             ["kl_mode", "step"], ["exact_kl", "exact_rel_bias", "grad_rel_bias",
                                                   "bias_distinguishable", "mc_bias_gap"])


def claim_kl(table: pd.DataFrame) -> list[ex.Finding]:
    """(5) k3 in the loss is biased for grad (J - beta KL); k1 in the reward is not."""
    if (set(table["kl_mode"]) if len(table) else set()) != {"k1_reward", "k3_loss"}:
        return [ex.Finding("(5) KL penalties", "inconclusive",
                           "needs KL runs of both modes measured after the first step")]
    k1, k3 = table[table["kl_mode"] == "k1_reward"], table[table["kl_mode"] == "k3_loss"]
    last = k3.iloc[-1]
    return [
        ex.check("", "(5) k3 in the loss is biased for ∇(J − βKL)",
                 (k3["exact_rel_bias_lo"] > 1e-3).all(),
                 f"at step {last['step']} (KL = {last['exact_kl']:.3g}) exact relative bias "
                 f"{format_columns(last, 'exact_rel_bias')}; Monte Carlo bias "
                 f"distinguishable in {last['bias_distinguishable']:.0%} of the runs"),
        ex.check("", "(5) k1 in the reward is unbiased (exact mean)", (k1["exact_rel_bias"] < 1e-3).all(),
                 f"exact relative bias {k1['exact_rel_bias'].max():.1g} (the closed form "
                 "is ∇(J − βKL))", ex.BY_CONSTRUCTION),
        ex.check("", "(5) the sampled means agree with the exact ones (both modes)",
                 ex.in_interval(table, "mc_bias_gap", 0).all(), gaps(table, "kl_mode", "step"))]


def claim_training(final: pd.DataFrame, start: pd.DataFrame) -> list[ex.Finding]:
    """(6) learning curves: final exact J and expected length per estimator."""
    return [ex.Finding("(6) learning curves with expected length", ex.MEASURED,
                       "no training runs" if final.empty else
                       f"from J = {start['exact_J'].iloc[0]:.3g}, E|y| = "
                       f"{start['exact_length'].iloc[0]:.3g} to, after "
                       f"{final['step'].max() + 1} updates: " + "; ".join(
                           f"{r['estimator']}: J {format_columns(r, 'exact_J')}, E|y| "
                           f"{format_columns(r, 'exact_length')}" for _, r in final.iterrows()),
                       ex.MEASURED)]


def analyze(frame: pd.DataFrame, out: Path, preset: str) -> str:
    """Write result.md, result.csv and figures/llm_estimators_overview.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if frame.empty or "exact_J" not in frame.columns:
        return ex.write_inconclusive(out, TITLE, "no sequence runs to analyse")
    frame = frame.assign(sweep_name=frame["run_id"].astype(str).str.split("/").str[0])
    direction, group, kl = direction_table(frame), group_size_table(frame), kl_table(frame)
    weights = pd.concat([weight_slopes(frame, "std_weights", STD_ONLY),
                         weight_slopes(frame, "at_init_table", "as used (G = 4)")],
                        ignore_index=True)
    curves = ex.means_by_group(frame[frame["sweep_name"] == "training"], ["estimator", "step"],
                               ["exact_J", "exact_length"])
    final = curves[curves["step"] == curves.groupby("estimator")["step"].transform("max")] \
        if len(curves) else curves
    parts = [*claim_direction(direction), *claim_prompt_weights(weights),
             *claim_length(direction), *claim_group_size(group), *claim_kl(kl),
             *claim_training(final, curves[curves["step"] == 0] if len(curves) else curves)]
    ex.sections_frame(direction=direction, prompt_weights=weights, group_size=group, kl=kl,
                      training=final).to_csv(out / "result.csv", index=False)
    heads = {"policy": "policy", "estimator": "estimator", "runs": "runs",
             "cos(E ĝ, ∇J) exact": ("exact_mean_cos", 6), "cos, Monte Carlo (de-noised)": "mc_cos",
             "rel. bias exact ‖E ĝ − ∇J‖/‖∇J‖": "exact_rel_bias",
             "length bias exact": "exact_length_bias", "length bias MC": "mc_length_bias",
             "rel. variance": "grad_rel_variance", "bias distinguishable": "bias_distinguishable"}
    sections = [
        ("Per estimator at random initial policies (G = 4, 16 per batch)", direction, heads),
        ("Prompt weights (table policy)", weights,
         ["setting", "estimator", "G", "points", "weight_min", "weight_max", "slope", "corr_with_gap"]),
        ("Group size at 16 completions per batch", group,
         ["estimator", "G", "prompts_per_batch", "runs", "grad_rel_variance", "rel_mse", "sf_mse"]),
        ("KL penalty (beta = 0.2): bias against ∇(J − βKL)", kl,
         ["kl_mode", "step", "runs", "exact_kl", "exact_rel_bias", "grad_rel_bias", "bias_distinguishable"]),
        ("Training (final update)", final, ["estimator", "step", "runs", "exact_J", "exact_length"])]
    text = "\n".join([f"# {TITLE} ({preset} preset)", "", *table_sections(sections),
                      *ex.findings_section(parts, ex.headline_verdict(parts))])
    (out / "result.md").write_text(text)
    ex.plot_estimate_panels([{"frame": frame, "x": x, "y": y, "by": by, **more} for frame, x, y, by, more in [
        (direction, "estimator", "mc_cos", "policy", {"ylabel": "cos(E ĝ, ∇J), Monte Carlo"}),
        (direction, "estimator", "mc_length_bias", "policy", {"ylabel": "length bias, MC"}),
        (weights[weights["setting"] == STD_ONLY] if len(weights) else weights, "G", "slope",
         "setting", {"ylabel": "slope: log weight on log(1/std)"}),
        (group, "G", "sf_mse", "estimator", {"yscale": "log", "ylabel": "scale-free rel. MSE"}),
        (curves, "step", "exact_J", "estimator", {}),
        (kl, "step", "exact_rel_bias", "kl_mode", {"ylabel": "rel. bias against ∇(J − βKL)"})]],
        out / "figures", "llm_estimators_overview")
    return text
