"""Gradient quality against the sample size (Ilyas et al. 2020): ``simulate(out, preset, params)``.

Called by ``pgvar-reproduce gradient_quality`` (``kind: simulation`` in sweep.yaml: this
experiment runs no sweep). At a few checkpoints of ONE training run it streams
state-action pairs of the checkpoint policy (``pgvar.sample_size``: blocks of n pairs cut
from one stream, each with a leave-block-out reference) and measures, for sample sizes n
from 10^3 to 10^6 pairs,

* the cosine between an estimate from n pairs and a reference gradient built from all
  the other pairs of the stream (estimate and reference never share an episode), and
* the mean cosine between two independent estimates from n pairs each,

for reinforce_rtg, value_baseline, gae and ppo (the critic-based ones with the run's
critic at that checkpoint). References: value_baseline with the run's critic (primary)
and reinforce_rtg (second), both unbiased; an estimator is scored against a reference
from a different estimator, value_baseline against reinforce_rtg's.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from analysis.experiment import Verdict, combined_word, estimate_columns, inconclusive
from analysis.figures import PANEL_HEIGHT, PAPER_WIDTH, apply_theme, log_axis, save_figure
from analysis.render import format_columns, markdown_table
from analysis.reproduce import forked_map, run_checkpoints
from analysis.stats import mean_ci
from pgvar.estimators import EstimatorConfig
from pgvar.progress import format_duration
from pgvar.sample_size import (
    BLOCK_ESTIMATORS, Blocks, Totals, block_estimates, corrected_cosine, cosine_rows,
    disjoint_pair_cosines, leave_one_out, reference_ceiling, stream_blocks)

ESTIMATORS_MEASURED = BLOCK_ESTIMATORS
# both unbiased; value_baseline's critic is the run's, fitted on earlier data than the
# stream. reinforce_rtg's variance grows with the episodes' length: at the trained
# checkpoints its reference from 2 x 10^6 pairs is noise (relative SE > 1).
PRIMARY_REFERENCE, SECOND_REFERENCE = "value_baseline", "reinforce_rtg"
PRACTICE_PAIRS = 2048  # PPO's batch on MuJoCo in the paper's setting
THRESHOLD = 0.5  # "correlate poorly": mean cosine to the true gradient below this
MIN_CEILING = 0.5  # a reference noisier than this cannot decide the claim


def reference_for(estimator: str) -> str:
    """The weighting of an estimator's (non-circular) reference."""
    return SECOND_REFERENCE if estimator == PRIMARY_REFERENCE else PRIMARY_REFERENCE


def summarise_blocks(blocks: list[Blocks], totals: Totals, checkpoint: str, step: int) -> list[dict]:
    """One record per (estimator, reference, n): cosine to the reference and between
    independent estimates, each a mean over blocks with its 95% interval."""
    records = []
    for b in (b.complete(totals.pairs) for b in blocks):
        if b.sums.shape[0] == 0:
            continue
        refs = {r: leave_one_out(b, totals, r) for r in (PRIMARY_REFERENCE, SECOND_REFERENCE)}
        for est in ESTIMATORS_MEASURED:
            g = block_estimates(b, est)
            pair = mean_ci(disjoint_pair_cosines(g))
            for ref_name, ref in refs.items():
                circular = ref_name == est
                cos = mean_ci(cosine_rows(g, ref.grads))
                rel = float(np.mean(ref.rel_se2))
                ceiling = reference_ceiling(rel)
                records.append({
                    "checkpoint": checkpoint, "step": step, "estimator": est, "n": b.n,
                    "reference": ref_name, "circular": circular,
                    "primary": ref_name == reference_for(est),
                    "blocks": int(b.sums.shape[0]), "pairs_per_block": float(b.pairs.mean()),
                    "episodes_per_block": float(b.episodes.mean()),
                    **estimate_columns("cos", cos), **estimate_columns("pairwise", pair),
                    "pairs_compared": pair.n, "ref_rel_se": math.sqrt(rel),
                    "ceiling": ceiling,
                    **estimate_columns("cos_true", cos.map(functools.partial(corrected_cosine, ceiling=ceiling)))})
    return records


