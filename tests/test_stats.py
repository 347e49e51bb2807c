"""pgvar.stats: hand-computed values on a tiny input, closed forms against brute force,
and the calibration of the bias interval on synthetic Gaussian estimates.

Tolerances of the statistical tests come from the replicate count R: a binomial
standard error for coverages, the standard error of a sample variance (from the
sample's own kurtosis) for standard deviations.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pgvar.stats import (
    GradStats,
    cos_pairwise,
    cos_ref,
    cross_noise_trace,
    frobenius_cov_sq,
    gradient_stats,
    jackknife_variance_u,
    mse,
    reference_noise_sq,
    reference_noise_variance,
    relative_variance,
    snr,
    squared_bias_estimate,
    squared_bias_variance,
    trace_variance,
)

Z = 1.959963984540054


pytestmark = pytest.mark.usefixtures("one_thread")  # thousands of tiny calls (tests/conftest.py)


# ----------------------------------------------------------------------------- by hand
# g1 = (1, 0), g2 = (0, 1), g3 = (2, 2), g_ref = (1, 1)
# g_bar = (1, 1); deviations (0,-1), (-1,0), (1,1): squared norms 1, 1, 2 -> trCov = 4/2 = 2
# d = g - g_ref = (0,-1), (-1,0), (1,1); d_bar = 0; pairs <d1,d2>=0, <d1,d3>=-1, <d2,d3>=-1
# U = 0 - trCov/M = -2/3 = 2 * (0 - 1 - 1) / (3 * 2)
# leave-one-out U (one pair left: U = <d_i, d_j>): drop1 -> <d2,d3> = -1, drop2 -> -1,
#   drop3 -> 0; mean -2/3; var_jack = (2/3) * (1/9 + 1/9 + 4/9) = 4/9, SE = 2/3 (M = 3: no
#   correction term, which needs M >= 4)
G_HAND = [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]
REF_HAND = [1.0, 1.0]


def test_trace_and_relative_variance_by_hand():
    assert trace_variance(G_HAND) == pytest.approx(2.0)
    assert relative_variance(G_HAND, REF_HAND) == pytest.approx(1.0)  # 2 / ||(1,1)||^2


def test_squared_bias_by_hand():
    assert squared_bias_estimate(G_HAND, REF_HAND) == pytest.approx(-2.0 / 3.0)
    assert squared_bias_estimate(G_HAND, REF_HAND, se_ref2=0.5) == pytest.approx(-2.0 / 3.0 - 0.5)
    d = torch.tensor(G_HAND, dtype=torch.float64) - torch.tensor(REF_HAND, dtype=torch.float64)
    assert jackknife_variance_u(d) == pytest.approx(4.0 / 9.0)
    assert squared_bias_variance(G_HAND, REF_HAND) == pytest.approx(4.0 / 9.0)
    # reference noise: + 4 se2 ||b||^2 + 2 se2^2 with b = 0 (U < 0) and nu = 1 (M < 4)
    assert squared_bias_variance(G_HAND, REF_HAND, se_ref2=0.5) == pytest.approx(4.0 / 9.0 + 0.5)


def test_reference_noise_terms_by_hand():
    # against g_ref = 0 the mean deviation is d_bar = (1, 1); se_ref2 = 0.5
    jack = squared_bias_variance(G_HAND, [0.0, 0.0])
    # trace bound: 4 ||d_bar||^2 se2 + 2 se2^2 = 4 * 2 * 0.5 + 0.5
    assert squared_bias_variance(G_HAND, [0.0, 0.0], se_ref2=0.5) == pytest.approx(jack + 4.5)
    # per-coordinate bound, variances (0.32, 0.18): 4 (|1| 0.4 + |1| 0.3...)^2 with sqrt
    sd = (math.sqrt(0.32), math.sqrt(0.18))
    expected = jack + 4 * (sd[0] + sd[1]) ** 2 + 2 * 0.5 ** 2
    assert squared_bias_variance(G_HAND, [0.0, 0.0], 0.5, [0.32, 0.18]) == pytest.approx(expected)
    assert expected < jack + 4.5  # never looser than the trace bound
    d_bar = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert reference_noise_variance(d_bar, 0.5) == pytest.approx(4 * 2 * 0.5 + 2 * 0.25)


def test_mse_cosines_snr_by_hand():
    assert mse(G_HAND, REF_HAND) == pytest.approx(4.0 / 3.0)  # mean of 1, 1, 2
    # cos(g1, ref) = cos(g2, ref) = 1/sqrt2, cos(g3, ref) = 1
    assert cos_ref(G_HAND, REF_HAND) == pytest.approx((math.sqrt(2.0) + 1.0) / 3.0)
    # cos(g1,g2) = 0, cos(g1,g3) = cos(g2,g3) = 2 / (1 * 2 sqrt2) = 1/sqrt2
    assert cos_pairwise(G_HAND) == pytest.approx(math.sqrt(2.0) / 3.0)
    assert snr(G_HAND) == pytest.approx(1.0)  # ||(1,1)||^2 / 2


def test_gradient_stats_by_hand():
    s = gradient_stats(np.array(G_HAND), np.array(REF_HAND))
    se = 2.0 / 3.0
    assert s.grad_bias_sq == pytest.approx(-2.0 / 3.0)
    assert s.grad_bias_sq_se == pytest.approx(se)
    assert s.grad_bias == 0.0 and s.grad_bias_lo == 0.0 and s.grad_rel_bias == 0.0
    assert s.grad_bias_hi == pytest.approx(math.sqrt(-2.0 / 3.0 + Z * se))
    assert s.bias_distinguishable is False
    assert s.ref_norm == pytest.approx(math.sqrt(2.0))
    assert s.ref_se == 0.0 and s.n_estimates == 3
    assert gradient_stats(G_HAND, REF_HAND, se_ref2=0.25).ref_se == pytest.approx(0.5)


def test_zero_fraction_and_mean_norm_by_hand():
    G = [[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 1.0]]
    s = gradient_stats(G, [0.0, 1.0])
    assert s.zero_grad_fraction == pytest.approx(0.5)  # rows 1 and 3 are exactly zero
    assert s.grad_norm_mean == pytest.approx((0 + 5 + 0 + 1) / 4)


def test_clear_bias_by_hand():
    # estimates (3, 0) and (3, 2) against g_ref = 0, M = 2: d_bar = (3, 1), trCov = 2
    # U = 10 - 2/2 = 9 = <d1, d2>; jackknife impossible with M = 2: SE = inf
    s = gradient_stats([[3.0, 0.0], [3.0, 2.0]], [0.0, 0.0])
    assert s.grad_bias_sq == pytest.approx(9.0)
    assert s.grad_bias == pytest.approx(3.0)
    assert s.grad_variance == pytest.approx(2.0) and s.grad_mse == pytest.approx(11.0)
    assert math.isinf(s.grad_bias_sq_se) and s.bias_distinguishable is False
    assert s.grad_rel_bias == math.inf and s.grad_rel_variance == math.inf  # ||g_ref|| = 0


def test_as_dict_keys_are_exactly_the_logged_metrics():
    keys = {"grad_variance", "grad_rel_variance", "grad_bias", "grad_bias_lo", "grad_bias_hi",
            "grad_bias_sq", "grad_bias_sq_se", "grad_rel_bias", "bias_distinguishable",
            "grad_mse", "cos_ref", "cos_pairwise", "snr", "ref_norm", "ref_se", "n_estimates",
            "zero_grad_fraction", "grad_norm_mean", "grad_variance_lo", "grad_variance_hi",
            "tail_index", "ci_reliable", "grad_bias_sq_lo", "grad_bias_sq_hi", "spread_z_mean",
            "spread_z_sq_mean", "bias_v0", "bias_slope", "bias_skew0", "proj_z_mean",
            "proj_z_sq_mean"}
    s = gradient_stats(G_HAND, REF_HAND)
    assert isinstance(s, GradStats)
    assert set(s.as_dict()) == keys


def test_input_checks():
    with pytest.raises(ValueError, match="at least M=2"):
        gradient_stats([[1.0, 2.0]], [0.0, 0.0])
    with pytest.raises(ValueError, match="P=2"):
        gradient_stats(G_HAND, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        gradient_stats(G_HAND, REF_HAND, se_ref2=-1.0)


def test_float32_input_is_computed_in_float64():
    G = torch.tensor(G_HAND, dtype=torch.float32) + 1e4
    ref = torch.tensor(REF_HAND, dtype=torch.float32) + 1e4
    assert gradient_stats(G, ref).grad_bias_sq == pytest.approx(-2.0 / 3.0, abs=1e-9)


# ----------------------------------------------------------------------------- closed forms


def test_u_equals_mean_over_pairs_and_jackknife_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(7, 4, generator=gen, dtype=torch.float64) + 0.3
    ref = torch.randn(4, generator=gen, dtype=torch.float64)
    d = G - ref
    M = G.shape[0]
    pairs = [float(d[i] @ d[j]) for i, j in itertools.permutations(range(M), 2)]
    assert squared_bias_estimate(G, ref) == pytest.approx(np.mean(pairs))
    loo = np.array([squared_bias_estimate(torch.cat([G[:k], G[k + 1:]]), ref) for k in range(M)])
    brute = (M - 1) / M * ((loo - loo.mean()) ** 2).sum()
    assert jackknife_variance_u(d) == pytest.approx(brute)


def test_frobenius_estimate_equals_the_u_statistic_brute_force():
    # unbiased tr(Sigma^2): mean over distinct (i,j) of <x_i,x_j>^2, minus 2 x mean over
    # distinct (i,j,k) of <x_i,x_j><x_j,x_k>, plus mean over distinct (i,j,k,l) of
    # <x_i,x_j><x_k,x_l> (each term's expectation spelled out in pgvar.stats)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(6, 3, generator=gen, dtype=torch.float64) + torch.tensor([1.0, -2.0, 0.5])
    K = X @ X.T
    idx = range(X.shape[0])
    t2 = np.mean([float(K[i, j] ** 2) for i, j in itertools.permutations(idx, 2)])
    t3 = np.mean([float(K[i, j] * K[j, k]) for i, j, k in itertools.permutations(idx, 3)])
    t4 = np.mean([float(K[i, j] * K[k, l]) for i, j, k, l in itertools.permutations(idx, 4)])
    assert frobenius_cov_sq(X) == pytest.approx(t2 - 2 * t3 + t4)


# ----------------------------------------------------------------------------- calibration


def replicate(R: int, M: int, sig: torch.Tensor, bias: torch.Tensor, seed: int,
              ref_sig: torch.Tensor | None = None, use_ref_var: bool = False):
    """R independent data sets of M estimates g ~ N(bias, diag(sig^2)), exact g_ref = 0
    (or a noisy g_ref ~ N(0, diag(ref_sig^2)) with se_ref2 = sum ref_sig^2, and its
    per-coordinate variances passed along if ``use_ref_var``)."""
    gen = torch.Generator().manual_seed(seed)
    P = sig.numel()
    out = []
    for _ in range(R):
        G = bias + sig * torch.randn(M, P, generator=gen, dtype=torch.float64)
        if ref_sig is None:
            out.append(gradient_stats(G, torch.zeros(P, dtype=torch.float64)))
        else:
            ref = ref_sig * torch.randn(P, generator=gen, dtype=torch.float64)
            ref_var = ref_sig ** 2 if use_ref_var else None
            out.append(gradient_stats(G, ref, float((ref_sig ** 2).sum()), ref_var))
    U = np.array([s.grad_bias_sq for s in out])
    var_hat = np.array([s.grad_bias_sq_se ** 2 for s in out])
    return out, U, var_hat


def sd_ratio_tolerance(U: np.ndarray, var_hat: np.ndarray, k: float = 4.0) -> float:
    """k standard errors of log(sqrt(mean var_hat) / sd(U)): half the relative SE of each
    variance, the sample variance's from the kurtosis of U, combined in quadrature."""
    R = U.size
    kurt = np.mean((U - U.mean()) ** 4) / np.var(U) ** 2
    rel_se_var_u = math.sqrt((kurt - 1.0) / R)
    rel_se_mean_var = var_hat.std() / var_hat.mean() / math.sqrt(R)
    return k * 0.5 * math.hypot(rel_se_var_u, rel_se_mean_var)


