"""Paired measurement (pgvar.paired, pgvar.measured_step), checkpoints (pgvar.checkpoints)
and pgvar-measure (pgvar.remeasure): several estimators on the same episodes against one
reference, and the same numbers again from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from pgvar import provenance, runlog
from pgvar.checkpoints import CheckpointError, checkpoint_path, checkpoint_steps, load_checkpoint
from pgvar.envs.registry import make_env, make_policy
from pgvar.paired import (
    EstimatorSpec,
    References,
    is_circular,
    parse_spec,
    reference_disagreement,
    spec_label,
)
from pgvar.reference import Reference, monte_carlo_reference
from pgvar.remeasure import main as remeasure_main
from pgvar.run import CONF_DIR, run_job

pytestmark = pytest.mark.usefixtures("one_thread")

MEASURED = ["rloo", "gae", "gae(lam=0.5)", "reinforce"]


def run_smoke(job: Path, overrides: list[str]) -> str:
    """One smoke-preset job of pgvar-run, in this process, in ``job``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["preset=smoke", *overrides])
    job.mkdir(parents=True, exist_ok=True)
    return run_job(cfg, job)


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory) -> Path:
    """A tabular run trained with reinforce that also measures rloo and two GAEs, with
    the exact critic and fresh critics on 8 and 512 episodes."""
    job = tmp_path_factory.mktemp("paired") / "run"
    listed = "[" + ",".join(f'"{s}"' for s in MEASURED) + "]"
    assert run_smoke(job, ["env=tabular", "estimator=reinforce",
                           f"training.measure.estimators={listed}",
                           "training.measure.critic_episodes=[8,512]",
                           "training.measure.exact_critic=true"]) == "complete"
    return job


# ------------------------------------------------------------------------------ specs


def test_a_spec_parses_its_knobs_and_gets_a_canonical_label():
    spec = parse_spec("gae(lam=0.5, normalize_advantages=true)")
    cfg = spec.config()
    assert (spec.name, cfg.lam, cfg.normalize_advantages) == ("gae", 0.5, True)
    assert spec_label(spec.name, cfg) == "gae(lam=0.5,normalize_advantages=true)"
    assert spec_label("gae", parse_spec("gae(lam=0.95)").config()) == "gae"  # the default


@pytest.mark.parametrize("text, words", [
    ("nope", "unknown estimator 'nope'"),
    ("gae(lamda=0.5)", "'lamda=0.5' is not knob=value"),
    ("gae(lam=2)", "lam"),
    ("gae(discount_weighting=maybe)", "true or false"),
    ("gae(lam=0.5", "is not NAME or NAME(knob=value,...)"),
])
def test_a_bad_spec_is_refused_naming_the_problem(text, words):
    with pytest.raises(ValueError, match=None) as err:
        parse_spec(text)
    assert words in str(err.value)


def test_a_bad_spec_in_the_config_is_refused_before_any_job(tmp_path):
    from pgvar.config import ConfigError, validate_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=["preset=smoke", "training.measure.estimators=[gea]"])
    with pytest.raises(ConfigError, match="training.measure.estimators: .*unknown estimator 'gea'"):
        validate_config(cfg)


def test_the_default_alternate_reference_differs_from_the_reference_estimator():
    """``alternate: auto`` is rloo, or reinforce_rtg when the reference is rloo itself
    (reward_to_go's CartPole sweep); an explicit alternate equal to it is refused."""
    from pgvar.config import ConfigError, validate_config
    from pgvar.run import run_config_from

    def resolved(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["preset=smoke", "env=cartpole", *overrides])
        validate_config(cfg)
        return run_config_from(cfg).training.reference.alternate_estimator()

    assert resolved() == "rloo"
    assert resolved("training.reference.estimator=rloo") == "reinforce_rtg"
    assert resolved("training.reference.alternate=null") is None
    with pytest.raises(ConfigError, match="must differ from training.reference.estimator"):
        resolved("training.reference.estimator=rloo", "training.reference.alternate=rloo")


