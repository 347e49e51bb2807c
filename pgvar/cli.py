"""``pgvar-run``'s command line: every job validated before any starts, then Hydra.

``main`` expands the sweep with Hydra's own override parser (``pgvar.sweep``), composes
every distinct job's config with Hydra's compose API and validates it
(``pgvar.config.validate_config``), checks the output folder, and only then hands over
to Hydra's app (``pgvar.run.hydra_main``), which runs the jobs. A refused command line
exits with status 2 before any job starts, one message per distinct problem.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pgvar import preflight
from pgvar.config import ConfigError, validate_config
from pgvar.run import CONF_DIR, CONFIG_NAME, hydra_main
from pgvar.sweep import expand_sweep, hydra_args_parser

# Flags with which Hydra runs no job (help, config printing, shell completion).
NO_JOB_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "resolve")


@dataclass
class CommandLine:
    """What ``main`` needs from argv: the overrides and where the configs come from."""

    overrides: list[str]
    config_name: str = CONFIG_NAME
    conf_dir: Path = CONF_DIR
    extra_config_dir: str | None = None
    runs_jobs: bool = True
    multirun: bool = False


def resolve_config_path(config_path: str | None) -> Path:
    """``--config-path`` as Hydra reads it: absolute, or relative to this module's folder."""
    if not config_path:
        return CONF_DIR
    path = Path(config_path)
    return path if path.is_absolute() else (Path(__file__).resolve().parent / path).resolve()


def parse_command_line(argv: list[str]) -> CommandLine:
    """Parse argv with Hydra's own argument parser."""
    args = hydra_args_parser().parse_args(argv)
    runs_jobs = not any(bool(getattr(args, flag, None)) for flag in NO_JOB_FLAGS)
    return CommandLine(overrides=list(args.overrides), config_name=args.config_name or CONFIG_NAME,
                       conf_dir=resolve_config_path(args.config_path),
                       extra_config_dir=args.config_dir, runs_jobs=runs_jobs,
                       multirun=bool(args.multirun))


def split_seed(job: list[str]) -> tuple[tuple[str, ...], str | None]:
    """A job's overrides without ``seed=...``, and the seed's text (None if not given).

    Any integer is a valid seed, so jobs that differ only in their seed need one
    composition between them: what makes validating a many-seed sweep cheap.
    """
    rest, seed = [], None
    for override in job:
        key, _, value = override.partition("=")
        if key == "seed":
            seed = value
        else:
            rest.append(override)
    return tuple(rest), seed


def check_seed_text(seed: str | None) -> None:
    """A seed override must be an integer."""
    if seed is None:
        return
    try:
        int(seed)
    except ValueError:
        raise ConfigError(f"seed must be an integer, got {seed!r}") from None


def compose_job(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose one job's config with Hydra's compose API (inside an initialized context)."""
    from hydra import compose

    return compose(config_name=config_name, overrides=overrides)


def describe_error(err: BaseException) -> str:
    """The error's message with those of its causes (Hydra wraps OmegaConf's), trimmed."""
    parts: list[str] = []
    while err is not None and len(parts) < 4:
        text = str(err).split("Config search path:")[0].strip()
        if text and not any(text in part for part in parts):  # a cause quoted already
            parts.append(text)
        err = err.__cause__
    return "\n".join(parts)


def job_problem(config_name: str, overrides: list[str]) -> str | None:
    """Why one job's config is refused (composition, types or values), or None if valid."""
    try:
        validate_config(compose_job(config_name, overrides))
    except Exception as err:  # noqa: BLE001 - composition, type and value errors alike
        return describe_error(err)
    return None


def validate_jobs(cmd: CommandLine) -> list[str]:
    """Compose and validate every job of the command; one message per distinct error.

    Each distinct job (seeds aside, see ``split_seed``) is composed with Hydra's compose
    API exactly as Hydra will compose it, then checked by ``validate_config``.
    """
    from hydra import initialize_config_dir

    try:
        jobs = expand_sweep(cmd.overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's parser errors have several types
        return [f"cannot parse the overrides {cmd.overrides}:\n{describe_error(err)}"]
    search = ([f"hydra.searchpath=[file://{Path(cmd.extra_config_dir).resolve()}]"]
              if cmd.extra_config_dir else [])
    problems: dict[str, list[str]] = {}
    verdicts: dict[tuple[str, ...], str | None] = {}
    with initialize_config_dir(config_dir=str(cmd.conf_dir), version_base="1.3", job_name="pgvar"):
        for job in jobs:
            rest, seed = split_seed(list(job))
            try:
                check_seed_text(seed)
            except ConfigError as err:
                problem: str | None = str(err)
            else:
                if rest not in verdicts:
                    verdicts[rest] = job_problem(cmd.config_name, search + list(job))
                problem = verdicts[rest]
            if problem:
                problems.setdefault(problem, []).append(" ".join(job))
    return [f"{msg}\n  (in {len(bad)} of {len(jobs)} jobs, e.g. the one with overrides: {bad[0]})"
            for msg, bad in problems.items()]


def output_dir_problems(cmd: CommandLine) -> list[str]:
    """The sweep folder (``-m``) or run folder must be writable; composed with Hydra's
    own config for the first job, as Hydra will (``pgvar.preflight.output_dir_problem``)."""
    from hydra import compose, initialize_config_dir

    key = "hydra.sweep.dir" if cmd.multirun else "hydra.run.dir"
    try:
        first_job = list(expand_sweep(cmd.overrides)[0])
        with initialize_config_dir(config_dir=str(cmd.conf_dir), version_base="1.3",
                                   job_name="pgvar"):
            cfg = compose(config_name=cmd.config_name, overrides=first_job,
                          return_hydra_config=True)
        folder = Path(str(OmegaConf.select(cfg, key)))
    except Exception:  # noqa: BLE001 - Hydra then reports the problem itself
        return []
    problem = preflight.output_dir_problem(folder, key)
    return [problem] if problem else []


def main() -> None:
    """Console entry ``pgvar-run`` (and ``python -m pgvar``): validate every job, then run Hydra."""
    cmd = parse_command_line(sys.argv[1:])
    if cmd.runs_jobs:
        single = None if cmd.multirun else preflight.sweep_without_multirun(cmd.overrides)
        problems = [single] if single else (validate_jobs(cmd) or output_dir_problems(cmd))
        if problems:
            print("pgvar-run: configuration refused; no job was started.", file=sys.stderr)
            for problem in problems:
                print(f"\nerror: {problem}", file=sys.stderr)
            sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
