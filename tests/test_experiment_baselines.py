"""experiments/baselines: the analysis recovers a known ordering and bias from synthetic
runs, classes its findings, and its verdict flips with the data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.loader import load_runs
from analysis.reproduce import load_experiment_module
from analysis.synthetic import TrueEstimator, synthetic_metrics, write_run

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "experiments" / "baselines"
B = 4  # small, so the batch mean's 1/B bias is large enough to see

# (estimator, critic kind) -> true (relative bias, relative variance); ||grad J|| = 1.
# Every claim of the text holds: each baseline lowers the variance of its return, the
# episode mean sits between vanilla and V, and the exact V has the lowest MSE.
TRUTH = {
    ("reinforce", "auto"): (0.0, 2.0),
    ("reinforce_rtg", "auto"): (0.0, 1.0),
    ("mean_baseline_episode", "auto"): (1.0 / B, 0.6),
    ("mean_baseline", "auto"): (1.0 / B, 0.5),
    ("rloo", "auto"): (0.0, 0.55),
    ("optimal_baseline", "auto"): (0.0, 0.23),
    ("value_baseline", "auto"): (0.0, 0.3),
    ("value_baseline", "exact"): (0.0, 0.2),
}
# Every claim fails: baselines raise the variance, V is the worst row, rloo is biased.
WRONG = {**TRUTH, ("mean_baseline_episode", "auto"): (1.0 / B, 2.5), ("rloo", "auto"): (0.5, 1.5),
         ("optimal_baseline", "auto"): (0.0, 2.5), ("value_baseline", "auto"): (0.0, 2.6),
         ("value_baseline", "exact"): (0.0, 3.0)}


def synthetic_frame(root: Path, truth_table: dict, seeds: int = 12) -> pd.DataFrame:
    """Runs in pgvar-run's format whose measured statistics follow ``truth_table``."""
    job = 0
    for (name, kind), (bias, variance) in truth_table.items():
        truth = TrueEstimator(f"{name}-{kind}", bias, variance)
        for seed in range(seeds):
            config = {"env": {"name": "tabular", "gamma": 0.99},
                      "estimator": {"name": name, "lam": 0.95},
                      "training": {"batch_size": B, "critic": {"kind": kind}},
                      "seed": seed, "preset_name": "synthetic"}
            write_run(root / str(job), config, synthetic_metrics(truth, seed, n_iters=7, M=64))
            job += 1
    return load_runs([root])[0]


def label(name: str, kind: str) -> str:
    return ("exact V" if kind == "exact" else "learned V") if name == "value_baseline" else name


def test_synthetic_ordering_bias_and_findings_are_recovered(tmp_path):
    m = load_experiment_module(FOLDER)
    text = m.analyze(synthetic_frame(tmp_path / "runs", TRUTH), tmp_path / "out", "synthetic")
    result = pd.read_csv(tmp_path / "out" / "result.csv")
    table = result[result["section"] == "rows"].set_index("label")
    covered = []  # 95% intervals: most, not necessarily all, cover the truth
    for (name, kind), (bias, variance) in TRUTH.items():
        row = table.loc[label(name, kind)]
        covered += [row["rel_variance_lo"] <= variance <= row["rel_variance_hi"],
                    row["var_ratio_lo"] <= variance / TRUTH[("reinforce_rtg", "auto")][1]
                    <= row["var_ratio_hi"], row["rel_bias_lo"] <= bias <= row["rel_bias_hi"]]
        assert row["rel_variance"] == pytest.approx(variance, rel=0.1), (name, kind)
    assert sum(covered) >= 0.8 * len(covered), covered
    assert table.loc["mean_baseline", "bias_verdict"] == "1/B"
    assert table.loc["mean_baseline", "expected_rel_bias"] == pytest.approx(1 / B)
    assert (table[table["expected_rel_bias"] == 0]["bias_verdict"] == "unbiased").all()
    for claim in ("unbiased", "reduces variance", "text's order", "V MSE-optimal"):
        assert f"| {claim} | tested | yes | confirmed |" in text, claim
    assert "| b* close to V | extra | no |" in text  # shown, not counted
    assert "Verdict: confirmed" in text
    assert (tmp_path / "out" / "figures" / "baselines_bias_variance.png").exists()


def test_the_verdict_flips_when_the_claims_fail(tmp_path):
    m = load_experiment_module(FOLDER)
    text = m.analyze(synthetic_frame(tmp_path / "runs", WRONG, seeds=8), tmp_path / "out", "synthetic")
    for claim in ("unbiased", "reduces variance", "text's order", "V MSE-optimal"):
        assert f"| {claim} | tested | yes | refuted |" in text, claim
    assert "Verdict: refuted" in text


def test_extras_do_not_move_the_verdict(tmp_path):
    """b* far from V (an extra, not the text's claim) leaves the verdict confirmed."""
    m = load_experiment_module(FOLDER)
    far = {**TRUTH, ("optimal_baseline", "auto"): (0.0, 0.9)}  # 4.5x V, still below vanilla
    text = m.analyze(synthetic_frame(tmp_path / "runs", far, seeds=8), tmp_path / "out", "synthetic")
    assert "| b* close to V | extra | no | refuted |" in text
    assert "Verdict: confirmed" in text