# ------------------------------------------------------------------------- references


def monte_carlo(name: str) -> Reference:
    return Reference(grad=torch.zeros(3, dtype=torch.float64), se2=1.0, n_episodes=10,
                     n_pairs=10, exact=False, method=f"monte_carlo:{name}")


def test_a_row_is_circular_only_against_a_reference_of_its_own_estimator():
    rtg, vb = monte_carlo("reinforce_rtg"), monte_carlo("value_baseline")
    assert is_circular(EstimatorSpec("reinforce_rtg"), rtg)
    assert not is_circular(EstimatorSpec("rloo"), rtg)
    assert not is_circular(EstimatorSpec("gae"), vb)
    assert is_circular(parse_spec("gae(lam=1)"), vb)  # GAE(1) with the same critic is it
    exact = Reference(grad=torch.zeros(3), se2=0.0, n_episodes=0, n_pairs=0, exact=True,
                      method="exact")
    assert not is_circular(EstimatorSpec("reinforce_rtg"), exact)


def test_a_circular_row_moves_to_the_alternate_or_is_flagged():
    rtg, rloo = monte_carlo("reinforce_rtg"), monte_carlo("rloo")
    with_alt = References(rtg, lambda: rloo)
    assert with_alt.for_spec(EstimatorSpec("reinforce")) == (rtg, False)
    assert with_alt.disagreement is None  # not made until a row needs it
    assert with_alt.for_spec(EstimatorSpec("reinforce_rtg")) == (rloo, False)
    assert References(rtg).for_spec(EstimatorSpec("reinforce_rtg")) == (rtg, True)


def test_two_independent_references_disagree_by_about_one():
    """||g_a - g_b||^2 / (se2_a + se2_b) has mean about 1 for two unbiased references; over 40
    CartPole reference pairs of 64 episodes (rtg against rloo) the mean is within 3
    standard errors of 1."""
    env = make_env("cartpole")
    policy = make_policy(env, hidden=(8,))
    values = []
    for i in range(40):
        a = monte_carlo_reference(env, policy, n_episodes=64, seed=2 * i, estimator="reinforce_rtg")
        b = monte_carlo_reference(env, policy, n_episodes=64, seed=2 * i + 1, estimator="rloo")
        values.append(reference_disagreement(a, b))
    v = torch.tensor(values, dtype=torch.float64)
    se = float(v.std() / len(v) ** 0.5)
    assert abs(float(v.mean()) - 1.0) < 3 * se, (float(v.mean()), se)


# --------------------------------------------------------------------------- the run


def read_paired(job: Path) -> pd.DataFrame:
    return pd.read_csv(job / runlog.PAIRED_FILE, keep_default_na=False, na_values=[""])


def test_every_measured_step_has_one_row_per_estimator_and_critic(paired_run):
    rows = read_paired(paired_run)
    steps = sorted(rows.step.unique())
    assert steps == checkpoint_steps(paired_run)
    per_step = rows.groupby("step").apply(lambda d: sorted(zip(d.estimator, d.critic.fillna(""))),
                                          include_groups=False)
    critics = ["exact", "fit:512", "fit:8", "train"]
    expected = sorted([("reinforce", ""), ("rloo", "")]
                      + [(g, c) for g in ("gae", "gae(lam=0.5)") for c in critics])
    assert all(v == expected for v in per_step)
    # one reference per step, shared by every row
    assert (rows.groupby("step").ref_norm.nunique() == 1).all()
    assert (rows.trained_with == "reinforce").all()


