"""The README's commands and Python snippets, run as a reader would run them, so the README
cannot drift from the code.

Every fenced ``bash`` block of README.md is split into commands (one a line, trailing
``# comments`` dropped) and every ``python`` block is one snippet. Each command must have
an entry in ``SHELL_FORMS``: the form in which this test runs it, with ``{tmp}`` a fresh
folder (the literal command where it is already at smoke size, else its smoke-size twin:
``preset=smoke``, ``--preset smoke``, fewer seeds), or ``None`` with the reason it is not
run (it sets up the environment the tests run in, or needs a cluster). A README command
without an entry fails ``test_every_readme_command_has_a_smoke_form``: whoever edits the
README states how it is checked.

Shell commands run through ``bash`` in ``{tmp}`` with the venv's scripts first on PATH
(what ``. .venv/bin/activate`` gives a reader); Python snippets are executed in this
process, with ``PYTHON_EDITS`` (text replacements) shrinking a size where needed. The
default run holds the Python snippets, the quick commands (``FAST``) and, in process, the
arguments of every ``pgvar-run`` and ``pgvar-reproduce`` form (they parse, compose and
validate); running the other commands is marked slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
TIMEOUT_S = 600

SWEEP = ("pgvar-run -m estimator=reinforce,mean_baseline,actor_critic,gae env=cartpole "
         "seed='range(3)' preset=smoke hydra.sweep.dir=sweeps/cartpole")
TB_SWEEP = ("pgvar-run -m estimator=reinforce,gae env=cartpole preset=smoke logger=tensorboard "
            "hydra.sweep.dir=sweeps/cartpole-tb")

PAIRED_RUN = ("pgvar-run env=tabular estimator=gae preset=smoke "
              "'training.measure.estimators=[reinforce,rloo,\"gae(lam=0.5)\"]' "
              "'training.measure.critic_episodes=[32,320]' hydra.run.dir=runs/paired")

# README command -> the command this test runs ({tmp}: a fresh folder), or None: not run.
SHELL_FORMS: dict[str, str | None] = {
    # sets up .venv and runs the suite this test is part of: CI runs it as its first step
    "make test": None,
    "make test-slow": None,
    # make reproduce = set-up + the quick preset; its smoke twin exercises the same path
    "make reproduce": "pgvar-reproduce table --preset smoke --out {tmp}/table",
    ". .venv/bin/activate": None,  # this test puts the venv's scripts first on PATH instead
    ".venv/bin/pip install -e '.[mujoco]'": None,  # an install, network needed
    ".venv/bin/pip install -e '.[tensorboard]'": None,  # an install (the dev extra has it)
    "pgvar-run env=cartpole estimator=gae preset=smoke":
        "pgvar-run env=cartpole estimator=gae preset=smoke",
    SWEEP: SWEEP,
    "pgvar-run -m ... hydra/launcher=joblib":
        "pgvar-run -m estimator=reinforce,gae env=tabular preset=smoke hydra/launcher=joblib "
        "hydra.launcher.n_jobs=2 hydra.sweep.dir={tmp}/sweep",
    "pgvar-run -m ... hydra/launcher=submitit_slurm hydra.launcher.partition=P": None,  # a cluster
    "pgvar-run -m ... hydra/launcher=submitit_local":
        "pgvar-run -m estimator=reinforce env=tabular preset=smoke "
        "hydra/launcher=submitit_local hydra.sweep.dir={tmp}/sweep",
    "pgvar-run --help;  pgvar-run <overrides> --cfg job":
        "pgvar-run --help && pgvar-run env=cartpole preset=smoke --cfg job",
    # the README's analysis example reads the sweep of the line above
    "pgvar-analyze sweeps/cartpole --out sweeps/cartpole-analysis":
        f"{SWEEP} && pgvar-analyze sweeps/cartpole --out sweeps/cartpole-analysis "
        "&& test -s sweeps/cartpole-analysis/table.md",
    TB_SWEEP: f"{TB_SWEEP} && ls sweeps/cartpole-tb/*/events.out.tfevents.*",
    "tensorboard --logdir sweeps/cartpole-tb": None,  # a server; the events: the line above
    PAIRED_RUN: PAIRED_RUN.replace("runs/paired", "{tmp}/paired"),
    "pgvar-measure runs/paired --estimators optimal_baseline actor_critic --critic-episodes 32":
        f"{PAIRED_RUN.replace('runs/paired', '{tmp}/paired')} && pgvar-measure {{tmp}}/paired "
        "--estimators optimal_baseline actor_critic --critic-episodes 32 "
        "&& grep -q remeasure {tmp}/paired/paired.csv",
}

# Commands run in the default suite (a few seconds each); all others are slow. Each
# pgvar-run and pgvar-reproduce form is also checked in process in the default run
# (its overrides compose and validate, its experiment and preset exist).
FAST: set[str] = set()

# First line of a Python snippet -> (old, new) replacements that shrink it to smoke size.
PYTHON_EDITS: dict[str, list[tuple[str, str]]] = {}


def synthetic_cartpole_sweep(folder: Path) -> None:
    """``sweeps/cartpole`` in ``folder``, as the README's sweep leaves it, from
    ``analysis.synthetic`` (written in pgvar-run's format in a fraction of a second; the
    slow ``pgvar-analyze`` line runs the real sweep)."""
    from analysis.synthetic import TrueEstimator, write_sweep

    truths = [TrueEstimator(name, bias=0.0, variance=v) for name, v in
              (("reinforce", 4.0), ("mean_baseline", 1.0), ("actor_critic", 0.5), ("gae", 0.7))]
    write_sweep(folder / "sweeps" / "cartpole", truths, seeds=range(3), env="cartpole")


# First line of a Python snippet -> what its folder needs first (the README's earlier steps).
PYTHON_SETUP = {"from analysis import load_runs": synthetic_cartpole_sweep}


# ------------------------------------------------------------------------ extraction


FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the fenced blocks of ``language`` in ``text``, in order."""
    return [body for lang, body in FENCE.findall(text) if lang == language]


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(text: str) -> list[str]:
    """Every command of the README's ``bash`` blocks, comments and blank lines dropped."""
    lines = [strip_comment(line) for body in fenced_blocks(text, "bash")
             for line in body.splitlines()]
    return [line.strip() for line in lines if line.strip()]


