"""pgvar.reference: exact gradients by autograd, and Monte Carlo gradients that converge
to them within their own standard errors.

How the tolerance is derived. A Monte Carlo reference averages n i.i.d. sub-batch
gradients, so by the CLT its error e = mc - grad J is ~ N(0, Sigma_r) with
tr(Sigma_r) estimated by se2. Then ||e||^2 / se2 ~ sum_k w_k chi2_1 with weights
w_k >= 0 summing to 1 (the eigenvalues of Sigma_r over its trace): mean 1, variance
2 sum w_k^2 <= 2. Its upper tail beyond 9 is largest when one weight is 1 (Szekely &
Bakirov 2003), P(chi2_1 > 9) = 0.27%: so ``ratio < 9`` fails a correct implementation
with at most that probability, for any covariance. Averaged over R independent
references the ratio's mean is 1 with standard error <= sqrt(2 / R): that checks se2
itself (too large an se2 would make the first check vacuous).
"""

from __future__ import annotations

import math

import pytest
import torch

from pgvar.critics import make_critic
from pgvar.envs.registry import make_env, make_policy
from pgvar.estimators import EstimatorConfig
from pgvar.reference import (
    NOISE_SAMPLE_ROWS,
    Reference,
    RunningMoments,
    SubBatchSample,
    chunk_seed,
    exact_reference,
    monte_carlo_reference,
    reference_gradient,
)
from pgvar.rollout import rollout
from pgvar.stats import tail_index, trace_variance

ENVS = {
    "tabular": {"n_states": 5, "n_actions": 3, "horizon": 10},
    "chain": {"length": 5, "horizon": 10},
    "lqr": {"state_dim": 2, "action_dim": 1, "horizon": 20},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def setup(name: str, policy_seed: int = 0):
    """An environment and a non-trivial policy (random initial parameters)."""
    env = make_env(name, **ENVS[name])
    scale = {"init_scale": 0.5} if name != "lqr" else {"init_gain_scale": 0.3}
    return env, make_policy(env, seed=policy_seed, **scale)


def error_ratio(mc: Reference, exact: Reference) -> float:
    """||mc - exact||^2 / se2: ~1 on average, < 9 but with probability <= 0.27%."""
    return float(((mc.grad - exact.grad) ** 2).sum()) / mc.se2


# ----------------------------------------------------------------------------- exact


@pytest.mark.parametrize("name", list(ENVS))
def test_exact_reference_is_autograd_of_the_exact_objective(name):
    env, policy = setup(name)
    ref = exact_reference(env, policy)
    params = list(policy.parameters())
    grads = torch.autograd.grad(env.exact_objective(policy), params)
    flat = torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)
    assert ref.exact and ref.se2 == 0.0 and ref.se == 0.0 and ref.method == "exact"
    assert ref.grad.dtype == torch.float64 and ref.grad.shape == (sum(p.numel() for p in params),)
    torch.testing.assert_close(ref.grad, flat)
    assert ref.objective == pytest.approx(float(env.exact_objective(policy).detach()))


def test_reference_gradient_picks_exact_where_possible():
    env, policy = setup("lqr")
    assert reference_gradient(env, policy).exact
    # "auto" on an exact env ignores Monte Carlo options; "exact" refuses them
    assert reference_gradient(env, policy, n_episodes=10).exact
    with pytest.raises(ValueError, match="no options"):
        reference_gradient(env, policy, method="exact", n_episodes=10)
    mc = reference_gradient(env, policy, method="monte_carlo", n_episodes=64, seed=0)
    assert not mc.exact and mc.se2 > 0 and mc.n_episodes == 64
    with pytest.raises(ValueError, match="method"):
        reference_gradient(env, policy, method="guess")


