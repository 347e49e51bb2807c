"""The helpers several experiments share (end of analysis/experiment.py, analysis.stats,
analysis.calibration): each checked against a case whose answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import experiment as ex
from analysis.calibration import in_percent
from analysis.stats import Estimate, proportion_ci


def test_log_linear_fit_recovers_a_noise_free_power_law_and_brackets_a_noisy_one():
    grid = [(T, d, seed) for T in (5, 10, 20, 40) for d in (1, 2, 4) for seed in range(6)]
    rows = pd.DataFrame(grid, columns=["T", "d", "seed"])
    noise = np.exp(np.random.default_rng(0).normal(0, 0.2, len(rows)))  # a factor per cell
    exact = ex.log_linear_fit(rows.assign(y=3.0 * rows["T"] ** 1.5 / rows["d"]), "y", {"a": "T", "b": "d"})
    assert exact["a"] == pytest.approx(1.5) and exact["b"] == pytest.approx(-1.0)
    assert exact["c"] == pytest.approx(math.log(3.0)) and exact["r2"] == pytest.approx(1.0)
    noisy = ex.log_linear_fit(rows.assign(y=noise * rows["T"] ** 1.5 / rows["d"]), "y",
                              {"a": "T", "b": "d"})
    assert noisy["a_lo"] <= 1.5 <= noisy["a_hi"] and noisy["b_lo"] <= -1.0 <= noisy["b_hi"]
    alone = ex.log_linear_fit(rows[rows["seed"] == 0].assign(y=1.0 * rows["T"]), "y", {"a": "T", "b": "d"})
    assert math.isnan(alone["a_lo"]) and alone["a"] == pytest.approx(1.0)  # one replicate: no interval


def test_interval_check_is_undecided_without_an_interval_or_replicates():
    record = {"x": 0.5, "x_lo": 0.2, "x_hi": 0.8}
    below_one = lambda lo, hi: hi < 1
    assert ex.interval_check(record, "x", below_one) is True
    assert ex.interval_check(record, "x", below_one, n=2, min_n=3) is None
    assert ex.interval_check({**record, "x_lo": math.nan}, "x", below_one) is None
    assert ex.estimate_of(record, "x", 4) == Estimate(0.5, 0.2, 0.8, 4)
    assert ex.estimate_of(record, "x").excludes(0.0) and not ex.estimate_of(record, "x").excludes(0.5)


def test_closeness_and_reciprocal_read_a_ratio_interval():
    assert ex.closeness(Estimate(1.0, 0.9, 1.1, 5), 1.25) == "close"
    assert ex.closeness(Estimate(2.0, 1.5, 2.5, 5), 1.25) == "not close"
    assert ex.closeness(Estimate(1.2, 1.0, 1.4, 5), 1.25) == "inconclusive"
    assert ex.closeness(Estimate(1.0, math.nan, math.nan, 1), 1.25) == "inconclusive"
    inverse = ex.reciprocal(Estimate(0.5, 0.25, 1.0, 4), numerator=8)
    assert (inverse.value, inverse.lo, inverse.hi) == (16.0, 8.0, 32.0)
    assert ex.reciprocal(Estimate(0.5, -0.1, 1.0, 4)).hi == math.inf  # the interval reaches 0


def test_proportion_ci_is_clopper_pearson():
    none = proportion_ci(0, 10)
    assert none.value == 0.0 and none.lo == 0.0
    assert none.hi == pytest.approx(1 - 0.025 ** (1 / 10))  # the exact upper end at k = 0
    half = proportion_ci(5, 10)
    assert half.lo < 0.5 < half.hi and half.hi == pytest.approx(1 - half.lo)


def test_runs_are_paired_and_counted_once():
    rows = pd.DataFrame({"run_dir": ["a", "a", "b", "c", "d"], "cfg": [1, 1, 1, 2, 2],
                         "seed": [0, 0, 0, 0, 1], "step": [0, 1, 0, 0, 0]})
    kept = ex.one_run_each(rows, ["cfg", "seed"])
    assert list(kept["run_dir"]) == ["a", "a", "c", "d"]  # b re-ran a's configuration
    runs = pd.DataFrame({"seed": [0, 0, 1, 2, 2], "arm": ["x", "y", "x", "x", "y"],
                         "v": [1.0, 2.0, 3.0, 4.0, 8.0]})
    wide = ex.paired_columns(runs, ["seed"], "arm", ["v"], ("x", "y"))
    assert list(wide["seed"]) == [0, 2] and list(wide["v_y"] / wide["v_x"]) == [2.0, 2.0]
    assert ex.paired_columns(runs, ["seed"], "arm", ["v"], ("x", "z")).empty
    ratio = ex.paired_geometric_ratio(runs[runs["arm"] == "y"], runs[runs["arm"] == "x"], "v", 2)
    assert ratio.value == pytest.approx(2.0) and ratio.n == 2


def test_reference_label_names_a_monte_carlo_reference():
    exact = pd.DataFrame({"ref_se": [0.0, 0.0]})
    assert ex.reference_label(exact) == "exact" and ex.reference_estimator(exact) is None
    mc = pd.DataFrame({"ref_se": [0.1, 0.2], "ref_episodes": [4000, 4000],
                       "training.reference.estimator": ["rloo", "rloo"]})
    assert ex.reference_label(mc) == "Monte Carlo (4000 episodes of rloo)"


def test_relative_mse_takes_out_the_reference_noise():
    rows = pd.DataFrame({"grad_mse": [5.0, 5.0], "ref_se": [1.0, np.nan], "ref_norm": [2.0, 2.0]})
    assert list(ex.relative_mse(rows)) == [1.0, 1.25]


def test_in_percent_scales_only_the_shares():
    table = pd.DataFrame({"M": [16], "bias_sq_coverage": [0.95], "bias_sq_coverage_lo": [0.9],
                          "false_positive": [0.02], "tail_index_median": [1.5]})
    shown = in_percent(table)
    assert shown["bias_sq_coverage"][0] == pytest.approx(95.0) and shown["M"][0] == 16
    assert shown["bias_sq_coverage_lo"][0] == pytest.approx(90.0)
    assert shown["false_positive"][0] == pytest.approx(2.0) and shown["tail_index_median"][0] == 1.5
