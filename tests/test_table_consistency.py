"""The comparison table never contradicts itself, and its pooled bias interval holds.

Every row of ``table.csv`` is read back and checked: each value inside its interval, the
relative columns equal to the absolute ones over the pooled ``||grad J||``, the norm
scale the square root of the squared scale, the 'distinguishable' verdict equal to the
interval's lower end > 0, and every 'inconclusive' verdict saying why. The synthetic
sweeps reproduce what made the old table contradict itself: a true gradient that
shrinks towards 0 late in training, so per-step ratios blow up.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.calibration import Case, measure_moving, pooled_coverage, with_run_flags
from analysis.pipeline import analyze
from analysis.stats import MIN_RUNS_FOR_SEED_BOOTSTRAP, N_RESAMPLES, Z_95, expanded_level
from analysis.synthetic import TrueEstimator, heavy_tailed_measurements, write_sweep
from analysis.table import fmt_ci, per_run_values, pooled_bias, pooled_se

TRUTHS = [
    TrueEstimator("reinforce", bias=0.0, variance=1.0),
    TrueEstimator("mean_baseline", bias=0.0, variance=0.25),
    TrueEstimator("actor_critic", bias=0.1, variance=0.05),
    TrueEstimator("gae", bias=0.3, variance=0.01, lam=0.5),
    TrueEstimator("gae", bias=0.02, variance=0.1, lam=0.95),
    TrueEstimator("ppo", bias=0.1, variance=0.05),
]
SHRINKING = {"n_iters": 8, "measure_every": 2, "ref_decay": 0.8}  # ||grad J||: 1, 0.2, 0.04, 0.008
M, P = 32, 8
LQR = {"state_dim": 2, "action_dim": 1, "horizon": 20}  # experiments/calibration's
REL_TOL = 1e-9


def _read_table(tmp_path, sweep_dirs) -> pd.DataFrame:
    analyze(sweep_dirs, tmp_path / "out", figures=False)
    return pd.read_csv(tmp_path / "out" / "table.csv")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """Tabular (exact reference) and cartpole (Monte Carlo reference), 8 seeds, and a
    2-seed chain env: every kind of row the table makes. Returns the output folder."""
    root = tmp_path_factory.mktemp("consistency")
    write_sweep(root / "runs", TRUTHS, range(8), env="tabular", **SHRINKING)
    write_sweep(root / "runs", TRUTHS[:3], range(8), env="cartpole", start=100, ref_se=0.05,
                **SHRINKING)
    write_sweep(root / "runs", TRUTHS[:3], range(2), env="chain", start=200, **SHRINKING)
    analyze([root / "runs"], root / "out", figures=False)
    return root / "out"


@pytest.fixture(scope="module")
def table(analysed) -> pd.DataFrame:
    return pd.read_csv(analysed / "table.csv")


def _close(a: float, b: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= REL_TOL * max(1.0, abs(a), abs(b))


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def check_row(row: pd.Series) -> None:
    """Every rule that makes a row agree with itself."""
    where = row["label"], row["env"]
    for name in ("bias_sq", "rel_bias_sq", "bias", "rel_bias", "variance", "rel_variance",
                 "var_ratio"):
        v, lo, hi = row[name], row[f"{name}_lo"], row[f"{name}_hi"]
        if math.isfinite(v) and math.isfinite(lo):
            assert lo - REL_TOL * abs(lo) <= v <= hi + REL_TOL * abs(hi), (name, where)
    for end in ("", "_lo", "_hi"):  # norm scale = sqrt of the squared scale
        assert _close(row[f"bias{end}"], math.sqrt(max(row[f"bias_sq{end}"], 0.0))), (end, where)
        norm = row["ref_norm"]
        if math.isfinite(norm) and norm > 0:  # relative = absolute / pooled ||grad J||
            assert _close(row[f"rel_bias_sq{end}"], row[f"bias_sq{end}"] / norm ** 2), (end, where)
            assert _close(row[f"rel_bias{end}"], row[f"bias{end}"] / norm), (end, where)
            assert _close(row[f"rel_variance{end}"], row[f"variance{end}"] / norm ** 2), (end, where)
    verdict = row["bias_distinguishable"]
    if _is_missing(verdict):
        assert isinstance(row["bias_test_note"], str) and row["bias_test_note"], where
    else:
        said = str(verdict) == "True"
        assert said == (row["bias_sq_lo"] > 0) == (row["bias_lo"] > 0), where
        if math.isfinite(row["rel_bias_lo"]):
            assert said == (row["rel_bias_lo"] > 0), where
    detail = str(row["agreement_detail"])
    assert not re.search(r"\(inconclusive\)", detail), (detail, where)  # always with a reason
    if row["agreement"] == "inconclusive":
        assert "(inconclusive: " in detail and row["agreement_short"].startswith("inconclusive ("), where
    if row["var_ratio_n"] < MIN_RUNS_FOR_SEED_BOOTSTRAP and row["seed_variance"] != "-":
        assert f"too few runs (n={int(row['var_ratio_n'])} < {MIN_RUNS_FOR_SEED_BOOTSTRAP})" in detail, where


def test_every_row_of_table_csv_agrees_with_itself(table):
    """The table before the pooled bias failed this on these sweeps: gae (lam=0.95) read
    bias 0.0355 [0.0227, 0.0447] next to 'distinguishable: no', and relative bias
    2.77 [0, 7.31] for unbiased REINFORCE."""
    assert len(table) == len(TRUTHS) + 3 + 3
    for _, row in table.iterrows():
        check_row(row)


PUBLISHED_TABLES = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*/results/*/table.csv"))


@pytest.mark.parametrize("path", PUBLISHED_TABLES, ids=lambda p: f"{p.parts[-4]}-{p.parts[-2]}")
def test_every_published_table_row_agrees_with_itself(path):
    """What users read: every row of every published comparison table, its number inside
    its interval, the bias on every scale and its verdict saying the same."""
    table = pd.read_csv(path)
    assert len(table) > 0
    for _, row in table.iterrows():
        check_row(row)


def test_the_compact_table_shows_the_same_numbers_and_verdicts(table, analysed):
    lines = [ln for ln in (analysed / "table.md").read_text().splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    assert len(header) <= 7
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]
    assert len(cells) == len(table)
    for row, shown in zip(table.itertuples(), cells):
        by_col = dict(zip(header, shown))
        assert by_col["relative bias [95% CI]"] == fmt_ci(row.rel_bias, row.rel_bias_lo, row.rel_bias_hi)
        said = {"True": "yes", "False": "no"}.get(str(row.bias_distinguishable))
        verdict = by_col["bias ≠ 0?"].split(" (ref SE")[0]  # Monte Carlo rows add their reference's SE
        assert verdict == said if said else verdict.startswith("n/a (")
        assert by_col["agrees with seed?"] == row.agreement_short
        assert len(row.agreement_short.split()) <= 4  # a word or two, no sentence
    full = (analysed / "table_full.md").read_text().splitlines()
    assert len(full) == len(table) + 2 and full[0].count(" | ") > 7
    # the note says how many 'yes' the test's level predicts among the tested rows
    tested = table["bias_distinguishable"].dropna()
    n, yes = len(tested), int((tested.astype(str) == "True").sum())
    assert 0 < yes < n
    assert (f"were all {n} tested rows unbiased, about {0.025 * n:.1f} would read 'yes' by "
            f"chance (here: {yes})") in (analysed / "table.md").read_text()


def test_biased_row_reads_biased_on_every_scale_even_when_grad_j_shrinks(table):
    """The old ppo contradiction: an interval above 0 next to 'distinguishable: no',
    because the verdict also asked a per-step-ratio interval blown up by late steps."""
    for env in ("tabular", "cartpole"):
        row = table[(table["env"] == env) & (table["estimator"] == "actor_critic")].iloc[0]
        assert str(row["bias_distinguishable"]) == "True"
        assert row["bias_lo"] > 0 and row["rel_bias_lo"] > 0


def test_unbiased_row_reads_near_zero_with_a_tight_interval(table):
    """An unbiased estimator's relative bias interval shrinks with the measurements, not
    inflated by steps where grad J is near 0. Bound: |mean U| + 1.96 SE <= 5 SE with
    probability > 0.999, SE^2 = 2 tr(Sigma^2) / (M (M - 1)) / K for K measurements. The
    verdict itself may say "biased": a calibrated test does in 2.5% of unbiased rows, and
    this sweep's mean U lies 2.1 SE above 0 (its rate is measured by
    ``test_pooled_verdict_fires_near_its_level_where_the_bias_is_zero``); both ends of the
    interval stay within the bound."""
    row = table[(table["env"] == "tabular") & (table["estimator"] == "reinforce")].iloc[0]
    truth = TRUTHS[0]
    k = 8 * 4
    pooled_se = math.sqrt(2 * truth.variance ** 2 / P / (M * (M - 1)) / k)
    assert row["bias_sq_lo"] <= 5 * pooled_se
    assert row["bias_sq_hi"] <= 5 * pooled_se
    assert row["rel_bias_hi"] <= math.sqrt(5 * pooled_se) / row["ref_norm"]


def test_monte_carlo_reference_noise_is_removed_from_the_pooled_norm(table):
    """E||g_ref||^2 = ||grad J||^2 + SE^2: the pooled norm subtracts SE^2."""
    row = table[(table["env"] == "cartpole") & (table["estimator"] == "reinforce")].iloc[0]
    true_sq = np.mean([math.exp(-2 * 0.8 * s) for s in (0, 2, 4, 6)])
    naive_sq = true_sq + 0.05 ** 2
    assert abs(row["ref_norm"] ** 2 - true_sq) < abs(row["ref_norm"] ** 2 - naive_sq) + 1e-3
    assert row["reference"] == "Monte Carlo"


def test_a_two_seed_smoke_sweep_gives_no_agree_or_disagree(tmp_path):
    """2 seeds and M=4 estimates per measurement (the smoke preset's sizes): too few runs
    for the variance ratio and too few estimates for the bias test, so every claim is
    inconclusive and says why."""
    write_sweep(tmp_path / "runs", TRUTHS, range(2), M=4, **SHRINKING)
    table = _read_table(tmp_path, [tmp_path / "runs"])
    for _, row in table.iterrows():
        check_row(row)
        assert row["agreement"] in ("inconclusive", "no claim"), (row["label"], row["agreement_detail"])
        if row["agreement"] == "inconclusive":
            assert "too few" in row["agreement_detail"]
    assert (table["bias_test_note"].fillna("").str.startswith("too few estimates")).all()


# ----------------------------------------------------------------------------- calibration


def _seed_bootstrap_interval(rows: pd.DataFrame, rng: np.random.Generator) -> tuple[float, float]:
    """The alternative not chosen: a percentile bootstrap over runs of the pooled ratio
    sum U / sum ||grad J||^2 (expanded percentiles, as analysis.stats does)."""
    per_run = rows.assign(sq=rows["ref_norm"] ** 2).groupby("run_dir")[["grad_bias_sq", "sq"]].sum()
    u, d = per_run["grad_bias_sq"].to_numpy(), per_run["sq"].to_numpy()
    idx = rng.integers(0, len(u), size=(N_RESAMPLES, len(u)))
    ratios = u[idx].sum(1) / d[idx].sum(1)
    q = (1 - expanded_level(len(u))) / 2
    lo, hi = np.quantile(ratios, [q, 1 - q])
    return float(lo), float(hi)


def _coverage(n_repeats: int, n_runs: int, M: int, rel_bias: float, seed: int) -> dict[str, float]:
    """Over repeats with known truth: how often the table's pooled interval and the
    seed bootstrap cover the true pooled relative squared bias, and say 'biased'."""
    rng = np.random.default_rng(seed)
    hits = {"pooled": 0, "bootstrap": 0, "pooled_positive": 0, "bootstrap_positive": 0}
    for _ in range(n_repeats):
        rows, truth = heavy_tailed_measurements(rng, n_runs, 6, M, 6, rel_bias)
        pooled = pooled_bias(per_run_values(rows))
        rel = pooled.relative(pooled.bias_sq)
        hits["pooled"] += rel.lo <= truth <= rel.hi
        hits["pooled_positive"] += rel.lo > 0
        lo, hi = _seed_bootstrap_interval(rows, rng)
        hits["bootstrap"] += lo <= truth <= hi
        hits["bootstrap_positive"] += lo > 0
    return {k: v / n_repeats for k, v in hits.items()}


def _binomial_floor(p: float, n: int, sds: float = 3.0) -> float:
    return p - sds * math.sqrt(p * (1 - p) / n)


def test_pooled_interval_covers_with_three_seeds_and_heavy_tails():
    """3 seeds x 6 steps, M=16 heavy-tailed estimates, grad J shrinking 7x: the pooled
    interval covers the true relative squared bias at its 95% (3-sd binomial
    tolerance), and under no bias says 'biased' at most at its one-sided 2.5%."""
    n = 100  # about 7 s; measured at 150 repeats: 95.3% (biased), 98.7% and 0.7% (unbiased)
    biased = _coverage(n, 3, 16, 0.3, seed=11)
    assert biased["pooled"] >= _binomial_floor(0.95, n), biased
    unbiased = _coverage(n, 3, 16, 0.0, seed=12)
    assert unbiased["pooled"] >= _binomial_floor(0.95, n), unbiased
    assert unbiased["pooled_positive"] <= 0.025 + 3 * math.sqrt(0.025 * 0.975 / n), unbiased


@pytest.mark.slow
def test_seed_bootstrap_would_undercover_with_few_seeds():
    """Why the table does not bootstrap over seeds: with 3 seeds the same cells give a
    bootstrap interval that covers far below 95% and calls unbiased rows biased."""
    n = 300
    unbiased = _coverage(n, 3, 16, 0.0, seed=21)
    assert unbiased["bootstrap"] < _binomial_floor(0.95, n, 5) < unbiased["pooled"], unbiased
    assert unbiased["bootstrap_positive"] > 0.05 > unbiased["pooled_positive"], unbiased


def test_pooled_interval_over_a_moving_lqr_run_covers_with_the_runs_widened_se():
    """One run's 10 steps along exact ascent on LQR (mean_baseline B = 2, M = 16: heavy
    tails, the first steps dominate the sum): pooled with each step's logged SE the table's
    interval covered 84% of 100 runs at this seed (80-98% over 9 seeds, 91% on average over
    their 900 runs: short of 95% beyond its binomial error); with the run's widening
    shared out as ``analysis.table.pooled_se`` does, 93% (93-100%, 97% on average).
    Tolerance: 3 binomial SDs at 95% over 100 runs."""
    case = Case("lqr", "mean_baseline", 2, "large", env_kwargs=LQR, moving=0.05)
    judged = with_run_flags(measure_moving(case, [16], 1000, seed=2))  # about 7 s
    floor = _binomial_floor(0.95, 100)
    table = pooled_coverage(judged).table  # each run's 10 steps through per_run_values, pooled_bias
    logged_only = pooled_coverage(judged.drop(columns="bias_sq_se_run")).table
    assert table >= floor > logged_only, (table, logged_only)


@pytest.mark.slow
def test_pooled_verdict_fires_near_its_level_where_the_bias_is_zero():
    """The table's verdict over one run's 10 steps of an unbiased estimator (tabular rloo,
    M = 16, exact reference, 1,000 runs, about 70 s): "biased" in 2.5% +- 3 binomial SDs
    (1.0-4.0%). The score form of the pooled model does (2.7% at this seed); the Wald
    interval on the pooled SEs, the table's rule before, fired in 0.5% (the corrected
    jackknife SE is floored at U's degenerate variance, ~1.6x too large in variance under
    no bias) and fails the test."""
    from analysis.calibration import run_calibration

    case = Case("tabular", "rloo", 4, "zero", env_kwargs={"n_states": 5, "n_actions": 3, "horizon": 8})
    judged = with_run_flags(run_calibration([case], [16], 10_000, seed=7))
    fired = pooled_coverage(judged).biased
    band = 3 * math.sqrt(0.025 * 0.975 / 1000)
    assert 0.025 - band <= fired <= 0.025 + band, fired
    wald = pooled_coverage(judged.drop(columns=["bias_v0", "bias_slope", "bias_skew0"])).biased
    assert wald < 0.025 - band, wald  # what the test guards against


def test_pooled_score_model_sums_the_steps_models():
    """A run's K steps pool as independent measurements: degenerate variances and slopes
    add over K^2, third cumulants over K^3; runs pool the same way over n; each step's
    slope weighs by its share of the positive part of U (all U <= 0: the plain sum), and a
    row whose runs logged no model keeps the Wald interval."""
    from analysis.table import pooled_score_model, run_score_models

    rows = pd.DataFrame({"run_dir": ["a", "a", "b", "b"], "seed": [0, 0, 1, 1],
                         "grad_bias_sq": [1.0, -1.0, 2.0, 2.0], "grad_bias_sq_se": 1.0,
                         "bias_v0": [4.0, 4.0, 1.0, 1.0], "bias_slope": [1.0, 3.0, 2.0, 2.0],
                         "bias_skew0": [0.5, 0.5, 0.0, 0.0]})
    runs = run_score_models(rows)
    assert runs.loc["a"].tolist() == pytest.approx([8 / 4, 4 / 4, 1 / 4, 1 / 2, 0.5 * 8 * 2 / 8])
    assert runs.loc["b"].tolist() == pytest.approx([2 / 4, 4 / 4, 8 / 4, 4 / 2, 0.0])
    model = pooled_score_model(per_run_values(rows), u=1.0)
    assert model.v0 == pytest.approx((2 + 0.5) / 4)
    assert model.slope == pytest.approx((0.25 + 2) / 4 / ((0.5 + 2) / 2))
    assert model.skew0 == pytest.approx(1.0 / 8 / model.v0 ** 1.5)
    negative = per_run_values(rows.assign(grad_bias_sq=-1.0))
    assert pooled_score_model(negative, u=-1.0).slope == pytest.approx(2 / 4)
    wald = pooled_bias(per_run_values(rows.drop(columns="bias_v0"))).bias_sq
    half = Z_95 * math.sqrt(0.5 + 0.5) / 2  # each run's mean has SE sqrt(1 + 1) / 2
    assert (wald.lo, wald.hi) == pytest.approx((1.0 - half, 1.0 + half))


def test_pooled_se_shares_the_widening_out_over_the_measurements_pooled():
    """n equal measurements: each keeps 1/n of its widening's excess; one measurement that
    carries the sum keeps all of its own; no ``grad_bias_sq_se_run``: the logged SEs."""
    def rows(se: list[float], se_run: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"run_dir": [f"r{i}" for i in range(len(se))], "seed": range(len(se)),
                             "grad_bias_sq": 0.0, "grad_bias_sq_se": se, "grad_bias_sq_se_run": se_run})
    equal = per_run_values(rows([1.0] * 4, [2.0] * 4))  # excess 3 each
    assert np.allclose(pooled_se(equal, "grad_bias_sq"), math.sqrt(1 + 3 / 4))
    dominated = pooled_se(per_run_values(rows([1.0, 1e-6], [2.0, 1e-6])), "grad_bias_sq")
    assert dominated[0] == pytest.approx(2.0, rel=1e-9)
    plain = per_run_values(rows([1.0] * 4, [2.0] * 4).drop(columns="grad_bias_sq_se_run"))
    assert np.allclose(pooled_se(plain, "grad_bias_sq"), 1.0)
