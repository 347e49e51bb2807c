"""Baselines: bias and variance of REINFORCE with each baseline, paired at the same policy.

The policy is held fixed (``lr=1e-12``) while the learned critic is fitted, so the runs of
one seed are measured at the same policy on the same episodes: *paired*, seeds being the
replicates; measured steps >= ``MIN_STEP`` only. Rows: ``reinforce``, ``reinforce_rtg``
(the variance reference), ``mean_baseline`` (batch mean of G_t), ``mean_baseline_episode``
(of R), ``rloo``, ``optimal_baseline`` (Greensmith et al. 2004), ``learned V`` and
``exact V``. Per row: relative variance, paired variance ratio to reward-to-go
(``paired_ratio``), relative bias (root of ``squared_bias_interval``) against theory (0,
or 1/B for the batch means), relative MSE. Claims: 1. unbiased (batch means: 1/B); 2.
variance ordered no baseline > batch mean > V; 3. the optimal constant baseline is within
a factor CLOSE of V; 4. V is MSE-optimal (no row's MSE significantly below the exact V's).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.experiment import (
    Experiment,
    Verdict,
    estimate_columns,
    inconclusive,
    sections_frame,
    sqrt_estimate,
)
from analysis.figures import PAPER_WIDTH, apply_theme, error_bars, log_axis, save_figure
from analysis.loader import measured_rows
from analysis.render import format_columns, markdown_table
from analysis.stats import NAN_ESTIMATE, Estimate, mean_ci
from analysis.table import per_run_values, squared_bias_interval

MIN_STEP = 1
NO_BASELINE = "reinforce_rtg"
LEARNED_V, EXACT_V = "learned V", "exact V"
LOO_R = "leave-one-out mean of R (derived)"  # see by_seed
ROW_ORDER = ["reinforce", "reinforce_rtg", "mean_baseline_episode", "mean_baseline", "rloo",
             "optimal_baseline", LEARNED_V, EXACT_V]
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
BATCH_MEAN_ROWS = ("mean_baseline", "mean_baseline_episode")  # E g = (1 - 1/B) grad J
TEXT_CHAIN = ["reinforce_rtg", "mean_baseline", LEARNED_V, EXACT_V]  # the text's order, high to low
ROW_COLOUR = {"reinforce": "tab:red", NO_BASELINE: "tab:red", LEARNED_V: "tab:green",
              EXACT_V: "tab:green"}  # no baseline / constant baselines (blue) / V
CLOSE = 1.25  # "close": variance ratio within [1/CLOSE, CLOSE]
MIN_SEEDS = 3  # fewer seeds: no interval, so no verdict (a bootstrap over 2 seeds means nothing)
CLAIM = ("“Subtracting a baseline that depends only on the state leaves the estimator "
         "unbiased […] but reduces variance by centring the signal around what the agent "
         "already expects. The optimal baseline in the mean-squared-error sense is the value "
         "function V^π(s_t).” Its table: no baseline 'very high', episode-mean baseline "
         "'moderate', V 'low' variance, all with bias 0. The issue adds: the variance-optimal "
         "constant baseline (Greensmith et al. 2004) is close to V.")


def row_label(estimator: str, critic_kind: object) -> str:
    """The row of a run: the estimator, with value_baseline split by its critic."""
    if estimator != "value_baseline":
        return estimator
    return EXACT_V if critic_kind == "exact" else LEARNED_V


def usable_measurements(frame: pd.DataFrame, min_step: int = MIN_STEP) -> pd.DataFrame:
    """Measured rows at steps >= ``min_step``, with ``label`` and ``batch_size`` columns.

    Runs that duplicate a (env, label, B, seed) already present (a critic kind swept over
    an estimator that has no critic) are dropped, keeping the first.
    """
    rows = measured_rows(frame)
    rows = rows[rows["step"] >= min_step].copy()
    if rows.empty:
        return rows.assign(label=pd.Series(dtype=str), batch_size=pd.Series(dtype=float))
    kind = rows.get("training.critic.kind", "auto")
    rows["label"] = [row_label(e, k) for e, k in zip(rows["estimator"],
                                                    np.broadcast_to(kind, len(rows)))]
    rows["batch_size"] = rows.get("training.batch_size", np.nan)
    first_run = rows.drop_duplicates("run_dir").drop_duplicates(
        ["env", "label", "batch_size", "seed"])["run_dir"]
    return rows[rows["run_dir"].isin(first_run)]


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
    """seed -> that row's per-run value, for paired ratios.

    ``LOO_R`` is derived, not run: the batch mean of R is exactly (1 - 1/B) times its
    leave-one-out version, ``R_i - mean_j R_j = (1 - 1/B)(R_i - mean_{j != i} R_j)``, so
    the leave-one-out mean of R has the variance (and, being unbiased, the MSE) of
    ``mean_baseline_episode`` divided by (1 - 1/B)^2.
    """
    if label == LOO_R:
        sel = runs[runs["label"] == "mean_baseline_episode"]
        if column not in ("grad_variance", "grad_rel_variance", "grad_rel_mse"):
            return {}
        column = "grad_rel_variance" if column == "grad_rel_mse" else column
        shrink = (1.0 - 1.0 / sel["batch_size"]) ** 2
        return dict(zip(sel["seed"], sel[column] / shrink))
    sel = runs[runs["label"] == label]
    return dict(zip(sel["seed"], sel[column]))


def expected_rel_bias(label: str, batch_size: float) -> float:
    """Theory: 1/B for the batch-mean baselines (own episode in the mean), else 0."""
    return 1.0 / batch_size if label in BATCH_MEAN_ROWS and batch_size > 0 else 0.0


def bias_verdict(rel_b2: Estimate, expected: float) -> str:
    """'unbiased' / 'biased' / 'as expected (1/B)' / 'not 1/B' from the squared-bias interval."""
    if not (math.isfinite(rel_b2.lo) and math.isfinite(rel_b2.hi)):
        return "inconclusive"
    if expected == 0.0:
        return "biased" if rel_b2.lo > 0 else "unbiased (bias not distinguishable from 0)"
    target = expected ** 2
    if rel_b2.lo <= target <= rel_b2.hi:
        return "1/B bias, as theory says" if rel_b2.lo > 0 else "consistent with 1/B (and with 0)"
    return "bias differs from 1/B"


def estimator_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One line per (env, B, label): relative variance, ratio to reward-to-go, bias, MSE."""
    records = []
    for (env, batch), group in runs.groupby(["env", "batch_size"], sort=False, dropna=False):
        for label in [r for r in ROW_ORDER if r in set(group["label"])]:
            rec = row_numbers(group, label)
            rec.update(env=env, batch_size=batch)
            records.append(rec)
    return pd.DataFrame.from_records(records)


