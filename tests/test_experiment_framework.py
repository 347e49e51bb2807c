"""analysis.experiment and analysis.render: the protocol every experiment's analyze.py uses,
its shared per-run quantities, and the one interval formatter and table renderer."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pandas as pd
import pytest

from analysis import experiment as ex
from analysis.experiment import Experiment, Verdict, combined_word, config_of, inconclusive
from analysis.loader import flatten_config
from analysis.render import format_ci, format_columns, markdown_table, yes_no
from analysis.stats import Estimate
from pgvar.run import run_config_from

# ----------------------------------------------------------------------------- verdicts


def test_a_verdict_needs_a_known_word_and_a_reason():
    assert Verdict("refuted", "k = -0.5 [-0.6, -0.4].").line() == \
        "Verdict: refuted — k = -0.5 [-0.6, -0.4]."
    assert inconclusive("two seeds").line("habit") == "Verdict (habit): inconclusive — two seeds."
    with pytest.raises(ValueError, match="not one of"):
        Verdict("maybe", "why not")
    with pytest.raises(ValueError, match="needs its reason"):
        inconclusive(" ")


@pytest.mark.parametrize("words,want", [([], "inconclusive"), (["confirmed"] * 2, "confirmed"),
                                        (["refuted", "refuted"], "refuted"),
                                        (["confirmed", "refuted"], "qualified"),
                                        (["inconclusive", "confirmed"], "qualified")])
def test_combined_word(words, want):
    assert combined_word(words) == want


# ----------------------------------------------------------------------------- rendering


def test_format_ci_and_its_missing_values():
    assert format_ci(0.012345, 0.011, 0.014) == "0.0123 [0.011, 0.014]"
    assert format_ci(1.234, math.nan, 2.0) == "1.23"
    assert format_ci(math.nan, 0.0, 1.0) == "n/a"
    assert format_ci(math.nan, 0.0, 1.0, missing="-") == "-"
    assert format_ci(1.0, 0.5, 1.5, 2, style="f") == "1.00 [0.50, 1.50]"
    assert format_columns({"k": -1.0, "k_lo": -1.2, "k_hi": -0.8}, "k", 2) == "-1 [-1.2, -0.8]"
    # a lower end that only marks "above 0" (the smallest positive number) reads so
    assert format_ci(0.04, 5e-324, 0.06) == "0.04 [>0, 0.06]"
    assert format_ci(0.04, 1e-9, 0.06) == "0.04 [1e-09, 0.06]"  # a real, small end keeps its digits


def test_markdown_table_and_yes_no():
    assert markdown_table(["a", "b"], [[1, "x"], [2, "y"]]) == [
        "| a | b |", "| --- | --- |", "| 1 | x |", "| 2 | y |"]
    assert [yes_no(v) for v in (True, False, None, math.nan)] == ["yes", "no", "n/a", "n/a"]


def test_sqrt_estimate_clips_below_zero_and_keeps_nan():
    root = ex.sqrt_estimate(Estimate(0.04, -0.01, 0.09, 5))
    assert (root.value, root.lo, root.hi, root.n) == (pytest.approx(0.2), 0.0, pytest.approx(0.3), 5)
    assert math.isnan(ex.sqrt_estimate(Estimate(0.04, math.nan, math.nan, 1)).lo)


# ----------------------------------------------------------------------------- per-run quantities


def logged_rows(mean: np.ndarray, seeds: int = 4, var: float = 0.3, M: int = 32) -> pd.DataFrame:
    """Rows whose logged statistics are what an estimator with expected estimate ``mean``
    against g = (1, 0), variance ``var`` and M batches would log with no sampling noise."""
    g = np.array([1.0, 0.0])
    return pd.DataFrame([{"seed": s, "grad_variance": var, "n_estimates": M,
                          "snr": (mean @ mean + var / M) / var, "ref_norm": 1.0, "ref_se": 0.0,
                          "grad_bias_sq": float((mean - g) @ (mean - g))} for s in range(seeds)])


def test_direction_columns_recover_the_parts_along_and_across_the_gradient():
    rows = ex.direction_columns(logged_rows(np.array([0.6, 0.8])))
    assert rows["rel_proj"].to_numpy() == pytest.approx(0.6)
    assert rows["rel_perp_sq"].to_numpy() == pytest.approx(0.64)
    cos = ex.pooled_cosine(rows)
    assert cos.value == pytest.approx(0.6) and cos.n == 4


def test_pooled_cosine_difference_pairs_by_seed():
    turned = ex.direction_columns(logged_rows(np.array([0.6, 0.8])))
    straight = ex.direction_columns(logged_rows(np.array([2.0, 0.0])))
    assert ex.pooled_cosine_difference(turned, straight).value == pytest.approx(-0.4)


def test_config_of_rebuilds_a_flattened_config():
    config = {"env": {"name": "lqr", "horizon": 20, "gamma": 0.99, "action_dim": 2},
              "policy": {"hidden": [64, 64], "init_gain_scale": 0.3, "init_log_std": None},
              "seed": 7}
    row = pd.Series({**flatten_config(config), "env.length": math.nan, "grad_variance": 1.0})
    row["env.horizon"] = 20.0  # a column with missing values elsewhere holds floats
    rebuilt = config_of(row)
    assert rebuilt["env"] == config["env"] and rebuilt["seed"] == 7
    assert rebuilt["policy"] == {"hidden": [64, 64], "init_gain_scale": 0.3}
    assert run_config_from(rebuilt).policy.init_gain_scale == 0.3


# ----------------------------------------------------------------------------- the protocol


def small_variance_experiment() -> Experiment:
    """The minimal experiment of analysis.experiment's module docstring, run as written."""
    import analysis.experiment

    doc = analysis.experiment.__doc__
    example = doc[doc.index("A minimal experiment::") + len("A minimal experiment::"):
                  doc.index("A test feeds")]
    namespace: dict = {}
    exec(textwrap.dedent(example), namespace)  # noqa: S102 - the project's own docstring
    return namespace["EXPERIMENT"]


