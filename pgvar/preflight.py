"""Checks that ``pgvar-run`` makes before any job starts, beyond each value's range.

``pgvar.config.validate_config`` calls these on every distinct job of a command (seeds
aside); ``pgvar.cli.main`` also checks the output folder. Each failure is one line that
names the setting to change:

- unknown keys, also those added with Hydra's ``+`` prefix (``+training.batchsize=4``
  would otherwise be accepted and ignored): the structured config is strict;
- ``device=cuda`` (or ``cuda:N``) on a machine where torch sees no such GPU;
- memory: each job's peak is estimated from its sizes (below) and compared with the
  memory this machine has available now; a job that cannot fit is refused, naming the
  size that makes it too large, instead of failing in an allocator (or swapping) later;
- the sweep (or run) folder must be writable;
- a sweep (``seed=0,1``) needs ``-m``; Hydra's own refusal is a paragraph and exit 1.

``count_argument`` gives the other console entries (``pgvar-reproduce --jobs``, the
benchmark's sizes) argparse's one-line refusal (exit 2) of a count below its minimum.

The memory estimate is an upper-side, order-of-magnitude model of what a run holds at
once, in bytes: the environment's model (the tabular MDP's and the chain's ``[S, A, S]``
float64 tables and their temporaries, LQR's moments over the horizon), the training
rollout (B episodes x T steps), the measurement rollout (M x B episodes x T steps), the
Monte Carlo reference's chunk (``chunk_episodes`` x T steps, Gymnasium envs only), and the
gradient rows (``[M, P]`` estimates, blocks of at most 64 groups x P). Episodes are
counted at the full horizon (a trained policy reaches it), so environments whose
episodes end early (CartPole at a random policy) are overestimated. A step of a padded
episode stores its observation twice (``obs``, ``next_obs``), its action, reward,
log-probability, flags and the estimators' per-step weights, and the rollout builds it
once compactly and once padded (``STEP_COPIES``).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pgvar.config import ConfigError, RunConfig

# reward, log-prob, mask and flags, returns and the estimators' per-step weights; with the
# factor below, ~300 bytes a step: measured peaks of 3.2M-step measurements on the tabular
# MDP and LQR were 280-300 bytes a step above the process' start-up memory
STEP_OVERHEAD_BYTES = 128
STEP_COPIES = 2  # the rollout holds the live steps compactly and then the padded batch
TABLE_COPIES = 4  # P and rewards [S, A, S] float64, plus the temporaries that generate them
GRADIENT_BLOCK_GROUPS = 64  # groups whose gradient rows are computed at once (measure's chunk)
FLOAT64_BYTES = 8


# ------------------------------------------------------------------------ unknown keys


def unknown_keys(node: Any, schema: type | None = None, prefix: str = "") -> list[str]:
    """Dotted keys of ``node`` that its structured-config schema does not declare.

    A node whose schema is a dataclass may hold only that dataclass' fields; free-form
    dicts (``env.make_kwargs``) are not checked.
    """
    schema = schema or OmegaConf.get_type(node)
    if not (isinstance(node, DictConfig) and is_dataclass(schema)):
        return []
    declared = {f.name for f in fields(schema)}
    found = []
    for key in node:
        name = f"{prefix}{key}"
        if key not in declared:
            found.append(name)
            continue
        child = None if OmegaConf.is_missing(node, key) else node.get(key)
        if isinstance(child, DictConfig):
            found += unknown_keys(child, OmegaConf.get_type(child), prefix=f"{name}.")
    return found


def declared_keys(cfg: DictConfig, dotted: str) -> list[str]:
    """The fields declared next to ``dotted`` (for 'did you mean')."""
    parent, _, _ = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    names = [f.name for f in fields(schema)] if is_dataclass(schema) else []
    return [f"{parent}.{n}" if parent else n for n in names]


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys the schema does not declare, with the closest declared name."""
    for key in unknown_keys(cfg, RunConfig):
        close = difflib.get_close_matches(key, declared_keys(cfg, key), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown key {key}: {hint}remove it (every valid key is in "
                          f"pgvar/config.py; a '+' prefix does not make a key valid)")


# ----------------------------------------------------------------------------- device


def check_device(device: str) -> None:
    """``cuda``/``cuda:N`` needs torch to see that GPU here (``auto`` falls back to cpu)."""
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        seen = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise ConfigError(f"device={device} but torch sees {seen} on this machine; "
                          f"use device=cpu (or device=auto)")


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryTerm:
    """One part of a job's memory: its bytes, what it is, and the sizes it grows with."""

    what: str
    bytes: float
    knobs: tuple[tuple[str, float], ...]  # (setting, its value), each a factor of ``bytes``


def available_memory_bytes() -> int | None:
    """Memory this process can still use: MemAvailable, capped by a cgroup limit."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            found.append(int(limit))
    except OSError:
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(found) if found else None


def model_terms(run_cfg: RunConfig) -> list[MemoryTerm]:
    """The exact environments' own tables, known from the config before anything is built."""
    env = run_cfg.env
    if env.name == "tabular":
        s, a = float(env.n_states), float(env.n_actions)
        return [MemoryTerm("the MDP's [S, A, S] tables", TABLE_COPIES * s * a * s * FLOAT64_BYTES,
                           (("env.n_states", s), ("env.n_states", s), ("env.n_actions", a)))]
    if env.name == "chain":
        n = float(env.length)
        return [MemoryTerm("the chain's [L, 2, L] tables", TABLE_COPIES * 2 * n * n * FLOAT64_BYTES,
                           (("env.length", n), ("env.length", n)))]
    if env.name == "lqr":
        d, t = float(env.state_dim + env.action_dim + 1), float(env.horizon or 1)
        return [MemoryTerm("LQR's moments over the horizon", TABLE_COPIES * t * d * d * FLOAT64_BYTES,
                           (("env.horizon", t), ("env.state_dim", float(env.state_dim)),
                            ("env.action_dim", float(env.action_dim))))]
    return []


def step_bytes(env: Any) -> float:
    """Bytes one step of a padded episode takes (module doc), with the rollout's copies."""
    import torch

    shape = getattr(env, "obs_shape", ())  # the sequence task has no observation array
    obs_numel = math.prod(shape) if shape else 1
    dtype = getattr(env, "obs_dtype", torch.float32)
    obs_bytes = obs_numel * torch.empty((), dtype=dtype).element_size()
    action_numel = max(1, int(getattr(getattr(env, "action_spec", None), "dim", 0) or 0))
    return STEP_COPIES * (2 * obs_bytes + FLOAT64_BYTES * action_numel + STEP_OVERHEAD_BYTES)


def job_memory_terms(run_cfg: RunConfig, env: Any, policy: Any) -> list[MemoryTerm]:
    """Every term of a job's peak memory (module doc), from its config and built env."""
    from pgvar.envs.base import is_exact

    tr, ref = run_cfg.training, run_cfg.training.reference
    T, B, M = float(env.horizon), float(tr.batch_size), float(tr.n_batches)
    P = float(sum(p.numel() for p in policy.parameters()))
    per_step = step_bytes(env)
    terms = model_terms(run_cfg) + [
        MemoryTerm("the training rollout", B * T * per_step,
                   (("training.batch_size", B), ("env.horizon", T))),
        MemoryTerm("the measurement rollout", M * B * T * per_step,
                   (("training.n_batches", M), ("training.batch_size", B), ("env.horizon", T))),
        MemoryTerm("the M batch gradients", 3 * M * P * FLOAT64_BYTES,
                   (("training.n_batches", M), ("policy size", P))),
        MemoryTerm("a block of gradient rows", 3 * min(M, GRADIENT_BLOCK_GROUPS) * P
                   * FLOAT64_BYTES, (("training.n_batches", M), ("policy size", P))),
    ]
    if not is_exact(env):
        chunk = float(ref.chunk_episodes)
        terms.append(MemoryTerm("a Monte Carlo reference chunk", 2 * chunk * T * per_step,
                                (("training.reference.chunk_episodes", chunk), ("env.horizon", T))))
    return terms


def knob_to_lower(term: MemoryTerm, run_cfg: RunConfig) -> str:
    """The setting of ``term`` furthest above its default (what to lower first)."""
    def excess(knob: tuple[str, float]) -> float:
        default = default_value(run_cfg, knob[0])
        return knob[1] / default if default else 0.0
    name, value = max(term.knobs, key=excess)
    return f"{name}={int(value) if float(value).is_integer() else value}"


def default_value(run_cfg: RunConfig, dotted: str) -> float | None:
    """The schema's default of a setting (of this run's env class), None if it has none."""
    section, _, key = dotted.partition(".")
    schemas = {"env": type(run_cfg.env), "training": type(run_cfg.training),
               "reference": type(run_cfg.training.reference)}
    if dotted.startswith("training.reference."):
        section, key = "reference", dotted.rsplit(".", 1)[1]
    schema = schemas.get(section)
    value = getattr(schema(), key, None) if schema else None
    return float(value) if isinstance(value, (int, float)) and value else None


def gib(n_bytes: float) -> str:
    """Bytes as GiB, readable across many orders of magnitude."""
    return f"{n_bytes / 2**30:.3g} GiB"


def check_memory(terms: list[MemoryTerm], run_cfg: RunConfig, available: int | None) -> None:
    """Refuse a job whose estimated memory exceeds what is ``available``."""
    total = sum(t.bytes for t in terms)
    if available is None or total <= available:
        return
    largest = max(terms, key=lambda t: t.bytes)
    knob = knob_to_lower(largest, run_cfg)
    raise ConfigError(f"{knob} is too large for this machine: a job would need about "
                      f"{gib(total)} ({gib(largest.bytes)} for {largest.what}), "
                      f"{gib(available)} is available; lower {knob.split('=')[0]}")


def check_model_size(run_cfg: RunConfig) -> None:
    """Before building the environment: its own tables must fit."""
    check_memory(model_terms(run_cfg), run_cfg, available_memory_bytes())


def check_job_memory(run_cfg: RunConfig, env: Any, policy: Any) -> None:
    """With the environment and policy built (on the CPU): the whole job must fit."""
    check_memory(job_memory_terms(run_cfg, env, policy), run_cfg, available_memory_bytes())


# ------------------------------------------------------------------------ duration

# Environment steps a job can take before it is refused: about a week of this machine at
# the measured 1-2 million state-action pairs a second of the reference (README, speed).
MAX_JOB_STEPS = 1e12
DURATION_CLASSES = ((1e7, "seconds"), (1e9, "minutes"), (1e10, "hours"), (math.inf, "days"))


def job_step_terms(run_cfg: RunConfig, horizon: float, exact: bool) -> list[MemoryTerm]:
    """Environment steps of a job (counted at the full horizon), by where they go: the
    training batches, the M x B measurement episodes and the Monte Carlo references at
    every measured iteration. ``MemoryTerm.bytes`` holds the step count here."""
    tr = run_cfg.training
    N, k = float(tr.iterations), float(tr.measure_every)
    measured = math.floor((N - 1) / k) + 1 + (1 if (N - 1) % k else 0)
    B, M, T = float(tr.batch_size), float(tr.n_batches), float(horizon)
    terms = [MemoryTerm("training", N * B * T, (("training.iterations", N),
                                                  ("training.batch_size", B))),
             MemoryTerm("measurements", measured * M * B * T,
                        (("training.n_batches", M), ("training.batch_size", B),
                         ("training.iterations", N)))]
    if not exact:
        ref = float(tr.reference.n_episodes)
        terms.append(MemoryTerm("Monte Carlo references", measured * ref * T,
                                (("training.reference.n_episodes", ref),
                                 ("training.iterations", N))))
    return terms


def duration_class(steps: float) -> str:
    """'seconds', 'minutes', 'hours' or 'days' for a job of ``steps`` environment steps
    on this 2-core class of machine (order of magnitude, not a promise)."""
    return next(word for bound, word in DURATION_CLASSES if steps < bound)


def check_job_duration(run_cfg: RunConfig, env: Any) -> tuple[float, str]:
    """The job's estimated environment steps and duration class; refuses a job beyond
    ``MAX_JOB_STEPS`` with one line naming the setting that makes it so long."""
    from pgvar.envs.base import is_exact

    terms = job_step_terms(run_cfg, float(env.horizon), is_exact(env))
    steps = sum(t.bytes for t in terms)
    if steps > MAX_JOB_STEPS:
        largest = max(terms, key=lambda t: t.bytes)
        knob = knob_to_lower(largest, run_cfg)
        raise ConfigError(f"{knob} makes a job too long: about {steps:.2g} environment steps "
                          f"({largest.what}: {largest.bytes:.2g}), days or more on this "
                          f"machine; lower {knob.split('=')[0]}")
    return steps, duration_class(steps)


def check_before_build(run_cfg: RunConfig) -> None:
    """What can be checked from the typed config alone: the device and the model size."""
    check_device(run_cfg.device)
    check_model_size(run_cfg)


# ----------------------------------------------------------------------- output folder


def deepest_existing(folder: Path) -> Path:
    """``folder`` itself if it exists, else its nearest existing ancestor."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def output_dir_problem(folder: Path, key: str) -> str | None:
    """Why ``folder`` (the value of ``key``) cannot take the runs' files, or None.

    Creates and deletes a temporary file in the folder (or, before it exists, in the
    ancestor it would be created in): the only test that also holds for root and for
    read-only file systems. Creates no folder, so a refused command leaves nothing.
    """
    probe_in = deepest_existing(folder)
    try:
        if not probe_in.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", str(probe_in))
        with tempfile.TemporaryFile(dir=probe_in, prefix=".pgvar-write-test"):
            pass
    except OSError as err:
        return (f"cannot write to {key}={folder} ({err.strerror or err}: {probe_in}); "
                f"choose a folder you can write to with {key}=DIR")
    return None


# ----------------------------------------------------------------- command-line shapes


def sweep_without_multirun(overrides: list[str]) -> str | None:
    """A sweep override (``seed=0,1``, ``range(5)``) in a command without ``-m``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - parse errors are reported by the job validation
        return None
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if not sweeps:
        return None
    return (f"{sweeps[0]} lists several values but -m (--multirun) is not given: add -m to run "
            f"one job per value (or quote the value, key='a,b', for one string)")


def count_argument(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``minimum`` (argparse then refuses
    anything else with one line and exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse
