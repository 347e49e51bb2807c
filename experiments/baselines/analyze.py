"""Baselines: bias and variance of REINFORCE with each baseline, paired at the same policy.

The policy is held fixed (``lr=1e-12``) while the learned critic is fitted, so the runs of
one seed are measured at the same policy on the same episodes: paired, seeds being the
replicates; measured steps >= ``MIN_STEP`` only. Per row: relative variance, paired
variance ratio to reward-to-go, relative bias (root of ``squared_bias_interval``) against
theory (0, or 1/B for the batch means) and relative MSE. Claims: 1. unbiased (batch means:
1/B); 2. variance ordered no baseline > batch mean > V; 3. the optimal constant baseline
is within a factor CLOSE of V; 4. V is MSE-optimal (no row's MSE significantly below V's).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.experiment import (Experiment, Verdict, estimate_columns, geometric_mean_ratio,
                                 inconclusive, sections_frame, side_of, sqrt_estimate)
from analysis.figures import PAPER_WIDTH, error_bars, log_axis, save_figure
from analysis.loader import measured_rows
from analysis.render import format_columns, markdown_table
from analysis.stats import Estimate, mean_ci
from analysis.table import per_run_values, squared_bias_interval

MIN_STEP = 1
NO_BASELINE, LEARNED_V, EXACT_V = "reinforce_rtg", "learned V", "exact V"
LOO_R = "leave-one-out mean of R (derived)"  # see by_seed
ROW_TEXT = {
    "reinforce": "no baseline, full return R (reinforce)",
    "reinforce_rtg": "no baseline, reward-to-go (reinforce_rtg)",
    "mean_baseline_episode": "batch mean of R (mean_baseline_episode)",
    "mean_baseline": "batch mean of G_t (mean_baseline)",
    "rloo": "leave-one-out mean of G_t (rloo)",
    "optimal_baseline": "variance-optimal constant b*, full return (optimal_baseline)",
    LEARNED_V: "learned V(s_t, t) (value_baseline)",
    EXACT_V: "exact V(s_t, t) (value_baseline, critic.kind=exact)",
}
ROW_ORDER = list(ROW_TEXT)
BATCH_MEAN_ROWS = ("mean_baseline", "mean_baseline_episode")  # E g = (1 - 1/B) grad J
TEXT_CHAIN = ["reinforce_rtg", "mean_baseline", LEARNED_V, EXACT_V]  # the text's order, high to low
CLOSE = 1.25  # "close": variance ratio within [1/CLOSE, CLOSE]
MIN_SEEDS = 3  # fewer seeds: no interval, so no verdict
CLAIM = ("“Subtracting a baseline that depends only on the state leaves the estimator "
         "unbiased […] but reduces variance by centring the signal around what the agent "
         "already expects. The optimal baseline in the mean-squared-error sense is the value "
         "function V^π(s_t).” Its table: no baseline 'very high', episode-mean baseline "
         "'moderate', V 'low' variance, all with bias 0. The issue adds: the variance-optimal "
         "constant baseline (Greensmith et al. 2004) is close to V.")


def usable_measurements(frame: pd.DataFrame) -> pd.DataFrame:
    """Measured rows at steps >= MIN_STEP with ``label`` (value_baseline split by its
    critic) and ``batch_size``; a run duplicating an (env, label, B, seed) is dropped (a
    critic kind swept over an estimator without critic)."""
    rows = measured_rows(frame)
    rows = rows[rows["step"] >= MIN_STEP].copy()
    if rows.empty:
        return rows
    kind = np.broadcast_to(rows.get("training.critic.kind", "auto"), len(rows))
    rows["label"] = [(EXACT_V if k == "exact" else LEARNED_V) if e == "value_baseline" else e
                     for e, k in zip(rows["estimator"], kind)]
    rows["batch_size"] = rows.get("training.batch_size", np.nan)
    first = rows.drop_duplicates("run_dir").drop_duplicates(["env", "label", "batch_size", "seed"])
    return rows[rows["run_dir"].isin(first["run_dir"])]


def per_run(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per run: its mean statistics (``per_run_values``) and relative MSE."""
    rows = rows.assign(grad_rel_mse=(rows["grad_mse"] - rows["ref_se"].fillna(0.0) ** 2)
                       / rows["ref_norm"] ** 2)
    values = per_run_values(rows)
    first = rows.groupby("run_dir", sort=False)
    values["grad_rel_mse"] = first["grad_rel_mse"].mean()
    for col in ("env", "label", "batch_size"):
        values[col] = first[col].first()
    return values.reset_index()


