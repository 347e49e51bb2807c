"""Aggregate statistics across runs: bootstrap confidence intervals and the IQM.

Everything here works on one number per run (a seed), because seeds are the
independent replicates of a sweep: steps of the same run are correlated, and the
batches inside one measurement step are already summarised by the run itself.

- ``mean_ci``: mean across runs with a scipy ``bootstrap`` percentile interval, its
  percentiles expanded for small n (``expanded_level``) so 95% means 95% with 10 seeds.
- ``ratio_ci``: ratio of two means, paired by seed when the runs line up (the
  estimators of a sweep start from the same parameters for the same seed, so pairing
  removes the seed-to-seed part of the noise).
- ``mean_with_known_se``: the mean of independent unbiased estimates that each carry
  their own standard error (the per-measurement squared-bias estimates U and their
  logged SEs), with a normal interval from the summed variances: the comparison
  table's bias statistic, which needs no replicate seeds.
- ``MIN_RUNS_FOR_SEED_BOOTSTRAP``: below this many seeds a bootstrap over seeds is not
  trusted (verdicts that rest on one say 'inconclusive: too few runs').
- ``iqm`` and ``stratified_bootstrap_iqm``: the interquartile mean and its stratified
  bootstrap interval, as rliable (Agarwal et al. 2021) computes them: runs are
  resampled with replacement inside each task (environment), then pooled.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000
Z_95 = 1.959963984540054  # two-sided 95% normal quantile
# Seeds a seed-paired bootstrap (``ratio_ci``, ``mean_ci``) needs before a verdict rests
# on it. Measured (300 repeats per cell, lognormal seed effects shared by the two sides
# with sd 0.5 or 1.0 and own noise sd 0.3 or 0.5): the paired ratio interval covered
# 47-53% at 2 seeds, 70-76% at 3, 90-92% at 4, 90-93% at 5 and 94-96% at 10. Below 4
# the coverage falls off a cliff; 5 keeps one seed of margin above it.
MIN_RUNS_FOR_SEED_BOOTSTRAP = 5


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval and the number of runs behind it."""

    value: float
    lo: float
    hi: float
    n: int

    def map(self, fn: Callable[[float], float]) -> Estimate:
        """Apply a monotone increasing function to the value and both ends."""
        return Estimate(fn(self.value), fn(self.lo), fn(self.hi), self.n)

    def excludes(self, x: float) -> bool:
        """True when the interval lies entirely above or below ``x`` (ends are finite)."""
        return bool(np.isfinite(self.lo) and np.isfinite(self.hi) and (self.lo > x or self.hi < x))


NAN_ESTIMATE = Estimate(math.nan, math.nan, math.nan, 0)


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """The finite entries of ``values`` as a float array (NaN marks 'not measured')."""
    x = np.asarray(values, dtype=float).ravel()
    return x[np.isfinite(x)]


def expanded_level(n: int, confidence: float = CONFIDENCE) -> float:
    """The percentile level that gives a bootstrap interval its nominal coverage at n runs.

    A percentile bootstrap interval of a mean is too narrow with few runs: it behaves
    like ``mean +- z * s / sqrt(n)`` with the divisor-n standard deviation, where the
    right interval has ``t_{n-1} * s / sqrt(n)`` with the divisor-(n-1) one (95% covers
    about 88% of the time at n = 10). Hesterberg's expanded percentile interval (2015,
    "What teachers should know about the bootstrap") widens the percentiles to
    ``Phi(-sqrt(n/(n-1)) * t_{alpha/2, n-1})``, which restores the coverage.
    """
    if n < 2:
        return confidence
    alpha = 1.0 - confidence
    t = stats.t.ppf(1 - alpha / 2, df=n - 1)
    return float(1.0 - 2.0 * stats.norm.cdf(-math.sqrt(n / (n - 1)) * t))


