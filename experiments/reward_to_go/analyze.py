"""Reward-to-go against the full return: paired variance ratio and both biases.

Each run is one measurement of ``reinforce`` (the full return R on every step) or
``reinforce_rtg`` (gamma^t G_t) at a random initial policy; runs with the same env,
instance (``env.seed``) and seed share policy and episodes and form a *pair*, the
independent replicate. Per environment: each estimator's relative variance; the ratio
rtg/full as the geometric mean of per-pair ratios (bootstrap over pairs of the mean log)
next to the ratio of mean variances (paired ``ratio_ci``); each estimator's relative
squared bias (``analysis.table.squared_bias_interval``) and whether it is
distinguishable from 0. Verdict per environment: *confirmed* when the ratio's interval
lies below 1 and neither bias is distinguishable; *refuted* when it lies above 1 or the
reward-to-go bias is distinguishable; otherwise *inconclusive*.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import ticker

from analysis.experiment import (
    Experiment,
    Verdict,
    combined_word,
    estimate_columns,
    first_measurements,
    instance_column,
)
from analysis.figures import PANEL_HEIGHT, PAPER_WIDTH, REL_VAR_LABEL, error_bars, save_figure
from analysis.render import format_ci, format_columns, markdown_table, yes_no
from analysis.stats import Estimate, mean_ci, ratio_ci
from analysis.table import per_run_values, squared_bias_interval
from pgvar.stats import sqrt_clipped

FULL, RTG = "reinforce", "reinforce_rtg"
ESTIMATORS = (FULL, RTG)
LABELS = {FULL: "full return R (reinforce)", RTG: "reward-to-go γᵗGₜ (reinforce_rtg)"}
PAIR_KEYS = ["env", "instance", "seed"]
MIN_PAIRS = 3  # fewer: a bootstrap interval means nothing, the verdict stays inconclusive
CLAIM = ("“Using reward-to-go rather than the full trajectory return reduces variance "
         "without introducing bias, because future actions cannot causally affect past "
         "rewards.”")


def paired_variances(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per pair (env, instance, seed) holding both estimators' variance and
    relative variance."""
    wide = rows.pivot_table(index=PAIR_KEYS, columns="estimator",
                            values=["grad_variance", "grad_rel_variance"], aggfunc="mean")
    wide.columns = [f"{stat}_{est}" for stat, est in wide.columns]
    needed = [f"grad_variance_{e}" for e in ESTIMATORS]
    if not set(needed) <= set(wide.columns):
        return pd.DataFrame(columns=PAIR_KEYS + needed)
    return wide.dropna(subset=needed).reset_index()


def geometric_mean_ratio(numerator: np.ndarray, denominator: np.ndarray) -> Estimate:
    """exp(mean log(num/den)) over pairs, with the bootstrap interval of the mean log."""
    logs = np.log(np.asarray(numerator, float) / np.asarray(denominator, float))
    return mean_ci(logs).map(math.exp)


def ratio_of_means(pairs: pd.DataFrame) -> Estimate:
    """mean Var(rtg) / mean Var(full), resampling pairs jointly."""
    keys = list(zip(pairs["instance"], pairs["seed"]))
    return ratio_ci(dict(zip(keys, pairs[f"grad_variance_{RTG}"])),
                    dict(zip(keys, pairs[f"grad_variance_{FULL}"])))


def bias_of(rows: pd.DataFrame) -> dict[str, object]:
    """Relative squared bias of one estimator's runs with its interval, the root of its
    upper end, and whether the bias is distinguishable from zero (both the absolute and
    the relative squared-bias intervals above 0, as the comparison table decides)."""
    values = per_run_values(rows)
    b2 = squared_bias_interval(values, "grad_bias_sq")
    rel = squared_bias_interval(values, "grad_rel_bias_sq")
    distinguishable = (bool(b2.lo > 0 and rel.lo > 0)
                       if math.isfinite(b2.lo) and math.isfinite(rel.lo) else None)
    return {**estimate_columns("rel_bias_sq", rel),
            "rel_bias_upper": sqrt_clipped(rel.hi) if math.isfinite(rel.hi) else math.nan,
            "distinguishable": distinguishable}


def env_verdict(ratio: Estimate, bias_full: dict, bias_rtg: dict) -> str:
    """confirmed / refuted / inconclusive for one environment (see module doc)."""
    if ratio.n < MIN_PAIRS:
        return "inconclusive"
    if (math.isfinite(ratio.lo) and ratio.lo > 1) or bias_rtg["distinguishable"]:
        return "refuted"
    if (math.isfinite(ratio.hi) and ratio.hi < 1 and bias_full["distinguishable"] is False
            and bias_rtg["distinguishable"] is False):
        return "confirmed"
    return "inconclusive"


def reference_kind(rows: pd.DataFrame) -> str:
    """'exact' or 'Monte Carlo (N episodes)' from the logged reference columns."""
    if "ref_exact" in rows.columns and rows["ref_exact"].fillna(1).astype(bool).all():
        return "exact"
    episodes = rows["ref_episodes"].max() if "ref_episodes" in rows.columns else math.nan
    return f"Monte Carlo ({episodes:.0f} episodes)" if math.isfinite(episodes) else "Monte Carlo"


