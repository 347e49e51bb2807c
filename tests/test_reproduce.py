"""pgvar-reproduce: experiment specs, and the table experiment end to end at the smoke preset."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis import reproduce as rp
from analysis.synthetic import TrueEstimator, write_sweep
from pgvar.sweep import expand_sweep

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
TABLE_ROWS = {"reinforce", "reinforce_rtg", "mean_baseline_episode", "mean_baseline", "rloo",
              "value_baseline", "actor_critic", "gae", "ppo"}


def _measured(overrides: list[str]) -> set[str]:
    """The estimator names a sweep's runs measure: ``training.measure.estimators`` (specs
    such as ``gae(lam=0.5)`` by their name) and the training ``estimator``."""
    names: set[str] = set()
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "training.measure.estimators":
            names |= {spec.strip('"').split("(")[0] for spec in re.findall(r'"[^"]*"|[^,\[\]]+', value)}
        elif key == "estimator":
            names |= set(value.split(","))
    return names


def _pgvar_reproduce() -> list[str]:
    """``pgvar-reproduce`` as this Python runs it (``test_console_scripts_resolve`` holds
    the installed script to the same function; an older install's script may be stale)."""
    return [sys.executable, "-m", "analysis.reproduce"]


def _require_pgvar_run() -> None:
    if shutil.which("pgvar-run") is None and not Path(sys.executable).with_name("pgvar-run").exists():
        pytest.skip("pgvar-run is not installed")


def test_unknown_experiment_and_preset_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="no experiment 'nope'.*available: .*table"):
        rp.load_spec("nope", "quick", EXPERIMENTS)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "sweep.yaml").write_text("presets:\n  quick:\n    a: [env=tabular]\n")
    with pytest.raises(SystemExit, match="no preset 'full'.*it has: quick"):
        rp.load_spec("x", "full", tmp_path)


def test_count_jobs_expands_like_hydra():
    assert rp.count_jobs(["estimator=a,b,c", "seed=range(4)", "env=tabular"]) == 12
    assert rp.count_jobs(["estimator=gae", "estimator.lam=0.5,1.0"]) == 2


def test_table_spec_has_every_preset_and_the_nine_rows_in_every_block():
    for preset in rp.PRESETS:
        spec = rp.load_spec("table", preset, EXPERIMENTS)
        assert spec.steps in ("first", "last", "all")
        for name, overrides in spec.sweeps.items():
            assert rp.count_jobs(overrides)
            assert TABLE_ROWS <= _measured(overrides), (preset, name, _measured(overrides))
        if preset != "smoke":
            assert {"tabular", "lqr", "cartpole"} <= set(spec.sweeps), preset


@pytest.mark.parametrize("preset", rp.PRESETS)
def test_table_sweeps_pass_pgvar_runs_validation(preset):
    """Every job of every preset (one seed each) composes from conf/ and validates."""
    config = pytest.importorskip("pgvar.config")
    from hydra import compose, initialize_config_dir

    config.register_configs()
    config.register_resolvers()
    spec = rp.load_spec("table", preset, EXPERIMENTS)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for overrides in spec.sweeps.values():
            one_seed = [o for o in overrides if not o.startswith("seed=")] + ["seed=0"]
            for job in expand_sweep([*one_seed, f"preset={preset}"]):
                config.validate_config(compose(config_name="config", overrides=list(job)))


def test_sweep_command_uses_joblib_and_the_sweep_dir(tmp_path):
    cmd = rp.sweep_command(["env=tabular"], "smoke", tmp_path / "runs" / "a", 2)
    assert "-m" in cmd and "preset=smoke" in cmd and "hydra/launcher=joblib" in cmd
    assert f"hydra.sweep.dir={(tmp_path / 'runs' / 'a').resolve()}" in cmd


def test_after_the_sweeps_in_process(tmp_path, capsys):
    """What ``pgvar-reproduce`` does once its sweeps have run, on synthetic runs: it finds
    the finished jobs, writes the table, its record and the published copy (with real
    sweeps, through the command line: the slow end-to-end test below)."""
    out = tmp_path / "out"
    truths = [TrueEstimator("reinforce", 0.0, 1.0), TrueEstimator("mean_baseline", 0.3, 0.5)]
    jobs = write_sweep(out / "runs" / "tabular", truths, seeds=range(3))
    assert set(rp.finished_jobs(out / "runs")) == set(jobs)
    (tmp_path / "experiments" / "demo").mkdir(parents=True)
    spec = rp.ExperimentSpec(name="demo", folder=tmp_path / "experiments" / "demo",
                             preset="smoke", sweeps={"tabular": ["env=tabular"]})
    code, runs_code = rp._analyse(spec, out, no_figures=True)
    assert code == 0
    # synthetic runs carry no code record: the load report printed says so, with the fix
    assert "6 carry no record of the code" in capsys.readouterr().out
    assert runs_code["unrecorded"] == len(jobs) and runs_code["other_code"] == 0
    assert "Vanilla REINFORCE" in (out / "table_full.md").read_text()
    assert "| reinforce |" in (out / "table.md").read_text()
    assert rp.run_experiment_analysis(spec, out) == 0  # no analyze.py: nothing more to run
    outcome = rp.SweepOutcome("tabular", 0, 1.0, {"complete": len(jobs)})
    rp._write_record(spec, out, [outcome], 1.0, 2.0, ["demo", "--preset", "smoke"], runs_code)
    record = json.loads((out / "reproduce.json").read_text())
    assert record["sweeps"]["tabular"]["statuses"] == {"complete": 6}
    assert record["code"]["digest"]["pgvar"] and record["runs_code"]["by_code"] == {"unrecorded": 6}
    published = rp.publish(out, spec)
    assert published == spec.folder / "results" / "smoke"
    names = {p.name for p in published.iterdir()}
    assert {"table.md", "table_full.md", "table.csv", "reproduce.json"} <= names