def row_numbers(group: pd.DataFrame, label: str) -> dict:
    """The numbers of one row of the table, each with its 95% interval."""
    sel = group[group["label"] == label]
    out: dict[str, object] = {"label": label, "row": ROW_TEXT.get(label, label),
                              "n_runs": len(sel)}
    out.update(estimate_columns("rel_variance", mean_ci(sel["grad_rel_variance"].to_numpy())))
    out.update(estimate_columns("var_ratio", paired_ratio(group, label, NO_BASELINE)))
    rel_b2 = squared_bias_interval(sel, "grad_rel_bias_sq")
    if len(sel) < MIN_SEEDS:
        rel_b2 = Estimate(rel_b2.value, math.nan, math.nan, rel_b2.n)
    out.update(estimate_columns("rel_bias_sq", rel_b2))
    out.update(estimate_columns("rel_bias", sqrt_estimate(rel_b2)))
    batch = float(sel["batch_size"].iloc[0]) if sel["batch_size"].notna().any() else math.nan
    out["expected_rel_bias"] = expected_rel_bias(label, batch)
    out["bias_verdict"] = bias_verdict(rel_b2, out["expected_rel_bias"])
    out.update(estimate_columns("rel_mse", mean_ci(sel["grad_rel_mse"].to_numpy())))
    out.update(estimate_columns("cos_ref", mean_ci(sel["cos_ref"].to_numpy())))
    return out


def paired_ratio(group: pd.DataFrame, num: str, den: str, column: str = "grad_variance") -> Estimate:
    """Geometric mean over seeds of the per-seed ratio ``column(num) / column(den)``, with
    the bootstrap interval of the mean log ratio (``mean_ci``), mapped back by exp.

    Paired (both rows of a seed share policy and episodes) and scale-free: every seed's
    policy weighs the same, where a ratio of means would be dominated by the seed with
    the largest variance.
    """
    a, b = by_seed(group, num, column), by_seed(group, den, column)
    seeds = [s for s in a if s in b and a[s] > 0 and b[s] > 0]
    if not seeds:
        return NAN_ESTIMATE
    logs = np.log([a[s] / b[s] for s in seeds])
    est = mean_ci(logs).map(math.exp)
    return est if len(seeds) >= MIN_SEEDS else Estimate(est.value, math.nan, math.nan, est.n)


