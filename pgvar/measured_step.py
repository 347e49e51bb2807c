"""One measured step of a run: the paired measurement of every estimator it asks for.

Used by ``pgvar-run`` at each measured iteration (with the training estimator first)
and by ``pgvar-measure`` at a saved checkpoint (with the estimators asked for later).
Both draw the measurement episodes and the reference from the run's seed streams
(``derive_seed(seed, "measure", step)``, ``derive_seed(seed, "reference", step)``), so
a row measured later from a checkpoint is paired with, and where it repeats one equal
to, the rows measured during the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from torch import nn

from pgvar.config import RunConfig, build_critic, measured_specs
from pgvar.estimators import DEFAULT_CONFIG, EstimatorConfig
from pgvar.paired import (
    CriticChoice,
    EstimatorSpec,
    PairedRow,
    References,
    measure_paired,
    spec_label,
)
from pgvar.provenance import code_record, pgvar_digest
from pgvar.reference import Reference, reference_gradient
from pgvar.rollout import rollout
from pgvar.seeding import derive_seed

ALTERNATE_INDEX = 1
FRESH_CRITIC_MINIBATCH = 4096  # samples per regression step of a fresh MLP critic  # derive_seed(seed, "reference", step, 1): the alternate's own stream


def training_spec(name: str, cfg: EstimatorConfig) -> EstimatorSpec:
    """The training estimator as a spec: its name and the knobs that differ from the defaults."""
    changed = tuple((f.name, getattr(cfg, f.name)) for f in fields(EstimatorConfig)
                    if getattr(cfg, f.name) != getattr(DEFAULT_CONFIG, f.name))
    return EstimatorSpec(name, changed)


def reference_options(run_cfg: RunConfig, critic: nn.Module | None, step: int,
                      alternate: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``reference_gradient`` (only Monte Carlo envs use them); the
    alternate uses its own estimator and a seed stream disjoint from the primary's."""
    ref = run_cfg.training.reference
    seed = (derive_seed(run_cfg.seed, "reference", step, ALTERNATE_INDEX) if alternate
            else derive_seed(run_cfg.seed, "reference", step))
    return {"n_episodes": ref.n_episodes, "target_rel_se": ref.target_rel_se,
            "estimator": ref.alternate_estimator() if alternate else ref.estimator,
            "batch_size": ref.batch_size, "chunk_episodes": ref.chunk_episodes,
            "lanes": ref.lanes or None, "critic": critic, "memory_mb": ref.memory_mb,
            "seed": seed}


def step_references(run_cfg: RunConfig, env, policy: nn.Module, critic: nn.Module | None,
                    step: int) -> References:
    """The step's reference, and its alternate made on demand (``pgvar.paired``)."""
    primary = reference_gradient(env, policy, **reference_options(run_cfg, critic, step))
    make_alternate = None
    if not primary.exact and run_cfg.training.reference.alternate_estimator() is not None:
        def make_alternate() -> Reference:
            return reference_gradient(env, policy,
                                      **reference_options(run_cfg, critic, step, alternate=True))
    return References(primary, make_alternate)


def critic_choices(run_cfg: RunConfig, env, policy: nn.Module, critic: nn.Module | None,
                   step: int, episodes: Sequence[int] | None = None,
                   exact: bool | None = None) -> list[CriticChoice]:
    """The critics critic-based rows are scored with: the run's own ("train"), the true V
    ("exact", tabular, when asked), and a fresh one fitted on N episodes for each N."""
    measure = run_cfg.training.measure
    episodes = measure.critic_episodes if episodes is None else episodes
    exact = measure.exact_critic if exact is None else exact
    choices = [CriticChoice("train", critic)] if critic is not None else []
    if exact and callable(getattr(env, "exact_values", None)):
        from pgvar.critics import make_critic

        choices.append(CriticChoice("exact", make_critic(env, "exact", policy=policy)))
    for n in episodes:
        choices.append(CriticChoice(f"fit:{int(n)}", fresh_critic(run_cfg, env, policy, step, int(n)),
                                    episodes=int(n)))
    return choices