def test_the_training_row_is_metrics_csv_s_measured_row(paired_run):
    rows = read_paired(paired_run)
    training = rows[rows.is_training].set_index("step")
    assert list(training.estimator.unique()) == ["reinforce"]
    metrics = pd.read_csv(paired_run / runlog.METRICS_FILE).dropna(subset=["grad_variance"])
    metrics = metrics.set_index("step")
    for column in ("grad_variance", "grad_bias_sq", "grad_bias_sq_lo", "cos_ref"):
        pd.testing.assert_series_equal(training[column], metrics[column], check_names=False)


def test_critic_error_is_zero_for_the_true_v_and_falls_with_critic_data(paired_run):
    rows = read_paired(paired_run)
    gae = rows[rows.estimator == "gae"].pivot(index="step", columns="critic", values="critic_error")
    assert (rows.loc[rows.critic == "exact", "critic_error"] == 0).all()
    assert (rows.loc[rows.critic.notna(), "critic_error_kind"] == "exact_v_rmse").all()
    # 512 episodes against 8 of a 5-state MDP: the table's cells are averages of 64x the data
    assert (gae["fit:512"] < 0.5 * gae["fit:8"]).all(), gae


def test_measuring_more_estimators_does_not_change_the_training_run(paired_run, tmp_path):
    plain = tmp_path / "plain"
    assert run_smoke(plain, ["env=tabular", "estimator=reinforce"]) == "complete"
    a = pd.read_csv(plain / runlog.METRICS_FILE).drop(columns=["wall_s", "critic_loss"])
    b = pd.read_csv(paired_run / runlog.METRICS_FILE).drop(columns=["wall_s", "critic_loss"])
    pd.testing.assert_frame_equal(a, b)


def test_a_redone_run_starts_without_the_old_paired_rows_and_checkpoints(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / runlog.PAIRED_FILE).write_text("stale\n")
    (job / runlog.CHECKPOINT_DIR).mkdir()
    checkpoint_path(job, 999).write_bytes(b"stale")
    runlog.clear_run_outputs(job)
    assert not (job / runlog.PAIRED_FILE).exists() and checkpoint_steps(job) == []


# ----------------------------------------------------------------------- checkpoints


def test_a_checkpoint_rebuilds_the_measured_policy(paired_run):
    from pgvar.run import initial_env_and_policy

    config = runlog.read_run_record(paired_run)["config"]
    _, initial = initial_env_and_policy(config)
    point = load_checkpoint(paired_run, 0)
    for a, b in zip(point.policy.parameters(), initial.parameters()):
        assert torch.equal(a, b)
    last = load_checkpoint(paired_run, checkpoint_steps(paired_run)[-1])
    assert not all(torch.equal(a, b) for a, b in zip(last.policy.parameters(),
                                                     initial.parameters()))
    assert last.critic is not None  # gae is measured, so the run fitted a critic


def test_the_initial_checkpoint_is_the_saved_step_0_and_simulations_find_both(paired_run, tmp_path):
    """A run's step-0 state built from its config alone equals its saved step-0
    checkpoint (policy and critic); ``analysis.reproduce.run_checkpoints`` hands out
    either, and refuses a later step without a run."""
    from analysis.reproduce import run_checkpoints
    from pgvar.checkpoints import initial_checkpoint

    config = runlog.read_run_record(paired_run)["config"]
    built, saved = initial_checkpoint(config), load_checkpoint(paired_run, 0)
    assert built.step == 0 and built.path is None
    for module in ("policy", "critic"):
        for a, b in zip(getattr(built, module).parameters(), getattr(saved, module).parameters()):
            assert torch.equal(a, b)
    (label, from_config), = run_checkpoints("t", {"checkpoints": {"start": 0},
                                                  "initial_config": config}, tmp_path)
    assert label == "start" and from_config.path is None
    (_, from_run), = run_checkpoints("t", {"checkpoints": {"start": 0}, "run_dir": str(paired_run)},
                                     tmp_path)
    assert from_run.path == checkpoint_path(paired_run, 0)
    with pytest.raises(SystemExit, match="need a run_dir"):
        run_checkpoints("t", {"checkpoints": {"late": 5}, "initial_config": config}, tmp_path)


