"""The table from paired measurements (paired.csv), on synthetic runs with known truths.

``analysis.synthetic.write_paired_sweep`` writes runs in pgvar-run's paired format: every
row of a step drawn from the same episodes (shared noise), so paired ratios are tight.
The loader must give one row per (run, step, estimator, critic) and fall back to
metrics.csv (with a warning) on a damaged paired.csv; the table must score every row at
the same checkpoints, keep the unfitted-critic checkpoint apart, and every verdict must
flip when the data say the opposite.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from analysis import claims as cl
from analysis import table as tb
from analysis.loader import (
    PairedWarning,
    StaleRowsWarning,
    load_runs,
    measured_rows,
    with_run_reliability,
)
from analysis.stats import Estimate
from analysis.synthetic import PairedTruth, TrueEstimator, write_paired_sweep, write_sweep
from pgvar import provenance
from pgvar.stats import (
    pooled_cross_kurtosis,
    pooled_spread_kurtosis,
    pooled_tail_index,
    run_intervals_reliable,
    variance_interval_from,
    variance_ratio_interval_from,
)

SEEDS = range(8)
BONFERRONI = 2.87 / 1.96  # a 95% interval's half-width scaled to 1 - 0.05/12 (normal)
N_ITERS, EVERY = 7, 2  # measured steps 0, 2, 4, 6: the first is apart, three in the headline

# Variances relative to vanilla's 10: rtg 0.4, episode-mean baseline 0.6, value baseline 0.1.
# Actor-critic's bias falls with the critic's data (0.4 -> 0.05) and is 0 with the exact V;
# GAE's bias falls with lambda at the fitted critic while its variance rises, and is 0 at
# every lambda with the exact V.
TRUTHS = [
    PairedTruth("reinforce", 0.0, 10.0),
    PairedTruth("reinforce_rtg", 0.0, 4.0),
    PairedTruth("mean_baseline_episode", 0.0, 6.0),
    PairedTruth("value_baseline", 0.0, 1.0, "train", 0.3),
    PairedTruth("actor_critic", 0.2, 0.05, "train", 0.2, first_bias=1.0),
    PairedTruth("actor_critic", 0.4, 0.05, "fit:32", 0.5),
    PairedTruth("actor_critic", 0.05, 0.05, "fit:320", 0.1),
    PairedTruth("actor_critic", 0.0, 0.05, "exact", 0.0),
    PairedTruth("gae(lam=0.5)", 0.3, 0.08, "fit:32", 0.5),
    PairedTruth("gae", 0.02, 0.5, "fit:32", 0.5),
    PairedTruth("gae(lam=0.5)", 0.0, 0.08, "exact", 0.0),
    PairedTruth("gae", 0.0, 0.5, "exact", 0.0),
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    write_paired_sweep(root, TRUTHS, SEEDS, n_iters=N_ITERS, measure_every=EVERY)
    return root


@pytest.fixture(scope="module")
def frame(sweep) -> pd.DataFrame:
    return load_runs(sweep)[0]


@pytest.fixture(scope="module")
def table(frame) -> pd.DataFrame:
    return tb.build_table(frame)


def _row(table: pd.DataFrame, label: str, scope: str = tb.HEADLINE) -> pd.Series:
    rows = table[(table["label"] == label) & (table["scope"] == scope)]
    assert len(rows) == 1, (label, list(table["label"]))
    return rows.iloc[0]


# ----------------------------------------------------------------------------- loader


def test_loader_gives_one_row_per_run_step_estimator_and_critic(frame):
    rows = measured_rows(frame)
    assert len(rows) == len(SEEDS) * 4 * len(TRUTHS)
    assert not rows.duplicated(["run_dir", "step", "estimator_label", "critic"]).any()
    # the run's own columns travel with every row
    assert {"env.name", "seed", "training.iterations", "return_mean"} <= set(rows.columns)
    # the MEASURED estimator is the row's identity, the training one a column
    assert set(rows["trained_with"]) == {"value_baseline"}
    gae = rows[rows["estimator_label"] == "gae(lam=0.5)"]
    assert set(gae["estimator"]) == {"gae"} and set(gae["lam"]) == {0.5}
    assert set(rows.loc[rows["estimator_label"] == "gae", "lam"]) == {0.95}  # the default
    training = rows[rows["is_training"]]
    assert set(zip(training["estimator"], training["critic"])) == {("value_baseline", "train")}
    # each series (run, estimator, critic) carries one flag judged from all its steps
    for _, series in rows.groupby(["run_dir", "estimator_label", "critic"]):
        kappa = pooled_spread_kurtosis(series["spread_z_mean"], series["spread_z_sq_mean"])
        expected = run_intervals_reliable(kappa, int(series["n_estimates"].min()))
        assert set(series["ci_reliable_run"]) == {expected}
        # the kurtosis of all its steps also sets each step's variance interval
        assert np.allclose(series["kurtosis_run"], kappa)
        row = series.iloc[-1]
        assert np.allclose([row["grad_variance_run_lo"], row["grad_variance_run_hi"]],
                           variance_interval_from(row["grad_variance"], int(row["n_estimates"]), kappa))


def test_loader_gives_each_step_its_variance_ratio_to_the_training_estimator(frame):
    """var_ratio_training: tr Cov over the training row's on the same batches, with the
    interval from the pooled kurtoses of the two series (their steps together), which
    covers the true ratio (each truth's variance over value_baseline's 1.0) at its level."""
    rows = measured_rows(frame)
    training = rows[rows["is_training"]].set_index(["run_dir", "step"])
    series = rows[(rows["estimator_label"] == "reinforce")]
    for run_dir, one in series.groupby("run_dir"):
        mine = training.loc[run_dir]
        assert np.allclose(one["var_ratio_training"],
                           one["grad_variance"].to_numpy() / mine.loc[one["step"], "grad_variance"].to_numpy())
        kappas = (pooled_spread_kurtosis(one["spread_z_mean"], one["spread_z_sq_mean"]),
                  pooled_spread_kurtosis(mine["spread_z_mean"], mine["spread_z_sq_mean"]),
                  pooled_cross_kurtosis(one["spread_z_mean"], mine.loc[one["step"], "spread_z_mean"],
                                        one["spread_z_cross"]))
        r = one.iloc[0]
        assert np.allclose([r["var_ratio_training_lo"], r["var_ratio_training_hi"]],
                           variance_ratio_interval_from(r["var_ratio_training"], int(r["n_estimates"]), *kappas))
    assert np.allclose(rows.loc[rows["is_training"], ["var_ratio_training", "var_ratio_training_lo",
                                                     "var_ratio_training_hi"]], 1.0)
    others = rows[~rows["is_training"]]
    truth = others.apply(lambda r: next(t.variance for t in TRUTHS if t.spec == r["estimator_label"]
                                        and t.critic == r["critic"]), axis=1) / 1.0
    covered = ((others["var_ratio_training_lo"] <= truth) & (truth <= others["var_ratio_training_hi"])).mean()
    n = len(others)
    assert abs(covered - 0.95) <= 0.02 + 3 * math.sqrt(0.95 * 0.05 / n), covered


def test_logs_from_before_the_spread_moments_fall_back_to_the_mean_tail_index(frame):
    derived = ["ci_reliable_run", "kurtosis_run", "grad_variance_run_lo", "grad_variance_run_hi",
               "var_ratio_training", "var_ratio_training_lo", "var_ratio_training_hi"]
    old = measured_rows(frame).drop(columns=derived + ["spread_z_mean", "spread_z_sq_mean",
                                                        "spread_z_cross"])
    rows = with_run_reliability(old)
    assert "var_ratio_training" not in rows.columns  # no cross moments: no paired ratio
    for _, series in rows.groupby(["run_dir", "estimator_label", "critic"]):
        assert np.allclose(series["kurtosis_run"], pooled_tail_index(series["tail_index"]))
        assert np.isfinite(series["grad_variance_run_lo"]).all()


def test_a_run_without_paired_csv_keeps_its_metrics_rows(tmp_path):
    write_sweep(tmp_path, [TrueEstimator("reinforce", 0.0, 1.0)], range(2))
    rows = measured_rows(load_runs(tmp_path)[0])
    assert set(rows["source"]) == {"metrics"} and set(rows["critic"]) == {""}
    assert set(rows["trained_with"]) == {"reinforce"} and rows["is_training"].all()


@pytest.mark.parametrize("damage", ["truncate", "drop_column", "bad_number"])
def test_a_damaged_paired_csv_warns_and_falls_back_to_metrics(tmp_path, damage):
    jobs = write_paired_sweep(tmp_path, TRUTHS[:4], range(5), n_iters=N_ITERS, measure_every=EVERY)
    path = jobs[0] / "paired.csv"
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "drop_column":
        frame = pd.read_csv(path).drop(columns=["grad_variance"])
        frame.to_csv(path, index=False)
    else:  # the step of the third row
        lines = text.splitlines(keepends=True)
        lines[3] = "x" + lines[3][lines[3].index(","):]
        path.write_text("".join(lines))
    df, _ = load_runs(tmp_path)
    with pytest.warns(PairedWarning, match=str(path)):
        rows = measured_rows(df)
    damaged = rows[rows["run_dir"] == str(jobs[0])]
    assert set(damaged["source"]) == {"metrics"}  # the training estimator's rows, kept
    assert len(damaged) == 4 and set(rows.loc[rows["run_dir"] != str(jobs[0]), "source"]) == {"run"}
    if damage == "truncate":
        with pytest.warns(PairedWarning):
            table = tb.build_table(df)  # the analysis goes on
        assert "reinforce" in set(table["label"])


def test_rows_measured_by_other_code_warn_with_the_runs_and_the_fix(tmp_path):
    jobs = write_paired_sweep(tmp_path, TRUTHS[:4], range(3), n_iters=N_ITERS, measure_every=EVERY)
    mine = provenance.pgvar_digest(provenance.code_record())
    for job, code in zip(jobs, ["", mine, "0123abcd0123abcd"]):
        frame = pd.read_csv(job / "paired.csv")
        frame["code"] = code  # older files: empty; this code; other code (pgvar-measure)
        frame.to_csv(job / "paired.csv", index=False)
    df, _ = load_runs(tmp_path)
    with pytest.warns(StaleRowsWarning, match=r"16 of 48 paired measurement rows \(in 1 run\(s\): "
                      + re.escape(str(jobs[2])) + r"\).*pgvar-measure"):
        rows = measured_rows(df)
    assert len(rows) == 48  # the rows are still analysed
    (jobs[2] / "paired.csv").write_text((jobs[1] / "paired.csv").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleRowsWarning)
        measured_rows(load_runs(tmp_path)[0])


def test_a_damaged_extra_cell_reads_as_missing(tmp_path):
    """Extra columns are not validated on load; a damaged one must not stop the analysis."""
    jobs = write_paired_sweep(tmp_path, TRUTHS[:4], range(2), n_iters=N_ITERS, measure_every=EVERY)
    frame = pd.read_csv(jobs[0] / "paired.csv")
    frame["spread_z_mean"] = frame["spread_z_mean"].astype(object)
    frame.loc[2, "spread_z_mean"] = "x"
    frame.to_csv(jobs[0] / "paired.csv", index=False)
    rows = measured_rows(load_runs(tmp_path)[0])
    assert rows["kurtosis_run"].notna().all() and rows["grad_variance_run_lo"].notna().all()


# ----------------------------------------------------------------------------- table


def test_rows_are_scored_at_the_same_checkpoints_and_the_unfitted_one_apart(table, frame):
    rows = tb.measurement_rows(frame)
    assert set(rows.loc[~rows["critic_fitted"], "step"]) == {0}
    headline = table[table["scope"] == tb.HEADLINE]
    assert set(headline["n_measurements"]) == {len(SEEDS) * 3}  # steps 2, 4, 6 of every run
    # the training critic at its initialisation (bias 1.0) is shown apart, not averaged in
    unfitted = _row(table, "actor_critic [train]", tb.UNFITTED)
    fitted = _row(table, "actor_critic [train]")
    assert unfitted["rel_bias_lo"] > 0.8 and fitted["rel_bias_hi"] < 0.3


@pytest.mark.parametrize("truth", TRUTHS, ids=lambda t: f"{t.spec}-{t.critic}")
def test_paired_variance_ratio_recovers_the_truth(table, truth):
    label = tb.row_label({"estimator": truth.name, "critic": truth.critic,
                          "lam": 0.5 if "0.5" in truth.spec else 0.95},
                         ["env", "estimator", "critic"] + (["lam"] if truth.name == "gae" else []))
    row = _row(table, label)
    ratio = truth.variance / TRUTHS[0].variance
    assert row["var_ratio_pairing"] == "run, step"
    # 95% intervals, widened to Bonferroni's level over the 12 truths (z 2.87 / 1.96)
    lo, value, hi = row["var_ratio_lo"], row["var_ratio"], row["var_ratio_hi"]
    assert value * (lo / value) ** BONFERRONI <= ratio <= value * (hi / value) ** BONFERRONI, label
    lo, value, hi = row["bias_sq_lo"], row["bias_sq"], row["bias_sq_hi"]
    assert value - BONFERRONI * (value - lo) <= truth.bias ** 2 <= value + BONFERRONI * (hi - value)


def test_pairwise_separations_rank_the_rows(table):
    pairs = tb.separations(table)
    head = pairs[pairs["scope"] == tb.HEADLINE]
    n_rows = (table["scope"] == tb.HEADLINE).sum()
    assert len(head) == n_rows * (n_rows - 1) // 2
    # vanilla's variance is separated above every other row: the highest rank
    assert _row(table, "reinforce")["var_rank"] == n_rows
    assert "reinforce" not in _row(table, "actor_critic [fit:32]")["var_ties"]
    # actor-critic's critics share one variance: their paired ratios contain 1 (95%
    # intervals widened to Bonferroni's level over the six pairs)
    same = head[head["a"].str.startswith("actor_critic") & head["b"].str.startswith("actor_critic")]
    assert len(same) == 6  # train, fit:32, fit:320, exact
    widen = 2.64 / 1.96  # 1 - 0.05/6
    for _, p in same.iterrows():
        assert p["ratio"] * (p["lo"] / p["ratio"]) ** widen <= 1 <= p["ratio"] * (p["hi"] / p["ratio"]) ** widen


def test_critic_rows_state_their_data_error_and_trend(table):
    few, many = _row(table, "actor_critic [fit:32]"), _row(table, "actor_critic [fit:320]")
    assert few["critic_episodes"] == 32 and math.isclose(few["critic_error"], 0.5)
    # "small (bootstrap) bias" is a function of critic quality: fails at 32 episodes, holds at 320
    assert "bias (disagrees)" in few["agreement_detail"]
    assert "bias (agrees)" in many["agreement_detail"]
    assert few["critic_trend"].startswith("agrees")
    assert "critic (data, error)" in tb.critic_table(table).columns


def test_mean_baseline_episode_carries_the_source_claim(table):
    row = _row(table, "mean_baseline_episode")
    assert (row["seed_bias"], row["seed_variance"]) == ("0", "moderate")
    assert row["variant"] == "REINFORCE with mean baseline"


# ----------------------------------------------------------------------------- verdicts flip


def test_tunable_agrees_with_a_fitted_critic_and_fails_with_the_exact_v(table):
    fitted = _row(table, "gae (lam=0.5) [fit:32]")
    exact = _row(table, "gae (lam=0.5) [exact]")
    assert "bias (agrees)" in fitted["agreement_detail"]
    assert "bias (disagrees)" in exact["agreement_detail"]
    assert "nothing to tune" in exact["agreement_detail"]


def test_vanilla_very_high_is_tested_against_the_other_source_rows(table, tmp_path):
    assert "variance (agrees)" in _row(table, "reinforce")["agreement_detail"]
    assert _row(table, "reinforce")["verdict_kind"] == cl.TESTED
    # a source row with MORE variance than vanilla flips it
    louder = [PairedTruth("reinforce", 0.0, 1.0), PairedTruth("mean_baseline_episode", 0.0, 3.0)]
    write_paired_sweep(tmp_path, louder, SEEDS, n_iters=N_ITERS, measure_every=EVERY,
                       trained_with="reinforce")
    flipped = tb.build_table(load_runs(tmp_path)[0])
    assert "variance (disagrees)" in _row(flipped, "reinforce")["agreement_detail"]


def test_a_circular_reference_is_not_tested_and_not_counted(tmp_path):
    truths = [PairedTruth("reinforce", 0.0, 10.0), PairedTruth("reinforce_rtg", 0.0, 4.0, circular=True)]
    write_paired_sweep(tmp_path, truths, SEEDS, n_iters=N_ITERS, measure_every=EVERY, ref_se=0.05,
                       trained_with="reinforce")
    table = tb.build_table(load_runs(tmp_path)[0])
    row = _row(table, "reinforce_rtg")
    assert "not tested (circular reference" in row["agreement_detail"]
    assert row["verdict_kind"] == f"bias {cl.BY_CONSTRUCTION}"
    assert row["agreement"] == "agrees"  # from the tested variance part alone
    compact = tb.compact_table(table)
    assert compact.set_index("estimator").loc["reinforce_rtg", "bias ≠ 0?"].endswith("(ref SE 0.05 circular)")
    assert math.isclose(row["ref_rel_se"], 0.05)


def test_judge_vanilla_variance_flips():
    below, above, across = Estimate(0.3, 0.2, 0.4, 8), Estimate(2.0, 1.5, 2.5, 8), Estimate(0.9, 0.7, 1.2, 8)
    assert cl.judge_vanilla_variance([("a", below), ("b", below)]).verdict == "agrees"
    assert cl.judge_vanilla_variance([("a", below), ("b", above)]).verdict == "disagrees"
    assert cl.judge_vanilla_variance([("a", below), ("b", across)]).verdict == "inconclusive"
    assert cl.judge_vanilla_variance([("a", Estimate(0.3, 0.2, 0.4, 3))]).verdict == "inconclusive"


def test_judge_tunable_flips():
    def end(lam, b2, lo, hi, dist=True):
        return cl.LambdaEnd(lam, Estimate(b2, lo, hi, 8), dist)
    low, high = end(0.5, 0.1, 0.08, 0.12), end(0.95, 0.01, 0.0, 0.02)
    rises, falls, flat = Estimate(5.0, 4.0, 6.0, 8), Estimate(0.5, 0.4, 0.6, 8), Estimate(1.0, 0.8, 1.2, 8)
    assert cl.judge_tunable(low, high, rises, True).verdict == "agrees"
    assert cl.judge_tunable(low, high, falls, True).verdict == "disagrees"
    assert cl.judge_tunable(low, high, flat, True).verdict == "inconclusive"
    assert cl.judge_tunable(high, low, rises, True).verdict == "disagrees"  # bias rises with lambda
    none = end(0.5, 0.0, -0.01, 0.01, False), end(0.95, 0.0, -0.01, 0.01, False)
    assert cl.judge_tunable(*none, rises, False).verdict == "disagrees"


def test_judge_bias_trend_flips():
    big, small = Estimate(0.1, 0.08, 0.12, 0), Estimate(0.01, 0.0, 0.02, 0)
    assert cl.judge_bias_trend([(32, big), (320, small)]).verdict == "agrees"
    assert cl.judge_bias_trend([(32, small), (320, big)]).verdict == "disagrees"
    assert cl.judge_bias_trend([(32, big), (320, big)]).verdict == "inconclusive"
    assert cl.judge_bias_trend([(32, big)]).verdict == "inconclusive"


def test_only_tested_judgements_count():
    nan = Estimate(math.nan, math.nan, math.nan, 0)
    circular = cl.judge_bias("0", True, nan, circular=True)
    assert circular.verdict == "not tested" and circular.kind == cl.BY_CONSTRUCTION
    assert cl.judge_bias("0", True, nan).verdict == "disagrees"  # the same data, tested
    agrees = cl.Judgement("agrees", "variance: fine")
    assert cl.combine(circular, agrees).verdict == "agrees"
    assert cl.combine(circular).verdict == "not tested"
    by_definition = cl.judge_variance("very high", Estimate(1, 1, 1, 8), is_reference=True)
    assert by_definition.kind == cl.BY_CONSTRUCTION


def test_figures_draw_the_headline_and_critic_lines(table, frame, tmp_path):
    from analysis import figures as fg

    assert set(fg.headline_rows(table)["scope"]) == {tb.HEADLINE}
    drawn = fg.trajectory_rows(tb.measurement_rows(frame))
    assert set(drawn["critic"]) <= {"", "train"}
    paths = fg.plot_gae_lambda(table, tmp_path)
    assert any(p.suffix == ".png" for p in paths)
    assert np.isfinite(table["var_ratio"]).all()


def test_ranks_treat_an_undecided_comparison_as_not_separated():
    """With too few runs a pairwise comparison has no interval (separated is None): the
    ranks must still be computed (a 2-seed smoke sweep crashed on ~None)."""
    from analysis.table import _add_ranks

    table = pd.DataFrame({"env": ["e", "e"], "scope": ["headline"] * 2, "label": ["a", "b"]})
    pairs = pd.DataFrame({"env": ["e"], "scope": ["headline"], "a": ["a"], "b": ["b"],
                          "separated": pd.Series([None], dtype=object), "lo": [math.nan],
                          "hi": [math.nan]})
    ranked = _add_ranks(table, pairs)
    assert list(ranked["var_rank"]) == [1, 1] and list(ranked["var_ties"]) == ["b", "a"]


def test_figures_fall_back_to_every_row_without_a_headline_checkpoint():
    from analysis.figures import headline_rows

    table = pd.DataFrame({"scope": ["first checkpoint (unfitted critic)"], "env": ["e"]})
    assert len(headline_rows(table)) == 1
    both = pd.DataFrame({"scope": ["headline", "first checkpoint (unfitted critic)"]})
    assert list(headline_rows(both)["scope"]) == ["headline"]
