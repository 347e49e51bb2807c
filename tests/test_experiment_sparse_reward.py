"""experiments/sparse_reward: exact reach probabilities, the zero-gradient prediction
recovered on synthetic counts, the verdict from the numbers, and the smoke preset."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.reproduce import load_experiment_module

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = REPO / "experiments" / "sparse_reward"


def load_analysis():
    """experiments/sparse_reward/analyze.py as a module (it is not a package)."""
    module = load_experiment_module(EXPERIMENT)
    return module


@pytest.fixture(scope="module")
def analysis():
    return load_analysis()


def synthetic_frame(analysis, horizon: int = 16, lengths=(6, 8, 9, 10, 11, 12, 13), seeds: int = 8,
                    batches: int = 200, batch_size: int = 8, shift: float = 0.0,
                    power: float = 1.0, rng_seed: int = 0) -> pd.DataFrame:
    """Loader-shaped rows whose zero-gradient counts are Binomial(M, (1-p)^B + shift) and
    whose episodes for SNR 1, B tr Cov / ||grad J||^2, are 2 / p^power (seed noise 10%)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for L in lengths:
        p = analysis.reach_probability(L, horizon)
        zero_p = min(max(analysis.predicted_zero_fraction(p, batch_size) + shift, 0.0), 1.0)
        ref_norm = p
        for seed in range(seeds):
            zeros = rng.binomial(batches, zero_p)
            variance = 2 * p ** (2 - power) / batch_size * rng.lognormal(0, 0.1)
            rows.append({
                "run_id": f"L{L}-s{seed}", "step": 0, "estimator": "reinforce", "seed": seed,
                "env.horizon": horizon, "env.length": L, "env.slip": 0.0, "env.gamma": 1.0,
                "training.batch_size": batch_size, "n_estimates": batches,
                "zero_grad_fraction": zeros / batches, "grad_norm_mean": p + 0.01,
                "ref_norm": ref_norm, "grad_variance": variance, "snr": 1.0,
            })
    return pd.DataFrame(rows)


def test_reach_probability_matches_hand_counts(analysis):
    assert analysis.reach_probability(2, 1) == pytest.approx(0.5)
    assert analysis.reach_probability(3, 2) == pytest.approx(0.25)
    # T = 3, goal 2 steps away: RR. (1/4) or a left at 0 (stays) then RR (1/8)
    assert analysis.reach_probability(3, 3) == pytest.approx(0.375)
    assert analysis.reach_probability(6, 4) == 0.0  # 5 steps away, 4 steps allowed
    assert analysis.predicted_zero_fraction(0.25, 3) == pytest.approx(0.75**3)


def test_zero_fractions_and_episodes_for_snr1_are_recovered(analysis):
    s = analysis.summarise(analysis.per_run_values(synthetic_frame(analysis)))
    cells = s["cells"]
    assert len(cells) == 7 and (cells["batches"] == 1600).all()
    covered = (cells["zero_fraction_lo"] <= cells["predicted_zero_fraction"]) & \
              (cells["predicted_zero_fraction"] <= cells["zero_fraction_hi"])
    assert covered.all() and not cells["below_prediction"].any()
    assert cells["p_reach"].is_monotonic_decreasing
    n1 = 2 / cells["p_reach"]
    assert ((cells["episodes_snr1_lo"] <= n1) & (n1 <= cells["episodes_snr1_hi"])).all()
    slope = s["slopes"].iloc[0]
    assert slope["points"] == 4 and slope["slope_lo"] <= 1 <= slope["slope_hi"]


@pytest.mark.parametrize("change,word", [({}, "confirmed"), ({"power": 0.5}, "refuted"),
                                         ({"shift": -0.2}, "confirmed"),  # by construction only
                                         ({"lengths": (2, 3, 4, 5)}, "inconclusive")])  # never sparse
def test_the_verdict_follows_the_tested_slope_only(analysis, tmp_path, change, word):
    """N1 ∝ 1/p_reach confirms, N1 ∝ 1/sqrt(p_reach) refutes; a zero fraction below its
    (by construction) bound is shown failed but does not move the verdict."""
    text = analysis.analyze(synthetic_frame(analysis, **change), tmp_path, "synthetic")
    assert f"\nVerdict: {word}" in text
    checks = pd.read_csv(tmp_path / "checks.csv")
    assert list(checks["kind"]) == ["tested", "by construction"]
    assert checks["passed"].iloc[1] == ("shift" not in change)


def test_analyze_writes_result_files_and_figure(analysis, tmp_path):
    text = analysis.analyze(synthetic_frame(analysis), tmp_path, "smoke")
    assert "\nVerdict: " in text and (tmp_path / "result.md").read_text() == text
    result = pd.read_csv(tmp_path / "result.csv")
    assert {"p_reach", "zero_fraction", "predicted_zero_fraction", "episodes_snr1"} <= set(result.columns)
    assert (tmp_path / "figures" / "sparse_reward_signal.png").stat().st_size > 5000


def test_every_preset_composes_and_validates():
    """The first and last job of every sweep of every preset (one seed) compose from
    conf/ and pass validation."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from analysis import reproduce as rp
    from pgvar import config

    config.register_configs()
    config.register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for preset in rp.PRESETS:
            for overrides in rp.load_spec("sparse_reward", preset).sweeps.values():
                one_seed = [o for o in overrides if not o.startswith("seed=")] + ["seed=0"]
                parsed = OverridesParser.create().parse_overrides([*one_seed, f"preset={preset}"])
                jobs = BasicSweeper.split_arguments(parsed, None)[0]
                for job in (jobs[0], jobs[-1]):
                    cfg = config.validate_config(compose(config_name="config", overrides=list(job)))
                    assert cfg.env.gamma == 1.0 and cfg.training.iterations == 1