def binomial_tolerance(p: float, R: int, k: float = 3.5) -> float:
    return k * math.sqrt(p * (1 - p) / R)


def test_jackknife_se_matches_spread_of_u_and_ci_covers_a_known_bias():
    # bias along a high-variance coordinate: the linear term 4 b'Sigma b / M dominates
    # Var(U), where the (corrected) jackknife is unbiased. (At M = 32 the upper end
    # undercovers, ~93% two-sided: see squared_bias_variance; M = 64 is near nominal.)
    R, M = 3000, 64
    sig = torch.linspace(0.5, 1.5, 10, dtype=torch.float64)
    bias = torch.zeros(10, dtype=torch.float64)
    bias[-1] = 1.5
    true_b2 = float((bias ** 2).sum())
    stats, U, var_hat = replicate(R, M, sig, bias, seed=0)

    exact_var = (4 * float((bias ** 2 * sig ** 2).sum()) / M
                 + 2 * float((sig ** 4).sum()) / (M * (M - 1)))
    assert U.mean() == pytest.approx(true_b2, abs=4 * math.sqrt(exact_var / R))  # U unbiased
    ratio = math.sqrt(var_hat.mean()) / U.std(ddof=1)
    assert abs(math.log(ratio)) < sd_ratio_tolerance(U, var_hat), ratio

    lo, hi = U - Z * np.sqrt(var_hat), U + Z * np.sqrt(var_hat)
    coverage = np.mean((lo <= true_b2) & (true_b2 <= hi))
    assert abs(coverage - 0.95) < binomial_tolerance(0.95, R), coverage
    # the lower end, which the verdict reads, misses at most its nominal 2.5%
    assert np.mean(lo > true_b2) < 0.025 + binomial_tolerance(0.025, R)
    # 1.5^2 = 2.25 against an SE of about 0.4: the verdict should almost always see it
    assert np.mean([s.bias_distinguishable for s in stats]) > 0.95
    # the logged interval (score upper end, lower end from the score and Wald ones) within
    # the target 95% +- 2 points, give or take chance; measured ~97.7%, on the safe side
    inside = np.mean([s.grad_bias_lo <= 1.5 <= s.grad_bias_hi for s in stats])
    assert 0.93 - binomial_tolerance(0.95, R) < inside < 0.97 + binomial_tolerance(0.95, R), inside