# ----------------------------------------------------------------------------- simulate


def simulate(out: Path, preset: str, params: dict) -> str:
    """Measure every checkpoint; write result.csv, result.md, checkpoints.csv and the figure."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(params.get("threads", 1)))
    checkpoints = run_checkpoints("gradient_quality", params, out)
    if any(ck.critic is None for _, ck in checkpoints):
        raise SystemExit("gradient_quality: the run has no critic; train it with a "
                         "critic-based estimator (gae)")
    n_grid = [int(float(n)) for n in params["n_grid"]]
    global _MEASURE_JOB
    _MEASURE_JOB = (checkpoints, n_grid, params)
    # ``only``: a subset of the labels, measured as in the whole preset (same seeds), to
    # split a preset's checkpoints across invocations
    todo = [i for i, (label, _) in enumerate(checkpoints) if label in params.get("only", [label])]
    workers = max(1, min(int(params.get("workers", 1)), len(todo)))
    records, timing, text = [], [], ""
    with forked_map(_measure_job, todo, workers) as results:
        for recs, row in results:
            records += recs
            timing.append(row)
            print(f"gradient_quality: {row['checkpoint']} (step {row['step']}) done: "
                  f"{row['pairs']} pairs, return {row['return']:.1f}, "
                  f"{format_duration(row['seconds'])}", flush=True)
            # written after every checkpoint, so a long run's finished part is never lost
            text = write_results(out, pd.DataFrame(records).sort_values(["step", "n"], kind="stable"),
                                 pd.DataFrame(timing).sort_values("step"), preset, params,
                                 len(todo))
    return text


_MEASURE_JOB: tuple = ()  # (checkpoints, n_grid, params) for the workers


def pairs_of(params: dict, label: str) -> int:
    """The stream's length at checkpoint ``label``: ``total_pairs``, a number or a
    mapping label -> number."""
    total = params["total_pairs"]
    return int(float(total[label] if isinstance(total, dict) else total))


def _measure_job(i: int) -> tuple[list[dict], dict]:
    """Checkpoint ``i`` of ``_MEASURE_JOB``: its records and its row of checkpoints.csv."""
    checkpoints, n_grid, params = _MEASURE_JOB
    label, ck = checkpoints[i]
    torch.set_num_threads(int(params.get("threads", 1)))
    res = stream_blocks(ck.env, ck.policy, ck.critic, EstimatorConfig(lam=float(ck.run_cfg.estimator.lam)),
                        n_grid, pairs_of(params, label), int(params["max_blocks"]),
                        seed=int(params.get("seed", 0)) + 1000 * i,
                        lanes=int(params.get("lanes", 512)),
                        chunk_episodes=int(params.get("chunk_episodes", 512)),
                        label=f"gradient_quality {label} (step {ck.step})")
    row = {"checkpoint": label, "step": ck.step, **res.summary()}
    return summarise_blocks(res.blocks, res.totals, label, ck.step), row


def write_results(out: Path, table: pd.DataFrame, runs: pd.DataFrame, preset: str,
                  params: dict, n_checkpoints: int) -> str:
    """result.csv, checkpoints.csv, the figure and result.md of the checkpoints done."""
    table.to_csv(out / "result.csv", index=False)
    runs.to_csv(out / "checkpoints.csv", index=False)
    verdict = decide(table)
    apply_theme()
    plot_cosines(table, out / "figures")
    text = render(table, runs, verdict, preset, params)
    if len(runs) < n_checkpoints:
        text = text.replace("\n\n", f"\n\n(partial: {len(runs)} of {n_checkpoints} "
                                      "checkpoints measured so far)\n\n", 1)
    (out / "result.md").write_text(text)
    return text


# ----------------------------------------------------------------------------- verdict


def practice_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows at the grid point nearest ``PRACTICE_PAIRS`` (log scale), non-circular
    references only."""
    ns = np.array(sorted(table["n"].unique()))
    n = int(ns[np.argmin(np.abs(np.log(ns) - math.log(PRACTICE_PAIRS)))])
    return table[(table["n"] == n) & table["primary"]]


