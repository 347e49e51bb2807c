"""Coverage of pgvar's per-measurement intervals, measured where the truth is known.

A *case* is an estimator at a fixed policy whose exact mean is known: ``rloo`` is unbiased
(bias 0), ``mean_baseline`` with B episodes has E g = (1 - 1/B) grad J exactly, so its
bias is grad J / B ('small' at B = 8, 'large' at B = 2). Against an exact reference
(tabular MDP, LQR) the true squared bias is ||grad J||^2 / B^2; against a Monte Carlo
reference the same holds with grad J exact (tabular) or from a very large Monte Carlo
average (CartPole, whose error is reported).

For each case a *pool* of batch estimates is drawn once (the case's estimator and vanilla
REINFORCE on the same batches), then cut into ``repeats`` disjoint measurements of M
estimates each; each measurement is scored by ``pgvar.stats.gradient_stats`` exactly as a
run scores it (with its own fresh Monte Carlo reference where the case asks for one).
Coverage is the fraction of measurements whose interval holds the truth, with a Wilson
95% binomial interval; the true trCov and variance ratio come from the whole pool.

``run_calibration(cases, ...)`` does all of it and returns one tidy frame per
measurement; ``coverage_table`` summarises it per (case, M). ``experiments/calibration``
turns that into the published table, figure and verdicts.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats as sst

from analysis.loader import paired_ratio_intervals, with_series_intervals
from pgvar import make_env, make_policy
from pgvar.envs.base import is_exact
from pgvar.estimators import estimate_gradients
from pgvar.progress import Progress
from pgvar.reference import reference_gradient
from pgvar.rollout import rollout
from pgvar.stats import (
    Z_95,
    BiasModel,
    GradStats,
    cross_spread_moment,
    estimates_spread,
    frobenius_cov_sq,
    gradient_stats,
    score_interval,
    spread_moments,
    variance_ratio_interval,
)

NOMINAL = 0.95
TOLERANCE = 0.02  # the target: coverage within 95% +- 2 points
FP_TARGET = (0.015, 0.035)  # one-sided false-positive rate of the bias verdict
BASE_ESTIMATOR = "reinforce"  # the variance ratio's denominator, on the same batches
POOLED_K = 10  # measurements pooled per table-like interval
MEAN_FACTORS = {"rloo": lambda B: 1.0, "reinforce": lambda B: 1.0,
                "reinforce_rtg": lambda B: 1.0,
                "mean_baseline": lambda B: 1.0 - 1.0 / B}


@dataclass(frozen=True)
class Case:
    """One estimator at one fixed policy, with a known exact mean (see module doc)."""

    env: str
    estimator: str
    batch_size: int
    bias: str  # 'zero', 'small' or 'large': what the known mean makes of it
    reference: str = "exact"  # or 'monte_carlo': a fresh reference per measurement
    ref_episodes: int = 0  # episodes of each Monte Carlo reference
    env_kwargs: dict = field(default_factory=dict)
    # > 0: each run's measured steps lie along exact gradient ascent, this far apart in
    # parameter space (``measure_moving``), instead of all at the initial policy
    moving: float = 0.0

    @property
    def label(self) -> str:
        ref = "exact" if self.reference == "exact" else f"MC {self.ref_episodes} ep"
        return f"{self.env} ({ref}) {self.estimator} B={self.batch_size}" + (
            ", moving policy" if self.moving > 0 else "")

    def mean_factor(self) -> float:
        """c with E g = c grad J, from the estimator's definition."""
        if self.estimator not in MEAN_FACTORS:
            raise ValueError(f"no known exact mean for estimator {self.estimator!r}; "
                             f"calibration cases use {sorted(MEAN_FACTORS)}")
        return MEAN_FACTORS[self.estimator](self.batch_size)


@dataclass
class Pool:
    """Batch estimates of a case (``G``) and of vanilla REINFORCE on the same batches
    (``G_base``), the true gradient and what the whole pool says about the spread."""

    G: torch.Tensor
    G_base: torch.Tensor
    grad_true: torch.Tensor
    grad_true_se2: float  # 0 when exact
    trcov_true: float
    ratio_true: float
    tr_cov_sq_true: float = math.nan  # tr(Sigma^2) of the estimates (``true_spread``)
    along_bias_true: float = math.nan  # their spread along the true bias (nan: no bias)