def test_zero_bias_interval_is_valid_and_only_mildly_conservative():
    # zero bias: Var(U) = 2 tr(Sigma^2) / (M(M-1)). The plain jackknife overestimates it by
    # 2(M-1)/(M-2) (Efron & Stein); the corrected SE removes that, floored at the
    # degenerate term, which leaves it a little conservative (about 10-15% on the SE).
    R, M, P = 3000, 32, 50
    sig = torch.linspace(0.5, 1.5, P, dtype=torch.float64)
    stats, U, var_hat = replicate(R, M, sig, torch.zeros(P, dtype=torch.float64), seed=1)

    lo, hi = U - Z * np.sqrt(var_hat), U + Z * np.sqrt(var_hat)
    coverage = np.mean((lo <= 0) & (0 <= hi))
    false_positive = np.mean([s.bias_distinguishable for s in stats])
    assert coverage > 0.95 - binomial_tolerance(0.95, R), coverage
    assert coverage < 0.995, coverage  # not the ~99.5% of the uncorrected jackknife
    assert false_positive < 0.025 + binomial_tolerance(0.025, R), false_positive

    ratio = math.sqrt(var_hat.mean()) / U.std(ddof=1)
    tol = sd_ratio_tolerance(U, var_hat)
    assert -tol < math.log(ratio) < math.log(1.25) + tol, ratio

    # the documented excess of the plain jackknife, which motivates the correction
    gen = torch.Generator().manual_seed(2)
    jack = np.array([
        jackknife_variance_u(sig * torch.randn(M, P, generator=gen, dtype=torch.float64))
        for _ in range(R)
    ])
    factor = jack.mean() / (2 * float((sig ** 4).sum()) / (M * (M - 1)))
    rel_tol = 4 * jack.std() / jack.mean() / math.sqrt(R)
    assert factor == pytest.approx(2 * (M - 1) / (M - 2), rel=rel_tol)