def fresh_critic(run_cfg: RunConfig, env, policy: nn.Module, step: int, n_episodes: int) -> nn.Module:
    """A critic built as the run builds its own, fitted on ``n_episodes`` fresh episodes
    of the current policy (their own seed stream: no overlap with the measured episodes).
    An MLP takes ``training.measure.critic_fit_steps`` steps on minibatches of
    ``FRESH_CRITIC_MINIBATCH`` samples; closed-form critics solve least squares."""
    settings = run_cfg.training.critic
    critic = build_critic(env, policy, settings, derive_seed(run_cfg.seed, "critic", step, n_episodes))
    if hasattr(critic, "minibatch"):  # MLP: a fixed cost per step whatever the data
        critic.minibatch = FRESH_CRITIC_MINIBATCH
    batch = rollout(env, policy, n_episodes, derive_seed(run_cfg.seed, "critic_data", step, n_episodes))
    steps = max(settings.fit_steps, run_cfg.training.measure.critic_fit_steps)
    critic.fit(batch, float(env.gamma), env.objective, steps=steps, lr=settings.lr,
               truncation_as_termination=run_cfg.estimator.truncation_as_termination)
    return critic


def paired_cells(row: PairedRow, run_cfg: RunConfig, step: int, references: References,
                 source: str, started: float) -> dict[str, Any]:
    """A paired.csv row: the row's own cells plus where, when and by which code (the
    pgvar source digest) it was measured."""
    disagreement = references.disagreement
    return {"step": step, **row.cells(), "trained_with": run_cfg.estimator.name,
            "is_training": is_training_row(row, run_cfg),
            "ref_disagreement": disagreement if disagreement is not None and math.isfinite(disagreement) else None,
            "source": source, "code": pgvar_digest(code_record()),
            "wall_s": round(time.perf_counter() - started, 3)}


def is_training_row(row: PairedRow, run_cfg: RunConfig) -> bool:
    """Whether ``row`` is the training estimator scored with the run's own critic (the
    row metrics.csv repeats)."""
    cfg = EstimatorConfig(**run_cfg.estimator.core_kwargs())
    return (row.label == spec_label(run_cfg.estimator.name, cfg)
            and (row.critic is None or row.critic.label == "train"))


def measure_step(run_cfg: RunConfig, env, policy: nn.Module, critic: nn.Module | None,
                 specs: Sequence[EstimatorSpec], configs: Sequence[EstimatorConfig], step: int,
                 critics: list[CriticChoice] | None = None, references: References | None = None
                 ) -> list[PairedRow]:
    """Score ``specs`` (with ``configs``) at the current policy on the step's measurement
    episodes against the step's references."""
    training = run_cfg.training
    references = references or step_references(run_cfg, env, policy, critic, step)
    n = training.n_batches * training.batch_size
    batch = rollout(env, policy, n, derive_seed(run_cfg.seed, "measure", step))
    if critics is None:
        critics = critic_choices(run_cfg, env, policy, critic, step)
    return measure_paired(env, policy, specs, configs, critics, batch, training.n_batches, references)


def run_specs(run_cfg: RunConfig, est_cfg: EstimatorConfig) -> tuple[list[EstimatorSpec], list[EstimatorConfig]]:
    """The training estimator first, then ``training.measure.estimators`` (duplicates of
    an earlier label dropped), with their configs."""
    specs = [training_spec(run_cfg.estimator.name, est_cfg)]
    configs = [est_cfg]
    seen = {spec_label(specs[0].name, est_cfg)}
    for spec in measured_specs(run_cfg):
        cfg = spec.config(est_cfg)
        label = spec_label(spec.name, cfg)
        if label not in seen:
            seen.add(label)
            specs.append(spec)
            configs.append(cfg)
    return specs, configs
