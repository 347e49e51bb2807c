"""pgvar.run.initial_env_and_policy rebuilds a run's starting point as the run built it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from pgvar.config import build_policy
from pgvar.reference import exact_reference
from pgvar.run import CONFIG_NAME, find_conf_dir, initial_env_and_policy, run_config_from, run_job


def real_run(tmp_path, overrides: list[str]) -> tuple[dict, float]:
    """One pgvar-run job in-process: its resolved config and the logged ||grad J|| at step 0."""
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        cfg = compose(config_name=CONFIG_NAME, overrides=[*overrides, "preset=smoke",
                                                          "training.iterations=1"])
    assert run_job(cfg, tmp_path) == "complete"
    config = json.loads((tmp_path / "run.json").read_text())["config"]
    ref_norm = float(pd.read_csv(tmp_path / "metrics.csv")["ref_norm"].dropna().iloc[0])
    return config, ref_norm


@pytest.mark.parametrize("overrides", [["env=tabular", "policy.init_scale=1.0", "seed=3"],
                                       ["env=lqr", "policy.init_gain_scale=0.3", "seed=4"]])
def test_rebuilt_policy_has_the_runs_exact_gradient(tmp_path, overrides):
    config, logged = real_run(tmp_path, overrides)
    env, policy = initial_env_and_policy(config)
    assert float(exact_reference(env, policy).grad.norm()) == pytest.approx(logged, rel=1e-5)
    # the recipe that seeds the policy with the run seed itself builds another policy
    naive = build_policy(env, run_config_from(config).policy, config["seed"])
    assert float(exact_reference(env, naive).grad.norm()) != pytest.approx(logged, rel=1e-3)


def test_a_partial_config_takes_the_schema_defaults():
    run_cfg = run_config_from({"env": {"name": "lqr", "horizon": 7}, "seed": 2})
    assert run_cfg.env.horizon == 7 and run_cfg.policy.init_gain_scale == 0.0


def test_an_unknown_environment_is_named():
    from pgvar.config import ConfigError

    with pytest.raises(ConfigError, match="env.name='nope'"):
        run_config_from({"env": {"name": "nope"}})