def case_policy(case: Case, seed: int):
    """The case's environment and its fixed policy, the one every pool and reference of
    ``seed`` is drawn at (the policy's initial parameters come from torch's seed)."""
    env = make_env(case.env, **case.env_kwargs)
    torch.manual_seed(seed)
    return env, make_policy(env)


def draw_pool(case: Case, n_batches: int, seed: int, truth_episodes: int = 200_000,
              with_base: bool = True) -> Pool:
    """``n_batches`` estimates of the case's estimator and (``with_base``) of REINFORCE on
    the same batches, drawn in rollouts of about 8192 episodes. Where the gradient is not
    exact, the truth is a Monte Carlo reference of ``truth_episodes`` episodes (200k:
    seconds on a tabular MDP, about a minute of CartPole on 2 cores)."""
    env, policy = case_policy(case, seed)
    return pool_at(case, env, policy, n_batches, seed, truth_episodes, with_base)


def pool_at(case: Case, env, policy, n_batches: int, seed: int, truth_episodes: int = 200_000,
            with_base: bool = True) -> Pool:
    """``draw_pool`` at a given policy of the case's environment."""
    B = case.batch_size
    per = max(8192 // B, 1)
    G, G_base = [], []
    for i, start in enumerate(range(0, n_batches, per)):
        m = min(per, n_batches - start)
        batch = rollout(env, policy, m * B, seed=seed * 1_000_003 + i)
        G.append(estimate_gradients(case.estimator, env, policy, batch, m).double())
        if with_base:
            G_base.append(estimate_gradients(BASE_ESTIMATOR, env, policy, batch, m).double())
    G = torch.cat(G)
    G_base = torch.cat(G_base) if with_base else G
    exact = reference_gradient(env, policy, method="auto", **(
        {} if is_exact(env) else {"n_episodes": truth_episodes, "seed": seed + 7}))
    var_a, var_b = _trace_cov(G), _trace_cov(G_base)
    grad = exact.grad.double()
    tr_s2, along = true_spread(G, (case.mean_factor() - 1.0) * grad)
    return Pool(G, G_base, grad, float(exact.se2), var_a, var_a / var_b, tr_s2, along)


TRUE_SPREAD_ROWS = 4096  # rows of a pool its tr(Sigma^2) is taken from, when P exceeds it


def true_spread(G: torch.Tensor, bias: torch.Tensor, max_rows: int = TRUE_SPREAD_ROWS
                ) -> tuple[float, float]:
    """What a whole pool says about the two parts of the estimates' spread that one
    measurement's score model estimates from its M estimates: tr(Sigma^2) (unbiased,
    ``frobenius_cov_sq``; from the first ``max_rows`` rows when the estimates have more
    coordinates than that, about 10 s at P = 4610) and b' Sigma b / ||b||^2 along the true
    bias b (nan for a zero bias, where it does not enter the interval's test of the truth)."""
    rows = G if G.shape[1] <= max_rows else G[:max_rows]
    norm = float(bias.norm())
    along = float((G @ (bias / norm)).var(unbiased=True)) if norm > 0 else math.nan
    return frobenius_cov_sq(rows), along


def true_spread_interval(G: torch.Tensor, g_ref: torch.Tensor, stats: GradStats, pool: Pool
                         ) -> tuple[float, float]:
    """One measurement's score interval (``pgvar.stats.score_interval``, neither widened
    nor joined with the Wald end) with the estimates' spread, tr(Sigma^2) and the spread
    along the bias, taken from the whole pool instead of its M estimates; the reference's
    terms and the skewness stay the measurement's. Its coverage says what the interval's
    form gives when that spread is known: beside the run's, whether a miss comes from the
    form or from estimating the spread from M estimates. (nan, nan) where the step has no
    score model (M < 4)."""
    M = G.shape[0]
    if M < 4 or not (math.isfinite(stats.bias_v0) and math.isfinite(pool.tr_cov_sq_true)):
        return math.nan, math.nan
    v_est, _, kappa = estimates_spread(G, G - g_ref, stats.grad_bias_sq)
    slope = stats.bias_slope
    if math.isfinite(pool.along_bias_true):
        slope += 4.0 * (pool.along_bias_true - kappa) / M
    model = BiasModel(u=stats.grad_bias_sq, skew0=stats.bias_skew0, slope=slope,
                      v0=stats.bias_v0 - v_est + 2.0 * pool.tr_cov_sq_true / (M * (M - 1)))
    return score_interval(model)


def _trace_cov(G: torch.Tensor) -> float:
    return float(G.var(0, unbiased=True).sum())


class FreshReferences(Sequence):
    """``n`` independent Monte Carlo references for a case at its pool's policy, each
    drawn when it is asked for: 600 CartPole references held at once, each with its
    256-row noise sample, took 5.6 GB."""

    def __init__(self, case: Case, n: int, seed: int):
        self.case, self.n, self.seed = case, n, seed
        self.env, self.policy = case_policy(case, seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, r: int):
        if not 0 <= r < self.n:
            raise IndexError(f"reference {r} of {self.n}")
        return reference_gradient(self.env, self.policy, method="monte_carlo",
                                  n_episodes=self.case.ref_episodes,
                                  seed=self.seed * 7919 + 100_000 + r)


def measurement_references(case: Case, n: int, seed: int) -> Sequence:
    """``n`` independent Monte Carlo references for a case at its pool's policy, drawn on
    demand (``FreshReferences``); empty for an exact case (its exact reference is used)."""
    if case.reference == "exact":
        return []
    return FreshReferences(case, n, seed)


def measure_moving(case: Case, Ms: Sequence[int], repeats: int, seed: int,
                   steps: int = POOLED_K) -> pd.DataFrame:
    """``measure_pool``'s records for a case whose runs move: ``repeats`` // ``steps`` runs,
    each measuring ``steps`` policies along exact gradient ascent from the case's initial
    one (``case.moving`` apart in parameter space), so that the tails' shape and scale a
    run pools change from step to step as in training; the truth is exact at every step.
    Repeat b * steps + k is run b's step k, so that blocks of ``steps`` consecutive repeats
    are runs (``with_run_flags``)."""
    if case.reference != "exact" or case.moving <= 0:
        raise ValueError(f"{case.label}: a moving policy needs an exact reference and a "
                         f"positive step, got reference={case.reference!r}, moving={case.moving}")
    env, policy = case_policy(case, seed)
    runs = repeats // steps
    frames = []
    bar = Progress(steps, f"{case.label}: policies", unit="steps")
    for k in range(steps):
        bar.update()
        pool = pool_at(case, env, policy, runs * max(Ms), seed * 1009 + k)
        records = measure_pool(case, pool, Ms, runs)
        frames.append(records.assign(repeat=records["repeat"] * steps + k))
        ascend(policy, pool.grad_true, case.moving)
    bar.close()
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["M", "repeat"], kind="stable", ignore_index=True)


