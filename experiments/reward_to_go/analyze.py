"""Reward-to-go against the full return, per environment over *pairs* (runs of both
estimators on the same env instance, seed and episodes); the design is in README.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from analysis import experiment as xp
from analysis.figures import (
    PANEL_HEIGHT, PAPER_WIDTH, category_intervals, save_figure, scatter_with_identity)
from analysis.render import format_columns, frame_table, yes_no
from analysis.stats import mean_ci, ratio_ci

FULL, RTG = "reinforce", "reinforce_rtg"
ESTIMATORS = (FULL, RTG)
MIN_PAIRS = 3  # fewer: a bootstrap interval means nothing, the verdict stays inconclusive
CLAIM = ("“Using reward-to-go rather than the full trajectory return reduces variance "
         "without introducing bias, because future actions cannot causally affect past "
         "rewards.”")


def select(frame: pd.DataFrame) -> pd.DataFrame:
    """The first measurement of every run of the two estimators, with its instance."""
    rows = xp.first_measurements(frame, ESTIMATORS)
    return rows.assign(instance=xp.instance_column(rows))


def paired_variances(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per pair (env, instance, seed) with both estimators' (relative) variance."""
    return xp.paired_columns(rows, ["env", "instance", "seed"], "estimator",
                          ["grad_variance", "grad_rel_variance"], ESTIMATORS)


def env_checks(env: str, record: dict, ref_estimator: str | None) -> list:
    """The ratio below 1 and both biases not distinguishable, for one environment."""
    enough = record["n_pairs"] >= MIN_PAIRS
    below = xp.interval_check(record, "ratio_geo", lambda lo, hi: hi < 1 if hi < 1 or lo > 1 else None,
                           record["n_pairs"], MIN_PAIRS)
    out = [xp.check(env, "Var(rtg)/Var(full) < 1: the interval below 1", below,
                 f"ratio {format_columns(record, 'ratio_geo', 2)} over {record['n_pairs']} pairs")]
    for est in ESTIMATORS:
        flag = record[f"{est}_bias_distinguishable"]
        circular = est == ref_estimator
        out.append(xp.check(env, f"{est} bias not distinguishable from 0"
                              + (f" (reference: Monte Carlo mean of {est} itself)" if circular else ""),
                         None if flag is None or not enough else not flag,
                         f"rel. squared bias {format_columns(record, f'{est}_rel_bias_sq', 2)}",
                         xp.BY_CONSTRUCTION if circular else "tested"))
    return out


def summarise_env(env: str, rows: pd.DataFrame, pairs: pd.DataFrame) -> dict[str, object]:
    """Every number of one environment's row of result.csv."""
    rtg, full = pairs[f"grad_variance_{RTG}"], pairs[f"grad_variance_{FULL}"]
    keys = list(zip(pairs["instance"], pairs["seed"]))
    by_pair = {RTG: dict(zip(keys, rtg)), FULL: dict(zip(keys, full))}
    record = {"env": env, "reference": xp.reference_label(rows), "n_pairs": len(pairs),
              "n_instances": pairs["instance"].nunique(),
              "M x B": f"{int(rows['n_estimates'].median())} x {int(rows['training.batch_size'].median())}",
              **xp.estimate_columns("ratio_geo", xp.geometric_mean_ratio(by_pair[RTG], by_pair[FULL], 1)),
              **xp.estimate_columns("ratio_means", ratio_ci(by_pair[RTG], by_pair[FULL])),
              "frac_pairs_rtg_lower": float((rtg / full < 1).mean()), "max_pair_ratio": (rtg / full).max()}
    for est in ESTIMATORS:
        record.update(xp.estimate_columns(f"rel_var_{est}", mean_ci(pairs[f"grad_rel_variance_{est}"].to_numpy())))
        record.update({f"{est}_{k}": v for k, v in xp.bias_columns(rows[rows["estimator"] == est]).items()})
    return {**record, "reference_estimator": xp.reference_estimator(rows)}


