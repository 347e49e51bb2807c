"""experiments/horizon_action_dim: the exponent fits recover known laws; the smoke preset
runs end to end."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.reproduce import load_experiment_module

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = REPO / "experiments" / "horizon_action_dim"


def load_analysis():
    """experiments/horizon_action_dim/analyze.py as a module (it is not a package)."""
    module = load_experiment_module(EXPERIMENT)
    return module


def synthetic_frame(a: float, b: float, seeds: int = 6, noise: float = 0.1,
                    horizons=(5, 10, 20, 40), dims=(1, 2, 4), rng_seed: int = 0) -> pd.DataFrame:
    """A loader-shaped frame: one measured row per run with variance = C_s T^a d^b e^noise
    and ||grad J||^2 = T d, so the relative variance has exponents a - 1 and b - 1."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for seed in range(seeds):
        scale = np.exp(rng.normal(0, 0.3))  # each system has its own level
        for T in horizons:
            for d in dims:
                var = scale * T**a * d**b * np.exp(rng.normal(0, noise))
                ref_norm = np.sqrt(T * d)
                rows.append({
                    "run_id": f"T{T}-d{d}-s{seed}", "step": 0, "estimator": "reinforce",
                    "seed": seed, "grad_variance": var, "grad_rel_variance": var / ref_norm**2,
                    "ref_norm": ref_norm, "n_estimates": 32, "training.batch_size": 16,
                    "env.name": "lqr", "env.gamma": 1.0, "env.horizon": T, "env.action_dim": d,
                    "env.state_dim": 2,
                    "env.objective": "finite", "env.seed": seed, "env.spectral_radius": 0.9,
                    "env.control_cost": 0.1, "env.process_noise": 0.1, "env.init_std": 0.5,
                    "policy.init_log_std": None, "policy.init_gain_scale": 0.0,
                })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def analysis():
    return load_analysis()


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (3.0, 2.0)])
def test_fit_recovers_known_exponents_within_its_intervals(analysis, a, b):
    runs = analysis.per_run_values(synthetic_frame(a, b))
    fits = {f.quantity: f for f in analysis.all_fits(runs)}
    var, rel = fits["grad_variance"], fits["grad_rel_variance"]
    assert var.a_lo <= a <= var.a_hi and var.b_lo <= b <= var.b_hi
    assert rel.a_lo <= a - 1 <= rel.a_hi and rel.b_lo <= b - 1 <= rel.b_hi
    assert var.a_ols_lo <= a <= var.a_ols_hi
    assert var.interaction_lo <= 0.0 <= var.interaction_hi  # no log T * log d term in the truth
    assert var.n_seeds == 6 and var.n_points == 6 * 4 * 3
    assert var.status == ("holds" if (a, b) == (1.0, 1.0) else "rejected")


def test_verdict_follows_the_numbers(analysis):
    product = analysis.all_fits(analysis.per_run_values(synthetic_frame(1.0, 1.0)))
    assert analysis.verdict(product).word == "confirmed"
    steeper = analysis.all_fits(analysis.per_run_values(synthetic_frame(3.0, 2.0)))
    assert analysis.verdict(steeper).word == "qualified"
    flat_in_d = analysis.all_fits(analysis.per_run_values(synthetic_frame(2.0, 0.0)))
    assert analysis.verdict(flat_in_d).word == "refuted"
    two_systems = analysis.all_fits(analysis.per_run_values(synthetic_frame(1.0, 1.0, seeds=2)))
    assert analysis.verdict(two_systems).word == "inconclusive"


def test_analyze_writes_result_files_and_figures(analysis, tmp_path):
    frame = synthetic_frame(3.0, 2.0, seeds=3, horizons=(5, 20), dims=(1, 2))
    text = analysis.analyze(frame, tmp_path, "smoke")
    assert "Verdict:" in text and (tmp_path / "result.md").read_text() == text
    result = pd.read_csv(tmp_path / "result.csv")
    assert set(result["quantity"]) == set(analysis.QUANTITIES)
    assert (tmp_path / "figures" / "horizon_action_dim_exponents.png").stat().st_size > 5000
    assert (tmp_path / "figures" / "horizon_action_dim_grid_gamma1.pdf").exists()


def test_every_preset_composes_and_validates():
    """The first and last job of every sweep of every preset (one seed) compose from
    conf/ and pass validation (every override key is exercised; all jobs would be slow)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from analysis import reproduce as rp
    from pgvar import config

    config.register_configs()
    config.register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for preset in rp.PRESETS:
            for overrides in rp.load_spec("horizon_action_dim", preset).sweeps.values():
                one_seed = [o for o in overrides if not o.startswith("seed=")] + ["seed=3"]
                parsed = OverridesParser.create().parse_overrides([*one_seed, f"preset={preset}"])
                jobs = BasicSweeper.split_arguments(parsed, None)[0]
                for job in (jobs[0], jobs[-1]):
                    cfg = config.validate_config(compose(config_name="config", overrides=list(job)))
                    assert cfg.env.seed == 3 and cfg.training.iterations == 1