def ascend(policy: torch.nn.Module, grad: torch.Tensor, distance: float) -> None:
    """Move ``policy``'s parameters ``distance`` along the unit gradient ``grad`` (flat, in
    ``parameters()`` order), in place."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    with torch.no_grad():
        theta = parameters_to_vector(policy.parameters())
        step = distance * grad / max(float(grad.norm()), 1e-300)
        vector_to_parameters(theta + step.to(theta.dtype), policy.parameters())


def measure_pool(case: Case, pool: Pool, Ms: Sequence[int], repeats: int,
                 references: Sequence = ()) -> pd.DataFrame:
    """One row per (M, repeat): the statistics a run would log, and the truth. Repeat r
    of every M is scored against the same reference ``references[r]``, drawn once."""
    c = case.mean_factor()
    true_bias = (c - 1.0) * pool.grad_true
    truth_b2 = float((true_bias ** 2).sum())
    if pool.G.shape[0] < max(Ms) * repeats:
        raise ValueError(f"pool of {pool.G.shape[0]} estimates is too small for "
                         f"{repeats} repeats of M={max(Ms)}")
    rows = []
    bar = Progress(repeats, f"{case.label}: scoring", unit="repeats")
    for r in range(repeats):
        bar.update()
        if references:
            ref = references[r]
            g_ref, se2, var, sample = (ref.grad.double(), float(ref.se2), ref.var,
                                       ref.noise_sample)
        else:
            g_ref, se2, var, sample = pool.grad_true, 0.0, None, None
        for M in Ms:
            G = pool.G[r * M:(r + 1) * M]
            s = gradient_stats(G, g_ref, se2, var, sample)
            true_lo, true_hi = true_spread_interval(G, g_ref, s, pool)
            ratio, ratio_lo, ratio_hi = variance_ratio_interval(G, pool.G_base[r * M:(r + 1) * M])
            rows.append({
                "case": case.label, "env": case.env, "estimator": case.estimator,
                "batch_size": case.batch_size, "bias": case.bias, "reference": case.reference,
                "policy_step": case.moving, "M": M, "repeat": r, "truth_bias_sq": truth_b2,
                "truth_rel_bias_sq": truth_b2 / float((pool.grad_true ** 2).sum()),
                "bias_sq": s.grad_bias_sq, "bias_sq_se": s.grad_bias_sq_se,
                "bias_sq_lo": s.grad_bias_sq_lo,
                "bias_sq_hi": s.grad_bias_sq_hi, "distinguishable": s.bias_distinguishable,
                "bias_sq_true_spread_lo": true_lo, "bias_sq_true_spread_hi": true_hi,
                "truth_variance": pool.trcov_true, "variance": s.grad_variance,
                "variance_lo": s.grad_variance_lo, "variance_hi": s.grad_variance_hi,
                "truth_ratio": pool.ratio_true, "ratio": ratio, "ratio_lo": ratio_lo,
                "ratio_hi": ratio_hi, "tail_index": s.tail_index, "ci_reliable": s.ci_reliable,
                "spread_z_mean": s.spread_z_mean, "spread_z_sq_mean": s.spread_z_sq_mean,
                "bias_v0": s.bias_v0, "bias_slope": s.bias_slope, "bias_skew0": s.bias_skew0,
                "proj_z_mean": s.proj_z_mean, "proj_z_sq_mean": s.proj_z_sq_mean,
                **base_moments(G, pool.G_base[r * M:(r + 1) * M]),
                "ref_rel_se": s.ref_se / max(s.ref_norm, 1e-300),
                "truth_se2": pool.grad_true_se2,
            })
    bar.close()
    frame = pd.DataFrame.from_records(rows)
    return frame.sort_values(["M", "repeat"], kind="stable", ignore_index=True)


def base_moments(G, G_base) -> dict:
    """What the run-pooled ratio interval needs of the base estimator on the same batches:
    its ``spread_moments`` and the cross moment with ``G`` (``cross_spread_moment``)."""
    z_mean, z_sq_mean = spread_moments(G_base)
    return {"base_spread_z_mean": z_mean, "base_spread_z_sq_mean": z_sq_mean,
            "spread_z_cross": cross_spread_moment(G, G_base)}


def run_calibration(cases: Iterable[Case], Ms: Sequence[int], repeats: int,
                    mc_Ms: Sequence[int] | None = None, mc_repeats: int | None = None,
                    seed: int = 0, log=print) -> pd.DataFrame:
    """Draw every case's pool, score its measurements; a progress line per case."""
    frames = []
    cases = list(cases)
    started = time.perf_counter()
    seconds: dict[tuple[str, str], list[float]] = {}  # per (env, reference) kind: cases' times
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        exact = case.reference == "exact"
        case_Ms = list(Ms if exact or mc_Ms is None else mc_Ms)
        n_rep = repeats if exact or mc_repeats is None else mc_repeats
        if case.moving > 0:
            frames.append(measure_moving(case, case_Ms, n_rep, seed + i))
        else:
            pool = draw_pool(case, max(case_Ms) * n_rep, seed + i)
            refs = measurement_references(case, n_rep, seed + i)
            frames.append(measure_pool(case, pool, case_Ms, n_rep, refs))
        took = time.perf_counter() - t0
        seconds.setdefault((case.env, case.reference), []).append(took)
        done = time.perf_counter() - started
        log(f"[{i + 1}/{len(cases)}] {case.label}: {n_rep} repeats x M in {case_Ms} "
            f"in {took:.0f}s (elapsed {done:.0f}s, {time_left(cases[i + 1:], seconds)})")
        sys.stdout.flush()
    return pd.concat(frames, ignore_index=True)


