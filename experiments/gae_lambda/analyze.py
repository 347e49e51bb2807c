"""GAE(lambda): bias, variance and MSE of the gradient against lambda, with a fitted critic
held the same for every lambda (README.md beside this file: the claim, the paired design,
the critic levels and the classes of the verdict's parts)."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd

from analysis import experiment as ex
from analysis.render import format_columns, frame_table
from analysis.stats import NAN_ESTIMATE, mean_ci
from analysis.table import squared_bias_interval

MIN_STEP = 1
POOLED = f">= {MIN_STEP}"  # the critic level of all fitted steps pooled (the claim's)
CLAIM = ("The seed's table: GAE (Schulman et al. 2016), baseline 'V^λ-weighted', bias "
         "'tunable', variance 'very low'; Schulman et al.: λ trades bias (small λ, which "
         "bootstraps from an imperfect V) against variance (λ → 1, Monte Carlo returns).")
MIN_SEEDS = 3  # fewer paired seeds: no interval, so no verdict
OTHER_BATCH_SIZES = (1, 4, 64, 256)
RUN_COLUMNS = {"rel_bias_sq": "grad_rel_bias_sq", "rel_variance": "grad_rel_variance",
               "rel_mse": "grad_rel_mse", "cos_ref": "cos_ref"}


def usable_measurements(frame: pd.DataFrame) -> pd.DataFrame:
    """GAE's measured rows with a known lambda, each with ``critic_fit_loss``: the logged
    ``critic_loss`` of the iteration before, the fit that made the measuring critic."""
    rows = ex.measured_with_previous(frame, "critic_loss", "critic_fit_loss")
    return rows[(rows["estimator"] == "gae") & rows["lam"].notna()].copy()


def per_run(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per run and critic level: its means over steps >= MIN_STEP (``POOLED``)
    and at each measured step alone (level = the step, the critic's number of fits)."""
    ref_se = rows["ref_se"].fillna(0.0) if "ref_se" in rows else pd.Series(0.0, rows.index)
    ref = rows.get("training.reference.estimator", pd.Series("?", rows.index)).astype(str)
    exact = rows["ref_exact"].astype(str).isin(["True", "true", "1", "1.0"])
    rows = rows.assign(grad_rel_mse=ex.relative_mse(rows),
                       ref_rel_se=ref_se / rows["ref_norm"], batch_size=rows.get(
                           "training.batch_size", np.nan),
                       reference=np.where(exact, "exact ∇J", "MC " + ref))
    step = rows["step"].astype(int).astype(str)
    pooled = rows[rows["step"] >= MIN_STEP].assign(level=POOLED)
    each_step = rows.assign(level=step, run_dir=rows["run_dir"].astype(str) + "@" + step)
    return pd.concat([ex.per_run_table(part, ["env", "lam", "level", "reference", "batch_size"],
                                       ["grad_rel_mse", "critic_fit_loss", "ref_rel_se"])
                      for part in (pooled, each_step)], ignore_index=True)


def lambda_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One line per (env, lambda): relative bias, variance, MSE and cosine, 95% intervals."""
    records = []
    for (env, lam), sel in runs.groupby(["env", "lam"], sort=True):
        b2 = ex.with_min_n(squared_bias_interval(sel, "grad_rel_bias_sq"), MIN_SEEDS)
        records.append({"env": env, "estimator": "gae", "lam": lam, "n_runs": len(sel),
                        "batch_size": sel["batch_size"].iloc[0], "bias_distinguishable": b2.lo > 0,
                        **ex.estimate_columns("rel_bias_sq", b2),
                        **ex.estimate_columns("rel_bias", ex.sqrt_estimate(b2)),
                        **ex.mean_columns(sel, {name: RUN_COLUMNS[name]
                                                for name in ("rel_variance", "rel_mse", "cos_ref")})})
    return pd.DataFrame.from_records(records)


def trend_record(sel: pd.DataFrame) -> dict[str, object]:
    """Trends of one env at one critic level: Spearman trends, the paired endpoint
    comparisons, the variance minimum, the MSE-optimal lambda at B and at other B'."""
    rec: dict[str, object] = {"critic_fit_loss": sel["critic_fit_loss"].mean(),
                              "reference": sel["reference"].iloc[0],
                              **ex.estimate_columns("ref_rel_se", mean_ci(sel["ref_rel_se"]))}
    curves = {name: ex.paired_matrix(sel, "lam", RUN_COLUMNS[name])
              for name in ("rel_bias_sq", "rel_variance", "rel_mse")}
    for name, (lams, values) in curves.items():
        rec["n_paired_seeds"] = values.shape[0]
        rec.update(ex.estimate_columns(f"spearman_{name}", ex.curve_trend(lams, values, MIN_SEEDS)))
    (_, b2), (lams, var), (_, mse) = curves.values()
    if var.size == 0:
        return rec
    low, high = lams.min(), lams.max()
    rec["variance_argmin"] = vmin = float(lams[int(np.argmin(var.mean(0)))])
    for name, (num, den) in {"1_over_0": (high, low), "min_over_0": (vmin, low),
                             "1_over_min": (high, vmin)}.items():
        rec.update(ex.estimate_columns(f"variance_ratio_{name}",
                                       ex.paired_ratio(lams, var, num, den, MIN_SEEDS)))
    rec.update(ex.estimate_columns("bias_sq_drop_0_minus_1",
                                   ex.paired_mean(b2[:, 0] - b2[:, -1], MIN_SEEDS)))
    best, shares = ex.curve_argmin(lams, mse, MIN_SEEDS)
    rec.update(**ex.estimate_columns("mse_argmin", best),
               mse_argmin_shares=";".join(f"{k:g}:{v:.2f}" for k, v in shares.items()))
    batch = float(sel["batch_size"].iloc[0])
    for other in OTHER_BATCH_SIZES:  # MSE of a mean of B' episodes: bias^2 + trCov_B * B / B'
        best = ex.curve_argmin(lams, b2 + var * batch / other, MIN_SEEDS)[0] \
            if math.isfinite(batch) else NAN_ESTIMATE
        rec.update(ex.estimate_columns(f"mse_argmin_B{other}", best))
    return rec


