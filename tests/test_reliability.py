"""Fault injection: damaged logs, concurrent sweeps, kills at random moments, bad values.

Fast cases (default run) work on one real smoke run made in this process, or call the
validation that ``pgvar-run`` runs before any job starts. The slow ones drive the real
command line: a sweep SIGKILLed again and again at random moments and re-run, two
identical sweeps started together into one folder, and every bad value refused with
exit 2 and one line.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from analysis.cli import main as analyze_main
from analysis.loader import load_runs
from pgvar.cli import CommandLine, validate_jobs
from pgvar.run import CONF_DIR, run_job

BIN = Path(sys.executable).parent
PGVAR_RUN = str(BIN / "pgvar-run") if (BIN / "pgvar-run").exists() else "pgvar-run"
TIMEOUT_S = 300


# -------------------------------------------------------------------------- helpers


def compose_job(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_here(job_dir: Path, *overrides: str) -> str:
    """One smoke run in this process (no Hydra runtime): its final status."""
    return run_job(compose_job(["preset=smoke", *overrides]), job_dir)


def record(job_dir: Path) -> dict:
    return json.loads((job_dir / "run.json").read_text())


def rows_without_wall_clock(job_dir: Path) -> list[list[str]]:
    with open(job_dir / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    drop = rows[0].index("wall_s")
    return [r[:drop] + r[drop + 1:] for r in rows]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PGVAR_RUN, *args], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=dict(os.environ, HYDRA_FULL_ERROR="0"))


def output_of(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """One complete smoke run (tabular, reinforce: 4 steps, measured at 0, 2 and 3)."""
    job = tmp_path_factory.mktemp("good") / "run"
    assert run_here(job) == "complete"
    return job


# ------------------------------------------------------------------- damaged files


def cut_bytes(job: Path) -> None:
    """What ``truncate -s -200 metrics.csv`` does: the last line ends mid-value."""
    path = job / "metrics.csv"
    os.truncate(path, path.stat().st_size - 200)


def edit_lines(job: Path, edit) -> None:
    path = job / "metrics.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))


def set_cell(job: Path, step: int, column: str, value: str) -> None:
    path = job / "metrics.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[step + 1][rows[0].index(column)] = value
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def edit_record(job: Path, **changes) -> None:
    info = record(job)
    info.update(changes)
    (job / "run.json").write_text(json.dumps(info))


DAMAGES = {
    "truncated mid-line": (cut_bytes, "ends mid-line"),
    "last row missing": (lambda j: edit_lines(j, lambda ls: ls[:-1]),
                         "3 rows but run.json says 4 steps completed"),
    "last two rows missing": (lambda j: edit_lines(j, lambda ls: ls[:-2]),
                              "2 rows but run.json says 4"),
    "duplicated row": (lambda j: edit_lines(j, lambda ls: ls[:3] + ls[2:]), "repeats step(s) [1]"),
    "two writers interleaved": (lambda j: edit_lines(j, lambda ls: [ls[0], ls[1].rstrip("\n") + ls[2],
                                                                    *ls[3:]]),
                                "line 2 has"),
    "header only": (lambda j: edit_lines(j, lambda ls: ls[:1]), "0 rows but run.json says 4"),
    "empty metrics.csv": (lambda j: (j / "metrics.csv").write_text(""), "metrics.csv is empty"),
    "run.json only says complete": (lambda j: (j / "run.json").write_text('{"status": "complete"}'),
                                    "run.json holds no config"),
    "config without an estimator": (lambda j: edit_record(j, config={"env": {"name": "tabular"}}),
                                    "names no estimator"),
    "steps_completed short of the iterations": (
        lambda j: (edit_record(j, steps_completed=3), edit_lines(j, lambda ls: ls[:-1])),
        "training.iterations=4"),
    "no steps_completed": (lambda j: edit_record(j, steps_completed=None),
                           "steps_completed is None"),
    "measured cell blank": (lambda j: set_cell(j, 2, "grad_variance", ""), "(step 2) has no number"),
    "text in a cell": (lambda j: set_cell(j, 1, "return_mean", "banana"), "no number in ['return_mean']"),
    "step column cut": (lambda j: set_cell(j, 3, "step", "3.95"), "steps are not 0..3 in order"),
}


def test_the_undamaged_run_loads_whole(good_run, tmp_path):
    shutil.copytree(good_run, tmp_path / "run")
    df, report = load_runs(tmp_path)
    assert not report.skipped and list(df["step"]) == [0, 1, 2, 3]
    assert df["grad_variance"].notna().sum() == 3


def test_a_logged_nan_is_a_missing_number_not_damage(good_run, tmp_path):
    """pgvar-run logs an undefined statistic as ``nan`` (the SNR when every batch of a
    sparse reward is zero): the run loads whole, that cell empty."""
    job = tmp_path / "run"
    shutil.copytree(good_run, job)
    set_cell(job, 1, "snr", "nan")
    df, report = load_runs(tmp_path)
    assert not report.skipped and len(df) == 4 and df["snr"].isna().sum() >= 1


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_run_is_skipped_whole_with_its_reason(good_run, tmp_path, damage):
    job = tmp_path / "run"
    shutil.copytree(good_run, job)
    make_damage, reason = DAMAGES[damage]
    make_damage(job)
    df, report = load_runs(tmp_path)
    assert df.empty, f"{damage}: loaded {len(df)} rows of a damaged run"
    assert [s.path for s in report.skipped] == [job]
    assert report.skipped[0].status == "unreadable"
    assert reason in report.skipped[0].reason, report.skipped[0].reason


def test_pgvar_analyze_lists_every_damaged_run(good_run, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(good_run, sweep / "good")
    for i, (make_damage, _) in enumerate(DAMAGES.values()):
        shutil.copytree(good_run, sweep / f"damaged{i}")
        make_damage(sweep / f"damaged{i}")
    assert analyze_main([str(sweep), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert f"loaded 1 complete run(s); skipped {len(DAMAGES)}" in out
    with open(tmp_path / "out" / "skipped_runs.csv", newline="") as f:
        skipped = list(csv.DictReader(f))
    assert len(skipped) == len(DAMAGES) and all(r["reason"] for r in skipped)


# ---------------------------------------------------------- job folders held by others


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".pgvar.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def test_a_job_folder_held_by_another_process_is_left_alone_until_it_dies(tmp_path):
    """Another process holds the folder: this one writes nothing there. Once that process
    is SIGKILLed, the OS drops its lock and the job runs."""
    job = tmp_path / "job"
    job.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(job)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_here(job) == "skipped"
        assert not (job / "metrics.csv").exists() and not (job / "run.json").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert run_here(job) == "complete"
    assert record(job)["steps_completed"] == 4


def test_a_lock_is_exclusive_and_released_on_exit(tmp_path):
    from pgvar.joblock import claim_job

    with claim_job(tmp_path) as first:
        assert first.held
        with claim_job(tmp_path) as second:  # another open file: refused, never waits
            assert not second.held and f"pid {os.getpid()}" in second.holder
    with claim_job(tmp_path) as again:
        assert again.held


# ----------------------------------------------------------------------- bad values


BAD_VALUES = [
    ("training.n_batches=100000000", "lower training.n_batches"),
    ("training.batch_size=100000000", "lower training.batch_size"),
    ("env.horizon=100000000", "lower env.horizon"),
    ("env.n_states=100000000", "lower env.n_states"),
    ("env=chain,env.length=10000000", "lower env.length"),
    ("env=cartpole,training.reference.chunk_episodes=100000000",
     "lower training.reference.chunk_episodes"),
    ("+training.batchsize=4", "unknown key training.batchsize: did you mean training.batch_size?"),
    ("+foo=1", "unknown key foo"),
    ("+env.nstates=3", "unknown key env.nstates: did you mean env.n_states?"),
    # a free-form dict (gymnasium.make_vec's kwargs) takes any key; the field beside it does not
    ("env=cartpole,+env.make_kwargs.x=1,+env.horizonn=3",
     "unknown key env.horizonn: did you mean env.horizon?"),
]


@pytest.mark.parametrize("overrides, fix", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_value_is_refused_before_launch_in_one_line(overrides, fix):
    problems = validate_jobs(CommandLine(["preset=smoke", *overrides.split(",")]))
    assert len(problems) == 1, problems
    message = problems[0].split("\n  (in ")[0]
    assert "\n" not in message and fix in message, message


def test_cuda_without_a_gpu_is_refused_before_launch():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    problems = validate_jobs(CommandLine(["preset=smoke", "device=cuda"]))
    assert len(problems) == 1 and "use device=cpu" in problems[0], problems


def test_memory_estimates_of_the_published_presets_fit_easily():
    """The checks refuse what cannot fit, not the presets: the full table's largest job
    is estimated far below a laptop's memory."""
    from pgvar.config import build_env, build_policy, to_run_config
    from pgvar.preflight import job_memory_terms

    for env_name in ("tabular", "lqr", "cartpole"):
        run_cfg = to_run_config(compose_job([f"env={env_name}", "preset=full"]))
        env = build_env(run_cfg.env)
        total = sum(t.bytes for t in job_memory_terms(run_cfg, env, build_policy(env, run_cfg.policy, 0)))
        assert 0 < total < 2**30, (env_name, total)