def time_left(remaining: Sequence[Case], seconds: dict[tuple[str, str], list[float]]) -> str:
    """'about Ns left': each remaining case at the mean time of the cases of its kind
    (environment and reference) done so far; cases of a kind not seen yet make it a lower
    bound (a Monte Carlo CartPole case takes minutes where a tabular one takes seconds)."""
    seen = [t for times in seconds.values() for t in times]
    known = [float(np.mean(seconds[(c.env, c.reference)])) for c in remaining
             if (c.env, c.reference) in seconds]
    unseen = len(remaining) - len(known)
    total = sum(known) + unseen * float(np.mean(seen))
    return f"about {total:.0f}s left" + (f", more if the {unseen} case(s) of a kind not run yet are slower"
                                         if unseen else "")


# ----------------------------------------------------------------------------- summary


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _covers(lo: pd.Series, hi: pd.Series, truth: pd.Series) -> pd.Series:
    return (lo <= truth) & (truth <= hi)


@dataclass(frozen=True)
class PooledCoverage:
    """How the comparison table's interval pooled over blocks of measurements fared: the
    share of blocks whose interval held the truth (``table``), the share whose verdict
    said "biased" (``biased``: false positives where the bias is 0), the blocks counted,
    and a Student-t interval's coverage across each block's values (``t``)."""

    table: float
    biased: float
    blocks: int
    t: float


