"""Gradient quality against the sample size (Ilyas et al. 2020): ``simulate(out, preset, params)``.

Called by ``pgvar-reproduce gradient_quality`` (``kind: simulation`` in sweep.yaml: this
experiment runs no sweep). At a few checkpoints of ONE training run it streams
state-action pairs of the checkpoint policy and measures, for sample sizes n from 10^3
to 10^6 pairs,

* the cosine between an estimate from n pairs and a reference gradient built from all
  the other pairs of the stream (leave-one-block-out, so estimate and reference never
  share an episode), and
* the mean cosine between two independent estimates from n pairs each,

for reinforce_rtg, value_baseline, gae and ppo (the critic-based ones with the run's
critic at that checkpoint).

Design (README.md beside this file says why):

* One stream of i.i.d. episodes per checkpoint (``pgvar.refill.reference_chunks``),
  episodes numbered in start order. Episode i starts at pair ``s_i`` = the pairs of the
  episodes before it; at sample size n, block b holds the episodes with
  ``b n <= s_i < (b + 1) n`` (whole episodes, so a block holds n pairs give or take
  one episode). Blocks of one n are disjoint, hence independent; the estimate of a
  block is the sum of its episodes' score sums (the cosine ignores the scale).
* Whether episode i is in block b depends on the lengths of earlier episodes only, so
  the number of episodes in a block is a stopping time and, by Wald's identity, the
  expected block sum is E[episodes] times the estimator's per-episode mean (grad J for
  the unbiased ones): no bias from cutting the stream at a pair count.
* Every episode's score sums for four weightings are computed once
  (``episode_score_sums``) and added into the blocks of every n and into the stream
  totals; ppo's per-batch advantage normalisation is rebuilt per block from the sums
  of the advantages and of their squares (``block_estimates``).
* References: value_baseline with the run's critic (primary) and reinforce_rtg (second),
  both unbiased; block b's reference is the stream total minus block b. An estimator is
  scored against a reference from a different estimator; value_baseline against
  reinforce_rtg's.
"""

from __future__ import annotations

import functools
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.experiment import Verdict, combined_word, estimate_columns, inconclusive
from analysis.figures import PANEL_HEIGHT, PAPER_WIDTH, apply_theme, log_axis, save_figure
from analysis.render import format_columns, markdown_table
from analysis.stats import mean_ci
from pgvar.estimators import ESTIMATORS, EstimatorConfig, prepare_inputs
from pgvar.gradients import score_gradients
from pgvar.progress import Progress, format_duration
from pgvar.returns import discount_weights

ESTIMATORS_MEASURED = ("reinforce_rtg", "value_baseline", "gae", "ppo")
# the per-episode score sums kept: four estimators' weights and gamma^t (ppo's normalisation)
WEIGHTINGS = ("reinforce_rtg", "value_baseline", "gae", "discount")
# both unbiased; value_baseline's critic is the run's, fitted on earlier data than the
# stream. reinforce_rtg's variance grows with the episodes' length: at the trained
# checkpoints its reference from 2 x 10^6 pairs is noise (relative SE > 1).
PRIMARY_REFERENCE, SECOND_REFERENCE = "value_baseline", "reinforce_rtg"
PRACTICE_PAIRS = 2048  # PPO's batch on MuJoCo in the paper's setting
THRESHOLD = 0.5  # "correlate poorly": mean cosine to the true gradient below this
MIN_CEILING = 0.5  # a reference noisier than this cannot decide the claim


# ----------------------------------------------------------------------------- statistics


def reference_ceiling(rel_se2: float) -> float:
    """E cos(g, g + e) for a perfect estimate g against a reference g + e, E||e||^2 = se2.

    With rel_se2 = se2 / ||g||^2 and e spread over many coordinates (P >> 1, no
    direction holding much of tr Cov e), ||g + e||^2 concentrates at ||g||^2 + se2 and
    g.(g + e) at ||g||^2 (relative fluctuations O(1/sqrt P)), so
    cos -> ||g||^2 / sqrt(||g||^2 (||g||^2 + se2)) = 1 / sqrt(1 + rel_se2).
    ``tests/test_gradient_quality.py`` checks it by simulation.
    """
    return 1.0 / math.sqrt(1.0 + max(rel_se2, 0.0))