# ----------------------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize("name", list(ENVS))
def test_monte_carlo_converges_to_exact_within_its_standard_error(name):
    env, policy = setup(name)
    exact = exact_reference(env, policy)
    mc = monte_carlo_reference(env, policy, n_episodes=16384, seed=0)
    assert mc.n_episodes == 16384 and mc.n_estimates == 16384 // 4
    assert mc.var.shape == exact.grad.shape and float(mc.var.sum()) == pytest.approx(mc.se2)
    assert mc.rel_se < 0.1  # a real test: the error allowed is a small fraction of the gradient
    assert error_ratio(mc, exact) < 9.0, (error_ratio(mc, exact), mc.rel_se)
    # the sampled objective converges too: |J_mc - J| < 3 SE fails with probability 0.27%
    assert abs(mc.objective - exact.objective) < 3 * mc.objective_se
    # the noise sample's covariance estimates the reference's: its trace is se2 up to the
    # sampling error of a 256-row trace (relative SE sqrt((kurtosis - 1) / 255))
    sample = mc.noise_sample
    assert sample.shape == (NOISE_SAMPLE_ROWS, exact.grad.numel())
    rel_se = math.sqrt((tail_index(sample) - 1.0) / (NOISE_SAMPLE_ROWS - 1))
    assert abs(math.log(trace_variance(sample) / mc.se2)) < 4 * rel_se


def test_standard_error_is_calibrated_over_independent_references():
    env, policy = setup("lqr")
    exact = exact_reference(env, policy)
    R = 60
    ratios = [error_ratio(monte_carlo_reference(env, policy, n_episodes=1024, seed=s), exact)
              for s in range(R)]
    mean = sum(ratios) / R
    assert abs(mean - 1.0) < 3 * math.sqrt(2.0 / R), mean


def test_other_unbiased_estimators_and_tiny_chunks_give_valid_references():
    # rloo with sub-batches of 2, one sub-batch per chunk: 500 chunks, memory of one
    env, policy = setup("tabular")
    exact = exact_reference(env, policy)
    mc = monte_carlo_reference(env, policy, n_episodes=1000, seed=1, estimator="rloo",
                               batch_size=2, chunk_episodes=2)
    assert mc.info["n_chunks"] == 500 and mc.n_estimates == 500 and mc.n_episodes == 1000
    # the first 256 sub-batches, gathered across 256 one-sub-batch chunks
    assert mc.noise_sample.shape == (NOISE_SAMPLE_ROWS, exact.grad.numel())
    assert error_ratio(mc, exact) < 9.0
    # value baseline with a critic fitted on other episodes
    critic = make_critic(env)
    critic.fit(rollout(env, policy, 500, seed=99), env.gamma, env.objective)
    mc = monte_carlo_reference(env, policy, n_episodes=8192, seed=2, estimator="value_baseline",
                               critic=critic, batch_size=8, chunk_episodes=1000)
    assert mc.n_episodes == 8192 and mc.info["n_chunks"] == 9  # 8 x 1000 + 192
    assert error_ratio(mc, exact) < 9.0


def test_pair_budget_counts_state_action_pairs():
    env, policy = setup("chain")  # episodes end early: pairs per episode vary
    mc = monte_carlo_reference(env, policy, n_pairs=5000, seed=0, chunk_episodes=64)
    assert mc.n_pairs >= 5000
    assert mc.n_pairs < 5000 + 64 * env.horizon  # stopped within one chunk of the target
    batch = rollout(env, policy, 64, chunk_seed(0, 0))
    assert batch.n_steps < 64 * env.horizon  # chain episodes do end early


def test_early_stop_at_target_relative_standard_error():
    env, policy = setup("lqr")
    mc = monte_carlo_reference(env, policy, n_episodes=1_000_000, seed=0, chunk_episodes=256,
                               target_rel_se=0.1)
    assert mc.info["stopped_early"] and mc.n_episodes < 1_000_000
    assert mc.rel_se <= 0.1
    assert error_ratio(mc, exact_reference(env, policy)) < 9.0


def test_refuses_biased_settings():
    env, policy = setup("tabular")
    for name in ("actor_critic", "mean_baseline", "gae", "ppo"):
        with pytest.raises(ValueError, match="unbiased"):
            monte_carlo_reference(env, policy, n_episodes=16, estimator=name)
    with pytest.raises(ValueError, match="discount_weighting"):
        monte_carlo_reference(env, policy, n_episodes=16,
                              cfg=EstimatorConfig(discount_weighting=False))
    with pytest.raises(ValueError, match="normalize_advantages"):
        monte_carlo_reference(env, policy, n_episodes=16,
                              cfg=EstimatorConfig(normalize_advantages=True))
    with pytest.raises(ValueError, match="n_episodes"):
        monte_carlo_reference(env, policy, n_episodes=0)
    with pytest.raises(ValueError, match="target_rel_se"):
        monte_carlo_reference(env, policy, n_episodes=16, target_rel_se=0.0)
    with pytest.raises(TypeError, match="exact_objective"):
        exact_reference(object(), policy)


