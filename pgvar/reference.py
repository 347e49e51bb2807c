"""Reference gradients: the exact grad J where the environment allows it, otherwise a
Monte Carlo average of an unbiased estimator, returned with its standard error.

The Monte Carlo reference streams chunks of episodes. Each chunk is split into
sub-batches of ``batch_size`` episodes; the estimator applied to one sub-batch is an
unbiased estimate of grad J, and sub-batches are i.i.d., so the mean of all of them is
unbiased and its squared standard error is

    se2 = tr Cov(mean) = trCov_subbatch / n_subbatches,

with ``trCov_subbatch`` the unbiased trace of the sub-batch gradients' covariance. A
running mean and a running sum of squared deviations (Welford/Chan, float64) are all
that is kept, so memory is that of one chunk whatever the number of episodes.

The reference must be independent of the estimates it is compared with: each chunk's
seed is derived from ``(seed, chunk index)`` through ``numpy.random.SeedSequence`` with
a tag of its own, so it does not coincide with the small integer seeds used for
measurement batches.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pgvar.checks import require_int
from pgvar.envs.base import is_exact
from pgvar.estimators import (
    DEFAULT_CONFIG,
    ESTIMATORS,
    EstimatorConfig,
    estimate_gradient_blocks,
    get_estimator,
)
from pgvar.policies import flat_autograd
from pgvar.progress import Progress
from pgvar.refill import reference_chunks, supports_refill
from pgvar.rollout import rollout_chunks

DEFAULT_MC_EPISODES = 10_000
DEFAULT_LANES = 4096  # refill lanes (pgvar.refill) where the environment can refill them
DEFAULT_MEMORY_MB = 512  # what one chunk of a Monte Carlo reference may hold (chunk_plan)
NOISE_SAMPLE_ROWS = 256  # sub-batch gradients kept to measure the shape of the noise
_SEED_TAG = 0x5EF0_9E3D  # distinguishes reference seeds from measurement seeds


@dataclass(frozen=True)
class Reference:
    """A reference gradient ``grad`` ``[P]`` (float64, ``policy.parameters()`` order).

    ``se2`` is the trace of the covariance of ``grad`` (its squared standard error; 0 if
    exact); ``n_episodes``/``n_pairs`` the episodes and state-action pairs it used;
    ``n_estimates`` the number of i.i.d. sub-batch gradients averaged (0 if exact);
    ``var`` ``[P]`` the variance of each coordinate of ``grad`` (sums to se2; None if
    exact), which lets ``pgvar.stats`` bound the reference's noise more tightly;
    ``noise_sample`` ``[k, P]`` (k <= ``NOISE_SAMPLE_ROWS``; None if exact) k of its
    sub-batch gradients (``SubBatchSample``) divided by sqrt(n_estimates): rows whose
    sample covariance estimates the covariance of ``grad``'s error, so ``pgvar.stats``
    measures the shape of that noise (tr Sigma_r^2, its spread along the bias) instead of
    assuming the worst.
    ``objective`` is J (exact), or the mean sampled return sum_t gamma^t r_t over the
    horizon with ``objective_se`` its standard error (Monte Carlo).
    """

    grad: torch.Tensor
    se2: float
    n_episodes: int
    n_pairs: int
    exact: bool
    method: str
    n_estimates: int = 0
    var: torch.Tensor | None = None
    noise_sample: torch.Tensor | None = None
    objective: float = math.nan
    objective_se: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def se(self) -> float:
        """sqrt(se2): the expected length of the reference's own error."""
        return math.sqrt(self.se2)

    @property
    def norm(self) -> float:
        return float(self.grad.norm())

    @property
    def rel_se(self) -> float:
        """se / ||grad||: the reference's noise relative to its length."""
        n = self.norm
        return self.se / n if n > 0 else math.inf


# ----------------------------------------------------------------------------- exact


def exact_reference(env, policy: nn.Module) -> Reference:
    """grad J = autograd of ``env.exact_objective(policy)``: no sampling, se2 = 0."""
    if not is_exact(env):
        raise TypeError(f"environment {getattr(env, 'name', type(env).__name__)!r} has no "
                        "exact_objective(policy); use monte_carlo_reference")
    with torch.enable_grad():
        J = env.exact_objective(policy)
        g = flat_autograd(J, policy)
    return Reference(grad=g.to(torch.float64).cpu(), se2=0.0, n_episodes=0, n_pairs=0,
                     exact=True, method="exact", objective=float(J.detach()))


# ----------------------------------------------------------------------------- Monte Carlo