def test_overflow_in_the_update_ends_the_run_diverged(tmp_path):
    assert run_here(tmp_path / "run", "lr=1e300") == "diverged"
    info = record(tmp_path / "run")
    assert "overflow" in info["error"] and info["diverged_at_step"] == 0


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: chmod 555, or (as root, who may write
    anywhere chmod allows) a sysfs folder."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()
    sysfs = Path("/sys/kernel")
    try:
        (sysfs / "pgvar-probe").mkdir()
    except OSError:
        return sysfs
    (sysfs / "pgvar-probe").rmdir()
    pytest.skip("no write-protected folder available here")


def test_a_write_protected_sweep_folder_is_one_line(tmp_path):
    from pgvar.cli import output_dir_problems

    locked = read_only_folder(tmp_path)
    sweep = locked / "sweep"
    problems = output_dir_problems(CommandLine(["preset=smoke", f"hydra.sweep.dir={sweep}"],
                                               multirun=True))
    assert len(problems) == 1 and "\n" not in problems[0]
    assert f"cannot write to hydra.sweep.dir={sweep}" in problems[0]
    assert "hydra.sweep.dir=DIR" in problems[0]
    assert not sweep.exists()
    ok = output_dir_problems(CommandLine(["preset=smoke", f"hydra.run.dir={tmp_path / 'r'}"]))
    assert ok == [] and not (tmp_path / "r").exists()