def corrected_cosine(cos_to_reference: float, ceiling: float) -> float:
    """cos(ĝ, grad J) from cos(ĝ, g + e): with e independent of ĝ and spread over many
    coordinates, ĝ.(g + e) ~ ĝ.g and ||g + e|| ~ ||g|| / ceiling, so the cosine to the
    reference is the cosine to grad J times the ceiling (NaN for a ceiling of 0)."""
    return cos_to_reference / ceiling if ceiling > 0 else math.nan


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise cosine of two ``[k, P]`` matrices (NaN for a zero row)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    den = a.norm(dim=1) * b.norm(dim=1)
    cos = (a * b).sum(1) / den
    return torch.where(den > 0, cos, torch.full_like(cos, math.nan)).numpy()


def disjoint_pair_cosines(estimates: torch.Tensor) -> np.ndarray:
    """Cosines of blocks (0, 1), (2, 3), ...: independent pairs of independent estimates."""
    k = estimates.shape[0] // 2
    return cosine_rows(estimates[0:2 * k:2], estimates[1:2 * k:2])


# ----------------------------------------------------------------------------- accumulation


@dataclass
class Blocks:
    """Sums over the blocks of one sample size ``n`` (module doc): ``sums`` ``[k, W, P]``
    score sums per weighting (``WEIGHTINGS``), and per block its episodes, pairs and the
    sum, squared sum and count of the GAE advantages (ppo's normalisation)."""

    n: int
    sums: torch.Tensor
    episodes: torch.Tensor
    pairs: torch.Tensor
    adv: torch.Tensor  # [k, 3]: sum A, sum A^2, count

    @classmethod
    def empty(cls, n: int, k: int, P: int) -> Blocks:
        z = torch.zeros
        return cls(n, z(k, len(WEIGHTINGS), P, dtype=torch.float64), z(k, dtype=torch.float64),
                   z(k, dtype=torch.float64), z(k, 3, dtype=torch.float64))


@dataclass
class Totals:
    """Sums over every episode of the stream: score sums ``[W, P]``, the sum of each
    episode's squared norm per weighting ``[W]`` (for the references' standard errors),
    episodes, pairs, and the sum and squared sum of undiscounted episode returns."""

    sums: torch.Tensor
    sq_norms: torch.Tensor
    episodes: int = 0
    pairs: int = 0
    returns: float = 0.0
    returns_sq: float = 0.0

    def mean_return(self) -> float:
        return self.returns / self.episodes

    def return_se(self) -> float:
        n = self.episodes
        var = (self.returns_sq - self.returns ** 2 / n) / max(n - 1, 1)
        return math.sqrt(max(var, 0.0) / n)


@dataclass
class EpisodeSums:
    """Per-episode quantities of one chunk: ``grads`` ``[E, W, P]`` score sums,
    ``lengths`` ``[E]``, ``adv`` ``[E, 3]`` (sum A, sum A^2, count), ``returns`` ``[E]``."""

    grads: torch.Tensor
    lengths: torch.Tensor
    adv: torch.Tensor
    returns: torch.Tensor


def episode_score_sums(env, policy: nn.Module, critic: nn.Module, batch,
                       cfg: EstimatorConfig) -> EpisodeSums:
    """Each episode's score sum sum_t w_t grad log pi(a_t|s_t) for every weighting of
    ``WEIGHTINGS`` (the estimators' own weights, ``pgvar.estimators``), with the sums of
    the GAE advantages that ppo normalises."""
    x = prepare_inputs(env, batch, 1, critic, cfg)
    mask = batch.mask
    weights = {name: ESTIMATORS[name].weights(x) for name in WEIGHTINGS if name != "discount"}
    weights["discount"] = discount_weights(batch.horizon, x.gamma, batch.rewards.dtype,
                                           batch.rewards.device).expand_as(batch.rewards) * mask
    grads = torch.stack([
        score_gradients(policy, batch.obs[:, None], batch.actions[:, None],
                        weights[name][:, None].detach(), mask[:, None])
        for name in WEIGHTINGS], dim=1)
    a = ESTIMATORS["gae"].advantage(x).detach().to(torch.float64) * mask
    m = mask.to(torch.float64)
    adv = torch.stack([a.sum(1), (a * a).sum(1), m.sum(1)], dim=1)
    returns = (batch.rewards.to(torch.float64) * m).sum(1)
    return EpisodeSums(grads.to(torch.float64), batch.lengths, adv, returns)