def test_running_moments_merge_equals_one_pass():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(37, 5, generator=gen, dtype=torch.float64) * 3 + 100.0
    rm = RunningMoments()
    for block in (X[:1], X[1:10], X[10:11], X[11:]):
        rm.update(block)
    assert rm.n == 37
    torch.testing.assert_close(rm.mean, X.mean(0))
    trace_cov = float(((X - X.mean(0)) ** 2).sum()) / 36
    assert rm.trace_cov == pytest.approx(trace_cov)
    assert rm.se2 == pytest.approx(trace_cov / 37)
    torch.testing.assert_close(rm.mean_var, X.var(0) / 37)


def test_chunk_seeds_are_distinct_and_not_small_integers():
    seeds = {chunk_seed(s, i) for s in range(5) for i in range(200)}
    assert len(seeds) == 1000
    assert min(seeds) > 10_000  # would collide with measurement seeds 0, 1, 2, ... otherwise


# ------------------------------------------------------------- memory of one chunk


class SimulatorLike:
    """What chunk_plan reads of an env: a MuJoCo-sized lane (1 MiB) and a long horizon."""

    horizon = 1000
    obs_shape = (11,)
    lane_bytes = 2 ** 20

    class action_spec:
        kind, dim = "continuous", 3


@pytest.mark.parametrize("refill", [True, False])
def test_chunk_plan_holds_one_chunk_within_the_budget(refill):
    from pgvar.reference import chunk_plan

    plan = chunk_plan(SimulatorLike(), batch_size=4, chunk_episodes=2048, lanes=4096,
                      memory_mb=512, refill=refill)
    assert plan.memory_bytes <= 512 * 2 ** 20
    assert plan.chunk_episodes % 4 == 0 and plan.chunk_episodes < 2048
    copies = plan.lanes if refill else plan.chunk_episodes
    assert copies <= 256  # half the budget at 1 MiB a copy
    assert (plan.lanes is None) is (not refill)


def test_chunk_plan_leaves_small_envs_near_the_asked_sizes():
    """CartPole (500 steps, 4 observations, a lane of a few KiB): the lanes as asked, the
    chunk within 1% of it (the estimate of a 500-step episode binds just below 2048)."""
    from pgvar.reference import chunk_plan

    env = make_env("cartpole")
    plan = chunk_plan(env, batch_size=4, chunk_episodes=2048, lanes=4096, memory_mb=512,
                      refill=True)
    assert plan.lanes == 4096 and 2028 <= plan.chunk_episodes <= 2048


def test_a_small_memory_budget_shrinks_the_chunks_not_the_reference():
    env = make_env("cartpole")
    policy = make_policy(env)
    ref = monte_carlo_reference(env, policy, n_episodes=256, seed=0, memory_mb=8)
    assert ref.info["chunk_bytes"] <= 8 * 2 ** 20
    assert ref.info["chunk_episodes"] < 256 and ref.n_episodes == 256
    assert ref.info["n_chunks"] > 1


def test_sub_batch_sample_selects_by_index_not_by_arrival():
    # blocks arrive in any order (packed by episode length); the sample keeps the rows
    # with the lowest indices of each chunk until it holds its limit
    sample = SubBatchSample(limit=5)
    sample.start_chunk()
    for idx in ([3, 0, 2], [1, 4, 5]):  # chunk 1 of 6 sub-batches, out of order
        indices = torch.tensor(idx)
        sample.update(indices, indices.to(torch.float64).unsqueeze(1))
    assert sample.count == 5
    sample.start_chunk()  # full: nothing more is kept
    sample.update(torch.tensor([0]), torch.zeros(1, 1))
    rows = sample.scaled(4) * 2.0  # scaled by 1 / sqrt(4)
    assert sorted(rows.squeeze(1).tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]

    spread = SubBatchSample(limit=4)  # chunks of 2 sub-batches: 2 rows from each
    for _ in range(3):
        spread.start_chunk()
        spread.update(torch.tensor([1, 0]), torch.ones(2, 1))
    assert spread.count == 4
