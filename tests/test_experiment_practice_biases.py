"""experiments/practice_biases: exact expectations, verdicts on synthetic sweeps, smoke run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.reproduce import load_experiment_module

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "practice_biases"


def load_analysis():
    module = load_experiment_module(EXPERIMENT)
    return module


# ----------------------------------------------------------------------------- exact expectations


def tabular_case(objective: str = "finite", horizon: int = 6, gamma: float = 0.9, name="tabular"):
    from pgvar import make_env, make_policy

    kwargs = {"length": 5} if name == "chain" else {}
    env = make_env(name, horizon=horizon, gamma=gamma, objective=objective, **kwargs)
    return env, make_policy(env, init_scale=1.0, seed=3)


@pytest.mark.parametrize("estimator", ["reinforce_rtg", "value_baseline", "actor_critic", "gae"])
def test_control_expectation_is_the_exact_gradient_under_finite(estimator: str) -> None:
    mod = load_analysis()
    env, policy = tabular_case()
    e = mod.expected_gradient(env, policy, estimator, 0.9, True, False)
    assert torch.allclose(e, mod.exact_gradient(env, policy), atol=1e-10)


def test_discounted_control_misses_only_the_tail_after_the_cut() -> None:
    """With the bootstrap, the expectation is grad J up to the unseen steps t >= T, whose
    share shrinks like gamma^T."""
    mod = load_analysis()
    gaps = []
    for horizon in (5, 40):
        env, policy = tabular_case("discounted", horizon=horizon, gamma=0.8)
        e = mod.expected_gradient(env, policy, "gae", 0.9, True, False)
        g = mod.exact_gradient(env, policy)
        gaps.append(float((e - g).norm() / g.norm()))
    assert gaps[1] < 1e-3 < gaps[0]


def test_truncation_habit_of_value_baseline_is_reward_to_go_without_tail() -> None:
    mod = load_analysis()
    env, policy = tabular_case("discounted", name="chain", horizon=8)
    vb = mod.expected_gradient(env, policy, "value_baseline", 0.95, True, True)
    rtg = mod.expected_gradient(env, policy, "reinforce_rtg", 0.95, True, True)
    gae1 = mod.expected_gradient(env, policy, "gae", 1.0, True, True)
    assert torch.allclose(vb, rtg, atol=1e-10) and torch.allclose(vb, gae1, atol=1e-10)


def test_dropped_discount_prediction_matches_sampled_estimates() -> None:
    """The predicted bias of reinforce_rtg without gamma^t agrees with the harness' own
    de-noised squared bias within 4 standard errors."""
    from pgvar.estimators import EstimatorConfig
    from pgvar.measure import measure

    mod = load_analysis()
    env, policy = tabular_case(horizon=10)
    stats = measure(env, policy, "reinforce_rtg", n_batches=64, batch_size=32, seed=1,
                    cfg=EstimatorConfig(discount_weighting=False)).stats
    e = mod.expected_gradient(env, policy, "reinforce_rtg", 0.95, False, False)
    g = mod.exact_gradient(env, policy)
    predicted = float((e - g) @ (e - g))
    assert abs(stats.grad_bias_sq - predicted) < 4 * stats.grad_bias_sq_se + 1e-9
    assert predicted > 5 * stats.grad_bias_sq_se  # and the bias is large, not marginal


# ----------------------------------------------------------------------------- synthetic sweeps


def synthetic_frame(seeds: int = 8) -> tuple[pd.DataFrame, dict]:
    """Runs on a non-tabular env (no exact prediction): each habit's run has expected
    estimate (1 + a, b) against g = (1, 0); its control is unbiased. The gamma habit is
    biased (a=0.3, b=0.2), normalisation only rescales (a=-0.5, b=0), truncation does
    nothing (a=b=0)."""
    rng = np.random.default_rng(1)
    M, var = 64, 0.2
    truth = {"drop gamma^t": (0.3, 0.2), "normalise advantages": (-0.5, 0.0),
             "truncation as termination": (0.0, 0.0)}
    flags = {"drop gamma^t": ("estimator.discount_weighting", False),
             "normalise advantages": ("estimator.normalize_advantages", True),
             "truncation as termination": ("estimator.truncation_as_termination", True)}
    rows = []
    for habit, (a, b) in truth.items():
        for arm in ("control", "habit"):
            for seed in range(seeds):
                mean = np.array([1 + a, b]) if arm == "habit" else np.array([1.0, 0.0])
                bias_sq = float(((mean - np.array([1.0, 0.0])) ** 2).sum()) + rng.normal(0, 0.003)
                row = {"env": "synth", "env.name": "synth", "env.gamma": 0.9, "env.objective": habit[:4],
                       "estimator": "rloo", "seed": seed, "step": 0,
                       "run_id": f"{habit}/{arm}/{seed}", "grad_variance": var, "n_estimates": M,
                       "grad_bias_sq": bias_sq, "snr": (mean @ mean + var / M) / var,
                       "ref_norm": 1.0, "ref_se": 0.0, "cos_ref": 0.7, "grad_rel_variance": var,
                       "grad_rel_bias_sq": bias_sq, "return_mean": 0.0,
                       "estimator.discount_weighting": True,
                       "estimator.normalize_advantages": False,
                       "estimator.truncation_as_termination": False}
                if arm == "habit":
                    col, value = flags[habit]
                    row[col] = value
                rows.append(row)
    return pd.DataFrame(rows), truth


def test_analysis_recovers_known_biases_and_verdicts(tmp_path: Path) -> None:
    mod = load_analysis()
    frame, truth = synthetic_frame()
    text = mod.analyze(frame, tmp_path, "synthetic")
    table = pd.read_csv(tmp_path / "result.csv")
    for habit, (a, b) in truth.items():
        row = table[(table["habit"] == habit) & (table["arm"] == "habit")].iloc[0]
        want_bias = math.hypot(a, b)
        assert row["rel_bias_lo"] - 1e-3 <= want_bias <= row["rel_bias_hi"] + 1e-3, (habit, row)
        want_cos = (1 + a) / math.hypot(1 + a, b)
        assert row["cos_mean_lo"] - 1e-3 <= want_cos <= row["cos_mean_hi"] + 1e-3, (habit, row)
        assert abs(row["scale"] - (1 + a)) < 0.02
    assert "Verdict (drop gamma^t): confirmed" in text
    assert "Verdict (normalise advantages): confirmed" in text
    assert "Verdict (truncation as termination): refuted" in text
    assert "\nVerdict: qualified" in text
    assert (tmp_path / "figures" / "practice_biases_bias.png").exists()




def test_a_configuration_run_twice_counts_once() -> None:
    mod = load_analysis()
    frame, _ = synthetic_frame(seeds=3)
    twice = pd.concat([frame, frame.assign(run_id=frame["run_id"] + "-again")])
    once, dup = mod.per_run(frame), mod.per_run(twice)
    assert len(dup) == len(once)
