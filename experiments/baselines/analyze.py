"""Baselines: bias and variance of REINFORCE with each baseline, paired at the same policy,
held fixed while the learned critic is fitted (README.md: the design; ``CLAIMS``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import experiment as xp
from analysis.figures import interval_grid
from analysis.loader import measured_rows
from analysis.render import format_columns, frame_table
from analysis.stats import Estimate, mean_ci
from analysis.table import squared_bias_interval
from pgvar.estimators import ESTIMATORS

MIN_STEP = 1
NO_BASELINE, LEARNED_V, EXACT_V = "reinforce_rtg", "learned V", "exact V"
LOO_R = "leave-one-out mean of R (derived)"  # see per_run
ROWS = ["reinforce", "reinforce_rtg", "mean_baseline_episode", "mean_baseline", "rloo",
        "optimal_baseline", LEARNED_V, EXACT_V]  # the table's order
ROW_TEXT = {r: f"{ESTIMATORS[r if r in ESTIMATORS else 'value_baseline'].baseline} ({r})" for r in ROWS}
BATCH_MEAN_ROWS = ("mean_baseline", "mean_baseline_episode")  # E g = (1 - 1/B) grad J
CLOSE, MIN_SEEDS = 1.25, 3  # close: a ratio within [1/CLOSE, CLOSE]; fewer seeds: no interval
CLAIM = ("“Subtracting a baseline that depends only on the state leaves the estimator "
         "unbiased […] but reduces variance by centring the signal around what the agent "
         "already expects. The optimal baseline in the mean-squared-error sense is the value "
         "function V^π(s_t).” Its table: no baseline 'very high', episode-mean baseline "
         "'moderate', V 'low' variance, all with bias 0.")
# claim -> (class, what it needs, its (numerator, denominator) pairs, the word that supports
# it, the word of a counter-example that refutes it alone: None where the claim is not universal)
CLAIMS = {
    "reduces variance": (xp.TESTED, "an unbiased baseline's variance below its return's alone", [
        ("rloo", NO_BASELINE), (LEARNED_V, NO_BASELINE), (EXACT_V, NO_BASELINE),
        ("optimal_baseline", "reinforce")], "lower", None),
    "text's order": (xp.TESTED, "vanilla > episode-mean baseline > V, each link below 1", [
        ("mean_baseline_episode", "reinforce"), (LEARNED_V, "mean_baseline_episode"),
        (EXACT_V, "mean_baseline_episode")], "lower", None),
    "V MSE-optimal": (xp.TESTED, "no unbiased row's MSE below the exact V's (MSE ratios)",
                      [(r, EXACT_V) for r in [*ROW_TEXT, LOO_R] if r != EXACT_V], "higher", "lower"),
    "b* close to V": (xp.EXTRA, f"the variance-optimal constant within ×{CLOSE} of V", [
        ("optimal_baseline", EXACT_V), ("optimal_baseline", LEARNED_V)], "close", None),
    "b* vs other constants": (xp.EXTRA, "b* below the batch and leave-one-out means of R", [
        ("optimal_baseline", "mean_baseline_episode"), ("optimal_baseline", LOO_R)], "lower", None),
}


def usable_measurements(frame: pd.DataFrame) -> pd.DataFrame:
    """Measured rows at steps >= MIN_STEP with ``label`` (value_baseline split by critic) and
    ``batch_size``; runs repeating an (env, label, B, seed) dropped."""
    rows = measured_rows(frame)
    rows = rows[rows["step"] >= MIN_STEP].copy()
    kind = np.broadcast_to(rows.get("training.critic.kind", "auto"), len(rows))
    rows["label"] = [(EXACT_V if k == "exact" else LEARNED_V) if e == "value_baseline" else e
                     for e, k in zip(rows["estimator"], kind)]
    rows["batch_size"] = rows.get("training.batch_size", np.nan)
    return xp.one_run_each(rows, ["env", "label", "batch_size", "seed"])


def per_run(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per run: its mean statistics (``per_run_values``) and relative MSE, plus the
    derived ``LOO_R`` rows: R_i - mean_j R_j = (1 - 1/B)(R_i - mean_{j != i} R_j), so the
    leave-one-out mean of R has the variance (and, unbiased, the MSE) of
    ``mean_baseline_episode`` divided by (1 - 1/B)^2."""
    runs = xp.per_run_table(rows.assign(grad_rel_mse=xp.relative_mse(rows)),
                            first=("env", "label", "batch_size"), mean=("grad_rel_mse",))
    mbe = runs[runs["label"] == "mean_baseline_episode"]
    shrink = (1.0 - 1.0 / mbe["batch_size"]) ** 2
    return pd.concat([runs, mbe.assign(label=LOO_R, grad_variance=mbe["grad_variance"] / shrink,
                                       grad_rel_mse=mbe["grad_rel_variance"] / shrink)])


