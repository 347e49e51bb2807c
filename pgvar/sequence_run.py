"""The training loop of ``pgvar-run`` on the ``sequence`` task (``env=sequence``).

The same loop as ``pgvar.run.train_and_measure``, with prompt groups instead of
episodes: for iterations i = 0..N-1 at theta_i,

1. sample a training batch of ``training.batch_size`` completions: batch_size / G
   prompts (uniform) times G completions each (``estimator.group_size``);
2. log the exact J, J - beta KL, expected length, KL(pi || pi_ref) and per-prompt
   success rates at theta_i (enumeration; pi_ref is the initial policy);
3. on measured iterations: M = ``training.n_batches`` fresh batches, their estimates
   against the exact grad (J - beta KL) (``pgvar.sequence_measure``), with the direction,
   length and per-prompt statistics;
4. an Adam ascent step along the estimator's direction on the training batch.

metrics.csv has pgvar's columns (``return_mean``: mean 0/1 reward of the training
batch; ``episode_length_mean``: its mean completion length; ``env_steps``: tokens;
``episodes``: completions) plus ``SEQUENCE_COLUMNS`` and one ``success_q`` and
``prompt_weight_q`` column per prompt.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from pgvar import runlog
from pgvar.config import RunConfig, build_policy
from pgvar.envs.sequence import SequenceTask
from pgvar.run import (
    Diverged,
    RunState,
    ascent_step,
    check_finite,
    derive_seed,
    is_measured_step,
    progress_interval,
    progress_line,
)
from pgvar.sequence_estimators import estimate_directions, sample_batches, sequence_config
from pgvar.sequence_measure import measure_sequence

log = logging.getLogger("pgvar.run")

EXACT_COLUMNS = ("exact_J", "exact_objective", "exact_length", "exact_kl")
MEASURED_SEQUENCE_COLUMNS = ("mean_cos_ref", "len_slope_est", "len_slope_ref", "length_bias",
                             "exact_mean_cos", "exact_rel_bias", "exact_len_slope",
                             "exact_length_bias")
SEQUENCE_COLUMNS = EXACT_COLUMNS + MEASURED_SEQUENCE_COLUMNS


def sequence_columns(n_prompts: int) -> tuple[str, ...]:
    """Every metrics.csv column of a sequence run with ``n_prompts`` prompts."""
    per_prompt = tuple(f"success_{q}" for q in range(n_prompts)) + tuple(
        f"prompt_weight_{q}" for q in range(n_prompts))
    return runlog.COLUMNS + SEQUENCE_COLUMNS + per_prompt


def frozen_copy(policy: torch.nn.Module) -> torch.nn.Module:
    """pi_ref: a copy of the policy without gradients."""
    ref = copy.deepcopy(policy)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def exact_row(task: SequenceTask, policy, reference, beta: float) -> dict[str, float]:
    """The exact columns at the current parameters."""
    with torch.no_grad():
        ex = task.exact(policy, reference, beta)
    row = {"exact_J": float(ex.J), "exact_objective": float(ex.objective),
           "exact_length": float(ex.mean_length), "exact_kl": float(ex.mean_kl)}
    row.update({f"success_{q}": float(s) for q, s in enumerate(ex.success)})
    return row


def training_row(step: int, batch, state: RunState) -> dict[str, Any]:
    """Counters and the training batch's rewards and lengths."""
    rewards = batch.rewards.double().reshape(-1)
    lengths = batch.lengths.double().reshape(-1)
    state.env_steps += int(lengths.sum())
    state.episodes += rewards.numel()
    mean = float(rewards.mean())
    return {"step": step, "env_steps": state.env_steps, "episodes": state.episodes,
            "return_mean": mean, "return_undiscounted_mean": mean,
            "return_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "episode_length_mean": float(lengths.mean())}


def measured_row(run_cfg: RunConfig, task: SequenceTask, policy, reference, cfg, step: int,
                 prompts_per_batch: int) -> dict[str, Any]:
    """Gradient statistics and the sequence statistics at theta_i."""
    m = measure_sequence(task, policy, run_cfg.estimator.name, run_cfg.training.n_batches,
                         prompts_per_batch, derive_seed(run_cfg.seed, "measure", step), cfg,
                         reference)
    stats = m.stats.as_dict()
    for key in ("grad_variance", "grad_mse"):
        if not math.isfinite(float(stats[key])):
            raise Diverged(f"non-finite measured {key} at step {step}")
    row = {k: stats[k] for k in runlog.MEASURED_COLUMNS + runlog.EXTRA_COLUMNS if k in stats}
    row.update(ref_exact=True, ref_episodes=0, **m.extras)
    return row


def train_and_measure_sequence(run_cfg: RunConfig, task: SequenceTask, job_dir: Path,
                               started: float, state: RunState) -> None:
    """The loop of the module docstring; rows go to ``job_dir/metrics.csv``."""
    training = run_cfg.training
    cfg = sequence_config(run_cfg.estimator)
    prompts_per_batch = training.batch_size // cfg.group_size
    policy = build_policy(task, run_cfg.policy, derive_seed(run_cfg.seed, "policy"))
    reference = frozen_copy(policy) if cfg.kl_beta > 0 else None
    optimizer = torch.optim.Adam(policy.parameters(), lr=run_cfg.lr, maximize=True)
    every = progress_interval(training.log_every, training.iterations)
    name = run_cfg.estimator.name
    with runlog.MetricsWriter(job_dir / runlog.METRICS_FILE, sequence_columns(task.n_prompts)) as w:
        for step in range(training.iterations):
            if step == run_cfg.debug.raise_at_step:
                raise RuntimeError(f"debug.raise_at_step={step}: a deliberate failure")
            batch = sample_batches(task, policy, 1, prompts_per_batch, cfg.group_size,
                                   derive_seed(run_cfg.seed, "train", step))
            row = training_row(step, batch, state)
            row.update(exact_row(task, policy, reference, cfg.kl_beta))
            if is_measured_step(step, training.iterations, training.measure_every):
                measured = measured_row(run_cfg, task, policy, reference, cfg, step,
                                        prompts_per_batch)
                row.update(measured)
                state.last_measured, state.last_measured_step = measured, step
            g = estimate_directions(name, task, policy, batch, cfg, reference)[0]
            if step == run_cfg.debug.nan_at_step:
                g = torch.full_like(g, float("nan"))
            check_finite(g, step, "training gradient")
            ascent_step(optimizer, policy, g)
            row["grad_norm"] = float(g.double().norm())
            elapsed = time.perf_counter() - started
            row["wall_s"] = round(elapsed, 3)
            w.write(row)
            state.steps_completed = step + 1
            if step % every == 0 or step == training.iterations - 1:
                log.info(progress_line(run_cfg, step, row, state, elapsed)
                         + f" | E|y| {row['exact_length']:.3f} J {row['exact_J']:.4f}")