def pooled_coverage(group: pd.DataFrame, k: int = POOLED_K) -> PooledCoverage:
    """Coverage of the mean squared bias over blocks of ``k`` measurements (one run), as
    the comparison table pools steps and seeds: ``analysis.table``'s ``pooled_bias`` of
    ``per_run_values`` on the logged SEs, the run's widened ones ``bias_sq_se_run`` and
    each step's score model (``PooledCoverage``)."""
    from analysis.table import per_run_values, pooled_bias

    ordered = group.sort_values("repeat")
    n = len(ordered) // k
    if n == 0:
        return PooledCoverage(math.nan, math.nan, 0, math.nan)
    ordered = ordered.iloc[: n * k]
    block = np.arange(n * k) // k
    rows = pd.DataFrame({"run_dir": block, "seed": block, "grad_bias_sq": ordered["bias_sq"].to_numpy(),
                         "grad_bias_sq_se": ordered["bias_sq_se"].to_numpy()})
    if "bias_sq_se_run" in ordered.columns:
        rows["grad_bias_sq_se_run"] = ordered["bias_sq_se_run"].to_numpy()
    for column in ("bias_v0", "bias_slope", "bias_skew0"):  # each step's score model
        if column in ordered.columns:
            rows[column] = ordered[column].to_numpy()
    # the truth of a block's mean: the mean of its measurements' (steps of a moving policy differ)
    truths = ordered["truth_bias_sq"].to_numpy().reshape(n, k).mean(1)
    pooled = [pooled_bias(per_run_values(r)).bias_sq for _, r in rows.groupby("run_dir", sort=True)]
    blocks = rows["grad_bias_sq"].to_numpy().reshape(n, k)
    mean = blocks.mean(1)
    half = sst.t.ppf(0.975, k - 1) * blocks.std(1, ddof=1) / math.sqrt(k)
    t_hits = (mean - half <= truths) & (truths <= mean + half)
    return PooledCoverage(table=float(np.mean([_holds(e, t) for e, t in zip(pooled, truths)])),
                          biased=float(np.mean([e.lo > 0 for e in pooled])), blocks=n,
                          t=float(np.mean(t_hits)))


def _holds(est, truth: float) -> bool:
    return bool(est.lo <= truth <= est.hi)


INTERVAL_COLUMNS = [("bias_sq", "bias_sq_run_lo", "bias_sq_run_hi", "truth_bias_sq"),
                    ("variance", "variance_run_lo", "variance_run_hi", "truth_variance"),
                    ("ratio", "ratio_run_lo", "ratio_run_hi", "truth_ratio")]
# the intervals from one step alone (metrics.csv's squared-bias and variance intervals, the
# paired jackknife on the log ratio): reported beside the run's, not judged
STEP_INTERVALS = [("bias_sq_step", "bias_sq_lo", "bias_sq_hi", "truth_bias_sq"),
                  ("variance_step", "variance_lo", "variance_hi", "truth_variance"),
                  ("ratio_step", "ratio_lo", "ratio_hi", "truth_ratio")]
# the squared-bias score interval with the estimates' true spread (``true_spread_interval``):
# reported beside the run's, not judged; records written before it give nan
TRUE_SPREAD_INTERVALS = [("bias_sq_true_spread", "bias_sq_true_spread_lo", "bias_sq_true_spread_hi",
                          "truth_bias_sq")]
MIN_UNFLAGGED = 0.1  # below this share of unflagged measurements a cell is 'flagged'
QUIET_FLAG = 0.1  # where every interval meets its target the flag fires in at most this share


