"""experiments/reward_to_go: the analysis recovers a known variance ratio and the bias
verdicts from synthetic runs, and the smoke preset runs end to end."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.loader import load_runs
from analysis.reproduce import load_experiment_module
from analysis.synthetic import TrueEstimator, synthetic_metrics, write_run

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "experiments" / "reward_to_go"


def load_module(figures: bool = True):
    """experiments/reward_to_go/analyze.py as a module; without its figures (which take
    most of the time) when ``figures`` is False."""
    module = load_experiment_module(FOLDER)
    if not figures:
        module.plot_variance_pairs = module.plot_bias = lambda *args, **kwargs: []
    return module


def synthetic_frame(root: Path, truths: list[TrueEstimator], instances: int = 3,
                    seeds: int = 5) -> pd.DataFrame:
    """Runs in pgvar-run's format: every (instance, seed) pair holds both estimators."""
    job = 0
    for truth in truths:
        for instance in range(instances):
            for seed in range(seeds):
                config = {"env": {"name": "tabular", "gamma": 0.99, "seed": instance},
                          "estimator": {"name": truth.name},
                          "training": {"batch_size": 16, "iterations": 1},
                          "seed": seed, "preset_name": "synthetic"}
                metrics = synthetic_metrics(truth, 100 * instance + seed, n_iters=1, M=64)
                write_run(root / str(job), config, metrics)
                job += 1
    return load_runs([root])[0]


def test_known_ratio_and_unbiasedness_are_recovered(tmp_path):
    m = load_module()
    truths = [TrueEstimator("reinforce", 0.0, 2.0), TrueEstimator("reinforce_rtg", 0.0, 0.5)]
    text = m.analyze(synthetic_frame(tmp_path / "runs", truths), tmp_path / "out", "synthetic")
    row = pd.read_csv(tmp_path / "out" / "result.csv").iloc[0]
    assert row["n_pairs"] == 15 and row["n_instances"] == 3
    assert row["ratio_geo_lo"] <= 0.25 <= row["ratio_geo_hi"] < 1
    assert row["ratio_geo"] == pytest.approx(0.25, rel=0.1)
    assert row["rel_var_reinforce_lo"] <= 2.0 <= row["rel_var_reinforce_hi"]
    assert not row["distinguishable_reinforce"] and not row["distinguishable_reinforce_rtg"]
    assert row["verdict"] == "confirmed"
    assert "\nVerdict: confirmed — tabular: Var(rtg)/Var(full) = 0.2" in text
    for name in ("reward_to_go_variance", "reward_to_go_bias"):
        assert (tmp_path / "out" / "figures" / f"{name}.png").stat().st_size > 5000


def test_a_biased_reward_to_go_is_refuted(tmp_path):
    m = load_module(figures=False)
    truths = [TrueEstimator("reinforce", 0.0, 2.0), TrueEstimator("reinforce_rtg", 0.5, 0.5)]
    text = m.analyze(synthetic_frame(tmp_path / "runs", truths), tmp_path / "out", "synthetic")
    row = pd.read_csv(tmp_path / "out" / "result.csv").iloc[0]
    assert row["distinguishable_reinforce_rtg"]
    assert row["rel_bias_sq_reinforce_rtg_lo"] <= 0.25 <= row["rel_bias_sq_reinforce_rtg_hi"]
    assert "\nVerdict: refuted" in text


def test_two_pairs_are_inconclusive(tmp_path):
    m = load_module(figures=False)
    truths = [TrueEstimator("reinforce", 0.0, 2.0), TrueEstimator("reinforce_rtg", 0.0, 0.5)]
    frame = synthetic_frame(tmp_path / "runs", truths, instances=1, seeds=2)
    assert "\nVerdict: inconclusive" in m.analyze(frame, tmp_path / "out", "synthetic")
