"""experiments/baselines: the analysis recovers a known ordering and bias from synthetic
runs, and the smoke preset runs end to end."""

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

# (estimator, critic kind) -> true (relative bias, relative variance); ||grad J|| = 1
TRUTH = {
    ("reinforce", "auto"): (0.0, 2.0),
    ("reinforce_rtg", "auto"): (0.0, 1.0),
    ("mean_baseline", "auto"): (1.0 / B, 0.5),
    ("rloo", "auto"): (0.0, 0.55),
    ("optimal_baseline", "auto"): (0.0, 0.23),
    ("value_baseline", "auto"): (0.0, 0.3),
    ("value_baseline", "exact"): (0.0, 0.2),
}


def load_module():
    module = load_experiment_module(FOLDER)
    return module


def synthetic_frame(root: Path, truth_table: dict = TRUTH, seeds: int = 12) -> pd.DataFrame:
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


def test_synthetic_ordering_bias_and_verdicts_are_recovered(tmp_path):
    m = load_module()
    text = m.analyze(synthetic_frame(tmp_path / "runs"), tmp_path / "out", "synthetic")
    result = pd.read_csv(tmp_path / "out" / "result.csv")
    table = result[result["section"] == "rows"].set_index("label")
    comp = result[result["section"] == "comparisons"]
    rtg_var = TRUTH[("reinforce_rtg", "auto")][1]
    covered = []  # 95% intervals: most, not necessarily all, of the 21 cover the truth
    for (name, kind), (bias, variance) in TRUTH.items():
        row = table.loc[(m.EXACT_V if kind == "exact" else m.LEARNED_V) if name == "value_baseline" else name]
        covered += [row["rel_variance_lo"] <= variance <= row["rel_variance_hi"],
                    row["var_ratio_lo"] <= variance / rtg_var <= row["var_ratio_hi"],
                    row["rel_bias_lo"] <= bias <= row["rel_bias_hi"]]
        assert row["rel_variance"] == pytest.approx(variance, rel=0.1), (name, kind)
    assert sum(covered) >= 0.8 * len(covered), covered
    assert table.loc["mean_baseline", "bias_verdict"] == "1/B bias, as theory says"
    assert table.loc["mean_baseline", "expected_rel_bias"] == pytest.approx(1 / B)
    assert all(table.drop(index="mean_baseline")["bias_verdict"].str.startswith("unbiased"))
    links = comp[(comp["claim"] == "order") & comp["numerator"].isin(m.TEXT_CHAIN)
                 & comp["denominator"].isin(m.TEXT_CHAIN)]
    assert len(links) == 3 and (links["word"] == "lower").all()
    close = comp[(comp["claim"] == "optimal close to V") & (comp["denominator"] == m.EXACT_V)]
    assert close["word"].tolist() == ["close"]
    assert "**unbiased**: confirmed" in text and "**ordered**: confirmed" in text
    assert "**V MSE-optimal**: confirmed" in text
    assert "Verdict: confirmed" in text
    assert (tmp_path / "out" / "figures" / "baselines_bias_variance.png").exists()


def test_an_exact_v_worse_than_others_refutes_order_and_mse_optimality(tmp_path):
    m = load_module()
    swapped = {**TRUTH, ("value_baseline", "exact"): (0.0, 0.6)}  # above learned V and mean
    frame = synthetic_frame(tmp_path / "runs", swapped, seeds=8)
    text = m.analyze(frame, tmp_path / "out", "synthetic")
    assert "**ordered**: qualified" in text
    assert "**V MSE-optimal**: refuted" in text
    assert "Verdict: qualified" in text
