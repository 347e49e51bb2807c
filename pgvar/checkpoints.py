"""Policy checkpoints at a run's measured steps, saved and read back without pickle.

A checkpoint is ``JOB_DIR/checkpoints/step_000010.pt``: ``torch.save`` of a dict of
plain tensors and strings (the policy's ``state_dict``, the critic's or None, the step,
and a fingerprint of the config that shaped them), read back with
``torch.load(weights_only=True)``, which refuses anything but tensors and primitive
containers, so a checkpoint cannot run code.

``load_checkpoint`` rebuilds the run's environment, policy and critic from its
run.json exactly as ``pgvar-run`` built them, then loads the saved parameters; a
checkpoint whose fingerprint or parameter shapes do not match that config is refused
with an error naming the file. This is what lets ``pgvar-measure`` score estimators
that were added after the run, at the very policies the run measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgvar import runlog

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
# the config sections that decide the environment, the policy and the critic's shapes
FINGERPRINT_KEYS = ("env", "policy", "seed")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not from this run's config."""


def checkpoint_path(job_dir: Path, step: int) -> Path:
    return Path(job_dir) / runlog.CHECKPOINT_DIR / f"step_{int(step):06d}.pt"


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A short hash of the config sections that shape the environment and policy (and
    the critic's settings): two runs with the same fingerprint have interchangeable
    checkpoints."""
    training = config.get("training") or {}
    parts = {k: config.get(k) for k in FINGERPRINT_KEYS}
    parts["critic"] = training.get("critic")
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(job_dir: Path, step: int, policy: nn.Module, critic: nn.Module | None,
                    config: Mapping[str, Any]) -> Path:
    """Write the policy (and critic) at ``step``; atomic (temporary file, then rename)."""
    path = checkpoint_path(job_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step": int(step), "policy": _cpu_state(policy),
               "critic": _cpu_state(critic) if critic is not None else None,
               "config_fingerprint": config_fingerprint(config)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def checkpoint_steps(job_dir: Path) -> list[int]:
    """The steps that have a checkpoint in ``job_dir``, ascending."""
    folder = Path(job_dir) / runlog.CHECKPOINT_DIR
    matches = (_STEP_FILE.match(p.name) for p in folder.glob("step_*.pt"))
    return sorted(int(m.group(1)) for m in matches if m)


@dataclass
class Checkpoint:
    """A run rebuilt at a measured step: its environment, policy and critic (None when
    the run had none), typed config (``pgvar.config.RunConfig``) and resolved config."""

    env: Any
    policy: nn.Module
    critic: nn.Module | None
    run_cfg: Any
    config: dict[str, Any]
    step: int
    path: Path | None  # None: ``initial_checkpoint``, built from a config, no file


def read_payload(path: Path, device: str = "cpu") -> dict[str, Any]:
    """The checkpoint file's dict, read with ``weights_only=True``."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint {path}: the run saves one at each measured step "
                              "(training.measure.checkpoints=true); list them with "
                              "pgvar.checkpoints.checkpoint_steps")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torn files, pickled objects, wrong formats
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}; "
                              "delete it and re-measure the run") from None
    if not isinstance(payload, dict) or "policy" not in payload:
        raise CheckpointError(f"{path} is not a pgvar checkpoint (no 'policy' entry)")
    return payload


def run_config_of(job_dir: Path) -> dict[str, Any]:
    """The resolved config in the run's run.json (an error naming the file if absent)."""
    record = runlog.read_run_record(job_dir)
    if not record or not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{Path(job_dir) / runlog.RUN_FILE} is missing or unreadable: "
                              "a checkpoint is rebuilt from its run's config")
    return record["config"]


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, path: Path) -> None:
    """``module.load_state_dict(state)``, refusing missing, extra or reshaped entries."""
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0:3]
        raise CheckpointError(f"{path}: the saved {what} does not fit the run's config "
                              f"({' '.join(first)})") from None


def load_checkpoint(job_dir: Path, step: int, device: str = "cpu") -> Checkpoint:
    """The run in ``job_dir`` rebuilt at ``step`` (see the module docstring)."""
    from pgvar.config import build_critic, build_env, run_has_critic
    from pgvar.run import initial_policy, run_config_from
    from pgvar.seeding import derive_seed

    path = checkpoint_path(job_dir, step)
    config = run_config_of(job_dir)
    payload = read_payload(path, device)
    if payload.get("config_fingerprint") != config_fingerprint(config):
        raise CheckpointError(f"{path} was saved by a run with a different environment, policy "
                              f"or seed than {Path(job_dir) / runlog.RUN_FILE} describes: "
                              "refusing to measure it as this run's policy")
    run_cfg = run_config_from(config)
    env = build_env(run_cfg.env, device)
    policy = initial_policy(env, run_cfg)
    load_state(policy, payload["policy"], "policy", path)
    critic = None
    if payload.get("critic") is not None:
        if not run_has_critic(run_cfg):
            raise CheckpointError(f"{path} holds a critic but the run's config uses none")
        critic = build_critic(env, policy, run_cfg.training.critic,
                              derive_seed(run_cfg.seed, "critic"))
        load_state(critic, payload["critic"], "critic", path)
        refresh = getattr(critic, "refresh", None)
        if callable(refresh):  # an exact critic follows the loaded policy
            refresh()
    return Checkpoint(env, policy, critic, run_cfg, config, int(step), path)


def initial_checkpoint(config: Mapping[str, Any], device: str = "cpu") -> Checkpoint:
    """A run's step-0 state built from its resolved ``config`` alone, as ``pgvar-run``
    builds it: the initial policy and the critic it starts from (built from the config's
    critic section even where the run's estimators would not fit one)."""
    from pgvar.config import build_critic
    from pgvar.run import initial_env_and_policy, run_config_from
    from pgvar.seeding import derive_seed

    run_cfg = run_config_from(dict(config))
    env, policy = initial_env_and_policy(config, device)
    critic = build_critic(env, policy, run_cfg.training.critic, derive_seed(run_cfg.seed, "critic"))
    return Checkpoint(env, policy, critic, run_cfg, dict(config), 0, None)
