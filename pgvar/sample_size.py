"""Gradient estimates from n state-action pairs, cut from one stream of episodes, with
references that share no episode with them: how an estimate's quality grows with n.

One stream of i.i.d. episodes of a fixed policy (``pgvar.refill.reference_chunks``),
episodes numbered in start order. Episode i starts at pair ``s_i`` = the pairs of the
episodes before it; at sample size n, block b holds the episodes with
``b n <= s_i < (b + 1) n`` (whole episodes, so a block holds n pairs give or take one
episode). Blocks of one n are disjoint, hence independent; the estimate of a block is
the sum of its episodes' score sums (a direction: cosines ignore the scale).

Whether episode i is in block b depends on the lengths of earlier episodes only, so the
number of episodes in a block is a stopping time and, by Wald's identity, the expected
block sum is E[episodes] times the estimator's per-episode mean (grad J for the unbiased
ones): cutting the stream at a pair count adds no bias.

Every episode's score sums for the weightings of ``WEIGHTINGS`` are computed once
(``episode_score_sums``) and added into the blocks of every n and into the stream
totals; ppo's per-batch advantage normalisation is rebuilt per block from the sums of
the advantages and of their squares (``block_estimates``). Block b's reference is the
stream total minus block b (``leave_one_out``), with its relative standard error from
the per-episode spread; ``reference_ceiling`` and ``corrected_cosine`` turn a cosine to
that noisy reference into one to grad J.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pgvar.estimators import ESTIMATORS, EstimatorConfig, prepare_inputs
from pgvar.gradients import score_gradients
from pgvar.progress import Progress
from pgvar.refill import reference_chunks
from pgvar.returns import discount_weights

# the per-episode score sums kept: four estimators' weights and gamma^t (ppo's normalisation)
WEIGHTINGS = ("reinforce_rtg", "value_baseline", "gae", "discount")
# the block estimators ``block_estimates`` builds from them
BLOCK_ESTIMATORS = ("reinforce_rtg", "value_baseline", "gae", "ppo")


# ----------------------------------------------------------------------------- cosines


def reference_ceiling(rel_se2: float) -> float:
    """E cos(g, g + e) for a perfect estimate g against a reference g + e, E||e||^2 = se2.

    With rel_se2 = se2 / ||g||^2 and e spread over many coordinates (P >> 1, no
    direction holding much of tr Cov e), ||g + e||^2 concentrates at ||g||^2 + se2 and
    g.(g + e) at ||g||^2 (relative fluctuations O(1/sqrt P)), so
    cos -> ||g||^2 / sqrt(||g||^2 (||g||^2 + se2)) = 1 / sqrt(1 + rel_se2).
    ``tests/test_sample_size.py`` checks it by simulation.
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

    def complete(self, stream_pairs: int) -> Blocks:
        """The blocks the stream filled: those ending at or before ``stream_pairs``."""
        full = (torch.arange(self.sums.shape[0]) + 1) * self.n <= stream_pairs
        return Blocks(self.n, self.sums[full], self.episodes[full], self.pairs[full], self.adv[full])


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

    @classmethod
    def empty(cls, P: int) -> Totals:
        return cls(torch.zeros(len(WEIGHTINGS), P, dtype=torch.float64),
                   torch.zeros(len(WEIGHTINGS), dtype=torch.float64))

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


# ----------------------------------------------------------------------------- streams


@dataclass
class StreamResult:
    """The blocks of every n (``Blocks.complete`` keeps those the stream filled), the
    stream's totals, its wall time and timings."""

    blocks: list[Blocks]
    totals: Totals
    seconds: float
    info: dict = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """The stream in one record: pairs, episodes, mean length, the undiscounted
        return with its standard error, wall and CPU seconds, and throughput."""
        t = self.totals
        return {"pairs": t.pairs, "episodes": t.episodes, "mean_length": t.pairs / t.episodes,
                "return": t.mean_return(), "return_se": t.return_se(), "seconds": self.seconds,
                **self.info, "pairs_per_s": t.pairs / self.seconds}


def block_counts(n_grid: list[int], total_pairs: int, max_blocks: int) -> dict[int, int]:
    """Blocks kept per n: as many as fit in the stream, at most ``max_blocks``."""
    return {n: max(1, min(max_blocks, total_pairs // n)) for n in n_grid}


def stream_blocks(env, policy: nn.Module, critic: nn.Module, cfg: EstimatorConfig,
                  n_grid: list[int], total_pairs: int, max_blocks: int, seed: int,
                  lanes: int, chunk_episodes: int, label: str = "sample sizes") -> StreamResult:
    """Stream ``total_pairs`` pairs of ``policy`` (``lanes`` refilled lanes, chunks of
    ``chunk_episodes``) into the blocks of every n of ``n_grid``; progress every 30 s.
    Cost: sampling ``total_pairs`` pairs plus four score sums per episode."""
    P = sum(p.numel() for p in policy.parameters())
    blocks = [Blocks.empty(n, k, P) for n, k in block_counts(n_grid, total_pairs, max_blocks).items()]
    totals = Totals.empty(P)
    sizes = iter(lambda: chunk_episodes, None)  # endless chunks; max_pairs stops the stream
    started, cpu = time.perf_counter(), time.process_time()
    t_grad = 0.0
    bar = Progress(total_pairs, label, unit="pairs", progress=True, every_s=30.0)
    for batch in reference_chunks(env, policy, sizes, seed, lanes=lanes, max_pairs=total_pairs):
        t = time.perf_counter()
        add_chunk(blocks, totals, episode_score_sums(env, policy, critic, batch, cfg))
        t_grad += time.perf_counter() - t
        bar.update(batch.n_steps)
    bar.close()
    return StreamResult(blocks, totals, time.perf_counter() - started,
                        {"cpu_s": time.process_time() - cpu, "gradient_s": t_grad})
