"""The ``pgvar-run`` app at the smoke preset: in process, and through its real command line.

In the default run (in process, seconds): every config file composes and validates; bad
overrides are refused with their messages; one job runs, is skipped when re-run, and a
failing and a diverging job are recorded. Through the command line: a refused sweep
exits 2 and a diverged run 0.

Slow (``-m slow``, subprocesses of 20-60 s each): a 2x2 sweep with the basic launcher,
with joblib and (2 jobs) with submitit_local; every bad override through the command
line; a sweep SIGKILLed mid-run and re-run (killed run redone, complete ones skipped);
two identical runs giving the same metrics.csv; failed and diverged runs recorded
while the sweep goes on.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pgvar import runlog
from pgvar.config import ConfigError, validate_config
from pgvar.run import CONF_DIR

BIN = Path(sys.executable).parent
PGVAR_RUN = str(BIN / "pgvar-run") if (BIN / "pgvar-run").exists() else "pgvar-run"
TIMEOUT_S = 240


# -------------------------------------------------------------------------- helpers


def run_cli(args: list[str], cwd: Path, module: bool = False) -> subprocess.CompletedProcess:
    """Run ``pgvar-run ARGS`` (or ``python -m pgvar ARGS``) in ``cwd``; capture its output."""
    cmd = [sys.executable, "-m", "pgvar", *args] if module else [PGVAR_RUN, *args]
    return subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=dict(os.environ, HYDRA_FULL_ERROR="0"))


def output_of(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def job_dirs(sweep: Path) -> dict[str, Path]:
    """Job sub-directories of a sweep by name (everything but Hydra's and submitit's files)."""
    return {p.name: p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")}


def read_status(job: Path) -> str:
    return json.loads((job / "run.json").read_text())["status"]


def read_rows(job: Path) -> list[dict[str, str]]:
    with open(job / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_wall_clock(job: Path) -> list[list[str]]:
    """metrics.csv as rows of cells with the wall_s column removed."""
    with open(job / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    drop = rows[0].index("wall_s")
    return [r[:drop] + r[drop + 1:] for r in rows]


SMOKE_GRID = ["preset=smoke", "estimator=reinforce,gae", "env=tabular,cartpole"]
GRID_JOBS = {f"env={e},estimator={s},preset=smoke" for e in ("cartpole", "tabular")
             for s in ("gae", "reinforce")}


def assert_complete_sweep(sweep: Path, expected: set[str]) -> None:
    """Every expected job is complete, with the documented files and columns."""
    jobs = job_dirs(sweep)
    assert set(jobs) == expected
    for name, job in jobs.items():
        record = json.loads((job / "run.json").read_text())
        assert record["status"] == "complete", (name, record.get("error"))
        for key in ("error", "config", "seed", "versions", "elapsed_s"):
            assert key in record
        assert {"python", "torch", "gymnasium", "pgvar"} <= set(record["versions"])
        rows = read_rows(job)
        assert list(rows[0]) == list(runlog.COLUMNS)
        assert [int(r["step"]) for r in rows] == list(range(4))  # smoke: 4 iterations
        measured = [int(r["step"]) for r in rows if r["grad_variance"] != ""]
        assert measured == [0, 2, 3]  # measure_every=2, plus the last iteration
        for r in rows:
            filled = [c for c in runlog.MEASURED_COLUMNS if r[c] != ""]
            assert filled in ([], list(runlog.MEASURED_COLUMNS))
        assert int(rows[-1]["episodes"]) == 4 * 4


# ------------------------------------------------------------ configs, in process


def compose_and_validate(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate_config(compose(config_name="config", overrides=overrides))


def config_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture
def run_in_process(tmp_path):
    """``run(overrides, name) -> (status, job dir)``: one job of ``pgvar-run`` at the smoke
    preset in ``tmp_path/sweep/name``, in this process (torch's thread count restored)."""
    from pgvar.run import run_job

    threads = torch.get_num_threads()

    def run(overrides: list[str], name: str) -> tuple[str, Path]:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["preset=smoke", *overrides])
        job = tmp_path / "sweep" / name
        job.mkdir(parents=True, exist_ok=True)
        return run_job(cfg, job), job

    yield run
    torch.set_num_threads(threads)