def frame_with(rel_variance: float, seeds: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame([{"run_id": f"r{s}-{step}", "env": "tabular", "estimator": "reinforce",
                          "seed": s, "step": step, "grad_variance": 1.0,
                          "grad_rel_variance": rel_variance * (1 + 0.1 * rng.normal())}
                         for s in range(seeds) for step in (0,)])


@pytest.mark.parametrize("rel_variance,seeds,word", [(0.5, 6, "confirmed"), (2.0, 6, "refuted"),
                                                     (0.5, 2, "inconclusive")])
def test_the_documented_example_decides_from_its_numbers(tmp_path, rel_variance, seeds, word):
    text = small_variance_experiment().analyze(frame_with(rel_variance, seeds), tmp_path, "test")
    assert f"\nVerdict: {word} — " in text and (tmp_path / "result.md").read_text() == text
    assert pd.read_csv(tmp_path / "result.csv")["n"].iloc[0] == seeds


def test_runs_without_measurements_are_inconclusive_with_the_reason(tmp_path):
    frame = frame_with(0.5, 3).assign(estimator="ppo")
    text = small_variance_experiment().analyze(frame, tmp_path, "test")
    assert "Verdict: inconclusive — the runs hold no measurement" in text


def test_replicate_resamples_share_draws_and_percentile_ends_skip_nan():
    idx = ex.replicate_resamples(5, seed=3, n_resamples=400)
    assert idx.shape == (400, 5) and idx.min() == 0 and idx.max() == 4
    assert (ex.replicate_resamples(5, seed=3, n_resamples=400) == idx).all()
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    means = values[idx].mean(axis=1)
    lo, hi = ex.percentile_ends(np.append(means, np.nan), n=5)
    assert lo < 3.0 < hi and 1.0 < lo and hi < 5.0
    # wider than the plain 95% percentiles: the ends are expanded for 5 replicates
    assert hi - lo > np.diff(np.percentile(means, [2.5, 97.5]))[0]


# ----------------------------------------------------------------------------- findings


def test_only_tested_findings_make_the_headline():
    tested = ex.Finding("a", "confirmed", "x = 1")
    check = ex.Finding("b", "refuted", "identity broken", ex.BY_CONSTRUCTION)
    extra = ex.Finding("c", "refuted", "not the text's", ex.EXTRA)
    number = ex.Finding("m", "measured", "argmin 0.9", ex.MEASURED)
    assert ex.headline_verdict([tested, check, extra, number]).word == "confirmed"
    assert ex.headline_verdict([tested, ex.Finding("d", "refuted", "y")]).word == "qualified"
    assert ex.headline_verdict([check, extra, number]).word == "inconclusive"
    lines = ex.findings_section([tested, check], Verdict("confirmed", "z"))
    assert "| b | by construction | no | **refuted** | identity broken |" in lines
    assert lines[-2] == "Verdict: confirmed — z."
    with pytest.raises(ValueError, match="not one of"):
        ex.Finding("e", "confirmed", "x", "obvious")
    with pytest.raises(ValueError, match="cannot have the word"):
        ex.Finding("f", "measured", "x", ex.TESTED)
    with pytest.raises(ValueError, match="cannot have the word"):
        ex.Finding("g", "confirmed", "x", ex.MEASURED)


def test_an_undecided_check_is_named_and_qualifies_a_confirmation():
    yes = ex.check("lqr", "k = -1 in the interval", True, "k = -1.0 [-1.1, -0.9]")
    undecided = ex.check("cartpole", "k = -1 in the interval", None, "2 seeds")
    assert (yes.word, undecided.word, undecided.label) == (
        "confirmed", "inconclusive", "cartpole: k = -1 in the interval")
    assert ex.headline_verdict([yes, undecided], "k = -1.0").word == "qualified"  # not shown everywhere
    failed = ex.check("tabular", "k = -1 in the interval", False, "k = -0.5 [-0.6, -0.4]")
    verdict = ex.headline_verdict([yes, undecided, failed], "k per env")
    assert verdict.word == "qualified" and "tabular: k = -1 in the interval: refuted" in verdict.reason
    assert "cartpole" in verdict.reason  # the undecided one is named
    assert ex.headline_verdict([failed, undecided], "k").word == "refuted"
    assert ex.headline_verdict([undecided], "k").word == "inconclusive"
    lines = ex.findings_table([yes, undecided])
    assert lines[0] == "| scope | claim | class | counted | verdict | reason |"
    assert list(ex.findings_frame([yes])["verdict"]) == ["confirmed"]


@pytest.mark.parametrize("words, want", [
    (["lower", "lower"], "confirmed"), (["lower", "higher"], "qualified"),
    (["higher", "indistinguishable"], "refuted"), (["inconclusive"], "inconclusive"),
    ([], "inconclusive")])
def test_share_word(words, want):
    assert ex.share_word(words, "lower") == want


def test_geometric_mean_ratio_and_side_of():
    r = ex.geometric_mean_ratio({s: 2.0 * (1 + 0.01 * s) for s in range(6)},
                                {s: 1.0 + 0.01 * s for s in range(6)})
    assert r.value == pytest.approx(2.0) and r.lo == pytest.approx(2.0) and r.n == 6
    assert ex.side_of(r, 1.0, "below", "above") == "above"
    few = ex.geometric_mean_ratio({0: 1.0, 1: 2.0}, {0: 1.0, 1: 1.0, 2: 5.0})
    assert few.n == 2 and math.isnan(few.lo) and ex.side_of(few, 1.0, "b", "a") == "inconclusive"
    assert math.isnan(ex.geometric_mean_ratio({0: -1.0}, {0: 1.0}).value)


def test_frame_table_formats_intervals_values_and_missing_ones():
    from analysis.render import frame_table

    rows = [{"name": "a", "x": 1.0, "x_lo": 0.5, "x_hi": 2.0, "f": 0.12345, "ok": True},
            {"name": "b", "f": float("nan"), "ok": False}]
    lines = frame_table(rows, {"row": "name", "x, 95% CI": "x", "f": ("f", 2), "ok?": "ok",
                               "twice": lambda r: r["name"] * 2}, missing="—")
    assert lines == ["| row | x, 95% CI | f | ok? | twice |", "| --- | --- | --- | --- | --- |",
                     "| a | 1 [0.5, 2] | 0.12 | yes | aa |", "| b | — | — | no | bb |"]
    assert frame_table(pd.DataFrame(), {"x": "x"}) == ["(no data)"]


def test_logged_bool_and_the_exact_objective_at_a_parameter_vector():
    from torch.nn.utils import parameters_to_vector

    assert ex.logged_bool("False") is False and ex.logged_bool(True) is True
    assert ex.logged_bool(float("nan")) is None
    env, policy = ex_initial_tabular()
    theta = parameters_to_vector(policy.parameters()).detach()
    before = float(env.exact_objective(policy).detach())
    assert ex.exact_objective_at(env, policy, theta) == pytest.approx(before)
    assert ex.exact_objective_at(env, policy, theta + 1.0) == pytest.approx(before)  # softmax shift
    ex.exact_objective_at(env, policy, theta * 0)
    assert float(env.exact_objective(policy).detach()) == pytest.approx(before)  # untouched


def ex_initial_tabular():
    from pgvar.run import initial_env_and_policy

    return initial_env_and_policy({"env": {"name": "tabular"}, "policy": {"init_scale": 1.0},
                                   "seed": 0})
