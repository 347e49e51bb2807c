"""The framework's generic helpers that experiments share: interval tests on summary
records, per-replicate bootstraps and curves, per-run reductions, exact gains, and the
renderers of estimates and titled tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import experiment as ex
from analysis.render import format_estimate, frame_table, table_sections
from analysis.stats import Estimate


def test_interval_tests_on_a_record_and_on_a_table():
    record = {"k": -0.9, **{f"k_{end}": v for end, v in (("lo", -1.1), ("hi", -0.7))}}
    assert ex.estimate_of(record, "k") == Estimate(-0.9, -1.1, -0.7, 0)
    assert ex.estimate_columns("k", ex.estimate_of(record, "k")) == record
    assert ex.in_interval(record, "k", -1) and not ex.in_interval(record, "k", 0)
    assert ex.interval_check(record, "k", ex.holds(-1), n=5, min_n=3) is True
    assert ex.interval_check(record, "k", ex.holds(0), n=5, min_n=3) is False
    assert ex.interval_check(record, "k", ex.holds(-1), n=2, min_n=3) is None  # too few
    assert [ex.interval_sign(record, "k", at) for at in (-2, -1, 0)] == [1, 0, -1]
    assert ex.interval_sign({}, "k") == 0  # no interval: no side
    table = pd.DataFrame({"g_lo": [-1.0, 0.5, math.nan], "g_hi": [1.0, 2.0, 1.0]})
    assert list(ex.in_interval(table, "g", 0)) == [True, False, False]


def test_bootstrap_estimates_give_one_estimate_per_entry_of_the_statistic():
    rng = np.random.default_rng(0)
    w = rng.normal([1.0, 5.0], 0.1, size=(12, 2))
    est = ex.bootstrap_estimates(w, lambda x: x.mean(axis=0))
    assert [e.n for e in est] == [12, 12]
    for e, want in zip(est, (1.0, 5.0)):
        assert e.value == pytest.approx(w[:, int(want > 1)].mean())
        assert e.lo < e.value < e.hi and e.hi - e.lo < 0.3 and e.lo < want < e.hi
    one = ex.bootstrap_estimates(w[:1], lambda x: x.mean(axis=0))
    assert all(math.isnan(e.lo) and math.isnan(e.hi) and e.n == 1 for e in one)


def test_paired_matrix_keys_replicates_by_several_columns_and_drops_incomplete_ones():
    runs = pd.DataFrame([{"instance": i, "seed": s, "B": b, "v": 10 * i + s + b / 100}
                         for i in (0, 1) for s in (0, 1) for b in (2, 4)
                         if (i, s, b) != (1, 1, 4)])
    xs, values = ex.paired_matrix(runs, "B", "v", ["instance", "seed"])
    assert list(xs) == [2.0, 4.0]
    assert values.tolist() == [[0.02, 0.04], [1.02, 1.04], [10.02, 10.04]]


def test_curve_argmin_is_an_estimate_with_the_share_of_each_x():
    xs = np.array([0.0, 0.5, 1.0])
    values = np.array([[3.0, 1.0, 2.0]] * 6) + np.linspace(0, 0.1, 6)[:, None]
    best, shares = ex.curve_argmin(xs, values)
    assert best == Estimate(0.5, 0.5, 0.5, 6) and shares == {0.5: 1.0}
    few, none = ex.curve_argmin(xs, values[:2])
    assert few.value == 0.5 and math.isnan(few.lo) and none == {}


def test_mean_columns_names_its_columns_as_asked():
    runs = pd.DataFrame({"grad_rel_variance": [1.0, 2.0, 3.0]})
    named = ex.mean_columns(runs, {"rel_variance": "grad_rel_variance"})
    assert list(named) == ["rel_variance", "rel_variance_lo", "rel_variance_hi"]
    assert named["rel_variance"] == pytest.approx(2.0)
    assert ex.mean_columns(runs, ["grad_rel_variance"])["grad_rel_variance"] == pytest.approx(2.0)


def test_paired_geometric_ratio_pairs_runs_by_seed():
    runs = pd.DataFrame({"seed": [3, 1, 2, 0], "d": [8.0, 4.0, 6.0, 2.0]})
    base = pd.DataFrame({"seed": [0, 1, 2, 3, 9], "d": [1.0, 2.0, 3.0, 4.0, 100.0]})
    r = ex.paired_geometric_ratio(runs, base, "d")
    assert r.value == pytest.approx(2.0) and r.n == 4 and r.lo == pytest.approx(2.0)


def test_measured_rows_carry_the_previous_iterations_value():
    frame = pd.DataFrame([
        {"run_dir": f"/nonexistent/run{r}", "run_id": f"run{r}", "seed": r, "env": "tabular",
         "step": step, "critic_loss": 10.0 * r + step,
         "grad_variance": 1.0 + step + r if step % 2 == 0 else math.nan,
         "grad_rel_variance": 0.5 * (1 + step) if step % 2 == 0 else math.nan}
        for r in (0, 1) for step in (3, 2, 1, 0)])  # logged out of order
    rows = ex.measured_with_previous(frame, "critic_loss", "fit_loss").sort_values(
        ["run_dir", "step"])
    assert rows["step"].tolist() == [0, 2, 0, 2]
    assert rows["fit_loss"].tolist()[1::2] == [1.0, 11.0]  # the loss logged at step 1
    assert rows["fit_loss"].isna().tolist()[::2] == [True, True]  # nothing before step 0
    runs = ex.per_run_table(rows, first=["env"], mean=["fit_loss"])
    assert runs["env"].tolist() == ["tabular"] * 2 and runs["fit_loss"].tolist() == [1.0, 11.0]
    assert runs["grad_variance"].tolist() == [2.0, 3.0] and runs["seed"].tolist() == [0, 1]


def test_exact_gains_measure_steps_on_the_exact_objective():
    import torch

    from pgvar.reference import exact_reference
    from pgvar.run import initial_env_and_policy

    env, policy = initial_env_and_policy({"env": {"name": "tabular"},
                                          "policy": {"init_scale": 1.0}, "seed": 0})
    g = exact_reference(env, policy).grad.double()
    n = g.numel()
    gains = ex.exact_gains(env, policy, {"none": torch.zeros(2, n, dtype=torch.float64),
                                         "along": 1e-3 * g[None, :], "against": -1e-3 * g[None, :]})
    assert gains["none"] == pytest.approx(0.0, abs=1e-12)
    # first order: a small step eps along the gradient gains eps * |g|^2
    assert gains["along"] == pytest.approx(1e-3 * float(g @ g), rel=0.05)
    assert gains["against"] == pytest.approx(-1e-3 * float(g @ g), rel=0.05)


def test_estimates_and_titled_tables_render():
    assert format_estimate(Estimate(1.0, 0.5, 2.0, 3)) == "1 [0.5, 2]"
    assert format_estimate(Estimate(1.0, math.nan, math.nan, 1), sign=True) == "+1"
    rows = [{"a": 1, "b": "x"}]
    assert frame_table(rows, ["a", "b"]) == frame_table(rows, {"a": "a", "b": "b"})
    assert table_sections([("One", rows, ["a"]), ("Two", [], ["a"])]) == [
        "## One", "", "| a |", "| --- |", "| 1 |", "", "## Two", "", "(no data)", ""]