def test_every_registered_estimator_and_env_has_a_config_file():
    from pgvar.envs.registry import available_envs
    from pgvar.estimators import ESTIMATORS
    from pgvar.sequence_estimators import SEQUENCE_ESTIMATORS

    assert config_options("estimator") == sorted(set(ESTIMATORS) | set(SEQUENCE_ESTIMATORS))
    assert config_options("env") == available_envs()


@pytest.mark.parametrize("preset", ["smoke", "quick", "full"])
def test_every_env_and_estimator_composes_and_validates(preset):
    for env in config_options("env"):
        cfg = compose_and_validate([f"env={env}", f"preset={preset}"])
        assert cfg.preset_name == preset and cfg.env.name == env
    from pgvar.estimators import ESTIMATORS

    for estimator in config_options("estimator"):
        env = [] if estimator in ESTIMATORS else ["env=sequence"]
        assert compose_and_validate([f"estimator={estimator}", *env]).estimator.name == estimator


def test_per_env_settings_apply_and_the_command_line_wins():
    assert compose_and_validate(["env=cartpole"]).lr == 0.01
    assert compose_and_validate(["env=cartpole", "lr=0.003"]).lr == 0.003
    cfg = compose_and_validate(["env=cartpole", "preset=quick"])
    assert cfg.training.reference.n_episodes == 1024
    assert compose_and_validate(["env=cartpole", "preset=smoke"]).training.iterations == 4


@pytest.mark.parametrize("override, message", [
    ("env.gamma=1.5", "env.gamma must lie in [0.0, 1.0]"),
    ("estimator.lam=-1", "estimator.lam must lie in [0.0, 1.0]"),
    ("training.batch_size=0", "training.batch_size must be an integer >= 1"),
    ("training.n_batches=2", "training.n_batches must be an integer >= 4"),
    ("env.objective=forever", "valid values: finite, discounted"),
    ("estimator.name=nope", "valid values: actor_critic"),
    ("training.reference.estimator=gae", "valid values:"),
    ("device=tpu", "valid values: cpu, cuda"),
    ("training.reference.lanes=-1", "training.reference.lanes must be a non-negative integer"),
])
def test_validation_names_the_valid_values(override, message):
    with pytest.raises(ConfigError) as err:
        compose_and_validate([override])
    assert message in str(err.value)


def test_sweep_validation_checks_every_job_and_knows_the_launcher_plugins():
    from pgvar.cli import CommandLine, validate_jobs

    slurm = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"]
    assert validate_jobs(CommandLine(["seed=range(30)", "estimator=reinforce,gae", *slurm])) == []
    problems = validate_jobs(CommandLine(["seed=0,abc", "env.gamma=0.5,1.5"]))
    assert len(problems) == 2
    assert any("seed must be an integer, got 'abc'" in p for p in problems)
    assert any("env.gamma must lie in [0.0, 1.0], got 1.5" in p and "in 1 of 4 jobs" in p
               for p in problems)


def test_bad_overrides_are_refused_in_process():
    """Every refused override of ``BAD_OVERRIDES``, with its message, as ``main`` checks
    them before Hydra starts (the command line's exit status: the subprocess tests)."""
    from pgvar.cli import CommandLine, validate_jobs

    for overrides, expected in BAD_OVERRIDES:
        problems = "\n".join(validate_jobs(CommandLine(["preset=smoke", "seed=0,1", *overrides])))
        for text in expected:
            assert text in problems, (overrides, problems)