def test_a_sweep_without_multirun_is_one_line():
    from pgvar.preflight import sweep_without_multirun

    assert sweep_without_multirun(["preset=smoke", "seed=7"]) is None
    for sweep in ("seed=0,1", "seed=range(3)"):
        message = sweep_without_multirun(["preset=smoke", sweep])
        assert message.startswith(f"{sweep} lists several values") and "add -m" in message


def readme_command_errors(tmp_path: Path, good_run: Path) -> dict[str, tuple]:
    """User errors in the README's other commands: (callable, text its one line names)."""
    from analysis import reproduce as rp
    from pgvar import bench

    a_file = good_run / "metrics.csv"
    return {
        "pgvar-analyze --out a file": (lambda: analyze_main([str(good_run), "--out", str(a_file)]),
                                       "choose a folder you can write to with --out=DIR"),
        "pgvar-reproduce nope": (lambda: rp.main(["nope"]), "no experiment 'nope'"),
        "pgvar-reproduce --jobs 0": (lambda: rp.main(["table", "--jobs", "0"]),
                                     "--jobs: must be an integer >= 1"),
        "pgvar-reproduce --out a file": (lambda: rp.main(["table", "--out", str(a_file)]),
                                         "choose a folder you can write to with --out=DIR"),
        "bench --lanes -1": (lambda: bench.main(["--lanes", "-1"]), "--lanes: must be an integer >= 0"),
        "bench --threads x": (lambda: bench.main(["--threads", "x"]), "--threads: 'x' is not an integer"),
    }


@pytest.mark.parametrize("case", ["pgvar-analyze --out a file", "pgvar-reproduce nope",
                                  "pgvar-reproduce --jobs 0", "pgvar-reproduce --out a file",
                                  "bench --lanes -1", "bench --threads x"])
