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
    """experiments/batch_size/analyze.py as a module; without its figure (most of the
    time) when ``figures`` is False."""
    module = load_experiment_module(FOLDER)
    if not figures:
        module.EXPERIMENT.figures = lambda *args: []
    return module


def ustat_variance(b, r: float = 2.0):
    """Hoeffding's variance of an order-2 U-statistic with zeta_1 = 1/4, zeta_2 = r/2."""
    return (4 * (b - 2) * 0.25 + 2 * r / 2) / (b * (b - 1))


def synthetic_frame(rtg_exponent: float = -1.0, mean_factor=lambda b: 1 - 1 / b,
                    rloo_variance=ustat_variance, replicates: int = 10, M: int = 64,
                    P: int = 8) -> pd.DataFrame:
    """Measured rows as load_runs returns them. Per replicate a reference gradient of norm
    1; reward-to-go has trace variance 2 B^rtg_exponent; rloo is unbiased with trace
    variance ``rloo_variance(B)``; the batch mean is ``mean_factor(B)`` times rloo's
    estimates (its expectation mean_factor(B) grad J)."""
    rows = []
    for rep in range(replicates):
        rng = np.random.default_rng(rep)
        g_ref = rng.normal(size=P)
        g_ref /= np.linalg.norm(g_ref)
        for b in BATCH_SIZES:
            rtg = g_ref + rng.normal(size=(M, P)) * np.sqrt(2 * b ** rtg_exponent / P)
            rloo = g_ref + rng.normal(size=(M, P)) * np.sqrt(rloo_variance(b) / P)
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
    rtg = result[result["estimator"] == "reinforce_rtg"].iloc[0]
    assert rtg["k_lo"] <= -1.0 <= rtg["k_hi"] and rtg["k_hi"] - rtg["k_lo"] < 0.1
    assert rtg["ustat_gap_lo"] <= 0.0 <= rtg["ustat_gap_hi"]  # 1/B is a U law too
    rloo = result[result["estimator"] == "rloo"].iloc[0]
    assert rloo["k_hi"] < -1  # faster than 1/B: the excess at small B
    assert rloo["ustat_gap_lo"] <= 0.0 <= rloo["ustat_gap_hi"]
    mean = result[result["estimator"] == "mean_baseline"].set_index("B")
    covered = [mean.loc[b, "rel_bias_lo"] <= 1 / b <= mean.loc[b, "rel_bias_hi"] for b in BATCH_SIZES]
    assert sum(covered) >= len(BATCH_SIZES) - 1, covered  # 95% intervals: most cover
    rloo_b = result[result["estimator"] == "rloo"].set_index("B")
    for b in BATCH_SIZES:
        assert mean.loc[b, "grad_variance"] / rloo_b.loc[b, "grad_variance"] == pytest.approx((1 - 1 / b) ** 2)
    assert mean.loc[2, "bias_distinguishable"] and not rloo_b["bias_distinguishable"].any()
    checks = pd.read_csv(tmp_path / "checks.csv")
    assert set(checks["kind"]) == {"tested", "by construction"} and checks["passed"].all()
    assert "\nVerdict: confirmed — tabular: k(reinforce_rtg) = " in text
    assert "| tested |" in text and "| by construction |" in text
    assert (tmp_path / "figures" / "batch_size_variance.png").stat().st_size > 5000


@pytest.mark.parametrize("change,failed", [
    ({"rtg_exponent": -0.5}, "Var(reinforce_rtg) ~ 1/B"),
    ({"rloo_variance": lambda b: b ** -1.5}, "Var(rloo) follows its U-statistic law")])
def test_the_verdict_flips_when_a_tested_law_fails(tmp_path, change, failed):
    """Same design as the confirmed case, one tested law broken: the verdict flips."""
    text = load_module(figures=False).analyze(synthetic_frame(**change), tmp_path, "synthetic")
    assert "\nVerdict: qualified" in text and f"failed: tabular: {failed}" in text


def test_checks_by_construction_do_not_count(tmp_path):
    """An unbiased batch mean breaks the 1/B bias identity, a by-construction check: shown
    as failed, but the verdict stays on the tested ones."""
    text = load_module(figures=False).analyze(synthetic_frame(mean_factor=lambda b: 1.0), tmp_path, "s")
    checks = pd.read_csv(tmp_path / "checks.csv").set_index("check")
    assert not checks.loc["mean_baseline relative bias at B=2 covers 1/B", "passed"]
    assert "\nVerdict: confirmed" in text


def test_the_u_statistic_law_predicts_the_inner_batch_sizes():
    m = load_module(figures=False)
    bs = np.array(BATCH_SIZES, float)
    var = ustat_variance(bs, 2.5)
    assert m.ustat_prediction_gap(bs, (1 / bs)[None, :]) == pytest.approx(0.0, abs=1e-12)  # 1/B
    assert m.ustat_prediction_gap(bs, var[None, :]) == pytest.approx(0.0, abs=1e-12)
    assert m.ustat_prediction_gap(bs, (bs ** -1.5)[None, :]) > 0.3  # not a U-statistic law


def test_two_replicates_are_inconclusive(tmp_path):
    m = load_module(figures=False)
    assert "\nVerdict: inconclusive" in m.analyze(synthetic_frame(replicates=2), tmp_path, "synthetic")