def decide(table: pd.DataFrame) -> Verdict:
    """The paper's finding at ~2,048 pairs: mean cosine to the true gradient below
    ``THRESHOLD``, the cosine to the reference divided by its ceiling
    (``corrected_cosine``). Confirmed if every (checkpoint, estimator)'s upper 95% end is
    below it, refuted if every lower end is at or above it, qualified when cells differ;
    cells whose reference is too noisy (ceiling < ``MIN_CEILING``) or without an interval
    are left out (inconclusive if none is left)."""
    if table.empty:
        return inconclusive("no measurement")
    rows = practice_rows(table)
    ok = (rows["ceiling"] >= MIN_CEILING) & rows["cos_true_hi"].notna()
    usable = rows[ok]
    if usable.empty:
        return inconclusive(f"no cell at n ~ {PRACTICE_PAIRS} has an interval and a reference "
                            f"with ceiling >= {MIN_CEILING}")
    words = []
    for _, r in usable.iterrows():
        words.append("confirmed" if r["cos_true_hi"] < THRESHOLD else
                     "refuted" if r["cos_true_lo"] >= THRESHOLD else "inconclusive")
    word = combined_word([w for w in words if w != "inconclusive"] or ["inconclusive"])
    if "inconclusive" in words and word != "inconclusive":
        word = "qualified"
    n = int(usable["n"].iloc[0])
    cells = "; ".join(f"{r.checkpoint}/{r.estimator} {r.cos_true:.2f} [{r.cos_true_lo:.2f}, "
                      f"{r.cos_true_hi:.2f}]" for r in usable.itertuples())
    skipped = "; ".join(f"{r.checkpoint}/{r.estimator} (ceiling {r.ceiling:.2f})"
                        for r in rows[~ok].itertuples())
    reason = (f"mean cosine to the true gradient (to the reference / its ceiling) at n = {n} "
              f"pairs against the threshold {THRESHOLD} ({len(usable)} cells, "
              f"{words.count('confirmed')} below, {words.count('refuted')} above, "
              f"{words.count('inconclusive')} straddling): {cells}"
              + (f"; left out, reference too noisy: {skipped}" if skipped else ""))
    return Verdict(word, reason)


# ----------------------------------------------------------------------------- output


