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
    """experiments/reward_to_go/analyze.py as a module; without its figure (most of the
    time) when ``figures`` is False."""
    module = load_experiment_module(FOLDER)
    if not figures:
        module.EXPERIMENT.figures = lambda *args: []
    return module


def synthetic_frame(root: Path, truths: list[TrueEstimator], instances: int = 3,
                    seeds: int = 5, reference: str | None = None) -> pd.DataFrame:
    """Runs in pgvar-run's format: every (instance, seed) pair holds both estimators;
    with ``reference`` a Monte Carlo reference (standard error 0.05) of that estimator."""
    job = 0
    for truth in truths:
        for instance in range(instances):
            for seed in range(seeds):
                config = {"env": {"name": "tabular", "gamma": 0.99, "seed": instance},
                          "estimator": {"name": truth.name},
                          "training": {"batch_size": 16, "iterations": 1,
                                       "reference": {"estimator": reference or "reinforce_rtg"}},
                          "seed": seed, "preset_name": "synthetic"}
                metrics = synthetic_metrics(truth, 100 * instance + seed, n_iters=1, M=64,
                                            ref_se=0.05 if reference else 0.0)
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
    assert not row["reinforce_bias_distinguishable"] and not row["reinforce_rtg_bias_distinguishable"]
    checks = pd.read_csv(tmp_path / "out" / "checks.csv")
    assert (checks["kind"] == "tested").all() and checks["passed"].all() and len(checks) == 3
    assert "\nVerdict: confirmed — tabular: Var(rtg)/Var(full) = 0.2" in text
    assert (tmp_path / "out" / "figures" / "reward_to_go_pairs_bias.png").stat().st_size > 5000


@pytest.mark.parametrize("full_bias,rtg,word", [(0.0, (0.5, 0.5), "qualified"),  # biased rtg
                                                (0.0, (0.0, 4.0), "qualified"),  # higher variance
                                                (0.5, (0.5, 4.0), "refuted")])  # every check fails
def test_the_verdict_flips_with_the_measurement(tmp_path, full_bias, rtg, word):
    m = load_module(figures=False)
    truths = [TrueEstimator("reinforce", full_bias, 2.0), TrueEstimator("reinforce_rtg", *rtg)]
    text = m.analyze(synthetic_frame(tmp_path / "runs", truths), tmp_path / "out", "synthetic")
    assert f"\nVerdict: {word}" in text


def test_a_reference_built_from_reward_to_go_is_by_construction(tmp_path):
    """With a Monte Carlo reference averaging reinforce_rtg, its bias check cannot fail:
    classed by construction and left out of the verdict; with rloo it is tested."""
    m = load_module(figures=False)
    truths = [TrueEstimator("reinforce", 0.0, 2.0), TrueEstimator("reinforce_rtg", 0.0, 0.5)]
    for ref, kind in (("reinforce_rtg", "by construction"), ("rloo", "tested")):
        m.analyze(synthetic_frame(tmp_path / ref, truths, reference=ref), tmp_path / f"out-{ref}", "s")
        checks = pd.read_csv(tmp_path / f"out-{ref}" / "checks.csv").set_index("kind", drop=False)
        rtg_check = checks[checks["check"].str.startswith("reinforce_rtg bias")].iloc[0]
        assert rtg_check["kind"] == kind, ref


def test_two_pairs_are_inconclusive(tmp_path):
    m = load_module(figures=False)
    truths = [TrueEstimator("reinforce", 0.0, 2.0), TrueEstimator("reinforce_rtg", 0.0, 0.5)]
    frame = synthetic_frame(tmp_path / "runs", truths, instances=1, seeds=2)
    assert "\nVerdict: inconclusive" in m.analyze(frame, tmp_path / "out", "synthetic")