def paired_ratio(group: pd.DataFrame, num: str, den: str, column: str = "grad_variance") -> Estimate:
    """Geometric mean over seeds of ``column(num) / column(den)`` (paired, scale-free)."""
    a, b = (group[group["label"] == x] for x in (num, den))
    return xp.paired_geometric_ratio(a, b, column, MIN_SEEDS)


def row_numbers(group: pd.DataFrame, label: str) -> dict:
    """One row of the table with 95% intervals; ``bias_verdict`` (un)biased, or (not) 1/B."""
    sel = group[group["label"] == label]
    b2 = xp.with_min_n(squared_bias_interval(sel, "grad_rel_bias_sq"), MIN_SEEDS)
    batch = float(sel["batch_size"].iloc[0]) if sel["batch_size"].notna().any() else math.nan
    expected = 1.0 / batch if label in BATCH_MEAN_ROWS and batch > 0 else 0.0
    word = ("inconclusive" if not math.isfinite(b2.lo) else ("biased" if b2.lo > 0 else "unbiased")
            if expected == 0 else "1/B" if b2.lo <= expected ** 2 <= b2.hi else "not 1/B")
    return {"label": label, "row": ROW_TEXT.get(label, label), "n_runs": len(sel),
            **xp.estimate_columns("rel_variance", mean_ci(sel["grad_rel_variance"].to_numpy())),
            **xp.estimate_columns("var_ratio", paired_ratio(group, label, NO_BASELINE)),
            **xp.estimate_columns("rel_bias_sq", b2), **xp.estimate_columns("rel_bias", xp.sqrt_estimate(b2)),
            "expected_rel_bias": expected, "bias_verdict": word,
            **xp.mean_columns(sel.rename(columns={"grad_rel_mse": "rel_mse"}), ["rel_mse", "cos_ref"])}


def comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Every claim's paired ratios per (env, B) for the rows present, with their readings."""
    records = []
    for (env, batch), group in runs.groupby(["env", "batch_size"], sort=False, dropna=False):
        has = set(group["label"])
        for claim, (kind, _, pairs, _, _) in CLAIMS.items():
            column = "grad_rel_mse" if claim == "V MSE-optimal" else "grad_variance"
            for num, den in [p for p in pairs if p[0] in has and p[1] in has]:
                r = paired_ratio(group, num, den, column)
                word = xp.side_of(r, 1.0, "lower", "higher")
                if claim == "b* close to V":
                    word = xp.closeness(r, CLOSE)
                if claim == "V MSE-optimal" and word == "lower" and num in BATCH_MEAN_ROWS:
                    word = "biased, lower"  # trades bias for variance: not a counter-example
                records.append({"env": env, "batch_size": batch, "claim": claim, "class": kind,
                                "numerator": num, "denominator": den, **xp.estimate_columns("ratio", r),
                                "pair": f"{'MSE' if 'mse' in column else 'variance'}: {num} / {den}",
                                "word": word})
    return pd.DataFrame.from_records(records)


def claim_word(words: list[str], good: str, counter: str | None) -> str:
    """``share_word`` ('indistinguishable' alone decides nothing); one ``counter`` refutes."""
    return "refuted" if counter in words else xp.share_word(words, good, ("inconclusive", "indistinguishable"))