def with_run_flags(records: pd.DataFrame, k: int = POOLED_K) -> pd.DataFrame:
    """``records`` with ``reliable_run``, the intervals ``bias_sq_run_lo`` / ``_hi`` (and
    ``distinguishable_run``, U's widened SE ``bias_sq_se_run``), ``variance_run_lo`` /
    ``_hi`` and ``ratio_run_lo`` / ``_hi``:
    each block of ``k`` consecutive repeats of a (case, M) read as the measured steps of
    one run, judged together as ``analysis.loader`` judges a run's series
    (``with_series_intervals``, ``paired_ratio_intervals`` with REINFORCE as the partner).
    Records without the spread moments (written before them) keep the step's own."""
    keys = ["case", "M", "block"]
    blocks = records.assign(block=records["repeat"] // k, n_estimates=records["M"],
                            grad_variance=records["variance"], grad_bias_sq=records["bias_sq"],
                            grad_bias_sq_se=records["bias_sq_se"])
    judged = with_series_intervals(blocks, keys)
    if "spread_z_cross" not in records.columns:
        return records.assign(reliable_run=judged["ci_reliable_run"].to_numpy(),
                              variance_run_lo=records["variance_lo"], variance_run_hi=records["variance_hi"],
                              ratio_run_lo=records["ratio_lo"], ratio_run_hi=records["ratio_hi"],
                              bias_sq_run_lo=records["bias_sq_lo"], bias_sq_run_hi=records["bias_sq_hi"],
                              distinguishable_run=records["distinguishable"],
                              bias_sq_se_run=records["bias_sq_se"])
    ratio_lo, ratio_hi = paired_ratio_intervals(
        blocks.groupby(keys, sort=False).indices.values(), records["ratio"].to_numpy(dtype=float),
        records["M"].to_numpy(dtype=float), records["spread_z_mean"], records["spread_z_sq_mean"],
        records["base_spread_z_mean"], records["base_spread_z_sq_mean"], records["spread_z_cross"])
    return records.assign(reliable_run=judged["ci_reliable_run"].to_numpy(),
                          variance_run_lo=judged["grad_variance_run_lo"].to_numpy(),
                          variance_run_hi=judged["grad_variance_run_hi"].to_numpy(),
                          bias_sq_run_lo=judged["grad_bias_sq_run_lo"].to_numpy(),
                          bias_sq_run_hi=judged["grad_bias_sq_run_hi"].to_numpy(),
                          distinguishable_run=judged["bias_distinguishable_run"].to_numpy(),
                          bias_sq_se_run=judged["grad_bias_sq_se_run"].to_numpy(),
                          ratio_run_lo=ratio_lo, ratio_run_hi=ratio_hi)


def coverage_cells(g: pd.DataFrame, scope: str = "") -> dict:
    """Coverage of the three intervals (with Wilson intervals and which side the truth
    missed on) and, for a zero bias, the verdict's false-positive rate, over the
    measurements ``g``; each name carries ``scope`` before its ``_lo``/``_hi`` ends
    (``bias_sq_coverage_unflagged_lo``), as ``analysis.figures.error_bars`` reads them."""
    n = len(g)
    row = {}
    for name, lo, hi, truth in [*INTERVAL_COLUMNS, *STEP_INTERVALS, *TRUE_SPREAD_INTERVALS]:
        cov = f"{name}_coverage{scope}"
        if lo not in g.columns or not g[lo].notna().any():
            row[cov] = row[f"{cov}_lo"] = row[f"{cov}_hi"] = math.nan
            row[f"{name}_below{scope}"] = row[f"{name}_above{scope}"] = math.nan
            continue
        k = int(_covers(g[lo], g[hi], g[truth]).sum())
        row[cov] = k / n if n else math.nan
        row[f"{cov}_lo"], row[f"{cov}_hi"] = wilson_interval(k, n)
        row[f"{name}_below{scope}"] = float((g[truth] < g[lo]).mean()) if n else math.nan
        row[f"{name}_above{scope}"] = float((g[truth] > g[hi]).mean()) if n else math.nan
    zero = n > 0 and g["bias"].iloc[0] == "zero"
    for name, column in (("false_positive", "distinguishable_run"), ("false_positive_step", "distinguishable")):
        fp = int(g[column].astype(bool).sum()) if column in g.columns else 0
        row[f"{name}{scope}"] = fp / n if zero and column in g.columns else math.nan
        row[f"{name}{scope}_lo"], row[f"{name}{scope}_hi"] = (
            wilson_interval(fp, n) if zero and column in g.columns else (math.nan, math.nan))
    return row