@dataclass
class RunningMoments:
    """Running mean and summed squared deviation of vectors (Chan et al.'s merge, float64).

    After rows x_1..x_n: ``mean`` = (1/n) sum x_i and ``m2`` = sum_i (x_i - mean)^2 per
    coordinate, so the coordinates' variances are m2/(n-1) and trCov = sum m2/(n-1).
    Merging a block of rows (mean_b, m2_b, n_b): delta = mean_b - mean,
    mean += delta n_b/(n + n_b), m2 += m2_b + delta^2 n n_b / (n + n_b).
    """

    n: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach()
        n_b = rows.shape[0]
        if n_b == 0:
            return
        # the block's own moments in its dtype and device (two passes, no float64 copy
        # of the block: a [n_b, P] conversion costs more than computing the gradients);
        # deviations from the block's own mean keep float32 accurate. Merged in float64.
        block_mean = rows.mean(0)
        m2_b = (rows - block_mean).square_().sum(0).to(torch.float64).cpu()
        mean_b = block_mean.to(torch.float64).cpu()
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n

    @property
    def trace_cov(self) -> float:
        """Unbiased trace of the rows' covariance, sum m2/(n-1)."""
        return float(self.m2.sum()) / (self.n - 1) if self.n > 1 else math.inf

    @property
    def se2(self) -> float:
        """Squared standard error of the mean: trCov / n."""
        return self.trace_cov / self.n if self.n > 0 else math.inf

    @property
    def mean_var(self) -> torch.Tensor:
        """Variance of each coordinate of the mean, m2/((n-1) n); sums to se2."""
        if self.n < 2:
            return torch.full_like(self.m2, math.inf)
        return self.m2 / ((self.n - 1) * self.n)


@dataclass
class SubBatchSample:
    """Up to ``limit`` sub-batch gradients of a stream of chunks, kept in float64 on the
    CPU: those with the lowest indices within each chunk, chunk after chunk.

    Sub-batches within a chunk are i.i.d. in index order, so these are a random sample;
    the order the rows arrive in is not (``estimate_gradient_blocks`` packs them by
    episode length, and on the chain environment the first 256 rows to arrive had 1.4x
    the variance of all of them). ``limit`` bounds the memory (256 rows of P numbers)."""

    limit: int
    rows: list = field(default_factory=list)
    count: int = 0  # rows kept so far
    quota: int = 0  # indices below this are kept from the current chunk

    def start_chunk(self) -> None:
        self.quota = self.limit - self.count

    def update(self, indices: torch.Tensor, rows: torch.Tensor) -> None:
        if self.quota <= 0:
            return
        keep = indices < self.quota
        if bool(keep.any()):
            self.rows.append(rows[keep].detach().to(torch.float64).cpu())
            self.count += int(keep.sum())

    def scaled(self, n_total: int) -> torch.Tensor | None:
        """The rows divided by sqrt(n_total): their covariance is that of the mean of
        n_total rows. None with fewer than 2 rows (no spread to measure)."""
        if self.count < 2:
            return None
        return torch.cat(self.rows) / math.sqrt(n_total)


def step_bytes(env) -> int:
    """Bytes one recorded step of a ``Batch`` takes: observation and next observation and
    the action (float32 or int64), reward and log-probability, two flags, two indices."""
    obs = math.prod(getattr(env, "obs_shape", (1,)))
    spec = getattr(env, "action_spec", None)
    act = max(getattr(spec, "dim", 0), 1) if getattr(spec, "kind", "") == "continuous" else 2
    return 4 * (2 * obs + act + 2) + 2 + 16


@dataclass(frozen=True)
class ChunkPlan:
    """How much of a Monte Carlo reference is in memory at once: ``chunk_episodes`` per
    chunk and ``lanes`` environment copies stepped together (None: one per episode)."""

    chunk_episodes: int
    lanes: int | None
    memory_bytes: int  # the estimate of what they hold, <= the budget unless a floor binds