def findings(table: pd.DataFrame, comp: pd.DataFrame) -> list[xp.Finding]:
    """Every claim's verdict: the bias claims from the table, the others from ``CLAIMS``."""
    out = [xp.Finding(name, claim_word(list(rows["bias_verdict"]), *words), "; ".join(
        f"{r['env']} {r['label']} {format_columns(r, 'rel_bias', 2)} (theory {r['expected_rel_bias']:.3g})"
        for _, r in rows.iterrows()) or "no such row", kind) for name, rows, kind, words in (
        ("unbiased", table[table["expected_rel_bias"] == 0], xp.TESTED, ("unbiased", "biased")),
        ("batch means biased by 1/B", table[table["expected_rel_bias"] > 0], xp.EXTRA, ("1/B", "not 1/B")))]
    for claim, (kind, what, _, good, counter) in CLAIMS.items():
        rows = comp[comp["claim"] == claim] if len(comp) else comp
        words = list(rows.get("word", []))  # 'biased, lower': qualifies, does not refute
        out.append(xp.Finding(claim, claim_word(words, good, counter), f"{what}: " + "; ".join(
            f"{r['env']} {r['pair']} {format_columns(r, 'ratio')} {r['word']}"
            for _, r in rows.iterrows()), kind))
    return out


def summarise(runs: pd.DataFrame) -> tuple:
    """(one line per env, B and row; the paired comparisons; the findings; seeds)."""
    table = pd.DataFrame.from_records([
        {**row_numbers(group, label), "env": env, "batch_size": batch}
        for (env, batch), group in runs.groupby(["env", "batch_size"], sort=False, dropna=False)
        for label in ROW_TEXT if label in set(group["label"])])
    return table, (comp := comparisons(runs)), findings(table, comp), int(runs["seed"].nunique())


def write_markdown(summary: tuple, verdict: xp.Verdict, preset: str) -> str:
    table, comp, found, n_seeds = summary
    return "\n".join([
        f"# Baselines: bias and variance at the same policy ({preset} preset)", "",
        f"**Claim.** {CLAIM}", "",
        (f"Measured at a held-fixed random policy per seed ({n_seeds} seeds), paired across "
         "rows; relative variance = tr Cov[ĝ] / ‖∇J‖² of one batch estimate; relative bias "
         "= √(mean U) / ‖∇J‖ (U the de-noised squared bias); 95% intervals."), "",
        *frame_table(table.assign(B=table["batch_size"].map("{:.0f}".format)), {
            "env": "env", "B": "B", "baseline": "row", "theory": lambda r: str(r["expected_rel_bias"]),
            "bias verdict": "bias_verdict", "rel. variance": "rel_variance",
            "variance / reward-to-go": "var_ratio", "rel. bias": "rel_bias", "rel. MSE": "rel_mse"},
            missing="—"), "",
        "Paired comparisons (geometric mean over seeds of the per-seed ratio):", "",
        *frame_table(comp, {"env": "env", "claim": "claim", "class": "class", "reading": "word",
                            "ratio": "pair", "95% CI": "ratio"}, missing="—"), "",
        *xp.findings_section(found, verdict)])


EXPERIMENT = xp.Experiment(
    "Baselines", summarise, lambda summary: xp.headline_verdict(summary[2]), write_markdown,
    select=usable_measurements, per_run=per_run,
    result_frame=lambda summary: xp.sections_frame(rows=summary[0], comparisons=summary[1]),
    figures=lambda summary, runs, out_dir: interval_grid(
        summary[0], "env", "label",
        [("var_ratio", "variance / reward-to-go"), ("rel_bias", "relative bias ‖E ĝ − ∇J‖/‖∇J‖")],
        out_dir, "baselines_bias_variance", log_y=("var_ratio",), levels={"var_ratio": 1.0},
        marks={"rel_bias": "expected_rel_bias"}),
    empty_reason=f"no measured step >= {MIN_STEP} in the runs")
analyze = EXPERIMENT.analyze