def _median_int(rows: pd.DataFrame, column: str) -> int | None:
    """The typical value of a size column (M, B), None when it was not logged."""
    if column not in rows.columns or rows[column].isna().all():
        return None
    return int(rows[column].median())


def summarise_env(env: str, rows: pd.DataFrame, pairs: pd.DataFrame) -> dict[str, object]:
    """Every number of one environment's row of result.csv."""
    geo = geometric_mean_ratio(pairs[f"grad_variance_{RTG}"], pairs[f"grad_variance_{FULL}"])
    per_pair = pairs[f"grad_variance_{RTG}"] / pairs[f"grad_variance_{FULL}"]
    record: dict[str, object] = {"env": env, "reference": reference_kind(rows),
                                 "n_pairs": len(pairs),
                                 "n_instances": int(pairs["instance"].nunique()),
                                 "n_batches": _median_int(rows, "n_estimates"),
                                 "batch_size": _median_int(rows, "training.batch_size")}
    for est in ESTIMATORS:
        record.update(estimate_columns(f"rel_var_{est}",
                                       mean_ci(pairs[f"grad_rel_variance_{est}"].to_numpy())))
    record.update({**estimate_columns("ratio_geo", geo),
                   **estimate_columns("ratio_means", ratio_of_means(pairs)),
                   "frac_pairs_rtg_lower": float((per_pair < 1).mean()),
                   "max_pair_ratio": float(per_pair.max())})
    biases = {est: bias_of(rows[rows["estimator"] == est]) for est in ESTIMATORS}
    for est, bias in biases.items():  # rel_bias_sq_lo of reinforce -> rel_bias_sq_reinforce_lo
        record.update({(f"{k[:-3]}_{est}{k[-3:]}" if k.endswith(("_lo", "_hi")) else f"{k}_{est}"): v
                       for k, v in bias.items()})
    record["verdict"] = env_verdict(geo, biases[FULL], biases[RTG])
    return record


def select(frame: pd.DataFrame) -> pd.DataFrame:
    """The first measurement of every run of the two estimators, with its instance."""
    rows = first_measurements(frame, ESTIMATORS)
    return rows.assign(instance=instance_column(rows))


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per environment with at least two pairs."""
    pairs = paired_variances(rows)
    records = [summarise_env(str(env), rows[rows["env"] == env], env_pairs)
               for env, env_pairs in pairs.groupby("env", sort=False)
               if len(env_pairs) >= 2]
    return pd.DataFrame.from_records(records)


def verdict(result: pd.DataFrame) -> Verdict:
    """All environments' verdicts agree: that word; they differ: qualified."""
    parts = [f"{r['env']}: Var(rtg)/Var(full) = "
             f"{format_columns(r, 'ratio_geo', 2)} over {r['n_pairs']} pairs, bias "
             f"distinguishable from 0: full {yes_no(r[f'distinguishable_{FULL}'])}, rtg "
             f"{yes_no(r[f'distinguishable_{RTG}'])} ({r['verdict']})"
             for _, r in result.iterrows()]
    return Verdict(combined_word(sorted(set(result["verdict"]))), "; ".join(parts))


def render(result: pd.DataFrame, verdict: Verdict, preset: str) -> str:
    """result.md: the claim, the table of numbers, the verdict line."""
    header = ["env", "reference", "pairs", "M x B", "rel. variance, full R",
              "rel. variance, reward-to-go", "Var ratio rtg/full (geo. mean)",
              "ratio of mean variances", "pairs with rtg lower (largest pair ratio)",
              "rel. squared bias, full R", "rel. squared bias, rtg",
              "bias distinguishable (full / rtg)", "rel. bias 95% upper bound (full / rtg)",
              "verdict"]
    rows = [[r["env"], r["reference"], r["n_pairs"], f"{r['n_batches']} x {r['batch_size']}",
             format_columns(r, f"rel_var_{FULL}"), format_columns(r, f"rel_var_{RTG}"),
             format_columns(r, "ratio_geo"), format_columns(r, "ratio_means"),
             f"{r['frac_pairs_rtg_lower']:.0%} ({r['max_pair_ratio']:.2f})",
             *(format_ci(r[f"rel_bias_sq_{e}"], r[f"rel_bias_sq_{e}_lo"],
                         r[f"rel_bias_sq_{e}_hi"], 2) for e in ESTIMATORS),
             " / ".join(yes_no(r[f"distinguishable_{e}"]) for e in ESTIMATORS),
             " / ".join(f"{r[f'rel_bias_upper_{e}']:.2g}" for e in ESTIMATORS),
             r["verdict"]] for _, r in result.iterrows()]
    return "\n".join([
        f"# Reward-to-go against the full return ({preset} preset)", "", f"Claim (source text): {CLAIM}", "",
        ("Paired measurements at random initial policies (one pair = one env instance "
         "and run seed, both estimators on the same episodes); 95% bootstrap intervals "
         "across pairs. Relative variance is tr Cov[ĝ] / ‖∇J‖²; relative squared bias "
         "is the de-noised ‖E ĝ − ∇J‖² / ‖∇J‖² (may be negative); its upper 95% end, "
         "square-rooted, bounds the relative bias ‖E ĝ − ∇J‖ / ‖∇J‖."), "",
        *markdown_table(header, rows), "", verdict.line(), ""])