def coverage_table(records: pd.DataFrame) -> pd.DataFrame:
    """Per (case, M): coverage of the squared-bias, variance and variance-ratio intervals
    with Wilson intervals and the verdict's false-positive rate where the bias is 0, over
    all measurements and over those whose run is not flagged (``with_run_flags``), the
    shares flagged by the run and by the step, and the pooled (table) coverage."""
    out = []
    keys = ["case", "env", "estimator", "batch_size", "bias", "reference", "policy_step", "M"]
    if "policy_step" not in records.columns:  # written before moving policies: all fixed
        records = records.assign(policy_step=0.0)
    for key, g in with_run_flags(records).groupby(keys, sort=False):
        row = {**dict(zip(keys, key)), "repeats": len(g), **coverage_cells(g)}
        kept = g[g["reliable_run"]]
        row.update(coverage_cells(kept, "_unflagged"))
        row["flagged"] = 1.0 - len(kept) / len(g)
        row["flagged_step"] = float((~g["ci_reliable"].astype(bool)).mean())
        pooled = pooled_coverage(g)
        row["bias_sq_coverage_pooled"], row["bias_sq_coverage_pooled_t"] = pooled.table, pooled.t
        row["bias_sq_coverage_pooled_lo"], row["bias_sq_coverage_pooled_hi"] = wilson_interval(
            round(pooled.table * pooled.blocks), pooled.blocks) if pooled.blocks else (math.nan, math.nan)
        zero = g["bias"].iloc[0] == "zero" and pooled.blocks > 0
        row["false_positive_pooled"] = pooled.biased if zero else math.nan
        row["false_positive_pooled_lo"], row["false_positive_pooled_hi"] = wilson_interval(
            round(pooled.biased * pooled.blocks), pooled.blocks) if zero else (math.nan, math.nan)
        row["tail_index_median"] = float(g["tail_index"].median())
        row["bias_sq_spread_corr"] = spread_correlation(g)
        row.update(variance_pivot(g))
        row["ref_rel_se"] = float(g["ref_rel_se"].median())
        row["truth_rel_bias_sq"] = float(g["truth_rel_bias_sq"].iloc[0])
        row["verdict"] = cell_verdict(row)
        row["verdict_unflagged"] = (cell_verdict(row, "_unflagged")
                                    if 1.0 - row["flagged"] >= MIN_UNFLAGGED else "flagged")
        out.append(row)
    return pd.DataFrame.from_records(out)


def spread_correlation(g: pd.DataFrame) -> float:
    """Pearson correlation, over a cell's measurements, of U with the spread its step's
    score model gives U at the true squared bias, sqrt(v0 + slope * theta); nan without
    the logged model or with fewer than 3 measurements. Near 0, U over a quantile of the
    model is as likely as U under the other; negative (the spread along the bias shrinks
    when U overshoots, as with left-skewed projections), the lower end misses more than
    its 2.5% unless widened and the upper end less."""
    if not {"bias_v0", "bias_slope"} <= set(g.columns) or len(g) < 3:
        return math.nan
    theta = g["truth_bias_sq"].clip(lower=0.0)
    spread = np.sqrt((g["bias_v0"] + g["bias_slope"] * theta).clip(lower=0.0))
    ok = np.isfinite(spread) & np.isfinite(g["bias_sq"])
    if ok.sum() < 3 or spread[ok].std() == 0 or g["bias_sq"][ok].std() == 0:
        return math.nan
    return float(np.corrcoef(g["bias_sq"][ok], spread[ok])[0, 1])


def variance_pivot(g: pd.DataFrame) -> dict:
    """What the spread of s^2 / sigma^2 (a measurement's trCov over the truth) says about
    any variance interval in a cell: its median, and ``variance_oracle_width`` = its 97.5%
    over its 2.5% quantile, the ratio of the ends of the interval [s^2 / q97.5, s^2 / q2.5]
    that covers 95% when those quantiles are known. A method that does not know them must
    still reach that width from the M estimates alone."""
    ratio = (g["variance"] / g["truth_variance"]).to_numpy(dtype=float)
    lo, median, hi = np.quantile(ratio, [0.025, 0.5, 0.975])
    return {"variance_median_ratio": float(median), "variance_oracle_width": float(hi / lo)}


def meets_band(lo: float, hi: float, target: tuple[float, float]) -> bool:
    """Whether a Wilson interval [lo, hi] meets the target range: with finitely many
    repeats a cell is only called off target when its binomial interval lies outside."""
    return hi >= target[0] and lo <= target[1]