def test_forked_workers_give_the_serial_results():
    from analysis.reproduce import forked_map

    with forked_map(abs, [-3, -1, 2], 1) as serial:
        assert list(serial) == [3, 1, 2]
    with forked_map(abs, [-3, -1, 2], 2) as forked:
        assert sorted(forked) == [1, 2, 3]


def test_a_checkpoint_of_another_config_is_refused(paired_run, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(paired_run, other)
    record = json.loads((other / runlog.RUN_FILE).read_text())
    record["config"]["seed"] = 12345
    (other / runlog.RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="different environment, policy or seed"):
        load_checkpoint(other, 0)


def test_a_pickled_or_torn_checkpoint_is_refused(paired_run, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(paired_run, other)
    torch.save({"policy": {}, "evil": Path("/")}, checkpoint_path(other, 0))  # not weights-only
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(other, 0)
    checkpoint_path(other, 0).write_bytes(b"\x00torn")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(other, 0)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(other, 777)


# ----------------------------------------------------------------------- pgvar-measure


def test_remeasuring_repeats_the_run_s_numbers_and_adds_new_rows(paired_run, tmp_path, capsys):
    import shutil

    job = tmp_path / "copy"
    shutil.copytree(paired_run, job)
    before = read_paired(job)
    remeasure_main([str(job), "--estimators", "gae", "optimal_baseline", "--critic-episodes", "8"])
    after = read_paired(job)
    key = ["step", "estimator", "critic"]
    again = after[after.source == "remeasure"].merge(before, on=key, suffixes=("", "_run"))
    assert len(again) == 2 * len(before.step.unique())  # gae with train and fit:8
    for column in ("grad_variance", "grad_bias_sq", "critic_error"):
        assert (again[column] == again[f"{column}_run"]).all(), column
    assert set(after.estimator) == set(before.estimator) | {"optimal_baseline"}
    assert not after.duplicated(key).any()
    assert len(after) == len(before) + len(before.step.unique())  # one new row a step
    remeasure_main([str(job), "--estimators", "optimal_baseline"])  # replaces, never duplicates
    assert len(read_paired(job)) == len(after)
    # every row names the pgvar code that measured it, the run's own rows included
    codes = pd.read_csv(job / runlog.PAIRED_FILE, dtype={"code": str})["code"]
    assert set(codes) == {provenance.pgvar_digest(provenance.code_record())}


def test_remeasure_refuses_what_it_cannot_measure(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        remeasure_main([str(tmp_path), "--estimators", "gae"])
    assert stop.value.code == 2
    assert "no run with checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        remeasure_main([str(tmp_path), "--estimators", "gea"])
    assert "unknown estimator 'gea'" in capsys.readouterr().err


def test_remeasure_asks_for_a_critic_where_the_run_had_none(tmp_path, capsys):
    job = tmp_path / "plain"
    assert run_smoke(job, ["env=tabular", "estimator=rloo"]) == "complete"
    with pytest.raises(SystemExit):
        remeasure_main([str(job), "--estimators", "actor_critic"])
    assert "--critic-episodes" in capsys.readouterr().err
    remeasure_main([str(job), "--estimators", "actor_critic", "--critic-episodes", "16"])
    rows = read_paired(job)
    assert set(rows.loc[rows.estimator == "actor_critic", "critic"]) == {"fit:16"}


def test_a_run_on_a_short_gymnasium_name_is_rebuilt():
    """CartPole's checkpoints are loaded through run_config_from; 'cartpole' is not a
    schema name of its own."""
    from pgvar.config import NamedGymEnvConfig
    from pgvar.run import run_config_from

    run_cfg = run_config_from({"env": {"name": "cartpole", "horizon": 50}, "seed": 3})
    assert isinstance(run_cfg.env, NamedGymEnvConfig) and run_cfg.env.horizon == 50