def by_seed(runs: pd.DataFrame, label: str, column: str) -> dict[object, float]:
    """seed -> that row's per-run value. ``LOO_R`` is derived, not run: R_i - mean_j R_j =
    (1 - 1/B)(R_i - mean_{j != i} R_j), so the leave-one-out mean of R has the variance
    (and, unbiased, the MSE) of ``mean_baseline_episode`` divided by (1 - 1/B)^2."""
    if label != LOO_R:
        sel = runs[runs["label"] == label]
        return dict(zip(sel["seed"], sel[column]))
    if column not in ("grad_variance", "grad_rel_variance", "grad_rel_mse"):
        return {}
    sel = runs[runs["label"] == "mean_baseline_episode"]
    column = "grad_rel_variance" if column == "grad_rel_mse" else column
    return dict(zip(sel["seed"], sel[column] / (1.0 - 1.0 / sel["batch_size"]) ** 2))


def paired_ratio(group: pd.DataFrame, num: str, den: str, column: str = "grad_variance") -> Estimate:
    """Geometric mean over seeds of ``column(num) / column(den)`` (paired, scale-free)."""
    return geometric_mean_ratio(by_seed(group, num, column), by_seed(group, den, column), MIN_SEEDS)


def bias_verdict(rel_b2: Estimate, expected: float) -> str:
    """'unbiased' / 'biased' / 'as expected (1/B)' / 'not 1/B' from the squared-bias interval."""
    if not (math.isfinite(rel_b2.lo) and math.isfinite(rel_b2.hi)):
        return "inconclusive"
    if expected == 0.0:
        return "biased" if rel_b2.lo > 0 else "unbiased (bias not distinguishable from 0)"
    if rel_b2.lo <= expected ** 2 <= rel_b2.hi:
        return "1/B bias, as theory says" if rel_b2.lo > 0 else "consistent with 1/B (and with 0)"
    return "bias differs from 1/B"


def row_numbers(group: pd.DataFrame, label: str) -> dict:
    """One row of the table: each number with its 95% interval."""
    sel = group[group["label"] == label]
    rel_b2 = squared_bias_interval(sel, "grad_rel_bias_sq")
    if len(sel) < MIN_SEEDS:
        rel_b2 = Estimate(rel_b2.value, math.nan, math.nan, rel_b2.n)
    batch = float(sel["batch_size"].iloc[0]) if sel["batch_size"].notna().any() else math.nan
    expected = 1.0 / batch if label in BATCH_MEAN_ROWS and batch > 0 else 0.0
    return {"label": label, "row": ROW_TEXT.get(label, label), "n_runs": len(sel),
            **estimate_columns("rel_variance", mean_ci(sel["grad_rel_variance"].to_numpy())),
            **estimate_columns("var_ratio", paired_ratio(group, label, NO_BASELINE)),
            **estimate_columns("rel_bias_sq", rel_b2),
            **estimate_columns("rel_bias", sqrt_estimate(rel_b2)),
            "expected_rel_bias": expected, "bias_verdict": bias_verdict(rel_b2, expected),
            **estimate_columns("rel_mse", mean_ci(sel["grad_rel_mse"].to_numpy())),
            **estimate_columns("cos_ref", mean_ci(sel["cos_ref"].to_numpy()))}