def test_user_errors_in_the_other_readme_commands_exit_2_in_one_line(case, good_run, tmp_path,
                                                                     capsys):
    call, fix = readme_command_errors(tmp_path, good_run)[case]
    try:
        code = call()
    except SystemExit as err:  # argparse's refusal
        code = err.code
    err_lines = [line for line in capsys.readouterr().err.splitlines() if fix in line]
    assert code == 2 and len(err_lines) == 1, (code, fix)


# --------------------------------------------------------- slow: the real command line


CLI_BAD_VALUES = [
    ["training.n_batches=100000000"], ["training.batch_size=100000000"], ["env.horizon=100000000"],
    ["env.n_states=100000000"], ["+training.batchsize=999"], ["lr=abc"], ["estimator=nope"],
    ["env.gamma=2"], ["seed=x"],
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", CLI_BAD_VALUES, ids=[" ".join(o) for o in CLI_BAD_VALUES])
def test_cli_refuses_bad_values_with_exit_2_and_no_traceback(tmp_path, overrides):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "preset=smoke", *overrides, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 2, output_of(proc)
    assert "no job was started" in proc.stderr and "Traceback" not in proc.stderr
    assert not sweep.exists()


@pytest.mark.slow
def test_cli_refuses_cuda_without_a_gpu_a_write_protected_folder_and_a_sweep_without_m(tmp_path):
    import torch

    proc = run_cli(["preset=smoke", "seed=0,1", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert proc.returncode == 2 and "add -m" in proc.stderr, output_of(proc)

    if not torch.cuda.is_available():
        proc = run_cli(["preset=smoke", "device=cuda", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
        assert proc.returncode == 2 and "use device=cpu" in proc.stderr, output_of(proc)
    locked = read_only_folder(tmp_path)
    proc = run_cli(["-m", "preset=smoke", f"hydra.sweep.dir={locked / 'sweep'}"], cwd=tmp_path)
    assert proc.returncode == 2, output_of(proc)
    assert "cannot write to hydra.sweep.dir" in proc.stderr and "Traceback" not in proc.stderr


KILL_SWEEP = ["-m", "preset=smoke", "env=tabular", "estimator=reinforce,gae", "seed=0,1",
              "debug.sleep_s=0.05"]
N_KILLS = int(os.environ.get("PGVAR_TEST_KILLS", "6"))


def some_job_has_rows(sweep: Path) -> bool:
    """True once a job folder of ``sweep`` holds a metrics.csv with a data row."""
    return any(len(p.read_text().splitlines()) >= 2 for p in sweep.glob("*/metrics.csv"))


def kill_when(args: list[str], cwd: Path, ready, timeout_s: float = 120) -> int:
    """Start ``pgvar-run ARGS``, SIGKILL its whole process group as soon as ``ready()``
    (or after ``timeout_s``); returns its exit status (its own, if it ended first)."""
    with open(cwd / "killed.log", "a") as log:
        proc = subprocess.Popen([PGVAR_RUN, *args], cwd=cwd, stdout=log, stderr=log,
                                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return proc.returncode


def random_moment(sweep: Path, since: float, delay_s: float):
    """A ``ready`` for ``kill_when``: ``delay_s`` after this attempt's first job started
    (wrote its run.json), so the kill lands among the jobs, not in Hydra's start-up."""
    at: list[float] = []

    def ready() -> bool:
        if not at and any(p.stat().st_mtime >= since for p in sweep.glob("*/run.json")):
            at.append(time.monotonic() + delay_s)
        return bool(at) and time.monotonic() >= at[0]
    return ready


def killed_mid_run(sweep: Path, since: float) -> int:
    """Runs the last kill interrupted: run.json says running, written after ``since``."""
    return sum(record(p.parent)["status"] == "running" and p.stat().st_mtime >= since
               for p in sweep.glob("*/run.json"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
                         ids=["basic", "joblib"])
def test_sweep_killed_again_and_again_then_rerun_equals_an_uninterrupted_one(tmp_path, launcher):
    """SIGKILL at random moments (seeded), each time into the same folder, then one run
    to the end: every job complete, its metrics equal to an uninterrupted sweep's, and
    the analysis loads all four with nothing skipped."""
    reference, sweep = tmp_path / "reference", tmp_path / "sweep"
    proc = run_cli([*KILL_SWEEP, *launcher, f"hydra.sweep.dir={reference}"], cwd=tmp_path)
    assert proc.returncode == 0, output_of(proc)
    rng = random.Random(15)
    args = [*KILL_SWEEP, *launcher, f"hydra.sweep.dir={sweep}"]
    started = time.time()
    codes = [kill_when(args, tmp_path, lambda: some_job_has_rows(sweep))]  # surely mid-run
    interrupted = killed_mid_run(sweep, started)
    for _ in range(N_KILLS - 1):  # then at random moments of the jobs, same folder
        started = time.time()
        codes.append(kill_when(args, tmp_path, random_moment(sweep, started, rng.uniform(0, 3))))
        interrupted += killed_mid_run(sweep, started)
    assert codes[0] == -signal.SIGKILL and interrupted >= 1
    print(f"{codes.count(-signal.SIGKILL)} of {len(codes)} attempts killed the sweep mid-way, "
          f"{interrupted} of them inside a run")
    for job in sweep.iterdir():  # a killed job never looks complete
        if (job / "run.json").exists() and record(job)["status"] == "complete":
            assert len(rows_without_wall_clock(job)) == 5
    proc = run_cli([*KILL_SWEEP, *launcher, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, output_of(proc)
    jobs = sorted(p.name for p in reference.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 4
    for name in jobs:
        assert record(sweep / name)["status"] == "complete"
        assert rows_without_wall_clock(sweep / name) == rows_without_wall_clock(reference / name)
    _, report = load_runs(sweep)
    assert not report.skipped and len(report.loaded) == 4


CONCURRENT_SWEEP = ["-m", "preset=smoke", "env=tabular",
                    "estimator=reinforce,rloo,gae,actor_critic", "seed=0,1"]


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_two_identical_sweeps_into_one_folder_run_every_job_exactly_once(tmp_path, trial):
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if trial == 2 else []
    args = [PGVAR_RUN, *CONCURRENT_SWEEP, *launcher, f"hydra.sweep.dir={sweep}"]
    with open(tmp_path / "sweep0.log", "w") as log0, open(tmp_path / "sweep1.log", "w") as log1:
        procs = [subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=log) for log in (log0, log1)]
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    text = "".join((tmp_path / f"sweep{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], text[-3000:]
    jobs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(jobs) == 8
    for job in jobs:
        assert record(job)["status"] == "complete"
        assert text.count(f"running in {job} ") == 1, job  # run by one sweep, not both
    df, report = load_runs(sweep)
    assert not report.skipped and len(report.loaded) == 8
    assert sorted(set(df["step"])) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- duration


def test_duration_class_and_refusal_of_a_job_of_days():
    """A job's environment steps are estimated from its sizes: a classed word for the log,
    and a one-line refusal naming the setting when it would take days or more."""
    from pgvar.config import ConfigError
    from pgvar.preflight import MAX_JOB_STEPS, check_job_duration, duration_class, job_step_terms
    from pgvar.run import initial_env_and_policy, run_config_from

    config = {"env": {"name": "tabular"}, "training": {"iterations": 11, "measure_every": 5,
                                                       "n_batches": 4, "batch_size": 2}}
    run_cfg = run_config_from(config)
    env, _ = initial_env_and_policy(config)
    terms = {t.what: t.bytes for t in job_step_terms(run_cfg, float(env.horizon), True)}
    # 11 iterations x 2 episodes x T; measured at iterations 0, 5, 10: 3 x 4 x 2 x T
    assert terms == {"training": 22 * env.horizon, "measurements": 24 * env.horizon}
    assert duration_class(1e3) == "seconds" and duration_class(5e9) == "hours"
    assert check_job_duration(run_cfg, env)[1] == "seconds"
    huge = run_config_from({**config, "training": {**config["training"],
                                                   "iterations": int(MAX_JOB_STEPS)}})
    with pytest.raises(ConfigError, match="training.iterations=.* makes a job too long"):
        check_job_duration(huge, env)