def test_one_job_runs_and_a_rerun_skips_it(run_in_process):
    """A job with a critic and an exact reference writes the documented files and
    columns; the same job again is skipped."""
    name = "env=tabular,estimator=gae,preset=smoke"
    status, job = run_in_process(["env=tabular", "estimator=gae"], name)
    assert status == "complete"
    assert_complete_sweep(job.parent, {name})
    rows = read_rows(job)
    assert rows[0]["ref_exact"] == "True" and float(rows[0]["ref_se"]) == 0
    assert rows[0]["critic_loss"] != "" and rows[0]["grad_variance"] != ""
    assert run_in_process(["env=tabular", "estimator=gae"], name)[0] == "skipped"


def test_failed_and_diverged_jobs_are_recorded_in_process(run_in_process, tmp_path):
    """A failing job writes run.json before its error goes to Hydra; a diverging one ends
    ``diverged`` at the step that gave a NaN, its earlier rows kept."""
    from pgvar.run import RunFailed

    with pytest.raises(RunFailed, match="deliberate failure"):
        run_in_process(["debug.raise_at_step=1"], "failed")
    failed = json.loads((tmp_path / "sweep" / "failed" / "run.json").read_text())
    assert failed["status"] == "failed" and failed["steps_completed"] == 1
    assert "deliberate failure" in failed["error"]
    status, job = run_in_process(["debug.nan_at_step=1"], "diverged")
    diverged = json.loads((job / "run.json").read_text())
    assert status == diverged["status"] == "diverged" and diverged["diverged_at_step"] == 1
    assert "non-finite training gradient at step 1" in diverged["error"]
    assert [r["step"] for r in read_rows(job)] == ["0"]

    """The sweeper that skips Hydra's second composition of every job is installed as a
    Hydra plugin and selected by conf/config.yaml (its speed-up is in the README)."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    from hydra_plugins.pgvar_sweeper import PgvarSweeper

    assert PgvarSweeper in Plugins.instance().discover(Sweeper)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.pgvar_sweeper.PgvarSweeper"
    assert PgvarSweeper.validate_batch_is_legal(None, [["seed=x"]]) is None


# ------------------------------------------------------------------- sweeps, via CLI


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory) -> Path:
    """The 2x2 smoke grid with Hydra's basic launcher (shared by several tests)."""
    root = tmp_path_factory.mktemp("basic")
    proc = run_cli(["-m", *SMOKE_GRID, f"hydra.sweep.dir={root / 'sweep'}"], cwd=root)
    assert proc.returncode == 0, output_of(proc)
    return root / "sweep"


@pytest.mark.slow
def test_basic_launcher_2x2_sweep(basic_sweep):
    assert_complete_sweep(basic_sweep, GRID_JOBS)
    assert (basic_sweep / "multirun.yaml").exists()
    cartpole = read_rows(basic_sweep / "env=cartpole,estimator=gae,preset=smoke")
    assert cartpole[0]["ref_exact"] == "False" and float(cartpole[0]["ref_se"]) > 0
    tabular = read_rows(basic_sweep / "env=tabular,estimator=gae,preset=smoke")
    assert tabular[0]["ref_exact"] == "True" and float(tabular[0]["ref_se"]) == 0
    assert tabular[0]["critic_loss"] != "" and tabular[0]["grad_variance"] != ""