def comparison_pairs(present: set[str]) -> list[tuple[str, str, str, str]]:
    """(claim, numerator, denominator, column) of every paired ratio behind claims 2-4."""
    chain = [r for r in TEXT_CHAIN if r in present]
    pairs = [("order", a, b, "grad_variance") for a, b in zip(chain[1:], chain[:-1])]
    pairs += [("order", num, den, "grad_variance") for num, den in (
        ("rloo", NO_BASELINE), ("optimal_baseline", "reinforce"),
        ("optimal_baseline", "mean_baseline_episode"), ("optimal_baseline", LOO_R))]
    pairs += [("optimal close to V", "optimal_baseline", v, "grad_variance") for v in (EXACT_V, LEARNED_V)]
    pairs += [("V MSE-optimal", other, EXACT_V, "grad_rel_mse")
              for other in [*ROW_ORDER, LOO_R] if other != EXACT_V]
    has = present | ({LOO_R} if "mean_baseline_episode" in present else set())
    return [p for p in pairs if p[1] in has and p[2] in has]


def comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """The paired ratios behind claims 2-4, per (env, B), each with its reading."""
    records = []
    for (env, batch), group in runs.groupby(["env", "batch_size"], sort=False, dropna=False):
        for claim, num, den, column in comparison_pairs(set(group["label"])):
            r = paired_ratio(group, num, den, column)
            if claim == "optimal close to V":
                word = ("inconclusive" if not math.isfinite(r.lo) else "close" if
                        1 / CLOSE <= r.lo and r.hi <= CLOSE else "not close" if
                        r.lo > CLOSE or r.hi < 1 / CLOSE else "inconclusive")
            else:
                word = side_of(r, 1.0, "lower", "higher")
            records.append({"env": env, "batch_size": batch, "claim": claim, "numerator": num,
                            "denominator": den, "statistic": "MSE" if "mse" in column else "variance",
                            **estimate_columns("ratio", r), "word": word})
    return pd.DataFrame.from_records(records)


def combine_words(words: list[str], good: str, bad: str) -> str:
    """All good: confirmed; all bad: refuted; a mix with some bad: qualified; else inconclusive."""
    decided = [w for w in words if w in (good, bad)]
    if not decided:
        return "inconclusive"
    if len(decided) == len(words) and len(set(decided)) == 1:
        return "confirmed" if decided[0] == good else "refuted"
    return "qualified" if bad in decided else "inconclusive"


def claim_verdicts(table: pd.DataFrame, comp: pd.DataFrame) -> dict[str, str]:
    """confirmed / refuted / qualified / inconclusive for each of the four claims. V is
    MSE-optimal: refuted if an unbiased row's MSE is significantly below the exact V's,
    confirmed if every other row's is above it, else qualified (only a biased batch mean
    beats V, or some rows are indistinguishable)."""
    words = table["bias_verdict"].tolist()
    unbiased = ("inconclusive" if all(w == "inconclusive" for w in words) else "refuted"
                if {"biased", "bias differs from 1/B"} & set(words) else "confirmed")
    links = comp[(comp["claim"] == "order") & comp["numerator"].isin(TEXT_CHAIN)
                 & comp["denominator"].isin(TEXT_CHAIN)]
    close = comp[(comp["claim"] == "optimal close to V") & (comp["denominator"] == EXACT_V)]
    close = close if not close.empty else comp[comp["claim"] == "optimal close to V"]
    mse = comp[comp["claim"] == "V MSE-optimal"]
    below = mse[mse["word"] == "lower"]
    mse_word = ("inconclusive" if (mse["word"] == "inconclusive").all() else "refuted"
                if (~below["numerator"].isin(BATCH_MEAN_ROWS)).any() else "confirmed"
                if (mse["word"] == "higher").all() else "qualified")
    return {"unbiased": unbiased, "ordered": combine_words(links["word"].tolist(), "lower", "higher"),
            "optimal close to V": combine_words(close["word"].tolist(), "close", "not close"),
            "V MSE-optimal": mse_word}