def summarise(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One row per environment with at least two pairs, and the checks."""
    pairs = paired_variances(rows)
    result = pd.DataFrame([summarise_env(str(env), rows[rows["env"] == env], p)
                           for env, p in pairs.groupby("env", sort=False) if len(p) >= 2])
    return {"result": result, "checks": [c for _, r in result.iterrows()
                                    for c in env_checks(r["env"], r, r["reference_estimator"])]}


def verdict(s: dict):
    """From the tested checks, with every environment's ratio and biases."""
    return xp.headline_verdict(s["checks"], "; ".join(
        f"{r['env']}: Var(rtg)/Var(full) = {format_columns(r, 'ratio_geo', 2)} over {r['n_pairs']} pairs, bias "
        f"distinguishable from 0: full {yes_no(r[f'{FULL}_bias_distinguishable'])}, rtg "
        f"{yes_no(r[f'{RTG}_bias_distinguishable'])}" for _, r in s["result"].iterrows()))


def render(s: dict, verdict, preset: str) -> str:
    """result.md: the claim, the table of numbers, the checks, the verdict line."""
    return "\n".join([
        f"# Reward-to-go against the full return ({preset} preset)", "", f"Claim (source text): {CLAIM}", "",
        ("Pairs: one env instance and seed, both estimators on the same episodes; 95% bootstrap "
        "intervals over pairs. Relative squared bias: de-noised ‖E ĝ − ∇J‖² / ‖∇J‖² (may be "
        "negative); the root of its upper end bounds the relative bias."), "",
        *frame_table(s["result"], {
            "env": "env", "reference": "reference", "pairs": "n_pairs", "M x B": "M x B",
            "rel. variance, full R": f"rel_var_{FULL}", "rel. variance, reward-to-go": f"rel_var_{RTG}",
            "Var ratio rtg/full (geo. mean)": "ratio_geo", "ratio of mean variances": "ratio_means",
            "pairs with rtg lower (largest pair ratio)":
                lambda r: f"{r['frac_pairs_rtg_lower']:.0%} ({r['max_pair_ratio']:.2f})",
            **{f"rel. squared bias, {e}": (lambda r, e=e: format_columns(r, f"{e}_rel_bias_sq", 2))
               for e in ESTIMATORS},
            "bias distinguishable (full / rtg)":
                lambda r: " / ".join(yes_no(r[f"{e}_bias_distinguishable"]) for e in ESTIMATORS),
            "rel. bias 95% upper bound (full / rtg)":
                lambda r: " / ".join(f"{r[f'{e}_rel_bias_hi']:.2g}" for e in ESTIMATORS)}),
        "", *xp.findings_section(s["checks"], verdict)])


def figures(s: dict, runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per environment: each pair's relative variance, reward-to-go against full return
    (log axes, y = x dashed), and both relative squared biases with 95% intervals."""
    pairs, result = paired_variances(runs), s["result"]
    fig, axes = plt.subplots(2, len(result), figsize=(PAPER_WIDTH, 2 * PANEL_HEIGHT + 0.6), squeeze=False)
    for (ax_var, ax_bias), (_, r) in zip(axes.T, result.iterrows()):
        p = pairs[pairs["env"] == r["env"]]
        scatter_with_identity(ax_var, p[f"grad_rel_variance_{FULL}"], p[f"grad_rel_variance_{RTG}"],
                              "rel. variance, full R", "rel. variance, rtg",
                              f"{r['env']}: ratio {format_columns(r, 'ratio_geo', 2)}")
        category_intervals(ax_bias, r, {"full R": f"{FULL}_rel_bias_sq", "reward-to-go": f"{RTG}_rel_bias_sq"},
                           "rel. squared bias (95% CI)", f"{r['env']} ({r['reference']})")
    fig.tight_layout()
    return save_figure(fig, out_dir, "reward_to_go_pairs_bias")


EXPERIMENT = xp.Experiment("Reward-to-go against the full return", summarise, verdict, render,
                        select=select, figures=figures, result_frame=lambda s: s["result"],
                        more_tables=lambda s: {"checks": xp.findings_frame(s["checks"])}, empty_reason="no environment has two paired runs of both estimators")
analyze = EXPERIMENT.analyze