def ratio_word(r: Estimate, close: float | None = None) -> str:
    """'lower' / 'higher' / 'indistinguishable' (or 'close' / 'not close') from a ratio CI."""
    if not (math.isfinite(r.lo) and math.isfinite(r.hi)):
        return "inconclusive"
    if close is not None:
        if 1 / close <= r.lo and r.hi <= close:
            return "close"
        if r.lo > close or r.hi < 1 / close:
            return "not close"
        return "inconclusive"
    return "lower" if r.hi < 1 else "higher" if r.lo > 1 else "indistinguishable"


def available(label: str, present: set[str]) -> bool:
    """A row was run, or (LOO_R) can be derived from one that was."""
    return label in present or (label == LOO_R and "mean_baseline_episode" in present)


def comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """The paired ratios behind claims 2-4, per (env, B)."""
    records = []
    for (env, batch), group in runs.groupby(["env", "batch_size"], sort=False, dropna=False):
        present = set(group["label"])
        chain = [r for r in TEXT_CHAIN if r in present]
        pairs = [("order", a, b, "grad_variance") for a, b in zip(chain[1:], chain[:-1])]
        pairs += [("order", "rloo", NO_BASELINE, "grad_variance"),
                  ("order", "optimal_baseline", "reinforce", "grad_variance"),
                  ("order", "optimal_baseline", "mean_baseline_episode", "grad_variance"),
                  ("order", "optimal_baseline", LOO_R, "grad_variance")]
        pairs += [("optimal close to V", "optimal_baseline", v, "grad_variance")
                  for v in (EXACT_V, LEARNED_V)]
        pairs += [("V MSE-optimal", other, EXACT_V, "grad_rel_mse")
                  for other in ROW_ORDER if other != EXACT_V]
        pairs += [("V MSE-optimal", LOO_R, EXACT_V, "grad_rel_mse")]
        for claim, num, den, column in pairs:
            if not (available(num, present) and available(den, present)):
                continue
            r = paired_ratio(group, num, den, column)
            close = CLOSE if claim == "optimal close to V" else None
            records.append({"env": env, "batch_size": batch, "claim": claim, "numerator": num,
                            "denominator": den, "statistic": "MSE" if "mse" in column else "variance",
                            "ratio": r.value, "ratio_lo": r.lo, "ratio_hi": r.hi,
                            "word": ratio_word(r, close)})
    return pd.DataFrame.from_records(records)


def claim_verdicts(table: pd.DataFrame, comp: pd.DataFrame) -> dict[str, str]:
    """confirmed / refuted / qualified / inconclusive for each of the four claims."""
    return {"unbiased": unbiased_verdict(table), "ordered": ordered_verdict(comp),
            "optimal close to V": close_verdict(comp), "V MSE-optimal": mse_verdict(comp)}


def unbiased_verdict(table: pd.DataFrame) -> str:
    words = table["bias_verdict"].tolist()
    if not words or all(w == "inconclusive" for w in words):
        return "inconclusive"
    bad = [w for w in words if w in ("biased", "bias differs from 1/B")]
    return "refuted" if bad else "confirmed"


def ordered_verdict(comp: pd.DataFrame) -> str:
    """The text's chain: each link's ratio to the one above must lie below 1."""
    links = comp[(comp["claim"] == "order") & comp.apply(
        lambda r: r["numerator"] in TEXT_CHAIN and r["denominator"] in TEXT_CHAIN, axis=1)]
    return combine_words(links["word"].tolist(), good="lower", bad="higher")


def close_verdict(comp: pd.DataFrame) -> str:
    rows = comp[(comp["claim"] == "optimal close to V") & (comp["denominator"] == EXACT_V)]
    if rows.empty:
        rows = comp[comp["claim"] == "optimal close to V"]
    return combine_words(rows["word"].tolist(), good="close", bad="not close")


def mse_verdict(comp: pd.DataFrame) -> str:
    """Refuted if an unbiased row's MSE is significantly below the exact V's; confirmed if
    every other row's is significantly above it; else qualified: some rows are
    indistinguishable, or only a batch mean (biased, its own episode in the mean: a
    (1 - 1/B) shrinkage that trades variance for bias) beats V."""
    rows = comp[comp["claim"] == "V MSE-optimal"]
    words = rows["word"].tolist()
    if not words or all(w == "inconclusive" for w in words):
        return "inconclusive"
    below = rows[rows["word"] == "lower"]
    if (~below["numerator"].isin(BATCH_MEAN_ROWS)).any():
        return "refuted"
    return "confirmed" if all(w == "higher" for w in words) else "qualified"