def cell_verdict(row: dict, suffix: str = "") -> str:
    """'meets' when every interval's coverage (the columns ending in ``suffix``) is
    consistent with 95% +- 2 points (its Wilson interval reaches that band) and, for a
    zero bias, the false-positive rate with 1.5-3.5%; else what misses, and how often the
    runs flagged themselves (M < 16 is outside the target and says so)."""
    band = (NOMINAL - TOLERANCE, NOMINAL + TOLERANCE)
    misses = [name for name, *_ in INTERVAL_COLUMNS
              if not meets_band(row[f"{name}_coverage{suffix}_lo"],
                                 row[f"{name}_coverage{suffix}_hi"], band)]
    if math.isfinite(row[f"false_positive{suffix}"]) and not meets_band(
            row[f"false_positive{suffix}_lo"], row[f"false_positive{suffix}_hi"], FP_TARGET):
        misses.append("false positives")
    if not misses:
        return "meets"
    words = "misses: " + ", ".join(misses)
    if row["flagged"] > 0.5:
        words += f" (flagged in {100 * row['flagged']:.0f}%: heavy tails or small M)"
    return f"outside target (M < 16); {words}" if row["M"] < 16 else words


def quiet_flag(table: pd.DataFrame) -> tuple[str, list[str], str]:
    """The flag's own claim over the cells of ``table``: (claim, one word per cell that
    meets every target, 'quiet' or 'loud', and why in numbers). A flag that fired
    everywhere would make 'covers where unflagged' hold trivially; this is what keeps
    that claim from being vacuous."""
    held = table[table["verdict"] == "meets"]
    loud = held[held["flagged"] > QUIET_FLAG]
    claim = (f"the run flag fires in at most {100 * QUIET_FLAG:.0f}% of the measurements of "
             "cells that meet every target")
    why = f"quiet in {len(held) - len(loud)} of {len(held)} such cells" + "".join(
        f"; loud: {r.case} M={r.M} ({100 * r.flagged:.0f}%)" for r in loud.itertuples())
    return claim, ["loud"] * len(loud) + ["quiet"] * (len(held) - len(loud)), why


REPORT_COLUMNS = {  # result.md's coverage table: heading -> column of coverage_table
    "case": "case", "M": "M", "repeats": "repeats", "squared bias": "bias_sq_coverage",
    "truth below": "bias_sq_below", "truth above": "bias_sq_above",
    "squared bias (step alone)": "bias_sq_step_coverage",
    "squared bias (true spread)": "bias_sq_true_spread_coverage",
    "true spread: truth above": "bias_sq_true_spread_above",
    "false positives": "false_positive", "false positives (step alone)": "false_positive_step",
    "variance": "variance_coverage",
    "variance (step alone)": "variance_step_coverage",
    "variance ratio": "ratio_coverage", "variance ratio (step alone)": "ratio_step_coverage", "flagged (run)": "flagged",
    "flagged (step)": "flagged_step", "unflagged: squared bias": "bias_sq_coverage_unflagged",
    "unflagged: variance": "variance_coverage_unflagged",
    "unflagged: ratio": "ratio_coverage_unflagged",
    "unflagged: false positives": "false_positive_unflagged",
    "pooled over 10: table": "bias_sq_coverage_pooled",
    "pooled over 10: t": "bias_sq_coverage_pooled_t",
    "pooled over 10: false positives": "false_positive_pooled", "tail index": "tail_index_median",
    "corr(U, its modelled spread)": "bias_sq_spread_corr",
    "median trCov / truth": "variance_median_ratio",
    "oracle variance interval width": "variance_oracle_width",
    "verdict": "verdict", "verdict where unflagged": "verdict_unflagged"}


SHARE_SUFFIXES = ("coverage", "coverage_lo", "coverage_hi", "positive", "positive_lo", "positive_step",
                  "positive_step_lo", "positive_step_hi",
                  "positive_hi", "below", "above", "flagged", "flagged_step", "unflagged",
                  "unflagged_lo", "unflagged_hi", "pooled", "pooled_lo", "pooled_hi", "pooled_t")


def in_percent(table: pd.DataFrame) -> pd.DataFrame:
    """``coverage_table`` with every share (the coverages, false-positive rates and flagged
    shares, with their interval ends) in percent, for a report."""
    shares = [c for c in table.columns if table[c].dtype.kind == "f" and c.endswith(SHARE_SUFFIXES)]
    return table.assign(**{c: 100 * table[c] for c in shares})