def test_noisy_reference_is_removed_from_the_bias_and_kept_conservative():
    # g_ref ~ N(g*, Sigma_r) independent of the estimates: U subtracts tr(Sigma_r) = se_ref2.
    # The reference is noisiest along the bias, where it matters most (4 b' Sigma_r b).
    R, M, P = 3000, 16, 8
    sig = torch.full((P,), 1.0, dtype=torch.float64)
    ref_sig = torch.full((P,), 0.1, dtype=torch.float64)
    ref_sig[0] = 0.3
    bias = torch.zeros(P, dtype=torch.float64)
    bias[0] = 0.5
    true_b2 = 0.25
    mean_se = {}
    for use_ref_var in (False, True):
        stats, U, var_hat = replicate(R, M, sig, bias, seed=3, ref_sig=ref_sig,
                                      use_ref_var=use_ref_var)
        # without the reference's term U would average true_b2 + se_ref2 = 0.25 + 0.16
        assert U.mean() == pytest.approx(true_b2, abs=4 * U.std() / math.sqrt(R))
        lo, hi = U - Z * np.sqrt(var_hat), U + Z * np.sqrt(var_hat)
        coverage = np.mean((lo <= true_b2) & (true_b2 <= hi))
        assert coverage > 0.95 - binomial_tolerance(0.95, R), (use_ref_var, coverage)
        mean_se[use_ref_var] = np.sqrt(var_hat).mean()
    assert mean_se[True] < mean_se[False]  # the per-coordinate bound is the tighter one
    assert stats[0].ref_se == pytest.approx(math.sqrt(0.3 ** 2 + 7 * 0.1 ** 2))