def combine_words(words: list[str], good: str, bad: str) -> str:
    """All good: confirmed; all bad: refuted; a mix with some bad: qualified; else inconclusive."""
    decided = [w for w in words if w in (good, bad)]
    if not decided:
        return "inconclusive"
    if len(decided) == len(words) and all(w == good for w in decided):
        return "confirmed"
    if all(w == bad for w in decided) and len(decided) == len(words):
        return "refuted"
    return "qualified" if bad in decided else "inconclusive"


def verdict(summary: tuple) -> Verdict:
    """confirmed when every claim is; inconclusive when none is decided; else qualified,
    or refuted when unbiasedness itself fails."""
    table, comp, verdicts, _ = summary
    values, reason = list(verdicts.values()), verdict_sentence(table, comp, verdicts)
    if all(v == "inconclusive" for v in values):
        return inconclusive(reason)
    if verdicts["unbiased"] == "refuted":
        return Verdict("refuted", reason)
    return Verdict("confirmed" if all(v == "confirmed" for v in values) else "qualified", reason)


def rows_table(table: pd.DataFrame) -> list[str]:
    return markdown_table(
        ["env", "B", "baseline", "rel. variance", "variance / reward-to-go", "rel. bias",
         "expected", "bias verdict", "rel. MSE"],
        [[r["env"], int(r["batch_size"]) if math.isfinite(r["batch_size"]) else "?", r["row"],
          format_columns(r, "rel_variance"), format_columns(r, "var_ratio"),
          format_columns(r, "rel_bias", 2), f"{r['expected_rel_bias']:.3g}", r["bias_verdict"],
          format_columns(r, "rel_mse")] for _, r in table.iterrows()])


def comparisons_table(comp: pd.DataFrame) -> list[str]:
    return markdown_table(
        ["env", "claim", "ratio (geometric mean over seeds)", "95% CI", "reading"],
        [[r["env"], r["claim"],
          f"{r['statistic']}: {r['numerator']} / {r['denominator']} = {r['ratio']:.3g}",
          f"[{r['ratio_lo']:.3g}, {r['ratio_hi']:.3g}]" if math.isfinite(r["ratio_lo"]) else "n/a",
          r["word"]] for _, r in comp.iterrows()])


def variance_ranking(table: pd.DataFrame) -> str:
    """Per env, the rows from highest to lowest mean variance."""
    parts = []
    for env, t in table.groupby("env", sort=False):
        order = t.sort_values("rel_variance", ascending=False)
        parts.append(f"{env}: " + " > ".join(f"{r['label']} ({r['rel_variance']:.3g})"
                                              for _, r in order.iterrows()))
    return "; ".join(parts)


def verdict_sentence(table: pd.DataFrame, comp: pd.DataFrame, verdicts: dict[str, str]) -> str:
    """One sentence with the numbers behind the overall verdict."""
    unbiased = table[table["expected_rel_bias"] == 0]
    n_unb = int((unbiased["bias_verdict"].str.startswith("unbiased")).sum())
    n_open = int((unbiased["bias_verdict"] == "inconclusive").sum())
    bits = [f"{n_unb}/{len(unbiased)} rows claimed unbiased show no distinguishable bias"
            + (f" ({n_open} inconclusive)" if n_open else "")]
    for env, t in table.groupby("env", sort=False):
        c = comp[comp["env"] == env]
        pieces = [f"{label} {format_columns(r, 'var_ratio')}"
                  for label in ("mean_baseline", "rloo", LEARNED_V, EXACT_V)
                  for _, r in t[t["label"] == label].iterrows()]
        text = f"{env}: variance / reward-to-go: " + ", ".join(pieces)
        for _, r in t[t["label"] == "mean_baseline"].iterrows():
            text += (f"; batch-mean bias {format_columns(r, 'rel_bias', 2)}"
                     f" (1/B = {r['expected_rel_bias']:.3g})")
        for num, den, stat, name in (("optimal_baseline", LOO_R, "variance", "b* / leave-one-out mean of R"),
                                     ("optimal_baseline", EXACT_V, "variance", "b* / exact V"),
                                     ("mean_baseline", EXACT_V, "MSE", "MSE batch mean / exact V"),
                                     ("rloo", EXACT_V, "MSE", "MSE rloo / exact V")):
            r = c[(c["numerator"] == num) & (c["denominator"] == den) & (c["statistic"] == stat)]
            if not r.empty:
                r = r.iloc[0]
                text += f"; {name} {format_columns(r, 'ratio')}"
        bits.append(text)
    return "; ".join(bits[:1]) + " — " + " | ".join(bits[1:])


