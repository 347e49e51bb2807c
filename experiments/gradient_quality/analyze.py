"""Gradient quality against the sample size (Ilyas et al. 2020): ``simulate(out, preset, params)``,
called by ``pgvar-reproduce gradient_quality`` (``kind: simulation``: no sweep).

At the checkpoints of one training run, estimates from n state-action pairs
(``pgvar.sample_size``: blocks cut from one stream, each with a leave-block-out
reference) are scored by their cosine to a reference from a different unbiased estimator
(value_baseline with the run's critic; reinforce_rtg's for value_baseline itself) and to
each other; README.md beside this file gives the design and the verdict's rule.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import experiment as xp
from analysis.render import format_columns, markdown_table
from analysis.reproduce import measure_checkpoints, per_checkpoint
from analysis.stats import mean_ci
from pgvar import sample_size as ss
from pgvar.estimators import EstimatorConfig
from pgvar.progress import format_duration

# both unbiased; value_baseline's critic is the run's, fitted on earlier data than the
# stream. reinforce_rtg's variance grows with the episodes' length: at the trained
# checkpoints its reference from 2 x 10^6 pairs is noise (relative SE > 1).
PRIMARY_REFERENCE, SECOND_REFERENCE = "value_baseline", "reinforce_rtg"
TITLE = "Gradient quality against the sample size on Hopper-v5"
PRACTICE_PAIRS = 2048  # PPO's batch on MuJoCo in the paper's setting
THRESHOLD = 0.5  # "correlate poorly": mean cosine to the true gradient below this
MIN_CEILING = 0.5  # a reference noisier than this cannot decide the claim


def reference_for(estimator: str) -> str:
    """The weighting of an estimator's (non-circular) reference."""
    return SECOND_REFERENCE if estimator == PRIMARY_REFERENCE else PRIMARY_REFERENCE


def summarise_blocks(blocks: list[ss.Blocks], totals: ss.Totals, checkpoint: str, step: int) -> list[dict]:
    """One record per (estimator, reference, n): cosine to the reference and between
    independent estimates, each a mean over blocks with its 95% interval."""
    records = []
    for b in (b.complete(totals.pairs) for b in blocks):
        if b.sums.shape[0] == 0:
            continue
        refs = {r: ss.leave_one_out(b, totals, r) for r in (PRIMARY_REFERENCE, SECOND_REFERENCE)}
        for est in ss.BLOCK_ESTIMATORS:
            g = ss.block_estimates(b, est)
            pair = mean_ci(ss.disjoint_pair_cosines(g))
            for ref_name, ref in refs.items():
                circular = ref_name == est
                cos = mean_ci(ss.cosine_rows(g, ref.grads))
                rel = float(np.mean(ref.rel_se2))
                ceiling = ss.reference_ceiling(rel)
                records.append({
                    "checkpoint": checkpoint, "step": step, "estimator": est, "n": b.n,
                    "reference": ref_name, "circular": circular,
                    "primary": ref_name == reference_for(est),
                    "blocks": int(b.sums.shape[0]), "pairs_per_block": float(b.pairs.mean()),
                    "episodes_per_block": float(b.episodes.mean()),
                    **xp.estimate_columns("cos", cos), **xp.estimate_columns("pairwise", pair),
                    "pairs_compared": pair.n, "ref_rel_se": math.sqrt(rel),
                    "ceiling": ceiling,
                    **xp.estimate_columns("cos_true", cos.map(functools.partial(ss.corrected_cosine, ceiling=ceiling)))})
    return records


# ----------------------------------------------------------------------------- simulate


def simulate(out: Path, preset: str, params: dict) -> str:
    """Measure every checkpoint; write result.csv, result.md, checkpoints.csv and the figure."""
    n_grid = [int(float(n)) for n in params["n_grid"]]

    def measure(i: int, label: str, ck) -> tuple[list[dict], dict]:
        res = ss.stream_blocks(ck.env, ck.policy, ck.critic, EstimatorConfig(lam=float(ck.run_cfg.estimator.lam)),
                            n_grid, int(float(per_checkpoint(params, "total_pairs", label))),
                            int(params["max_blocks"]), seed=int(params.get("seed", 0)) + 1000 * i,
                            lanes=int(params.get("lanes", 512)),
                            chunk_episodes=int(params.get("chunk_episodes", 512)),
                            label=f"gradient_quality {label} (step {ck.step})")
        row = {"checkpoint": label, "step": ck.step, **res.summary()}
        return summarise_blocks(res.blocks, res.totals, label, ck.step), row

    def write(records: list[dict], rows: list[dict], n_checkpoints: int) -> str:
        runs = pd.DataFrame(rows).sort_values("step", kind="stable")
        return xp.Experiment(
            TITLE, lambda table: table.sort_values(["step", "n"], kind="stable"), decide,
            lambda table, verdict, preset: render(table, runs, verdict, preset, params, n_checkpoints),
            select=lambda records: records, figures=lambda table, _, fig_dir: plot_cosines(table, fig_dir),
            more_tables=lambda table: {"checkpoints": runs}).analyze(pd.DataFrame(records), Path(out), preset)

    return measure_checkpoints("gradient_quality", params, Path(out), measure, write, need_critic=True)