def noisy_reference_replicates(R: int, M: int, P: int, ref_scale: float, bias: float,
                               seed: int, with_sample: bool):
    """R measurements of M estimates g ~ N(b, I_P) (b = ``bias`` along the first axis)
    against a reference N(0, ref_scale^2 I_P), whose noise is described by its
    per-coordinate variances and, ``with_sample``, by 256 rows of the same covariance."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.zeros(P, dtype=torch.float64)
    b[0] = bias
    ref_var = torch.full((P,), ref_scale ** 2, dtype=torch.float64)
    out = []
    for _ in range(R):
        G = b + torch.randn(M, P, generator=gen, dtype=torch.float64)
        ref = ref_scale * torch.randn(P, generator=gen, dtype=torch.float64)
        sample = ref_scale * torch.randn(256, P, generator=gen, dtype=torch.float64)
        out.append(gradient_stats(G, ref, float(ref_var.sum()), ref_var,
                                  sample if with_sample else None))
    return out


def test_a_sample_of_the_reference_noise_restores_the_verdict_where_that_noise_dominates():
    # M = 128 estimates against a reference whose noise equals the estimates' own noise
    # floor (tr Sigma_r = tr Sigma / M) spread over P = 20 directions: the worst-case bound
    # 2 se_ref2^2 is 20x the true 2 tr(Sigma_r^2) and the verdict almost never fires; with
    # a sample of the reference's noise its rate is the nominal one-sided 2.5%.
    R, M, P = 2000, 128, 20
    scale = 1.0 / math.sqrt(M)
    rate = {}
    for with_sample in (False, True):
        stats = noisy_reference_replicates(R, M, P, scale, 0.0, seed=11, with_sample=with_sample)
        rate[with_sample] = np.mean([s.bias_distinguishable for s in stats])
    assert rate[False] < 0.01, rate
    assert abs(rate[True] - 0.025) < binomial_tolerance(0.025, R), rate
    # and a bias is covered at least at its level: b = 0.3 along one axis, ||b||^2 = 0.09
    # (measured 98.5%: the lower end is the Wald one, whose reference term stays
    # conservative, b replaced by g_bar - g_ref)
    stats = noisy_reference_replicates(R, M, P, scale, 0.3, seed=12, with_sample=True)
    inside = np.mean([s.grad_bias_sq_lo <= 0.09 <= s.grad_bias_sq_hi for s in stats])
    assert inside > 0.95 - binomial_tolerance(0.95, R), inside


def test_reference_noise_terms_are_unbiased_for_their_traces():
    # Sigma_r = diag(s^2) and Sigma = diag(t^2): tr(Sigma_r^2) = sum s^4 and
    # tr(Sigma Sigma_r) = sum s^2 t^2, each estimated without bias from samples
    gen = torch.Generator().manual_seed(5)
    P, R = 6, 3000
    s_r = torch.linspace(0.2, 1.0, P, dtype=torch.float64)
    t = torch.linspace(1.0, 0.5, P, dtype=torch.float64)
    sq, cross = [], []
    for _ in range(R):
        sample = s_r * torch.randn(32, P, generator=gen, dtype=torch.float64)
        G = t * torch.randn(16, P, generator=gen, dtype=torch.float64)
        se2 = float((s_r ** 2).sum())
        # no floor from ref_var and a cap far away: the raw estimate
        sq.append(frobenius_cov_sq(sample))
        cross.append(cross_noise_trace(G, sample))
    for values, truth in ((sq, float((s_r ** 4).sum())), (cross, float((s_r ** 2 * t ** 2).sum()))):
        values = np.asarray(values)
        assert values.mean() == pytest.approx(truth, abs=4 * values.std() / math.sqrt(R))
    # both ways of computing it (P x P, or M x k when P is the larger) equal the direct
    # tr(S_G S_r) of the two sample covariances
    for P_, M_, k_ in ((3, 8, 10), (40, 8, 10)):
        G = torch.randn(M_, P_, generator=gen, dtype=torch.float64)
        S = torch.randn(k_, P_, generator=gen, dtype=torch.float64)
        direct = float((torch.cov(G.T).reshape(P_, P_) * torch.cov(S.T).reshape(P_, P_)).sum())
        assert cross_noise_trace(G, S) == pytest.approx(direct)
    # the clipped version stays within what the diagonal and the trace allow
    one = s_r * torch.randn(8, P, generator=gen, dtype=torch.float64)
    est = reference_noise_sq(se2, s_r ** 2, one)
    assert float((s_r ** 4).sum()) <= est <= se2 ** 2
    assert reference_noise_sq(se2) == se2 ** 2  # no sample: the worst case


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_estimates_without_spread_give_a_point_interval_against_an_exact_reference(offset):
    """All M estimates equal (an estimator with no signal at this policy gives all-zero
    gradients): no division by a zero spread; U is then the squared bias itself."""
    G = torch.zeros(16, 5, dtype=torch.float64)
    stats = gradient_stats(G, torch.full((5,), offset, dtype=torch.float64), 0.0).as_dict()
    assert stats["grad_bias_sq_lo"] == stats["grad_bias_sq_hi"] == pytest.approx(5 * offset ** 2)
    assert stats["bias_distinguishable"] == (offset > 0)