def summarise(runs: pd.DataFrame) -> tuple:
    """(one line per env, B and row; the paired comparisons; the claims' words; seeds)."""
    table = pd.DataFrame.from_records([
        {**row_numbers(group, label), "env": env, "batch_size": batch}
        for (env, batch), group in runs.groupby(["env", "batch_size"], sort=False, dropna=False)
        for label in ROW_ORDER if label in set(group["label"])])
    comp = comparisons(runs)
    return table, comp, claim_verdicts(table, comp), int(runs["seed"].nunique())


def verdict(summary: tuple) -> Verdict:
    """confirmed when every claim is; inconclusive when none is decided; refuted when
    unbiasedness fails; else qualified."""
    table, comp, verdicts, _ = summary
    reason = verdict_sentence(table, comp)
    if all(v == "inconclusive" for v in verdicts.values()):
        return inconclusive(reason)
    if verdicts["unbiased"] == "refuted":
        return Verdict("refuted", reason)
    return Verdict("confirmed" if all(v == "confirmed" for v in verdicts.values()) else "qualified",
                   reason)


def verdict_sentence(table: pd.DataFrame, comp: pd.DataFrame) -> str:
    """The numbers behind the verdict: unbiased rows, then per env the key ratios."""
    unbiased = table[table["expected_rel_bias"] == 0]
    n_open = int((unbiased["bias_verdict"] == "inconclusive").sum())
    bits = [f"{int(unbiased['bias_verdict'].str.startswith('unbiased').sum())}/{len(unbiased)} "
            "rows claimed unbiased show no distinguishable bias"
            + (f" ({n_open} inconclusive)" if n_open else "")]
    for env, t in table.groupby("env", sort=False):
        c = comp[comp["env"] == env].set_index(["numerator", "denominator", "statistic"])
        text = f"{env}: variance / reward-to-go: " + ", ".join(
            f"{r['label']} {format_columns(r, 'var_ratio')}" for _, r in t.iterrows()
            if r["label"] in ("mean_baseline", "rloo", LEARNED_V, EXACT_V))
        for _, r in t[t["label"] == "mean_baseline"].iterrows():
            text += (f"; batch-mean bias {format_columns(r, 'rel_bias', 2)}"
                     f" (1/B = {r['expected_rel_bias']:.3g})")
        for key, name in (((("optimal_baseline", LOO_R, "variance")), "b* / leave-one-out mean of R"),
                          (("optimal_baseline", EXACT_V, "variance"), "b* / exact V"),
                          (("mean_baseline", EXACT_V, "MSE"), "MSE batch mean / exact V"),
                          (("rloo", EXACT_V, "MSE"), "MSE rloo / exact V")):
            if key in c.index:
                text += f"; {name} {format_columns(c.loc[key], 'ratio')}"
        bits.append(text)
    return bits[0] + " — " + " | ".join(bits[1:])


