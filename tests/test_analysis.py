"""The analysis package on synthetic logs whose true bias and variance are known.

``analysis.synthetic`` writes sweeps in pgvar-run's format; the loader must keep the
complete runs and report every other one, and the table must recover the true numbers
within its confidence intervals.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import claims as cl
from analysis.cli import main as analyze_main
from analysis.loader import LoadError, load_runs, measured_rows
from analysis.pipeline import analyze
from analysis.stats import Estimate, iqm, mean_ci, ratio_ci, stratified_bootstrap_iqm
from analysis.synthetic import TrueEstimator, synthetic_metrics, write_run, write_sweep
from analysis.table import build_table, select_steps, tex_escape, to_latex, to_markdown

TRUTHS = [
    TrueEstimator("reinforce", bias=0.0, variance=8.0),
    TrueEstimator("mean_baseline_episode", bias=0.0, variance=2.0),
    TrueEstimator("actor_critic", bias=0.3, variance=0.2),
    TrueEstimator("gae", bias=0.6, variance=0.02, lam=0.5),
    TrueEstimator("gae", bias=0.1, variance=0.5, lam=0.95),
]
N_SEEDS = 20
SEEDS = range(100, 100 + N_SEEDS)  # fixed draws; test_interval_coverage checks many others


@pytest.fixture(scope="module")
def synthetic_sweep(tmp_path_factory) -> Path:
    """A sweep of the five truths above, 20 seeds each, 4 measured steps per run."""
    root = tmp_path_factory.mktemp("sweep")
    write_sweep(root, TRUTHS, SEEDS, n_iters=8, measure_every=2)
    return root


@pytest.fixture(scope="module")
def table(synthetic_sweep) -> pd.DataFrame:
    df, _ = load_runs(synthetic_sweep)
    return build_table(df, steps="all")


def _row(table: pd.DataFrame, estimator: str, lam: float | None = None) -> pd.Series:
    rows = table[table["estimator"] == estimator]
    if lam is not None:
        rows = rows[np.isclose(rows["lam"], lam)]
    assert len(rows) == 1
    return rows.iloc[0]


# ----------------------------------------------------------------------------- stats


def test_iqm_cuts_a_quarter_from_each_end():
    # 8 values: drop 2 lowest and 2 highest, mean of the middle 4
    assert iqm([100, 1, 2, 3, 4, 5, 6, -100]) == pytest.approx((2 + 3 + 4 + 5) / 4)
    assert iqm([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # n // 4 == 0: plain mean


def test_iqm_along_an_axis_matches_rows():
    x = np.array([[1, 2, 3, 4], [10, 0, 5, 5]], dtype=float)
    np.testing.assert_allclose(iqm(x, axis=1), [2.5, 5.0])


def test_mean_ci_brackets_the_mean_and_needs_two_runs():
    est = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert est.value == pytest.approx(3.0) and est.lo < 3.0 < est.hi and est.n == 5
    single = mean_ci([7.0])
    assert single.value == 7.0 and math.isnan(single.lo)
    assert math.isnan(mean_ci([]).value)
    constant = mean_ci([2.0, 2.0, 2.0])
    assert constant.lo == constant.hi == 2.0


def test_ratio_ci_pairs_by_seed():
    num = {s: 2.0 * (s + 1) for s in range(6)}
    den = {s: float(s + 1) for s in range(6)}
    est = ratio_ci(num, den)
    # paired: every resample has ratio exactly 2
    assert est.value == pytest.approx(2.0) and est.lo == pytest.approx(2.0) and est.hi == pytest.approx(2.0)


def test_stratified_bootstrap_keeps_tasks_apart():
    est = stratified_bootstrap_iqm({"a": [1.0] * 8, "b": [3.0] * 8})
    assert est.value == pytest.approx(2.0)
    assert est.lo == pytest.approx(2.0) and est.hi == pytest.approx(2.0)  # no mixing of strata
    noisy = stratified_bootstrap_iqm({"a": np.arange(20.0)})
    assert noisy.lo < noisy.value < noisy.hi


# ----------------------------------------------------------------------------- loader


def test_loader_gives_one_row_per_run_and_step(synthetic_sweep):
    df, report = load_runs([synthetic_sweep])
    assert len(report.loaded) == len(TRUTHS) * N_SEEDS and not report.skipped
    assert len(df) == len(TRUTHS) * N_SEEDS * 8
    assert {"env", "estimator", "lam", "seed", "env.gamma", "estimator.name", "step",
            "grad_variance", "grad_bias_sq"} <= set(df.columns)
    assert df.groupby("run_dir")["step"].apply(lambda s: list(s) == list(range(8))).all()
    assert set(df["estimator"]) == {t.name for t in TRUTHS}


def test_select_steps_first_last_all(synthetic_sweep):
    df, _ = load_runs(synthetic_sweep)
    measured = measured_rows(df)
    assert set(select_steps(measured, "first")["step"]) == {0}
    assert set(select_steps(measured, "last")["step"]) == {6}
    assert set(select_steps(measured, "all")["step"]) == {0, 2, 4, 6}
    with pytest.raises(ValueError):
        select_steps(measured, "middle")


def _broken_sweep(root: Path) -> dict[str, str]:
    """Two good runs and one of each bad kind; returns bad job name -> expected status."""
    good = TrueEstimator("reinforce", 0.0, 1.0)
    write_sweep(root, [good], [0, 1])
    config = {"env": {"name": "tabular"}, "estimator": {"name": "reinforce"}, "seed": 9}
    metrics = synthetic_metrics(good, 9)
    expected = {}

    write_run(root / "corrupt_json", config, metrics)
    (root / "corrupt_json" / "run.json").write_text('{"status": "complete", "conf')
    expected["corrupt_json"] = "unreadable"

    write_run(root / "corrupt_csv", config, metrics)
    (root / "corrupt_csv" / "metrics.csv").write_text('step,return_mean\n0,1.0\n1,"oops\n2,3,4,5\n')
    expected["corrupt_csv"] = "unreadable"

    write_run(root / "text_in_csv", config, metrics)
    (root / "text_in_csv" / "metrics.csv").write_text("step,return_mean\n0,1.0\n1,banana\n")
    expected["text_in_csv"] = "unreadable"

    write_run(root / "no_run_json", config, metrics)
    (root / "no_run_json" / "run.json").unlink()
    expected["no_run_json"] = "incomplete"

    write_run(root / "killed_running", config, metrics, status="running")
    expected["killed_running"] = "running"

    write_run(root / "diverged", config, metrics, status="diverged",
              error="non-finite training gradient at step 3")
    expected["diverged"] = "diverged"

    write_run(root / "failed", config, metrics, status="failed", error="ValueError: boom")
    expected["failed"] = "failed"

    (root / "only_hydra" / ".hydra").mkdir(parents=True)
    expected["only_hydra"] = "incomplete"
    return expected


def test_bad_runs_are_reported_with_reasons_and_left_out(tmp_path):
    expected = _broken_sweep(tmp_path)
    df, report = load_runs(tmp_path)
    assert len(report.loaded) == 2 and set(df["seed"]) == {0, 1}
    got = {s.path.name: s for s in report.skipped}
    assert set(got) == set(expected)
    for name, status in expected.items():
        assert got[name].status == status, (name, got[name])
        assert got[name].reason
    assert "non-finite training gradient" in got["diverged"].reason
    assert "boom" in got["failed"].reason
    assert "no run.json" in got["no_run_json"].reason
    summary = report.summary()
    assert all(name in summary for name in expected)


def test_cli_reports_skipped_runs_and_still_writes_the_table(tmp_path, capsys):
    _broken_sweep(tmp_path / "sweep")
    assert analyze_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "skipped [diverged]" in out and "skipped [unreadable]" in out
    skipped = pd.read_csv(tmp_path / "out" / "skipped_runs.csv")
    assert len(skipped) == 8


def test_cli_without_out_writes_beside_the_runs(tmp_path, capsys):
    _broken_sweep(tmp_path / "sweep")
    assert analyze_main([str(tmp_path / "sweep"), "--no-figures"]) == 0
    assert (tmp_path / "sweep" / "analysis" / "table.md").exists()
    # a second call reads the same runs: the analysis folder holds no run of its own
    assert analyze_main([str(tmp_path / "sweep"), "--no-figures"]) == 0
    assert "table" in capsys.readouterr().out


def test_empty_directory_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no runs found"):
        load_runs(tmp_path / "empty")
    assert analyze_main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no runs found" in capsys.readouterr().err
    assert not (tmp_path / "out" / "table.md").exists()


def test_missing_path_is_refused(tmp_path, capsys):
    with pytest.raises(LoadError, match="does not exist"):
        load_runs([tmp_path / "nope"])
    assert analyze_main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_directory_of_only_bad_runs_is_refused(tmp_path, capsys):
    config = {"env": {"name": "tabular"}, "estimator": {"name": "reinforce"}, "seed": 0}
    write_run(tmp_path / "0", config, synthetic_metrics(TRUTHS[0], 0), status="diverged", error="nan")
    assert analyze_main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no complete run" in err and "diverged" in err


def test_cli_main_returns_2_on_missing_path(tmp_path, capsys):
    from analysis.cli import main

    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_exits_non_zero_on_missing_path(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis.cli", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], check=False, capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


# ----------------------------------------------------------------------------- table


@pytest.mark.parametrize("truth", TRUTHS, ids=lambda t: f"{t.name}-{t.lam}")
def test_table_recovers_true_variance_and_bias_within_its_cis(table, truth):
    row = _row(table, truth.name, truth.lam)
    assert row["n_runs"] == N_SEEDS
    assert row["variance_lo"] <= truth.variance <= row["variance_hi"]
    assert row["rel_variance_lo"] <= truth.variance <= row["rel_variance_hi"]  # ||g_ref|| = 1
    assert row["bias_lo"] <= truth.bias <= row["bias_hi"]
    assert row["bias_sq_lo"] <= truth.bias ** 2 <= row["bias_sq_hi"]
    assert bool(row["bias_distinguishable"]) == (truth.bias > 0)


def test_variance_ratio_to_vanilla_is_recovered(table):
    for truth in TRUTHS:
        row = _row(table, truth.name, truth.lam)
        ratio = truth.variance / TRUTHS[0].variance
        assert row["var_ratio_lo"] <= ratio <= row["var_ratio_hi"], truth


def test_gae_lambdas_are_separate_rows_and_labelled(table):
    labels = list(table["label"])
    assert labels == ["reinforce", "mean_baseline_episode", "actor_critic", "gae (lam=0.5)", "gae (lam=0.95)"]


def test_agreement_column_follows_the_rule(table):
    rows = {r["label"]: r for _, r in table.iterrows()}
    # reinforce: unbiased, highest variance -> agrees
    assert rows["reinforce"]["agreement"] == "agrees"
    # mean baseline: variance ratio 0.25 -> 'moderate' band, unbiased -> agrees
    assert rows["mean_baseline_episode"]["agreement"] == "agrees"
    assert rows["mean_baseline_episode"]["measured_variance_word"] == "moderate"
    # actor-critic: ratio 0.025 -> 'low', relative bias 0.3 > 0.25 -> bias claim 'small' fails
    assert rows["actor_critic"]["measured_variance_word"] == "low"
    assert rows["actor_critic"]["agreement"] in ("disagrees", "inconclusive")
    assert "small" in rows["actor_critic"]["agreement_detail"]
    # GAE: lambda moves the bias (tunable agrees); variance 0.0025 'very low' at lam=0.5,
    # 0.0625 'low' at lam=0.95 -> disagrees with 'very low'
    assert rows["gae (lam=0.5)"]["agreement"] == "agrees"
    assert rows["gae (lam=0.95)"]["agreement"] == "disagrees"
    assert "seed says very low (0-0.01x vanilla), measured low" in rows["gae (lam=0.95)"]["agreement_detail"]


def test_table_writers(table):
    md = to_markdown(table)
    assert md.count("\n") == len(table) + 2
    assert "Vanilla REINFORCE" in md and "agrees" in md
    tex = to_latex(table)
    assert tex.startswith(r"\begin{tabular}") and r"\bottomrule" in tex
    assert r"mean\_baseline" in tex and "mean_baseline" not in tex
    assert tex_escape("a_b & 50% ‖∇J‖") == r"a\_b \& 50\% $\|$$\nabla$J$\|$"


def test_rows_split_per_environment(tmp_path):
    write_sweep(tmp_path, TRUTHS[:2], range(4), env="tabular")
    write_sweep(tmp_path, TRUTHS[:2], range(4), env="cartpole", start=100, ref_exact=False)
    write_sweep(tmp_path, TRUTHS[:1], range(4), env="chain", start=200)
    df, _ = load_runs(tmp_path)
    table = build_table(df, steps="first")
    # exact-reference environments first, by name; estimators in the seed's order
    assert list(zip(table["env"], table["estimator"])) == [
        ("chain", "reinforce"), ("tabular", "reinforce"), ("tabular", "mean_baseline_episode"),
        ("cartpole", "reinforce"), ("cartpole", "mean_baseline_episode")]
    assert list(table["reference"]) == ["exact"] * 3 + ["Monte Carlo"] * 2
    header, _, first, *_ = to_markdown(table).splitlines()
    assert header.startswith("| env |") and first.startswith("| chain (exact ∇J) |")


# ----------------------------------------------------------------------------- claims


def test_variance_bands():
    assert cl.variance_band(1.0) == "very high"
    assert cl.variance_band(0.3) == "moderate"
    assert cl.variance_band(0.05) == "low"
    assert cl.variance_band(0.001) == "very low"


def test_judge_variance_uses_the_whole_interval():
    inside = Estimate(0.3, 0.2, 0.4, 10)
    straddling = Estimate(0.12, 0.05, 0.2, 10)
    outside = Estimate(0.05, 0.04, 0.06, 10)
    assert cl.judge_variance("moderate", inside).verdict == "agrees"
    assert cl.judge_variance("moderate", straddling).verdict == "inconclusive"
    assert cl.judge_variance("moderate", outside).verdict == "disagrees"
    assert cl.judge_variance(cl.LOWER_THAN_VANILLA, outside).verdict == "agrees"
    assert cl.judge_variance("", outside).verdict == "no claim"


def test_judge_bias_words():
    none = Estimate(math.nan, math.nan, math.nan, 0)
    assert cl.judge_bias("0", False, none).verdict == "agrees"
    assert cl.judge_bias("0", True, none).verdict == "disagrees"
    assert cl.judge_bias("small", True, Estimate(0.1, 0.05, 0.15, 5)).verdict == "agrees"
    assert cl.judge_bias("small", True, Estimate(0.5, 0.4, 0.6, 5)).verdict == "disagrees"
    assert cl.judge_bias("tunable", True, none).verdict == "inconclusive"


def test_seed_rows_keep_the_seeds_words():
    assert cl.claim_for("reinforce").variant == "Vanilla REINFORCE"
    assert cl.claim_for("gae").baseline == "V^lambda-weighted"
    assert cl.claim_for("ppo").variance == ""  # the seed makes no variance claim for PPO


# ----------------------------------------------------------------------------- pipeline


def test_analyze_writes_every_file_and_figure(tmp_path, synthetic_sweep):
    result = analyze([synthetic_sweep], tmp_path / "out", steps="all")
    out = tmp_path / "out"
    for name in ["runs.parquet", "table.md", "table.csv", "table.tex", "learning_curves.csv",
                 "gradient_stats_by_step.csv", "returns_iqm.csv", "skipped_runs.csv"]:
        assert (out / name).stat().st_size > 0, name
    for fig in ["learning_curves", "gradient_stats", "bias_variance", "gae_lambda"]:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{fig}.{ext}").stat().st_size > 5000, (fig, ext)
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs) == len(TRUTHS) * N_SEEDS * 8 and "estimator.lam" in runs.columns
    table = pd.read_csv(out / "table.csv")
    assert len(table) == len(result.table) == 5
    curves = pd.read_csv(out / "learning_curves.csv")
    assert (curves["lo"] <= curves["iqm"] + 1e-12).all() and (curves["iqm"] <= curves["hi"] + 1e-12).all()


def test_config_values_of_mixed_types_still_save_to_parquet(tmp_path):
    truth = TRUTHS[0]
    for i, value in enumerate([3, "three", None]):
        config = {"env": {"name": "tabular", "odd": value}, "estimator": {"name": "reinforce"},
                  "seed": i, "policy": {"hidden": [64, 64]}}
        write_run(tmp_path / "sweep" / str(i), config, synthetic_metrics(truth, i))
    result = analyze([tmp_path / "sweep"], tmp_path / "out", figures=False)
    runs = pd.read_parquet(tmp_path / "out" / "runs.parquet")
    assert sorted(runs["env.odd"].dropna().unique()) == ["3", "three"]
    assert json.loads(runs["policy.hidden"].iloc[0]) == [64, 64]
    assert len(result.table) == 3  # env.odd varies, so it splits the rows


@pytest.mark.slow
def test_interval_coverage_over_many_synthetic_sweeps(tmp_path):
    """Across 30 independent sweeps of 10 seeds, the 95% intervals cover the truth in
    most of them (percentile bootstrap with 10 seeds under-covers a little; the squared-
    bias interval is conservative) and unbiased rows are rarely called biased."""
    truths = TRUTHS[:3]
    covered = {"variance": [], "bias_sq": []}
    false_alarms = []
    for k in range(30):
        root = tmp_path / str(k)
        write_sweep(root, truths, range(1000 + 10 * k, 1010 + 10 * k), n_iters=4, measure_every=2)
        df, _ = load_runs(root)
        table = build_table(df, steps="all")
        for truth in truths:
            row = _row(table, truth.name)
            covered["variance"].append(row["variance_lo"] <= truth.variance <= row["variance_hi"])
            covered["bias_sq"].append(row["bias_sq_lo"] <= truth.bias ** 2 <= row["bias_sq_hi"])
            if truth.bias == 0:
                false_alarms.append(bool(row["bias_distinguishable"]))
    assert np.mean(covered["variance"]) >= 0.85, np.mean(covered["variance"])
    assert np.mean(covered["bias_sq"]) >= 0.9, np.mean(covered["bias_sq"])
    assert np.mean(false_alarms) <= 0.1, np.mean(false_alarms)


def test_a_run_reached_through_two_paths_is_loaded_once(tmp_path):
    write_sweep(tmp_path / "out" / "runs", TRUTHS[:1], range(3))
    df, report = load_runs([tmp_path / "out", tmp_path / "out" / "runs"])
    assert len(report.loaded) == 3 and df["run_dir"].nunique() == 3


def test_left_out_runs_are_counted_per_row_and_an_all_diverged_row_is_kept(tmp_path):
    write_sweep(tmp_path, TRUTHS[:2], range(3))
    for seed in range(3):
        config = {"env": {"name": "tabular", "gamma": 0.99}, "estimator": {"name": "ppo", "lam": None},
                  "seed": seed, "preset": {"name": "synthetic"}}
        write_run(tmp_path / f"ppo{seed}", config, synthetic_metrics(TRUTHS[0], seed),
                  status="diverged", error="non-finite measured grad_variance at step 0")
    config = {"env": {"name": "tabular", "gamma": 0.99}, "estimator": {"name": "reinforce", "lam": None},
              "seed": 7, "preset": {"name": "synthetic"}}
    write_run(tmp_path / "r7", config, synthetic_metrics(TRUTHS[0], 7), status="failed", error="boom")
    df, report = load_runs(tmp_path)
    table = build_table(df, skipped=report.skipped)
    rows = {r["estimator"]: r for _, r in table.iterrows()}
    assert rows["reinforce"]["n_runs"] == 3 and rows["reinforce"]["left_out"] == "1 failed"
    assert rows["mean_baseline_episode"]["n_left_out"] == 0
    assert rows["ppo"]["n_runs"] == 0 and rows["ppo"]["left_out"] == "3 diverged"
    assert rows["ppo"]["agreement"] == "no data" and rows["ppo"]["reference"] == "exact"
    assert list(table["estimator"]) == ["reinforce", "mean_baseline_episode", "ppo"]
    md = to_markdown(table)
    assert "| 3 (+1 failed) |" in md and "| 0 (+3 diverged) |" in md