def bootstrap_interval(data: tuple[np.ndarray, ...], statistic: Callable, paired: bool,
                        seed: int) -> tuple[float, float]:
    """Expanded percentile bootstrap interval (``expanded_level``) of ``statistic`` over
    the runs in ``data``, with ``scipy.stats.bootstrap``.

    Percentile rather than BCa: with a handful of seeds BCa's acceleration estimate is
    itself unstable and scipy warns or returns NaN on constant data.
    """
    if np.ptp(np.concatenate(data)) == 0.0 and not paired:
        v = float(statistic(*data))
        return v, v
    n = min(len(d) for d in data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(data, statistic, n_resamples=N_RESAMPLES, paired=paired,
                              confidence_level=expanded_level(n), method="percentile",
                              vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def mean_ci(values: Sequence[float] | np.ndarray, seed: int = 0) -> Estimate:
    """Mean across runs with a 95% percentile bootstrap interval (NaN ends for n < 2)."""
    x = _finite(values)
    if x.size == 0:
        return NAN_ESTIMATE
    if x.size == 1:
        return Estimate(float(x[0]), math.nan, math.nan, 1)
    lo, hi = bootstrap_interval((x,), _mean, paired=False, seed=seed)
    return Estimate(float(x.mean()), lo, hi, int(x.size))


def _ratio_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) / np.mean(b, axis=axis)


def ratio_ci(numerator: Mapping[object, float], denominator: Mapping[object, float],
             seed: int = 0) -> Estimate:
    """mean(numerator) / mean(denominator) with a 95% bootstrap interval.

    Both arguments map a seed to that run's value. When every seed appears in both, the
    bootstrap resamples seeds jointly (paired); otherwise each side is resampled alone.
    """
    num = {k: v for k, v in numerator.items() if np.isfinite(v)}
    den = {k: v for k, v in denominator.items() if np.isfinite(v)}
    if not num or not den:
        return NAN_ESTIMATE
    a, b = np.array(list(num.values())), np.array(list(den.values()))
    value = float(a.mean() / b.mean())
    if len(a) < 2 or len(b) < 2:
        return Estimate(value, math.nan, math.nan, min(len(a), len(b)))
    if set(num) == set(den):
        keys = sorted(num, key=str)
        a, b = np.array([num[k] for k in keys]), np.array([den[k] for k in keys])
        lo, hi = bootstrap_interval((a, b), _ratio_of_means, paired=True, seed=seed)
    else:
        lo, hi = _independent_ratio_interval(a, b, seed)
    return Estimate(value, lo, hi, min(len(a), len(b)))


def _independent_ratio_interval(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[float, float]:
    """Percentile interval of mean(a)/mean(b) when a and b come from different runs."""
    rng = np.random.default_rng(seed)
    ra = rng.choice(a, size=(N_RESAMPLES, a.size)).mean(axis=1)
    rb = rng.choice(b, size=(N_RESAMPLES, b.size)).mean(axis=1)
    q = (1 - expanded_level(min(a.size, b.size))) / 2
    lo, hi = np.quantile(ra / rb, [q, 1 - q])
    return float(lo), float(hi)


def mean_with_known_se(values: Sequence[float] | np.ndarray,
                       ses: Sequence[float] | np.ndarray) -> Estimate:
    """Mean of n independent unbiased estimates with standard errors ``ses``, and the 95%
    interval ``mean +- z sqrt(sum se_i^2) / n``.

    Why not a bootstrap over the n values: they need not share one mean (each run is at
    its own policy), and the interval is about their average, for which the summed
    variances are exact; a sum of many terms is also close to normal even when each term
    is skewed. Calibration of the pooled squared bias is tested in
    tests/test_table_consistency.py. NaN ends when any SE is not finite.
    """
    x = np.asarray(values, dtype=float).ravel()
    se = np.asarray(ses, dtype=float).ravel()
    if se.size != x.size:
        raise ValueError(f"{x.size} values but {se.size} standard errors")
    keep = np.isfinite(x)
    x, se = x[keep], se[keep]
    if x.size == 0:
        return NAN_ESTIMATE
    mean = float(x.mean())
    if not np.isfinite(se).all():
        return Estimate(mean, math.nan, math.nan, int(x.size))
    half = Z_95 * math.sqrt(float((se ** 2).sum())) / x.size
    return Estimate(mean, mean - half, mean + half, int(x.size))


def iqm(values: Sequence[float] | np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Interquartile mean: the mean of the middle half of the values along ``axis``.

    ``floor(n / 4)`` values are cut from each end, as ``scipy.stats.trim_mean(x, 0.25)``
    (what rliable uses) does. Robust to a few failed seeds, less noisy than the median.
    """
    x = np.sort(np.asarray(values, dtype=float), axis=axis)
    n = x.shape[axis]
    cut = n // 4
    middle = np.take(x, np.arange(cut, n - cut), axis=axis)
    out = middle.mean(axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def stratified_bootstrap_iqm(scores_by_task: Mapping[object, Sequence[float]],
                             seed: int = 0, n_resamples: int = N_RESAMPLES) -> Estimate:
    """IQM of all runs pooled over tasks, with a stratified percentile bootstrap interval.

    ``scores_by_task`` maps a task (an environment) to the scores of its runs. Each
    bootstrap replicate resamples runs with replacement within every task separately,
    keeping the number of runs per task fixed, then takes the IQM of the pooled
    replicate: the interval reflects seed-to-seed noise without mixing tasks' scales.
    """
    tasks = [_finite(v) for v in scores_by_task.values()]
    tasks = [t for t in tasks if t.size]
    if not tasks:
        return NAN_ESTIMATE
    pooled = np.concatenate(tasks)
    point = float(iqm(pooled))
    if pooled.size < 2:
        return Estimate(point, math.nan, math.nan, int(pooled.size))
    rng = np.random.default_rng(seed)
    replicates = np.concatenate(
        [t[rng.integers(0, t.size, size=(n_resamples, t.size))] for t in tasks], axis=1)
    boot = iqm(replicates, axis=1)
    q = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(boot, [q, 1 - q])
    return Estimate(point, float(lo), float(hi), int(pooled.size))


def proportion_ci(k: int, n: int) -> Estimate:
    """The share k / n of n trials with its exact (Clopper-Pearson) 95% interval."""
    ci = stats.binomtest(k, n).proportion_ci(CONFIDENCE, method="exact")
    return Estimate(k / n, float(ci.low), float(ci.high), n)