def write_markdown(summary: tuple, verdict: Verdict, preset: str) -> str:
    table, comp, verdicts, n_seeds = summary
    ranking = "; ".join(f"{env}: " + " > ".join(
        f"{r['label']} ({r['rel_variance']:.3g})"
        for _, r in t.sort_values("rel_variance", ascending=False).iterrows())
        for env, t in table.groupby("env", sort=False))
    rows = markdown_table(
        ["env", "B", "baseline", "rel. variance", "variance / reward-to-go", "rel. bias",
         "expected", "bias verdict", "rel. MSE"],
        [[r["env"], f"{r['batch_size']:.0f}" if math.isfinite(r["batch_size"]) else "?", r["row"],
          format_columns(r, "rel_variance"), format_columns(r, "var_ratio"),
          format_columns(r, "rel_bias", 2), f"{r['expected_rel_bias']:.3g}", r["bias_verdict"],
          format_columns(r, "rel_mse")] for _, r in table.iterrows()])
    pairs = markdown_table(
        ["env", "claim", "ratio (geometric mean over seeds), 95% CI", "reading"],
        [[r["env"], r["claim"], f"{r['statistic']}: {r['numerator']} / {r['denominator']} = "
          + format_columns(r, "ratio"), r["word"]] for _, r in comp.iterrows()])
    return "\n".join([
        f"# Baselines: bias and variance at the same policy ({preset} preset)", "",
        f"**Claim.** {CLAIM}", "",
        (f"Measured at a held-fixed random policy per seed ({n_seeds} seeds), paired across "
         "rows; relative variance = tr Cov[ĝ] / ‖∇J‖² of one batch estimate; relative bias "
         "= √(mean U) / ‖∇J‖ (U the de-noised squared bias); 95% intervals."), "",
        *rows, "", f"Variance ranking (mean relative variance): {ranking}.", "",
        ("Paired comparisons (geometric mean over seeds of the per-seed ratio; 'lower' = "
         "interval below 1):"), "", *pairs, "",
        "Claims: " + "; ".join(f"**{k}**: {v}" for k, v in verdicts.items()) + ".", "",
        verdict.line(), ""])


def plot_rows(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per environment (columns): each row's variance relative to reward-to-go (paired,
    log scale) and its relative bias against theory, 95% CIs."""
    envs = list(dict.fromkeys(table["env"]))
    labels = [r for r in ROW_ORDER if r in set(table["label"])]
    ypos = {label: len(labels) - 1 - i for i, label in enumerate(labels)}
    fig, axes = plt.subplots(2, len(envs), figsize=(PAPER_WIDTH, 5.6), squeeze=False, sharey=True)
    for j, env in enumerate(envs):
        t = table[table["env"] == env].reset_index(drop=True)
        y = t["label"].map(ypos).to_numpy()
        colours = ["tab:red" if lab.startswith("reinforce") else "tab:green" if lab.endswith(" V")
                   else "tab:blue" for lab in t["label"]]
        for ax, col, xlabel in ((axes[0, j], "var_ratio", "variance / variance of reward-to-go"),
                                (axes[1, j], "rel_bias", "relative bias  ‖E ĝ − ∇J‖ / ‖∇J‖")):
            ax.errorbar(t[col], y, xerr=np.nan_to_num(error_bars(t, col)), fmt="none",
                        ecolor="0.3", capsize=2, lw=1)
            ax.scatter(t[col], y, c=colours, s=18, zorder=3)
            ax.set_xlabel(xlabel)
            ax.set_title(f"{env} (B = {t['batch_size'].iloc[0]:.0f}), 95% CI")
        axes[0, j].axvline(1.0, color="0.4", lw=0.8, ls="--")
        axes[1, j].scatter(t["expected_rel_bias"], y, marker="|", s=120, color="k", zorder=4,
                           label="theory: 0, or 1/B for the batch means")
        log_axis(axes[0, j], "x", pd.concat([t["var_ratio"], t["var_ratio_lo"], t["var_ratio_hi"]]))
    for ax in axes[:, 0]:
        ax.set_yticks(list(ypos.values()), list(ypos.keys()))
    fig.legend(*axes[1, 0].get_legend_handles_labels(), loc="lower center", frameon=False,
               fontsize=7, bbox_to_anchor=(0.5, -0.03))
    fig.tight_layout()
    return save_figure(fig, out_dir, "baselines_bias_variance")


EXPERIMENT = Experiment(
    "Baselines", summarise, verdict, write_markdown, select=usable_measurements, per_run=per_run,
    result_frame=lambda summary: sections_frame(rows=summary[0], comparisons=summary[1]),
    figures=lambda summary, runs, out_dir: plot_rows(summary[0], out_dir),
    empty_reason=f"no measured step >= {MIN_STEP} in the runs")
analyze = EXPERIMENT.analyze