def judged(t: dict) -> dict[str, str]:
    """Bias falls: Spearman CI below 0 and bias²(0) − bias²(1) above 0; variance rises:
    Spearman CI above 0 and the λ=1/λ=0 ratio above 1; U-shaped: falls to an inner
    minimum and rises from it (both ratio intervals excluding 1)."""
    side = partial(ex.interval_sign, t)  # the interval above (1) / below (-1) a level
    b_rank, b_end = side("spearman_rel_bias_sq"), side("bias_sq_drop_0_minus_1")
    v_rank, v_end = side("spearman_rel_variance"), side("variance_ratio_1_over_0", 1.0)
    bias = "falls" if (b_rank, b_end) == (-1, 1) else \
        "rises" if b_rank == 1 or b_end == -1 else "unclear"
    var = "rises" if (v_rank, v_end) == (1, 1) else "falls" if -1 in (v_rank, v_end) else "unclear"
    if var == "unclear" and 0 < t.get("variance_argmin", math.nan) < 1 and \
            side("variance_ratio_min_over_0", 1.0) == -1 == -side("variance_ratio_1_over_min", 1.0):
        var = f"falls to λ={t['variance_argmin']:g}, then rises"
    words = {"falls": "confirmed", "rises": "refuted", "unclear": "inconclusive"}
    var_word = {"rises": "confirmed", "falls": "refuted", "unclear": "inconclusive"}.get(
        var, "qualified")
    return {"bias_direction": bias, "variance_direction": var, "bias_word": words[bias],
            "variance_word": var_word, "env_verdict": ex.combined_word([words[bias], var_word])}


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per env and lambda, fitted steps pooled; per env and critic level: trends, words)."""
    records = [{"env": env, "level": level, **trend_record(sel)}
               for (env, level), sel in runs.groupby(["env", "level"], sort=False)]
    return lambda_table(runs[runs["level"] == POOLED]), \
        pd.DataFrame.from_records([{**rec, **judged(rec)} for rec in records])


def parts_of(summary: tuple) -> list[ex.Finding]:
    """The claim's parts per env, fitted steps pooled (their classes: README.md)."""
    table, tr = summary
    parts = []
    for _, t in tr[tr["level"] == POOLED].iterrows():
        env, sub = t["env"], table[table["env"] == t["env"]]
        lo, hi = sub.loc[sub["lam"].idxmin()], sub.loc[sub["lam"].idxmax()]
        circular = t["reference"] == "MC value_baseline"
        unbiased = "inconclusive" if not math.isfinite(hi["rel_bias_lo"]) else \
            "refuted" if hi["bias_distinguishable"] else "confirmed"
        parts += [
            ex.Finding(f"{env}: bias falls as λ grows", t["bias_word"],
                       f"relative bias {format_columns(lo, 'rel_bias', 2)} at λ={lo['lam']:g}, "
                       f"{format_columns(hi, 'rel_bias', 2)} at λ={hi['lam']:g}; Spearman(λ, "
                       f"bias²) {format_columns(t, 'spearman_rel_bias_sq', 2)}"),
            ex.Finding(f"{env}: variance rises as λ grows", t["variance_word"],
                       f"variance ×{format_columns(t, 'variance_ratio_1_over_0', 2)} from λ=0 to 1, "
                       f"{t['variance_direction']}; lowest at λ={t['variance_argmin']:g}"),
            ex.Finding(f"{env}: GAE(λ=1) is unbiased", unbiased,
                       f"relative bias {format_columns(hi, 'rel_bias', 2)} against {t['reference']}"
                       + (" (GAE(1) itself)" if circular else ""),
                       ex.BY_CONSTRUCTION if circular else ex.TESTED),
            ex.Finding(f"{env}: MSE-optimal λ at B = {lo['batch_size']:g}", ex.MEASURED,
                       f"{format_columns(t, 'mse_argmin')}; bootstrap shares {t['mse_argmin_shares']}",
                       ex.MEASURED)]
    return parts + [ex.Finding(
        "the MSE-optimal λ moves towards 1 with more episodes B'", "confirmed",
        "only the variance term of bias² + variance·B/B' shrinks with B'", ex.BY_CONSTRUCTION)] * (not tr.empty)