def add_chunk(blocks: list[Blocks], totals: Totals, ep: EpisodeSums) -> None:
    """Add a chunk's episodes (the next ones of the stream) to the blocks and totals."""
    lengths = ep.lengths.to(torch.long)
    starts = totals.pairs + torch.cumsum(lengths, 0) - lengths
    for b in blocks:
        index = starts // b.n
        keep = (index < b.sums.shape[0]).nonzero().squeeze(1)
        if keep.numel() == 0:
            continue
        idx = index[keep]
        b.sums.index_add_(0, idx, ep.grads[keep])
        b.episodes.index_add_(0, idx, torch.ones(len(keep), dtype=torch.float64))
        b.pairs.index_add_(0, idx, lengths[keep].to(torch.float64))
        b.adv.index_add_(0, idx, ep.adv[keep])
    totals.sums += ep.grads.sum(0)
    totals.sq_norms += ep.grads.square().sum((0, 2))
    totals.episodes += int(lengths.numel())
    totals.pairs += int(lengths.sum())
    totals.returns += float(ep.returns.sum())
    totals.returns_sq += float(ep.returns.square().sum())


def block_estimates(b: Blocks, estimator: str) -> torch.Tensor:
    """``[k, P]``: the estimator's direction on each block (up to a positive factor).

    ppo: the gradient of the clipped surrogate at the sampling policy (ratio 1, clip
    inactive) with the batch-normalised GAE advantages of PPO implementations,
    sum_t gamma^t (A_t - mean A)/std A grad log pi = (S_gae - mean A S_discount) / std A;
    the positive 1/std A is dropped."""
    w = WEIGHTINGS.index
    if estimator == "ppo":
        mean = b.adv[:, 0] / b.adv[:, 2].clamp(min=1.0)
        return b.sums[:, w("gae")] - mean[:, None] * b.sums[:, w("discount")]
    return b.sums[:, w(estimator)]


@dataclass
class LeaveOneOut:
    """Block b's reference (the stream total minus block b) for one weighting, with its
    squared relative standard error se2 / ||grad J||^2 (se2 from the per-episode spread)."""

    grads: torch.Tensor  # [k, P]
    rel_se2: np.ndarray  # [k]


def leave_one_out(b: Blocks, totals: Totals, weighting: str) -> LeaveOneOut:
    """References that share no episode with their block; per-episode covariance trace
    tr Cov = (sum ||g_i||^2 - N ||mean||^2) / (N - 1), se2 = tr Cov / (N - N_b)."""
    w = WEIGHTINGS.index(weighting)
    n_total = float(totals.episodes)
    mean = totals.sums[w] / n_total
    tr_cov = (float(totals.sq_norms[w]) - n_total * float(mean.square().sum())) / (n_total - 1)
    grads = totals.sums[w][None] - b.sums[:, w]
    n_ref = n_total - b.episodes
    se2 = tr_cov / n_ref.clamp(min=1.0)
    norm2 = (grads / n_ref.clamp(min=1.0)[:, None]).square().sum(1)
    rel = se2 / (norm2 - se2).clamp(min=1e-300)  # ||ref||^2 overestimates ||g||^2 by se2
    return LeaveOneOut(grads, rel.numpy())


def reference_for(estimator: str) -> str:
    """The weighting of an estimator's (non-circular) reference."""
    return SECOND_REFERENCE if estimator == PRIMARY_REFERENCE else PRIMARY_REFERENCE