@pytest.mark.slow
def test_reproduce_table_smoke_end_to_end(tmp_path):
    """`pgvar-reproduce table --preset smoke` writes the runs, the table, the figures and
    its record, reports progress, and ends with the table's path."""
    _require_pgvar_run()
    out = tmp_path / "out"
    started = time.perf_counter()
    proc = subprocess.run([*_pgvar_reproduce(), "table", "--preset", "smoke", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out / "table.md")
    assert any("[2/2]" in line for line in lines)  # one progress line per finished run

    for name in ["runs.parquet", "table.md", "table.csv", "table.tex", "learning_curves.csv",
                 "gradient_stats_by_step.csv", "returns_iqm.csv", "skipped_runs.csv",
                 "reproduce.json", "logs/tabular.log"]:
        assert (out / name).stat().st_size > 0, name
    for fig in ["learning_curves", "gradient_stats", "bias_variance"]:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{fig}.{ext}").stat().st_size > 5000, (fig, ext)

    table = pd.read_csv(out / "table.csv")
    assert set(table["estimator"]) == TABLE_ROWS and (table["n_runs"] == 2).all()
    assert set(table["scope"]) == {"headline", "first checkpoint, training critic never fitted"}
    assert table["variance"].gt(0).all() and table["agreement"].notna().all()
    runs = pd.read_parquet(out / "runs.parquet")
    assert runs["run_dir"].nunique() == 2 and set(runs["env"]) == {"tabular"}
    assert "Vanilla REINFORCE" in (out / "table_full.md").read_text()
    # 2 seeds, 4 estimates per measurement: no claim can be agreed or disagreed with
    assert set(table["agreement"]) <= {"inconclusive", "no claim"}, table["agreement_detail"]
    record = json.loads((out / "reproduce.json").read_text())
    assert record["preset"] == "smoke" and record["sweeps"]["tabular"]["statuses"] == {"complete": 2}
    # the runs were made by this code, and reproduce.json says which
    assert record["runs_code"]["other_code"] == record["runs_code"]["unrecorded"] == 0
    assert sum(record["runs_code"]["by_code"].values()) == 2
    assert elapsed < 180, f"smoke preset took {elapsed:.0f}s"

    # a second call finds every run complete and only redoes the analysis
    again = subprocess.run([*_pgvar_reproduce(), "table", "--preset", "smoke", "--out", str(out),
                            "--no-figures"], check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 job(s) were already finished" in again.stdout


def test_a_refused_sweep_stops_before_the_analysis_in_process(tmp_path, monkeypatch, capsys):
    """``main``'s handling of a sweep that pgvar-run refuses (exit 2), with the sweep
    itself stubbed; the real refusal through both commands: the slow test below."""
    (tmp_path / "exp" / "bad").mkdir(parents=True)
    (tmp_path / "exp" / "bad" / "sweep.yaml").write_text(
        "presets:\n  smoke:\n    only:\n      - env=tabular\n")
    (tmp_path / "refused.log").write_text("error: estimator.name='nope' is not valid\n")
    monkeypatch.setenv("PGVAR_EXPERIMENTS_DIR", str(tmp_path / "exp"))
    monkeypatch.setattr(rp, "run_sweep", lambda name, *args: rp.SweepOutcome(
        name, 2, 0.1, log=str(tmp_path / "refused.log")))
    assert rp.main(["bad", "--preset", "smoke", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "refused sweep 'only'" in err and "estimator.name='nope'" in err
    assert not (tmp_path / "o" / "table.md").exists()


@pytest.mark.slow
def test_a_sweep_that_pgvar_run_refuses_stops_with_its_message(tmp_path):
    _require_pgvar_run()
    (tmp_path / "exp" / "bad").mkdir(parents=True)
    (tmp_path / "exp" / "bad" / "sweep.yaml").write_text(
        "presets:\n  smoke:\n    only:\n      - env=tabular\n      - estimator=no_such_estimator\n")
    proc = subprocess.run([*_pgvar_reproduce(), "bad", "--preset", "smoke", "--out", str(tmp_path / "o")],
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PGVAR_EXPERIMENTS_DIR": str(tmp_path / "exp")})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refused" in proc.stderr and "no_such_estimator" in proc.stderr
    assert not (tmp_path / "o" / "table.md").exists()


def test_console_scripts_resolve():
    """Every console script of pyproject.toml names an importable function (a moved module
    must take its script along)."""
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"pgvar-run", "pgvar-analyze", "pgvar-reproduce", "pgvar-measure"}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    assert scripts["pgvar-reproduce"] == "analysis.reproduce:main"
