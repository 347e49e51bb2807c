"""pgvar.exact_mean: the exact expectation of an estimator on tabular environments."""

from __future__ import annotations

import pytest
import torch

from pgvar import make_env, make_policy
from pgvar.exact_mean import exact_gradient, expected_gradient


def tabular_case(objective: str = "finite", horizon: int = 6, gamma: float = 0.9, name="tabular"):
    kwargs = {"length": 5} if name == "chain" else {}
    env = make_env(name, horizon=horizon, gamma=gamma, objective=objective, **kwargs)
    return env, make_policy(env, init_scale=1.0, seed=3)


@pytest.mark.parametrize("estimator", ["reinforce_rtg", "value_baseline", "actor_critic", "gae"])
def test_control_expectation_is_the_exact_gradient_under_finite(estimator: str) -> None:
    env, policy = tabular_case()
    e = expected_gradient(env, policy, estimator, 0.9, True, False)
    assert torch.allclose(e, exact_gradient(env, policy), atol=1e-10)


def test_discounted_control_misses_only_the_tail_after_the_cut() -> None:
    """With the bootstrap, the expectation is grad J up to the unseen steps t >= T, whose
    share shrinks like gamma^T."""
    gaps = []
    for horizon in (5, 40):
        env, policy = tabular_case("discounted", horizon=horizon, gamma=0.8)
        e = expected_gradient(env, policy, "gae", 0.9, True, False)
        g = exact_gradient(env, policy)
        gaps.append(float((e - g).norm() / g.norm()))
    assert gaps[1] < 1e-3 < gaps[0]


def test_truncation_habit_of_value_baseline_is_reward_to_go_without_tail() -> None:
    env, policy = tabular_case("discounted", name="chain", horizon=8)
    vb = expected_gradient(env, policy, "value_baseline", 0.95, True, True)
    rtg = expected_gradient(env, policy, "reinforce_rtg", 0.95, True, True)
    gae1 = expected_gradient(env, policy, "gae", 1.0, True, True)
    assert torch.allclose(vb, rtg, atol=1e-10) and torch.allclose(vb, gae1, atol=1e-10)


def test_dropped_discount_prediction_matches_sampled_estimates() -> None:
    """The predicted bias of reinforce_rtg without gamma^t agrees with the harness' own
    de-noised squared bias within 4 standard errors."""
    from pgvar.estimators import EstimatorConfig
    from pgvar.measure import measure

    env, policy = tabular_case(horizon=10)
    stats = measure(env, policy, "reinforce_rtg", n_batches=64, batch_size=32, seed=1,
                    cfg=EstimatorConfig(discount_weighting=False)).stats
    e = expected_gradient(env, policy, "reinforce_rtg", 0.95, False, False)
    g = exact_gradient(env, policy)
    predicted = float((e - g) @ (e - g))
    assert abs(stats.grad_bias_sq - predicted) < 4 * stats.grad_bias_sq_se + 1e-9
    assert predicted > 5 * stats.grad_bias_sq_se  # and the bias is large, not marginal


def test_an_estimator_without_an_exact_mean_is_refused() -> None:
    env, policy = tabular_case()
    with pytest.raises(ValueError, match="no exact mean for estimator 'ppo'"):
        expected_gradient(env, policy, "ppo", 0.95, True, False)
