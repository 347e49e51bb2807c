"""experiments/batch_size: the analysis recovers known exponents and the batch mean's 1/B
bias from synthetic measurements, and the smoke preset runs end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.loader import add_derived_columns
from analysis.reproduce import load_experiment_module
from analysis.synthetic import gradient_statistics

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "experiments" / "batch_size"
BATCH_SIZES = (2, 4, 8, 16, 32, 64)


def load_module(figures: bool = True):
    """experiments/batch_size/analyze.py as a module; without its figures (which take
    most of the time) when ``figures`` is False."""
    module = load_experiment_module(FOLDER)
    if not figures:
        module.plot_variance = module.plot_bias = lambda *args, **kwargs: []
    return module


def synthetic_frame(rtg_exponent: float = -1.0, mean_factor=lambda b: 1 - 1 / b,
                    replicates: int = 10, M: int = 64, P: int = 8) -> pd.DataFrame:
    """Measured rows as load_runs returns them. Per replicate a reference gradient of norm
    1; reward-to-go has trace variance 2 B^rtg_exponent; rloo is unbiased with trace
    variance 1/B; the batch mean is ``mean_factor(B)`` times rloo's estimates (its
    expectation mean_factor(B) grad J)."""
    rows = []
    for rep in range(replicates):
        rng = np.random.default_rng(rep)
        g_ref = rng.normal(size=P)
        g_ref /= np.linalg.norm(g_ref)
        for b in BATCH_SIZES:
            rtg = g_ref + rng.normal(size=(M, P)) * np.sqrt(2 * b ** rtg_exponent / P)
            rloo = g_ref + rng.normal(size=(M, P)) * np.sqrt(1 / b / P)
            for name, G in (("reinforce_rtg", rtg), ("rloo", rloo),
                            ("mean_baseline", mean_factor(b) * rloo)):
                stats = gradient_statistics(G, g_ref)
                rows.append({"env": "tabular", "estimator": name, "seed": rep % 5,
                             "env.seed": rep // 5, "training.batch_size": b, "step": 0,
                             "run_dir": f"{rep}/{name}/{b}", **stats})
    return add_derived_columns(pd.DataFrame(rows))


def test_exponents_bias_and_identity_are_recovered(tmp_path):
    m = load_module()
    text = m.analyze(synthetic_frame(), tmp_path, "synthetic")
    result = pd.read_csv(tmp_path / "result.csv")
    for est in ("reinforce_rtg", "rloo"):
        r = result[result["estimator"] == est].iloc[0]
        assert r["k_lo"] <= -1.0 <= r["k_hi"] and r["k_hi"] - r["k_lo"] < 0.1, est
        assert r["ustat_r_lo"] <= 1.0 <= r["ustat_r_hi"], est  # exact 1/B: no excess
    mean = result[result["estimator"] == "mean_baseline"].set_index("B")
    covered = [mean.loc[b, "rel_bias_lo"] <= 1 / b <= mean.loc[b, "rel_bias_hi"] for b in BATCH_SIZES]
    assert sum(covered) >= len(BATCH_SIZES) - 1, covered  # 95% intervals: most cover
    for b in BATCH_SIZES:
        assert mean.loc[b, "var_ratio_mean_rloo"] == pytest.approx((1 - 1 / b) ** 2)
    assert mean.loc[2, "bias_distinguishable"]
    assert mean.iloc[0]["c2_lo"] <= 1.0 <= mean.iloc[0]["c2_hi"]
    rloo = result[result["estimator"] == "rloo"]
    assert rloo.iloc[0]["c2_lo"] <= 0.0 <= rloo.iloc[0]["c2_hi"]
    assert "\nVerdict: confirmed — tabular: k(reinforce_rtg) = " in text
    for name in ("batch_size_variance", "batch_size_bias"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 5000


def test_a_slower_decay_and_an_unbiased_mean_are_reported(tmp_path):
    m = load_module(figures=False)
    frame = synthetic_frame(rtg_exponent=-0.5, mean_factor=lambda b: 1.0)
    text = m.analyze(frame, tmp_path, "synthetic")
    r = pd.read_csv(tmp_path / "result.csv").query("estimator == 'reinforce_rtg'").iloc[0]
    assert r["k_lo"] <= -0.5 <= r["k_hi"]
    assert "\nVerdict: qualified" in text
    assert "failed: tabular: Var(reinforce_rtg) ~ 1/B" in text
    assert "mean_baseline relative bias = c/B with c² = 1" in text.split("failed:")[1]


def test_the_u_statistic_excess_is_recovered():
    m = load_module(figures=False)
    bs = np.array(BATCH_SIZES, float)
    r_true = 2.5  # Var(B) = (4 (B-2) z1 + 2 z2) / (B (B-1)) with z2 / (2 z1) = 2.5
    var = (4 * (bs - 2) + 2 * 2 * r_true) / (bs * (bs - 1))
    noisy = var * np.random.default_rng(0).lognormal(0, 0.05, size=(8, bs.size))
    assert m.ustat_excess(bs, var[None, :]) == pytest.approx(r_true)
    assert m.ustat_excess(bs, noisy) == pytest.approx(r_true, rel=0.15)
    assert m.ustat_excess(bs, (1 / bs)[None, :]) == pytest.approx(1.0)  # exact 1/B
    assert m.ustat_curve(bs, 1.0) == pytest.approx(np.ones_like(bs))


def test_two_replicates_are_inconclusive(tmp_path):
    m = load_module(figures=False)
    assert "\nVerdict: inconclusive" in m.analyze(synthetic_frame(replicates=2), tmp_path, "synthetic")