def figures(result: pd.DataFrame, runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The paired variances and the biases, one panel per environment each."""
    return [*plot_variance_pairs(paired_variances(runs), result, out_dir), *plot_bias(result, out_dir)]


def _square_log_axes(ax, values: pd.Series) -> tuple[float, float]:
    """The same log scale on both axes, spanning ``values`` with a margin; plain-number
    ticks at 1-2-5 within two decades, at powers of ten beyond."""
    v = values[np.isfinite(values) & (values > 0)]
    lo, hi = v.min() / 1.6, v.max() * 1.6
    subs = (1.0, 2.0, 5.0) if math.log10(hi / lo) < 2 else (1.0,)
    for axis, set_scale, set_lim in ((ax.xaxis, ax.set_xscale, ax.set_xlim),
                                     (ax.yaxis, ax.set_yscale, ax.set_ylim)):
        set_scale("log")
        set_lim(lo, hi)
        axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
        axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())
    ax.set_aspect("equal", adjustable="box")
    return lo, hi


def plot_variance_pairs(pairs: pd.DataFrame, result: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One panel per environment: each pair's relative variance, reward-to-go against the
    full return, on equal log axes, with y = x and the geometric-mean ratio (95% band)."""
    envs = list(result["env"])
    fig, axes = plt.subplots(1, len(envs), figsize=(PAPER_WIDTH, PANEL_HEIGHT + 0.5), squeeze=False)
    for ax, env in zip(axes.flat, envs):
        p = pairs[pairs["env"] == env]
        x, y = p[f"grad_rel_variance_{FULL}"], p[f"grad_rel_variance_{RTG}"]
        r = result[result["env"] == env].iloc[0]
        lo, hi = _square_log_axes(ax, pd.concat([x, y]))
        grid = np.geomspace(lo, hi, 20)
        ax.plot(grid, grid, color="0.4", ls="--", lw=0.8, label="equal variance (y = x)")
        ax.plot(grid, r["ratio_geo"] * grid, color="tab:red", lw=1.0,
                label="geometric-mean ratio, 95% CI")
        ax.fill_between(grid, r["ratio_geo_lo"] * grid, r["ratio_geo_hi"] * grid,
                        color="tab:red", alpha=0.2, lw=0)
        ax.scatter(x, y, s=12, alpha=0.8, color="tab:blue", zorder=3,
                   label="one (instance, seed) pair")
        ax.set_xlabel("rel. variance, full return R")
        ax.set_ylabel("rel. variance, reward-to-go")
        ax.set_title(f"{env}, {r['n_pairs']} pairs\nratio rtg/full {r['ratio_geo']:.2f} "
                     f"[{r['ratio_geo_lo']:.2f}, {r['ratio_geo_hi']:.2f}]")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False,
               bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(f"Paired gradient variance at the same policy and episodes ({REL_VAR_LABEL})",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir, "reward_to_go_variance")


def plot_bias(result: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Relative squared bias (de-noised, may be negative) of both estimators with 95%
    intervals, one panel per environment (own scale); 0 is unbiased."""
    colours = {FULL: "tab:blue", RTG: "tab:orange"}
    fig, axes = plt.subplots(1, len(result), figsize=(PAPER_WIDTH, PANEL_HEIGHT), squeeze=False)
    for ax, (_, r) in zip(axes.flat, result.iterrows()):
        for j, est in enumerate(ESTIMATORS):
            ax.errorbar(j, r[f"rel_bias_sq_{est}"], yerr=error_bars(r, f"rel_bias_sq_{est}"), fmt="o", ms=4, capsize=3, color=colours[est],
                        label=LABELS[est])
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks([0, 1], ["full R", "reward-to-go"])
        ax.set_xlim(-0.6, 1.6)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:.2g}"))
        ax.set_title(f"{r['env']} ({r['reference']})" if r["reference"] == "exact"
                     else f"{r['env']} (Monte Carlo ref.)")
    axes.flat[0].set_ylabel("rel. squared bias\n‖E ĝ − ∇J‖² / ‖∇J‖²  (95% CI)")
    fig.suptitle("Bias against the reference gradient: 0 = unbiased (de-noised estimate, "
                 "may be negative)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir, "reward_to_go_bias")


EXPERIMENT = Experiment("Reward-to-go against the full return", summarise, verdict, render,
                        select=select, figures=figures,
                        empty_reason="no environment has two paired runs of both estimators")
analyze = EXPERIMENT.analyze