def chunk_plan(env, batch_size: int, chunk_episodes: int, lanes: int | None,
               memory_mb: float, refill: bool) -> ChunkPlan:
    """Chunk size and lane count that keep one chunk within ``memory_mb``, whatever the env.

    Two things grow with a chunk: the recorded episodes, ``horizon * step_bytes`` each,
    held about four times (the stream's record and the padded ``Batch``, two chunks
    alive while the next is prefetched); and the environment copies that step them,
    ``env.lane_bytes`` each (a MuJoCo model and its data: about 1 MiB; Hopper at 2048
    copies took 2.3 GB). Half the budget goes to each. Without refill every episode of
    a chunk has its own copy, so the chunk is bounded by both halves. Floors: one
    sub-batch of ``batch_size`` episodes, one lane.
    """
    budget = float(memory_mb) * 2 ** 20
    episode_bytes = 4 * int(getattr(env, "horizon", 1)) * step_bytes(env)
    lane_bytes = int(getattr(env, "lane_bytes", 0))
    max_episodes = int(budget / 2 // episode_bytes)
    max_lanes = int(budget / 2 // lane_bytes) if lane_bytes else None
    if refill:
        lanes = lanes if max_lanes is None else max(1, min(lanes, max_lanes))
    elif max_lanes is not None:
        max_episodes = min(max_episodes, max_lanes)
    per_chunk = max(1, min(chunk_episodes, max_episodes) // batch_size)
    chunk_episodes = per_chunk * batch_size
    copies = lanes if refill else chunk_episodes
    return ChunkPlan(chunk_episodes, lanes if refill else None,
                     chunk_episodes * episode_bytes + copies * lane_bytes)


def chunk_seed(seed: int, index: int) -> int:
    """A 32-bit seed for chunk ``index`` of a reference seeded ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([_SEED_TAG, int(seed), int(index)]).generate_state(1)[0])


def unbiased_estimators() -> list[str]:
    return sorted(n for n, e in ESTIMATORS.items() if e.claimed_unbiased)


def check_unbiased(env, estimator: str, cfg: EstimatorConfig, critic: nn.Module | None) -> None:
    """Refuse settings under which the Monte Carlo average would not be unbiased for grad J."""
    est = get_estimator(estimator)
    if not est.claimed_unbiased:
        raise ValueError(f"a reference needs an unbiased estimator; {estimator!r} is not "
                         f"(unbiased ones: {unbiased_estimators()})")
    if not cfg.discount_weighting and float(env.gamma) < 1.0:
        raise ValueError("a reference needs cfg.discount_weighting=True: without gamma^t the "
                         "score sum is biased for J when gamma < 1")
    if cfg.normalize_advantages:
        raise ValueError("a reference needs cfg.normalize_advantages=False: per-batch "
                         "normalisation biases the estimate")
    if env.objective == "discounted":
        if cfg.truncation_as_termination:
            raise ValueError("under objective='discounted' a reference needs "
                             "cfg.truncation_as_termination=False (the tail must bootstrap)")
        if critic is None:
            warnings.warn("objective='discounted' with no critic: the Monte Carlo reference "
                          "drops the return beyond the horizon, so it is the gradient of the "
                          "truncated objective", stacklevel=3)


def monte_carlo_reference(env, policy: nn.Module, n_episodes: int | None = None,
                          n_pairs: int | None = None, seed: int = 0,
                          estimator: str = "reinforce_rtg", critic: nn.Module | None = None,
                          batch_size: int = 4, chunk_episodes: int = 2048,
                          target_rel_se: float | None = None, min_estimates: int = 64,
                          cfg: EstimatorConfig = DEFAULT_CONFIG, chunk: int = 64,
                          prefetch: bool = True, lanes: int | None = DEFAULT_LANES,
                          memory_mb: float = DEFAULT_MEMORY_MB,
                          progress: bool | None = None) -> Reference:
    """Average of ``estimator`` over sub-batches of ``batch_size`` episodes, with its se2.

    Budget: stop once ``n_episodes`` episodes or ``n_pairs`` state-action pairs are used
    (whichever comes first; ``DEFAULT_MC_EPISODES`` episodes if neither is given), or
    earlier once ``se / ||mean|| <= target_rel_se`` with at least ``min_estimates``
    sub-batches. Chunks of ``chunk_episodes`` episodes (rounded down to whole sub-batches)
    are rolled out and reduced one at a time, so memory is that of one chunk; the chunk
    and the lanes are shrunk where needed to hold one chunk within ``memory_mb``
    (``chunk_plan``: an estimate of what the episodes and the environment copies hold).

    Cost at the defaults (10,000 episodes; measured on 2 cores at a load average of 9 to
    10): CartPole at its initial policy (~22 steps an episode) 1.3 s, +110 MB; Hopper-v5
    (MuJoCo, ~20 steps an episode at its initial policy) 160 s, the process peaking at
    616 MB (2048 episodes alone took +2.3 GB before the memory bound: one MuJoCo copy,
    ~1 MiB, per lane). Time grows with the episodes' length: a trained CartPole policy
    runs 500 steps an episode, about 20 times as long. The budget costs speed where
    episodes are cheap: CartPole's references run 1.5x faster with 8192-episode chunks
    (``chunk_episodes=8192, memory_mb=4096``, as ``pgvar.bench`` does) than with the
    2032 the default budget allows. ``progress`` prints a
    line with the rate and the time left every few seconds (``pgvar.progress``; by
    default only on a terminal).

    Where the environment can refill lanes (``pgvar.refill``: Gymnasium envs), episodes
    run on ``lanes`` lanes that start a new episode as soon as one ends, instead of one
    episode per lane stepped until the longest ends; ``lanes=None`` (or 0) turns this
    off. Either way the next chunk is sampled in a background thread while this one is
    reduced, and the gradients of each chunk are reduced block by block
    (``estimate_gradient_blocks``), never held as one ``[n_sub, P]`` matrix.
    """
    lanes = None if lanes is None or lanes == 0 else require_int("lanes", lanes)
    check_unbiased(env, estimator, cfg, critic)
    batch_size = require_int("batch_size", batch_size)
    require_int("chunk_episodes", chunk_episodes)
    if not memory_mb > 0:
        raise ValueError(f"memory_mb must be > 0, got {memory_mb}")
    refill = bool(lanes) and supports_refill(env)
    plan = chunk_plan(env, batch_size, chunk_episodes, lanes, memory_mb, refill)
    chunk_episodes, lanes = plan.chunk_episodes, plan.lanes
    if n_episodes is None and n_pairs is None:
        n_episodes = DEFAULT_MC_EPISODES
    max_episodes = math.inf if n_episodes is None else require_int("n_episodes", n_episodes)
    max_pairs = math.inf if n_pairs is None else require_int("n_pairs", n_pairs)
    if target_rel_se is not None and not target_rel_se > 0:
        raise ValueError(f"target_rel_se must be > 0 or None, got {target_rel_se}")

    def schedule():  # (episodes, seed) of chunk 0, 1, ...: whole sub-batches, within budget
        done, index = 0, 0
        while done < max_episodes:
            n_sub = max(1, int(min(chunk_episodes, max_episodes - done) // batch_size))
            yield n_sub * batch_size, chunk_seed(seed, index)
            done, index = done + n_sub * batch_size, index + 1

    grads, returns = RunningMoments(), RunningMoments()
    sample = SubBatchSample(NOISE_SAMPLE_ROWS)
    used_episodes = used_pairs = index = 0
    stopped_early = False
    # the next chunk is rolled out in a background thread while this one is reduced
    if refill:
        sizes = (n for n, _ in schedule())
        chunks = reference_chunks(env, policy, sizes, chunk_seed(seed, 0), lanes=lanes,
                                  prefetch=prefetch, max_pairs=max_pairs)
    else:
        chunks = rollout_chunks(env, policy, schedule(), prefetch=prefetch, max_pairs=max_pairs)
    bar = Progress(max_episodes if math.isfinite(max_episodes) else None,
                   "monte carlo reference", unit="episodes", progress=progress)
    for batch in chunks:
        bar.update(batch.n_episodes)
        n_sub = batch.n_episodes // batch_size
        sample.start_chunk()
        for indices, rows in estimate_gradient_blocks(estimator, env, policy, batch, n_sub,
                                                      critic, cfg, chunk):
            grads.update(rows)
            sample.update(indices, rows)
        returns.update(batch.episode_returns(float(env.gamma)).unsqueeze(1))
        used_episodes += batch.n_episodes
        used_pairs += batch.n_steps
        index += 1
        if target_rel_se is not None and grads.n >= min_estimates:
            norm = float(grads.mean.norm())
            if norm > 0 and math.sqrt(grads.se2) <= target_rel_se * norm:
                stopped_early = True
                break
    bar.close()

    return Reference(grad=grads.mean, se2=grads.se2, n_episodes=used_episodes,
                     n_pairs=used_pairs, exact=False, method=f"monte_carlo:{estimator}",
                     n_estimates=grads.n, var=grads.mean_var,
                     noise_sample=sample.scaled(grads.n), objective=float(returns.mean[0]),
                     objective_se=math.sqrt(returns.se2),
                     info={"batch_size": batch_size, "n_chunks": index,
                           "stopped_early": stopped_early, "chunk_episodes": chunk_episodes,
                           "lanes": lanes, "chunk_bytes": plan.memory_bytes})


def reference_gradient(env, policy: nn.Module, method: str = "auto", **kw) -> Reference:
    """The best reference available: ``exact_reference`` where ``is_exact(env)``, else
    ``monte_carlo_reference(env, policy, **kw)`` (with "auto" on an exact environment the
    Monte Carlo options are ignored, so one configuration serves every environment).
    ``method`` may force "exact" or "monte_carlo" (how the tests check one against the
    other)."""
    if method not in ("auto", "exact", "monte_carlo"):
        raise ValueError(f"method must be 'auto', 'exact' or 'monte_carlo', got {method!r}")
    if method != "monte_carlo" and is_exact(env):
        kw.pop("progress", None)  # an exact gradient is one autograd call: nothing to show
    if method == "exact" and kw:
        raise ValueError(f"exact_reference takes no options, got {sorted(kw)}")
    if method == "exact" or (method == "auto" and is_exact(env)):
        return exact_reference(env, policy)  # "auto": Monte Carlo options are not needed
    return monte_carlo_reference(env, policy, **kw)