def render(summary: tuple, verdict, preset: str) -> str:
    table, tr = summary
    pooled = tr[tr["level"] == POOLED]
    by_level = tr[tr["level"] != POOLED].assign(
        level=lambda d: d["level"].astype(int), critic_fit_loss=lambda d: d["critic_fit_loss"].map(
            lambda x: f"{x:.3g}" if math.isfinite(x) else "unfitted"))
    return "\n".join([
        f"# GAE λ: bias, variance and the MSE-optimal λ ({preset} preset)", "",
        f"**Claim.** {CLAIM}", "",
        ("Relative bias √(mean U)/‖∇J‖, relative variance tr Cov[ĝ]/‖∇J‖² and relative MSE "
         "of one batch estimate, each λ at the same held-fixed policy, critic and episodes "
         f"per seed (paired), measured steps {POOLED} pooled; 95% intervals. References: "
         + "; ".join(f"{t['env']} {t['reference']} (relative SE "
                     f"{format_columns(t, 'ref_rel_se', 2)})" for _, t in pooled.iterrows()) + "."),
        "", *frame_table(table, {
            "env": "env", "λ": "lam", "rel. bias ‖E ĝ − ∇J‖/‖∇J‖": ("rel_bias", 2),
            "bias ≠ 0?": "bias_distinguishable", "rel. variance": "rel_variance",
            "rel. MSE": "rel_mse", "cos(ĝ, ∇J)": ("cos_ref", 2)}),
        "", "Trends over λ (bootstrap over seeds, paired across λ):", "", *frame_table(pooled, {
            "env": "env", "seeds": "n_paired_seeds", "Spearman(λ, bias²)": ("spearman_rel_bias_sq", 2),
            "Spearman(λ, variance)": ("spearman_rel_variance", 2),
            "variance λ=1 / λ=0 (geo. mean)": "variance_ratio_1_over_0",
            "bias²(λ=0) − bias²(λ=1), relative": "bias_sq_drop_0_minus_1",
            "MSE-optimal λ [95% CI]": "mse_argmin", "bootstrap share of each λ": "mse_argmin_shares"}),
        "", ("MSE-optimal λ had each batch held B' episodes (bias² + variance · B/B', from the "
             "measured per-seed bias² and variance, the critic unchanged; 95% bootstrap CI over "
             "seeds):"), "",
        *frame_table(pooled, {"env": "env", **{f"B' = {b}": f"mse_argmin_B{b}"
                                                   for b in OTHER_BATCH_SIZES}}),
        "", ("The verdict against the critic's quality: each measured step alone, the critic "
             "after that many fits (critic loss: its squared error on the batch it was last "
             "fitted to, in-sample; step 0: unfitted):"), "",
        *frame_table(by_level.sort_values(["env", "level"]), {
            "env": "env", "critic fits": "level", "critic loss": "critic_fit_loss",
            "bias": "bias_direction", "bias²(λ=0) − bias²(λ=1)": "bias_sq_drop_0_minus_1",
            "variance": "variance_direction",
            "variance λ=1 / λ=0": "variance_ratio_1_over_0", "MSE-optimal λ": "mse_argmin",
            "verdict": "env_verdict"}),
        "", *ex.findings_section(parts_of(summary), verdict)])


EXPERIMENT = ex.Experiment(
    "GAE λ", summarise, lambda summary: ex.headline_verdict(parts_of(summary)), render,
    select=usable_measurements, per_run=per_run,
    result_frame=lambda summary: ex.sections_frame(**{"lambda": summary[0], "trend": summary[1]}),
    figures=lambda summary, runs, out_dir: ex.plot_estimate_panels([
        {"frame": summary[0], "x": "lam", "y": y, "by": "env", "ylabel": label}
        for y, label in (("rel_bias", "relative bias ‖E ĝ − ∇J‖/‖∇J‖"), ("rel_variance",
                         "relative variance"), ("rel_mse", "relative MSE"))],
        out_dir, "gae_lambda_bias_variance"),
    empty_reason="no GAE measurement")
analyze = EXPERIMENT.analyze