def summarise_blocks(blocks: list[Blocks], totals: Totals, checkpoint: str, step: int) -> list[dict]:
    """One record per (estimator, reference, n): cosine to the reference and between
    independent estimates, each a mean over blocks with its 95% interval."""
    records = []
    for b in blocks:
        complete = (torch.arange(b.sums.shape[0]) + 1) * b.n <= totals.pairs
        b = Blocks(b.n, b.sums[complete], b.episodes[complete], b.pairs[complete], b.adv[complete])
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


# ----------------------------------------------------------------------------- streams


@dataclass
class Checkpoint:
    """A policy (and critic) to measure at, with its label and training step."""

    label: str
    step: int
    env: object
    policy: nn.Module
    critic: nn.Module
    cfg: EstimatorConfig


@dataclass
class StreamResult:
    records: list[dict]
    totals: Totals
    seconds: float
    info: dict = field(default_factory=dict)


def block_counts(n_grid: list[int], total_pairs: int, max_blocks: int) -> dict[int, int]:
    """Blocks kept per n: as many as fit in the stream, at most ``max_blocks``."""
    return {n: max(1, min(max_blocks, total_pairs // n)) for n in n_grid}


def measure_checkpoint(ck: Checkpoint, n_grid: list[int], total_pairs: int, max_blocks: int,
                       seed: int, lanes: int, chunk_episodes: int) -> StreamResult:
    """Stream ``total_pairs`` pairs of the checkpoint policy and summarise the blocks."""
    from pgvar.refill import reference_chunks

    P = sum(p.numel() for p in ck.policy.parameters())
    blocks = [Blocks.empty(n, k, P) for n, k in block_counts(n_grid, total_pairs, max_blocks).items()]
    totals = Totals(torch.zeros(len(WEIGHTINGS), P, dtype=torch.float64),
                    torch.zeros(len(WEIGHTINGS), dtype=torch.float64))
    sizes = iter(lambda: chunk_episodes, None)  # endless chunks; max_pairs stops the stream
    started, cpu = time.perf_counter(), time.process_time()
    t_grad = 0.0
    bar = Progress(total_pairs, f"gradient_quality {ck.label} (step {ck.step})", unit="pairs",
                   progress=True, every_s=30.0)
    for batch in reference_chunks(ck.env, ck.policy, sizes, seed, lanes=lanes,
                                  max_pairs=total_pairs):
        t = time.perf_counter()
        add_chunk(blocks, totals, episode_score_sums(ck.env, ck.policy, ck.critic, batch, ck.cfg))
        t_grad += time.perf_counter() - t
        bar.update(batch.n_steps)
    bar.close()
    seconds = time.perf_counter() - started
    return StreamResult(summarise_blocks(blocks, totals, ck.label, ck.step), totals, seconds,
                        {"gradient_s": t_grad, "cpu_s": time.process_time() - cpu})


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoints(params: dict, run_dir: Path | None) -> list[Checkpoint]:
    """The checkpoints of ``params['checkpoints']`` (label -> step) of the run in
    ``run_dir`` (``pgvar.checkpoints.load_checkpoint``: the run's env, policy and critic
    at that step). Without a run (every step 0) the initial policy of
    ``params['initial_config']`` with a fresh critic, as ``pgvar-run`` builds them."""
    from pgvar.checkpoints import load_checkpoint
    from pgvar.config import build_critic
    from pgvar.run import initial_env_and_policy, run_config_from
    from pgvar.seeding import derive_seed

    out = []
    for label, step in params["checkpoints"].items():
        if run_dir is not None:
            ck = load_checkpoint(run_dir, int(step))
            env, policy, critic, run_cfg = ck.env, ck.policy, ck.critic, ck.run_cfg
        else:
            config = dict(params["initial_config"])
            run_cfg = run_config_from(config)
            env, policy = initial_env_and_policy(config)
            critic = build_critic(env, policy, run_cfg.training.critic,
                                  derive_seed(run_cfg.seed, "critic"))
        if critic is None:
            raise SystemExit(f"gradient_quality: the run in {run_dir} has no critic; train it "
                             "with a critic-based estimator (gae)")
        cfg = EstimatorConfig(lam=float(run_cfg.estimator.lam))
        out.append(Checkpoint(str(label), int(step), env, policy, critic, cfg))
    return out


def resolve_run_dir(params: dict, out: Path) -> Path | None:
    """The training run's job dir (``params['run_dir']``, relative to ``out``), or None
    where every checkpoint is step 0 (the initial policy needs no run)."""
    if "run_dir" not in params:
        if any(int(s) != 0 for s in params["checkpoints"].values()):
            raise SystemExit("gradient_quality: checkpoints after step 0 need a run_dir "
                             "(and train overrides) in the preset")
        return None
    path = Path(params["run_dir"])
    return path if path.is_absolute() else out / path


def ensure_trained(params: dict, run_dir: Path) -> None:
    """Train the run (``pgvar-run`` with ``params['train']``; it saves a checkpoint at every
    measured step) unless ``run_dir`` holds a complete one (a re-run reuses it)."""
    from analysis.reproduce import _pgvar_run
    from pgvar.runlog import read_run_record

    if (read_run_record(run_dir) or {}).get("status") == "complete":
        return
    if "train" not in params:
        raise SystemExit(f"gradient_quality: {run_dir} holds no complete training run and the "
                         "preset gives no `train` overrides to make one")
    cmd = [*_pgvar_run(), *[str(o) for o in params["train"]], f"hydra.run.dir={run_dir}"]
    print("gradient_quality: training:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


# ----------------------------------------------------------------------------- simulate


def simulate(out: Path, preset: str, params: dict) -> str:
    """Measure every checkpoint; write result.csv, result.md, checkpoints.csv and the figure."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(params.get("threads", 1)))
    run_dir = resolve_run_dir(params, out)
    if run_dir is not None:
        ensure_trained(params, run_dir)
    checkpoints = load_checkpoints(params, run_dir)
    n_grid = [int(float(n)) for n in params["n_grid"]]
    global _MEASURE_JOB
    _MEASURE_JOB = (checkpoints, n_grid, params)
    # ``only``: a subset of the labels, measured as in the whole preset (same seeds), to
    # split a preset's checkpoints across invocations
    todo = [i for i, ck in enumerate(checkpoints) if ck.label in params.get("only", [ck.label])]
    workers = max(1, min(int(params.get("workers", 1)), len(todo)))
    records, timing, text = [], [], ""
    with _pool(workers) as pool:
        for recs, row in pool.imap_unordered(_measure_job, todo):
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


class _Serial:
    """``imap_unordered`` in this process (one worker: no fork)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    @staticmethod
    def imap_unordered(fn, items):
        return map(fn, items)


def _pool(workers: int):
    """Checkpoints measured in ``workers`` forked processes (each one thread), or here."""
    import multiprocessing

    return _Serial() if workers == 1 else multiprocessing.get_context("fork").Pool(workers)


def _measure_job(i: int) -> tuple[list[dict], dict]:
    """Checkpoint ``i`` of ``_MEASURE_JOB``: its records and its row of checkpoints.csv."""
    checkpoints, n_grid, params = _MEASURE_JOB
    ck = checkpoints[i]
    torch.set_num_threads(int(params.get("threads", 1)))
    res = measure_checkpoint(ck, n_grid, pairs_of(params, ck.label), int(params["max_blocks"]),
                             seed=int(params.get("seed", 0)) + 1000 * i,
                             lanes=int(params.get("lanes", 512)),
                             chunk_episodes=int(params.get("chunk_episodes", 512)))
    t = res.totals
    row = {"checkpoint": ck.label, "step": ck.step, "pairs": t.pairs, "episodes": t.episodes,
           "mean_length": t.pairs / t.episodes, "return": t.mean_return(),
           "return_se": t.return_se(), "seconds": res.seconds, "cpu_s": res.info["cpu_s"],
           "gradient_s": res.info["gradient_s"], "pairs_per_s": t.pairs / res.seconds}
    return res.records, row


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