@pytest.mark.slow
def test_joblib_launcher_2x2_sweep_matches_the_basic_one(basic_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *SMOKE_GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, output_of(proc)
    assert_complete_sweep(sweep, GRID_JOBS)
    for name in GRID_JOBS:  # same configs in other processes: the same numbers
        assert without_wall_clock(sweep / name) == without_wall_clock(basic_sweep / name)


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "preset=smoke", "estimator=reinforce,gae", "hydra/launcher=submitit_local",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, output_of(proc)
    assert_complete_sweep(sweep, {f"estimator={s},preset=smoke" for s in ("gae", "reinforce")})


@pytest.mark.slow
def test_identical_runs_give_identical_metrics(tmp_path):
    """Two single runs (console script, then python -m pgvar) with a critic and a Monte
    Carlo reference: every column but wall_s is byte-equal."""
    args = ["preset=smoke", "env=cartpole", "estimator=gae", "seed=7"]
    first = run_cli([*args, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    second = run_cli([*args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path, module=True)
    assert first.returncode == 0, output_of(first)
    assert second.returncode == 0, output_of(second)
    a, b = without_wall_clock(tmp_path / "a"), without_wall_clock(tmp_path / "b")
    assert len(a) == 5 and a == b
    assert read_status(tmp_path / "a") == read_status(tmp_path / "b") == "complete"


BAD_OVERRIDES = [
    (["estimator=nope"], ["Could not find 'estimator/nope'", "reinforce", "gae"]),
    (["env=nope"], ["Could not find 'env/nope'", "cartpole", "tabular"]),
    (["estimator.name=nope"], ["valid values: actor_critic"]),
    (["training.batch_size=abc"], ["could not be converted to Integer"]),
    (["env.gamma=1.5"], ["env.gamma must lie in [0.0, 1.0], got 1.5"]),
    (["estimator=gae", "estimator.lam=-1"], ["estimator.lam must lie in [0.0, 1.0]"]),
    (["training.batch_size=0"], ["training.batch_size must be an integer >= 1"]),
    (["env.gamma=0.9,1.5"], ["env.gamma must lie in [0.0, 1.0], got 1.5"]),  # one bad job of two
    (["env=gym", "env.env_id=Nope-v0"], ["unknown Gymnasium environment id 'Nope-v0'"]),
]


# Through the command line, one case in the default run (every case in process above).
FAST_BAD_OVERRIDE = ["env.gamma=0.9,1.5"]


@pytest.mark.parametrize("overrides, expected", [
    pytest.param(o, e, id=" ".join(o), marks=() if o == FAST_BAD_OVERRIDE else pytest.mark.slow)
    for o, e in BAD_OVERRIDES])
def test_bad_overrides_are_refused_before_any_job_starts(tmp_path, overrides, expected):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "preset=smoke", "seed=0,1", *overrides, f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path)
    assert proc.returncode == 2, output_of(proc)
    assert "no job was started" in proc.stderr
    for text in expected:
        assert text in proc.stderr, output_of(proc)
    assert not sweep.exists()  # Hydra never got to create the sweep directory


@pytest.mark.slow
def test_failed_and_diverged_runs_are_recorded_and_the_sweep_goes_on(tmp_path):
    """The failing job comes first; the others still run. Exit 1 because one failed."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "preset=smoke", "debug.raise_at_step=1,-1", "debug.nan_at_step=-1,1",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 1, output_of(proc)
    jobs = job_dirs(sweep)
    status = {name: read_status(job) for name, job in jobs.items()}
    assert status == {
        "debug.nan_at_step=-1,debug.raise_at_step=1,preset=smoke": "failed",
        "debug.nan_at_step=1,debug.raise_at_step=1,preset=smoke": "failed",
        "debug.nan_at_step=-1,debug.raise_at_step=-1,preset=smoke": "complete",
        "debug.nan_at_step=1,debug.raise_at_step=-1,preset=smoke": "diverged",
    }
    failed = json.loads((jobs["debug.nan_at_step=-1,debug.raise_at_step=1,preset=smoke"]
                         / "run.json").read_text())
    assert "deliberate failure" in failed["error"] and failed["steps_completed"] == 1
    diverged_job = jobs["debug.nan_at_step=1,debug.raise_at_step=-1,preset=smoke"]
    diverged = json.loads((diverged_job / "run.json").read_text())
    assert "non-finite training gradient at step 1" in diverged["error"]
    assert diverged["diverged_at_step"] == 1
    assert [r["step"] for r in read_rows(diverged_job)] == ["0"]


def test_a_diverged_run_alone_exits_zero(tmp_path):
    proc = run_cli(["preset=smoke", "debug.nan_at_step=0", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, output_of(proc)
    assert read_status(tmp_path / "run") == "diverged"


def wait_for_rows(path: Path, n_rows: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Block until ``path`` holds ``n_rows`` data rows (the process must still be running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        if path.exists() and len(path.read_text().splitlines()) >= n_rows + 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n_rows} rows")


@pytest.mark.slow
def test_sigkilled_sweep_is_redone_and_complete_runs_skipped(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "preset=smoke", "seed=0,1", "debug.sleep_s=0.5", f"hydra.sweep.dir={sweep}"]
    done_job = sweep / "debug.sleep_s=0.5,preset=smoke,seed=0"
    killed_job = sweep / "debug.sleep_s=0.5,preset=smoke,seed=1"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([PGVAR_RUN, *args], cwd=tmp_path, stdout=log, stderr=log,
                                start_new_session=True)
        try:
            wait_for_rows(killed_job / "metrics.csv", 2, proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert read_status(done_job) == "complete"
    assert read_status(killed_job) == "running"  # never mistaken for a complete run
    kept_record = (done_job / "run.json").read_bytes()
    kept_mtime = (done_job / "metrics.csv").stat().st_mtime_ns

    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, output_of(proc)
    log = proc.stdout + proc.stderr
    assert f"skipping {done_job}" in log
    assert "an earlier attempt ended with status 'running'" in log
    assert (done_job / "run.json").read_bytes() == kept_record
    assert (done_job / "metrics.csv").stat().st_mtime_ns == kept_mtime
    assert read_status(killed_job) == "complete"
    assert [r["step"] for r in read_rows(killed_job)] == ["0", "1", "2", "3"]


# --------------------------------------------------------------- logger=tensorboard


def read_event_scalars(job: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the job's TensorBoard event files: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(job), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def csv_scalars(job: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as tag -> [(step, value)], empty cells left out, booleans as 0/1."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in read_rows(job):
        for column, cell in row.items():
            if column != "step" and cell != "":
                value = {"True": 1.0, "False": 0.0}.get(cell, None)
                out.setdefault(column, []).append(
                    (int(row["step"]), float(cell) if value is None else value))
    return out


def test_tensorboard_logger_writes_the_scalars_of_metrics_csv(run_in_process):
    """logger=tensorboard: the job directory holds one event file with exactly the
    columns and values of metrics.csv (float32, as TensorBoard stores them)."""
    pytest.importorskip("tensorboard")
    status, job = run_in_process(["env=cartpole", "estimator=gae", "logger=tensorboard"], "tb")
    assert status == "complete"
    assert len(list(job.glob(runlog.EVENTS_GLOB))) == 1
    logged, expected = read_event_scalars(job), csv_scalars(job)
    assert set(logged) == set(expected)
    assert "grad_variance" in logged and "return_mean" in logged
    for tag, points in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6,
                                                           nan_ok=True), tag


def test_tensorboard_logger_without_the_package_is_refused(monkeypatch):
    """Asked for where tensorboard is not installed: a ConfigError naming the extra."""
    monkeypatch.setattr(runlog, "tensorboard_installed", lambda: False)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["preset=smoke", "logger=tensorboard"])
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tensorboard\]'"):
        validate_config(cfg)


def test_a_sweeps_jobs_log_where_the_sweep_stands(run_in_process, tmp_path):
    """After each job of a sweep: jobs ended of all (from Hydra's multirun.yaml), rate and
    time left; nothing for a folder that is not a sweep's."""
    from pgvar.run import SWEEP_RECORD, sweep_progress

    status, job = run_in_process(["env=tabular"], "seed=0")
    assert status == "complete" and sweep_progress(job) is None
    (job.parent / SWEEP_RECORD).write_text(
        "hydra:\n  overrides:\n    task: [env=tabular, 'seed=0,1,2', preset=smoke]\n")
    line = sweep_progress(job)
    assert line.startswith("sweep sweep: 1/3 jobs ended, ") and "left" in line
