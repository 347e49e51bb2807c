"""Bias, variance and the fine-tuning statistics of a sequence estimator, in one call.

    task = make_env("sequence"); policy = make_policy(task)
    m = measure_sequence(task, policy, "grpo", n_batches=64, prompts_per_batch=4, seed=0)
    print(m.stats.grad_bias, m.extras["mean_cos_ref"], m.extras["length_bias"])

The reference is the exact gradient of ``J - beta KL(pi || pi_ref)`` (``beta = cfg.kl_beta``).
Beyond ``pgvar.stats.gradient_stats`` of the M batch estimates (``stats``), ``extras``:

- ``mean_cos_ref``: cos(g_bar, grad J_beta): the direction of the mean estimate (direction
  bias; unlike ``cos_ref``, the mean of per-batch cosines, it is not dragged down by noise);
- ``len_slope_est`` and ``len_slope_ref``: the directional derivative of the expected
  completion length along the unit mean estimate and along the unit true gradient,
  ``<grad E|y|, v> / ||v||``; ``length_bias`` is their difference (tokens per unit step);
- where ``exact_mean`` applies: ``exact_mean_cos`` (cos(E g, grad J_beta) by enumeration),
  ``exact_rel_bias`` (||E g - grad J_beta|| / ||grad J_beta||),
  ``exact_len_slope``, ``exact_length_bias`` and ``prompt_weight_q`` for every prompt q,
  the implied weight ``<E g_q, grad J_q> / ||grad J_q||^2`` of prompt q (E g_q: the part of
  E g from q's groups, times Q; REINFORCE gives 1 for every prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pgvar.envs.sequence import SequenceTask
from pgvar.estimators import DEFAULT_CONFIG, EstimatorConfig
from pgvar.sequence_estimators import (
    cosine,
    estimate_directions,
    exact_mean,
    has_exact_mean,
    sample_batches,
)
from pgvar.sequence_policies import SequencePolicy, flat_grad
from pgvar.stats import GradStats, gradient_stats


@dataclass
class SequenceMeasurement:
    """``stats`` of the M estimates against the exact grad J_beta, and ``extras`` (above)."""

    estimator: str
    stats: GradStats
    extras: dict[str, float] = field(default_factory=dict)
    reference: torch.Tensor | None = None
    estimates: torch.Tensor | None = None


def length_slope(grad_length: torch.Tensor, v: torch.Tensor) -> float:
    """<grad E|y|, v> / ||v||: how fast the expected length changes along direction v."""
    n = float(v.norm())
    return float(grad_length.double() @ v.double()) / n if n > 0 else math.nan


def exact_gradients(task: SequenceTask, policy: SequencePolicy,
                    reference: SequencePolicy | None, beta: float) -> dict[str, torch.Tensor]:
    """Flat exact gradients of J - beta KL (``objective``), J and E|y| (``mean_length``)."""
    ex = task.exact(policy, reference, beta)
    names = ("objective", "J", "mean_length")
    return {what: flat_grad(getattr(ex, what), policy, retain_graph=what != names[-1])
            for what in names}


def prompt_weights(name: str, task: SequenceTask, policy: SequencePolicy,
                   cfg: EstimatorConfig, reference: SequencePolicy | None) -> list[float]:
    """Implied weight of every prompt: <E g_q, grad J_q> / ||grad J_q||^2 with E g_q the
    exact mean of q's groups times Q (nan where grad J_q = 0)."""
    weights = []
    for q in range(task.n_prompts):
        g_q = exact_mean(name, task, policy, cfg, reference, prompts=[q]) * task.n_prompts
        success_q = task.exact(policy).success[q]
        d_q = flat_grad(success_q, policy)
        nn2 = float(d_q.double() @ d_q.double())
        weights.append(float(g_q.double() @ d_q.double()) / nn2 if nn2 > 0 else math.nan)
    return weights


def measure_sequence(task: SequenceTask, policy: SequencePolicy, estimator: str, n_batches: int,
                     prompts_per_batch: int, seed: int,
                     cfg: EstimatorConfig = DEFAULT_CONFIG,
                     reference: SequencePolicy | None = None, with_weights: bool = True,
                     keep_estimates: bool = False) -> SequenceMeasurement:
    """M = ``n_batches`` estimates of ``prompts_per_batch`` x G completions, scored against
    the exact gradient of J - beta KL; see the module docstring for ``extras``."""
    if int(n_batches) < 2:
        raise ValueError(f"n_batches must be >= 2 (variance needs two estimates), got {n_batches}")
    batch = sample_batches(task, policy, n_batches, prompts_per_batch, cfg.group_size, seed)
    D = estimate_directions(estimator, task, policy, batch, cfg, reference).to(torch.float64)
    grads = exact_gradients(task, policy, reference, cfg.kl_beta)
    ref, dlen = grads["objective"], grads["mean_length"]
    stats = gradient_stats(D, ref)
    g_bar = D.mean(0)
    extras = {"mean_cos_ref": cosine(g_bar, ref), "len_slope_est": length_slope(dlen, g_bar),
              "len_slope_ref": length_slope(dlen, ref)}
    extras["length_bias"] = extras["len_slope_est"] - extras["len_slope_ref"]
    if has_exact_mean(estimator, cfg):
        mean = exact_mean(estimator, task, policy, cfg, reference)
        extras["exact_mean_cos"] = cosine(mean, ref)
        extras["exact_rel_bias"] = float((mean.double() - ref.double()).norm() / ref.double().norm())
        extras["exact_len_slope"] = length_slope(dlen, mean)
        extras["exact_length_bias"] = extras["exact_len_slope"] - extras["len_slope_ref"]
        if with_weights:
            for q, w in enumerate(prompt_weights(estimator, task, policy, cfg, reference)):
                extras[f"prompt_weight_{q}"] = w
    return SequenceMeasurement(estimator, stats, extras, ref, D if keep_estimates else None)