# ----------------------------------------------------------------------------- verdict


def practice_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows at the grid point nearest ``PRACTICE_PAIRS`` (log scale), non-circular
    references only."""
    ns = np.array(sorted(table["n"].unique()))
    n = int(ns[np.argmin(np.abs(np.log(ns) - math.log(PRACTICE_PAIRS)))])
    return table[(table["n"] == n) & table["primary"]]


def decide(table: pd.DataFrame) -> xp.Verdict:
    """The paper's finding at ~2,048 pairs: mean cosine to the true gradient below
    ``THRESHOLD``, the cosine to the reference divided by its ceiling
    (``ss.corrected_cosine``). Confirmed if every (checkpoint, estimator)'s upper 95% end is
    below it, refuted if every lower end is at or above it, qualified when cells differ;
    cells whose reference is too noisy (ceiling < ``MIN_CEILING``) or without an interval
    are left out (xp.inconclusive if none is left)."""
    if table.empty:
        return xp.inconclusive("no measurement")
    rows = practice_rows(table)
    ok = (rows["ceiling"] >= MIN_CEILING) & rows["cos_true_hi"].notna()
    usable = rows[ok]
    if usable.empty:
        return xp.inconclusive(f"no cell at n ~ {PRACTICE_PAIRS} has an interval and a reference "
                            f"with ceiling >= {MIN_CEILING}")
    words = ["confirmed" if r["cos_true_hi"] < THRESHOLD else "refuted" if r["cos_true_lo"] >= THRESHOLD
             else "inconclusive" for _, r in usable.iterrows()]
    word = xp.combined_word([w for w in words if w != "inconclusive"] or ["inconclusive"])
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
    return xp.Verdict(word, reason)


# ----------------------------------------------------------------------------- output


def plot_cosines(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One panel per checkpoint against n: the cosine to the value_baseline reference (95%
    bars; value_baseline's own against its own estimator's reference, the cross one being
    noise at trained checkpoints) and between independent estimates (dotted); the band
    above the reference's ceiling is what reference noise hides."""
    rows = table[table["reference"] == PRIMARY_REFERENCE].assign(
        estimator=lambda d: d["estimator"].replace(PRIMARY_REFERENCE, f"{PRIMARY_REFERENCE} (vs own)"),
        top=1.0)
    ylim = (min(-0.05, float(rows["pairwise"].min()) - 0.05), 1.02)
    return xp.plot_estimate_panels([
        {"frame": part, "x": "n", "y": "cos", "by": "estimator", "prediction": "pairwise",
         "band": ("ceiling", "top"), "hlines": [THRESHOLD], "vlines": [PRACTICE_PAIRS],
         "xscale": "log", "ylim": ylim, "title": f"{label} (step {part['step'].iloc[0]})",
         "xlabel": "state-action pairs n", "ylabel": "cosine to the reference\n(dotted: between estimates)"}
        for label, part in rows.groupby("checkpoint", sort=False)],
        out_dir, "gradient_quality_cosine_vs_pairs", ncols=rows["checkpoint"].nunique())


def render(table: pd.DataFrame, runs: pd.DataFrame, verdict: xp.Verdict, preset: str,
           params: dict, n_checkpoints: int) -> str:
    """result.md: the verdict, the checkpoints, one table per checkpoint (with a line
    saying so while only some checkpoints are measured)."""
    partial = [f"(partial: {len(runs)} of {n_checkpoints} checkpoints measured so far)", ""]
    lines = [f"# {TITLE} ({preset} preset)", "", *partial * (len(runs) < n_checkpoints),
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
        for est in ss.BLOCK_ESTIMATORS:
            header += [f"{est} to ref", f"{est} pairwise"]
        header += [f"{PRIMARY_REFERENCE} vs own", f"ceiling {PRIMARY_REFERENCE} / {SECOND_REFERENCE}"]
        body = []
        for n, g in part.groupby("n"):
            prim = g[g["primary"]].set_index("estimator")
            row = [f"{n:,}", int(prim["blocks"].iloc[0])]
            for est in ss.BLOCK_ESTIMATORS:
                r = prim.loc[est]
                row += [format_columns(r, "cos", 2, style="f"), format_columns(r, "pairwise", 2, style="f")]
            circ = g[g["circular"] & (g["estimator"] == PRIMARY_REFERENCE)].iloc[0]
            ceil = g.set_index("reference")["ceiling"]
            row += [format_columns(circ, "cos", 2, style="f"), (f"{ceil[PRIMARY_REFERENCE].iloc[0]:.3f} / "
                                  f"{ceil[SECOND_REFERENCE].iloc[0]:.3f}")]
            body.append(row)
        lines += markdown_table(header, body) + [""]
    lines += [(f"At most {params['max_blocks']} blocks per n (the stream of each checkpoint: "
               "*pairs streamed* above). Figure: "
               "figures/gradient_quality_cosine_vs_pairs.png."), ""]
    return "\n".join(lines)