def python_snippets(text: str) -> list[str]:
    return fenced_blocks(text, "python")


README_TEXT = README.read_text()
COMMANDS = shell_commands(README_TEXT)
SNIPPETS = python_snippets(README_TEXT)


# ----------------------------------------------------------------------- the checks


def test_the_extraction_sees_the_readme_snippets():
    assert "make reproduce" in COMMANDS and "make test" in COMMANDS
    assert SNIPPETS, "the README has no python block"
    assert strip_comment("pgvar-run seed='range(5)'   # five seeds") == "pgvar-run seed='range(5)'"
    assert strip_comment("echo '#not a comment'") == "echo '#not a comment'"


def test_every_readme_command_has_a_smoke_form():
    missing = [c for c in COMMANDS if c not in SHELL_FORMS]
    assert not missing, ("README commands without an entry in tests/test_readme.py's "
                         f"SHELL_FORMS (say how each is checked): {missing}")
    stale = [c for c in SHELL_FORMS if c not in COMMANDS]
    assert not stale, f"SHELL_FORMS entries no longer in the README: {stale}"


def shell_env() -> dict[str, str]:
    """The environment of a reader who activated the venv: its scripts first on PATH."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_command(command: str, tmp: Path) -> subprocess.CompletedProcess:
    """``command`` (with ``{tmp}`` filled in) through bash in ``tmp``."""
    return subprocess.run(["bash", "-c", command.replace("{tmp}", str(tmp))], cwd=tmp,
                          env=shell_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)


RUNNABLE = [c for c in COMMANDS if SHELL_FORMS.get(c)]


@pytest.mark.parametrize("readme_command", [
    pytest.param(c, id=c[:60], marks=() if c in FAST else pytest.mark.slow) for c in RUNNABLE])
def test_readme_command_runs(readme_command, tmp_path):
    proc = run_command(SHELL_FORMS[readme_command], tmp_path)
    assert proc.returncode == 0, (f"README command {readme_command!r} as "
                                  f"{SHELL_FORMS[readme_command]!r} exited {proc.returncode}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_python_snippet_runs(index, tmp_path, monkeypatch, one_thread):
    """Each snippet in a fresh namespace, in a scratch folder, as a notebook would run it."""
    code = SNIPPETS[index]
    for old, new in PYTHON_EDITS.get(code.splitlines()[0], []):
        assert old in code, f"PYTHON_EDITS: {old!r} is no longer in the snippet"
        code = code.replace(old, new)
    setup = PYTHON_SETUP.get(code.splitlines()[0])
    if setup is not None:
        setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code


def tool_calls(command: str, tool: str) -> list[list[str]]:
    """The argument lists of every call of ``tool`` in a shell command line."""
    import shlex

    calls = []
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        if words and words[0] == tool:
            calls.append(words[1:])
    return calls


FORMS = [SHELL_FORMS[c] for c in RUNNABLE]


def distinct_calls(tool: str) -> list[list[str]]:
    """Every distinct argument list of ``tool`` in the forms, in order."""
    return [list(a) for a in dict.fromkeys(tuple(a) for f in FORMS for a in tool_calls(f, tool))]


@pytest.mark.parametrize("args", distinct_calls("pgvar-run"), ids=" ".join)
def test_readme_pgvar_run_arguments_validate(args, tmp_path):
    """pgvar-run's own pre-launch check on each form: every job composes and validates."""
    from pgvar.cli import parse_command_line, validate_jobs

    cmd = parse_command_line([a.replace("{tmp}", str(tmp_path)) for a in args])
    if cmd.runs_jobs:
        assert validate_jobs(cmd) == []


@pytest.mark.parametrize("args", distinct_calls("pgvar-reproduce"), ids=" ".join)
def test_readme_pgvar_reproduce_arguments_parse(args, tmp_path):
    """pgvar-reproduce's arguments parse and name an experiment with that preset."""
    from analysis.reproduce import load_spec, parse_args

    parsed = parse_args([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert load_spec(parsed.name, parsed.preset).sweeps