def plot_cosines(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One panel per checkpoint: cosine to the value_baseline reference (solid, 95% bars;
    value_baseline's own against its own estimator's reference, the cross one being
    noise at trained checkpoints) and between independent estimates (dashed) against n;
    the band above the reference's ceiling is what reference noise hides."""
    rows = table[table["reference"] == PRIMARY_REFERENCE]
    labels = list(dict.fromkeys(rows["checkpoint"]))
    fig, axes = plt.subplots(1, len(labels), figsize=(PAPER_WIDTH, PANEL_HEIGHT + 0.6),
                             squeeze=False, sharey=True)
    colours = dict(zip(ESTIMATORS_MEASURED, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, label in zip(axes[0], labels):
        part = rows[rows["checkpoint"] == label].sort_values("n")
        ref = part.drop_duplicates("n")
        ax.fill_between(ref["n"], ref["ceiling"], 1.0, color="0.85", step="mid",
                        label="reference noise (above ceiling)")
        for est in ESTIMATORS_MEASURED:
            r = part[part["estimator"] == est]
            err = np.vstack([r["cos"] - r["cos_lo"], r["cos_hi"] - r["cos"]]).clip(min=0)
            ax.errorbar(r["n"], r["cos"], yerr=np.nan_to_num(err), color=colours[est],
                        marker="o", ms=3, lw=1.2, capsize=2,
                        label=est if est != PRIMARY_REFERENCE else f"{est} (vs own)")
            ax.plot(r["n"], r["pairwise"], color=colours[est], ls="--", lw=1)
        ax.axhline(THRESHOLD, color="0.4", lw=0.8, ls=":")
        ax.axvline(PRACTICE_PAIRS, color="0.4", lw=0.8, ls=":")
        log_axis(ax, "x", part["n"])
        step = int(part["step"].iloc[0])
        ax.set_title(f"{label} (step {step})")
        ax.set_xlabel("state-action pairs n")
    axes[0][0].set_ylabel(f"cosine (solid: to {PRIMARY_REFERENCE} ref.;\n"
                          "dashed: between estimates)")
    axes[0][0].set_ylim(min(-0.05, float(rows["pairwise"].min()) - 0.05), 1.02)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return save_figure(fig, out_dir, "gradient_quality_cosine_vs_pairs")


def _cell(r) -> str:
    return format_columns(r, "cos", 2, style="f")


def render(table: pd.DataFrame, runs: pd.DataFrame, verdict: Verdict, preset: str,
           params: dict) -> str:
    """result.md: the verdict, the checkpoints, one table per checkpoint."""
    lines = [f"# Gradient quality against the sample size on Hopper-v5 ({preset} preset)", "",
             verdict.line(), "",
             (f"Claim tested (Ilyas et al. 2020): at the batch sizes used in practice "
              f"(~{PRACTICE_PAIRS} state-action pairs) gradient estimates correlate poorly "
              f"with the true gradient: mean cosine < {THRESHOLD}. It fails if the lower 95% "
              f"end of the mean cosine is >= {THRESHOLD}."), "",
             "## Checkpoints", ""]
    lines += markdown_table(
        ["checkpoint", "step", "pairs streamed", "episodes", "mean length",
         "mean return (undiscounted)", "time", "pairs/s"],
        [[r.checkpoint, r.step, f"{r.pairs:,}", f"{r.episodes:,}", f"{r.mean_length:.0f}",
          f"{r['return']:.1f} ± {r.return_se:.1f}", format_duration(r.seconds),
          f"{r.pairs_per_s:.0f}"] for _, r in runs.iterrows()])
    lines += ["", (f"Cells: mean cosine over disjoint blocks of n pairs [95% bootstrap interval]. "
                   f"*to ref*: against the leave-block-out reference, from {PRIMARY_REFERENCE} "
                   f"(the run's critic) for every estimator except {PRIMARY_REFERENCE}, which "
                   f"is scored against {SECOND_REFERENCE}'s: never its own estimator; "
                   f"*{PRIMARY_REFERENCE} vs own*: against its own estimator's reference (still "
                   "unbiased for grad J, but it could not reveal a bias of its own); *pairwise*: "
                   "between two independent estimates; *ceiling*: 1/sqrt(1 + rel. SE^2) of the "
                   "reference, what a perfect estimator would reach against it (0: the "
                   "reference's SE exceeds its length)."), ""]
    for label in dict.fromkeys(table["checkpoint"]):
        part = table[table["checkpoint"] == label]
        lines += [f"## {label}", ""]
        header = ["n", "blocks"]
        for est in ESTIMATORS_MEASURED:
            header += [f"{est} to ref", f"{est} pairwise"]
        header += [f"{PRIMARY_REFERENCE} vs own", f"ceiling {PRIMARY_REFERENCE} / {SECOND_REFERENCE}"]
        body = []
        for n, g in part.groupby("n"):
            prim = g[g["primary"]].set_index("estimator")
            row = [f"{n:,}", int(prim["blocks"].iloc[0])]
            for est in ESTIMATORS_MEASURED:
                r = prim.loc[est]
                row += [_cell(r), format_columns(r, "pairwise", 2, style="f")]
            circ = g[g["circular"] & (g["estimator"] == PRIMARY_REFERENCE)].iloc[0]
            ceil = g.set_index("reference")["ceiling"]
            row += [_cell(circ), (f"{ceil[PRIMARY_REFERENCE].iloc[0]:.3f} / "
                                  f"{ceil[SECOND_REFERENCE].iloc[0]:.3f}")]
            body.append(row)
        lines += markdown_table(header, body) + [""]
    lines += [(f"At most {params['max_blocks']} blocks per n (the stream of each checkpoint: "
               "*pairs streamed* above). Figure: "
               "figures/gradient_quality_cosine_vs_pairs.png."), ""]
    return "\n".join(lines)