def write_markdown(summary: tuple, verdict: Verdict, preset: str) -> str:
    table, comp, verdicts, n_seeds = summary
    return "\n".join([
        f"# Baselines: bias and variance at the same policy ({preset} preset)", "",
        f"**Claim.** {CLAIM}", "",
        (f"Measured at a held-fixed random policy per seed ({n_seeds} seeds), paired across "
         "rows; relative variance = tr Cov[ĝ] / ‖∇J‖² of one batch estimate; relative bias "
         "= √(mean U) / ‖∇J‖ (U the de-noised squared bias); 95% intervals."), "",
        *rows_table(table), "",
        f"Variance ranking (mean relative variance): {variance_ranking(table)}.", "",
        ("Paired comparisons (geometric mean over seeds of the per-seed ratio; 'lower' = "
         "interval below 1):"), "",
        *comparisons_table(comp), "",
        "Claims: " + "; ".join(f"**{k}**: {v}" for k, v in verdicts.items()) + ".", "",
        verdict.line(), ""])


def plot_rows(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per environment (columns): each row's variance relative to reward-to-go (paired,
    log scale) and its relative bias, 95% CIs; rows at the same height in every panel."""
    apply_theme()
    envs = list(dict.fromkeys(table["env"]))
    labels = [r for r in ROW_ORDER if r in set(table["label"])]
    ypos = {label: len(labels) - 1 - i for i, label in enumerate(labels)}
    fig, axes = plt.subplots(2, len(envs), figsize=(PAPER_WIDTH, 5.6), squeeze=False,
                             sharey=True)
    for j, env in enumerate(envs):
        t = table[table["env"] == env].reset_index(drop=True)
        y = t["label"].map(ypos).to_numpy()
        colours = [ROW_COLOUR.get(label, "tab:blue") for label in t["label"]]
        for ax, col in ((axes[0, j], "var_ratio"), (axes[1, j], "rel_bias")):
            ax.errorbar(t[col], y, xerr=np.nan_to_num(error_bars(t, col)), fmt="none", ecolor="0.3",
                        capsize=2, lw=1)
            ax.scatter(t[col], y, c=colours, s=18, zorder=3)
        axes[0, j].axvline(1.0, color="0.4", lw=0.8, ls="--")
        axes[1, j].scatter(t["expected_rel_bias"], y, marker="|", s=120, color="k", zorder=4,
                           label="theory: 0, or 1/B for the batch means")
        log_axis(axes[0, j], "x", pd.concat([t["var_ratio"], t["var_ratio_lo"], t["var_ratio_hi"]]))
        b = int(t["batch_size"].iloc[0]) if np.isfinite(t["batch_size"].iloc[0]) else "?"
        axes[0, j].set_xlabel("variance / variance of reward-to-go\n(paired, geometric mean over seeds)")
        axes[1, j].set_xlabel("relative bias  ‖E ĝ − ∇J‖ / ‖∇J‖")
        axes[0, j].set_title(f"{env} (B = {b}): variance ratio, 95% CI")
        axes[1, j].set_title(f"{env}: bias, 95% CI")
    for ax in axes[:, 0]:
        ax.set_yticks(list(ypos.values()))
        ax.set_yticklabels(list(ypos.keys()))
    handles, names = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", frameon=False, fontsize=7,
               bbox_to_anchor=(0.5, -0.03))
    fig.tight_layout()
    return save_figure(fig, out_dir, "baselines_bias_variance")


def summarise(runs: pd.DataFrame) -> tuple:
    """(one line per env and row, the paired comparisons, the four claims' words, seeds)."""
    table, comp = estimator_table(runs), comparisons(runs)
    return table, comp, claim_verdicts(table, comp), int(runs["seed"].nunique())


EXPERIMENT = Experiment(
    "Baselines", summarise, verdict, write_markdown, select=usable_measurements, per_run=per_run,
    result_frame=lambda summary: sections_frame(rows=summary[0], comparisons=summary[1]),
    figures=lambda summary, runs, out_dir: plot_rows(summary[0], out_dir),
    empty_reason=f"no measured step >= {MIN_STEP} in the runs")
analyze = EXPERIMENT.analyze
