"""experiments/horizon_action_dim: the exponent fits recover known laws; the smoke preset
runs end to end."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.experiment import initial_exact_objective
from analysis.reproduce import load_experiment_module

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = REPO / "experiments" / "horizon_action_dim"


def load_analysis():
    """experiments/horizon_action_dim/analyze.py as a module (it is not a package)."""
    module = load_experiment_module(EXPERIMENT)
    return module


def synthetic_frame(a: float, b: float, seeds: int = 6, noise: float = 0.1,
                    horizons=(5, 10, 20, 40), dims=(1, 2, 4), rng_seed: int = 0) -> pd.DataFrame:
    """A loader-shaped frame: one measured row per run whose variance per parameter per
    squared return (J exact, from the config) is C_s T^a d^b e^noise, ||grad J||^2 = T d."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for seed in range(seeds):
        scale = np.exp(rng.normal(0, 0.3))  # each system has its own level
        for T in horizons:
            for d in dims:
                row = {"run_id": f"T{T}-d{d}-s{seed}", "step": 0, "estimator": "reinforce",
                       "seed": seed, "n_estimates": 32, "training.batch_size": 16,
                       "env.name": "lqr", "env.gamma": 1.0, "env.horizon": T, "env.action_dim": d,
                       "env.state_dim": 2, "env.objective": "finite", "env.seed": seed,
                       "env.nested_actions": True, "policy.init_gain_scale": 0.0}
                J = initial_exact_objective(pd.Series(row))
                var = scale * T**a * d**b * np.exp(rng.normal(0, noise)) * J**2 * d * 4
                rows.append({**row, "grad_variance": var, "grad_rel_variance": var / (T * d),
                             "ref_norm": np.sqrt(T * d)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def analysis():
    return load_analysis()


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (3.0, 2.0)])
def test_fit_recovers_known_exponents_within_its_intervals(analysis, a, b):
    runs = analysis.per_run_values(synthetic_frame(a, b))
    fits = analysis.all_fits(runs).set_index("quantity")
    head, var = fits.loc[analysis.HEADLINE], fits.loc["grad_variance"]
    assert head["a_lo"] <= a <= head["a_hi"] and head["b_lo"] <= b <= head["b_hi"]
    assert head["n_seeds"] == 6 and head["n_points"] == 6 * 4 * 3
    product = (a, b) == (1.0, 1.0)
    assert analysis.exponent_is_one(head, "a") is product and analysis.exponent_is_one(head, "b") is product
    assert var["b"] > b + 0.5  # the raw variance carries J² and P: steeper in d


@pytest.mark.parametrize("a,b,word", [(1.0, 1.0, "confirmed"), (1.0, 2.0, "qualified"),
                                      (0.5, 0.5, "qualified"), (-1.0, -1.0, "refuted")])
def test_the_verdict_flips_with_the_scale_free_exponents(analysis, tmp_path, a, b, word):
    """The same design, only the headline law changed: each tested check can fail."""
    text = analysis.analyze(synthetic_frame(a, b), tmp_path, "synthetic")
    assert f"\nVerdict: {word}" in text
    checks = pd.read_csv(tmp_path / "checks.csv")
    assert (checks["class"] == "tested").all() and len(checks) == 4


def test_two_systems_are_inconclusive(analysis, tmp_path):
    text = analysis.analyze(synthetic_frame(1.0, 1.0, seeds=2), tmp_path, "synthetic")
    assert "\nVerdict: inconclusive" in text


def test_analyze_writes_result_files_and_figures(analysis, tmp_path):
    frame = synthetic_frame(3.0, 2.0, seeds=3, horizons=(5, 20), dims=(1, 2))
    text = analysis.analyze(frame, tmp_path, "smoke")
    assert "Verdict:" in text and (tmp_path / "result.md").read_text() == text
    result = pd.read_csv(tmp_path / "result.csv")
    assert set(result["quantity"]) == set(analysis.QUANTITIES)
    assert (tmp_path / "figures" / "horizon_action_dim_exponents.png").stat().st_size > 5000


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
                    assert cfg.env.seed == 3 and cfg.training.iterations == 1 and cfg.env.nested_actions
