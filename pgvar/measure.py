"""Bias and variance of an estimator at the policy's current parameters, in one call.

    env = make_env("lqr", state_dim=2, action_dim=1, horizon=20); policy = make_policy(env)
    m = measure(env, policy, "rloo", n_batches=64, batch_size=16, seed=0)
    print(m.stats.grad_bias, m.stats.grad_variance)

``measure`` draws ``n_batches * batch_size`` episodes in one batched rollout, splits them
into M = ``n_batches`` independent batches of B = ``batch_size`` episodes, computes the M
estimates g_1..g_M, and scores them against the reference gradient (exact where the
environment allows, else Monte Carlo with its own standard error, from other episodes)
with ``pgvar.stats.gradient_stats``. ``measure_many`` scores several estimators on the
same episodes: a paired comparison, in which the sampling noise common to all rows of a
comparison cancels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pgvar.batch import Batch
from pgvar.checks import require_int
from pgvar.estimators import (
    DEFAULT_CONFIG,
    EstimatorConfig,
    estimate_gradients,
    get_estimator,
)
from pgvar.progress import Progress
from pgvar.reference import Reference, reference_gradient
from pgvar.rollout import rollout
from pgvar.stats import GradStats, gradient_stats


@dataclass
class Measurement:
    """One estimator's statistics at one parameter vector.

    ``stats``: the statistics of the M estimates against ``reference``; ``n_steps``: the
    state-action pairs of all M batches together; ``estimates``: the ``[M, P]`` estimates
    when asked for (``keep_estimates=True``), else None.
    """

    estimator: str
    stats: GradStats
    reference: Reference
    n_batches: int
    batch_size: int
    n_steps: int
    seed: int
    estimates: torch.Tensor | None = None

    def as_dict(self) -> dict[str, float | int | bool | str]:
        """Flat record for logs: the statistics plus what they were measured on."""
        return {
            "estimator": self.estimator,
            **self.stats.as_dict(),
            "batch_size": self.batch_size,
            "n_batches": self.n_batches,
            "n_steps": self.n_steps,
            "ref_exact": self.reference.exact,
            "ref_method": self.reference.method,
            "ref_n_episodes": self.reference.n_episodes,
        }


def check_sizes(n_batches: int, batch_size: int) -> None:
    """M >= 2 batches (a spread needs two) and B >= 1 episodes each, as integers."""
    require_int("n_batches (variance needs two estimates)", n_batches, 2)
    require_int("batch_size", batch_size)


def _for(name: str, value, kind):
    """``value`` itself, or ``value[name]`` when a per-estimator mapping was given."""
    if isinstance(value, Mapping) and not isinstance(value, kind):
        return value.get(name)
    return value


def measure_many(env, policy: nn.Module, estimators: Sequence[str], n_batches: int,
                 batch_size: int, seed: int,
                 critic: nn.Module | Mapping[str, nn.Module] | None = None,
                 cfg: EstimatorConfig | Mapping[str, EstimatorConfig] = DEFAULT_CONFIG,
                 reference: Reference | None = None, chunk: int = 64,
                 keep_estimates: bool = False, reference_kwargs: dict | None = None,
                 batch: Batch | None = None, progress: bool | None = None) -> dict[str, Measurement]:
    """Score several estimators on the same ``n_batches * batch_size`` episodes.

    Cost: where the environment has no exact gradient (Gymnasium ids) and no
    ``reference`` is passed, the Monte Carlo reference dominates: 10,000 episodes at the
    defaults (``pgvar.reference.monte_carlo_reference`` gives its time and memory;
    Hopper-v5 160 s and 616 MB, CartPole at its initial policy about 1 s); pass
    ``reference_kwargs={"n_episodes": ...}`` to size it. ``progress`` (default: on a
    terminal) prints the reference's and the estimators' progress every few seconds.

    ``critic`` and ``cfg`` are shared, or mappings from estimator name (missing names:
    no critic / the default config). The reference is computed once (or the one passed
    is reused); ``reference_kwargs`` go to ``reference_gradient`` (Monte Carlo budget,
    seed; a Monte Carlo reference is seeded from ``seed`` on streams of its own).
    ``batch`` may be given to reuse episodes already drawn (it must hold exactly
    ``n_batches * batch_size`` episodes from the current policy).
    """
    check_sizes(n_batches, batch_size)
    names = list(estimators)
    if not names:
        raise ValueError("estimators must name at least one estimator")
    for name in names:
        est = get_estimator(name)
        if est.needs_critic and _for(name, critic, nn.Module) is None:
            raise ValueError(f"estimator {name!r} needs a critic: pass critic= "
                             "(e.g. pgvar.critics.make_critic(env), fitted on other data)")
    if reference is None:
        kw = {"seed": seed, "progress": progress, **(reference_kwargs or {})}
        reference = reference_gradient(env, policy, **kw)
    n = int(n_batches) * int(batch_size)
    if batch is None:
        batch = rollout(env, policy, n, seed)
    elif batch.n_episodes != n:
        raise ValueError(f"batch holds {batch.n_episodes} episodes, expected n_batches * "
                         f"batch_size = {n}")
    out = {}
    bar = Progress(len(names), "measure", unit="estimators", progress=progress)
    for name in names:
        c = _for(name, critic, nn.Module)
        conf = _for(name, cfg, EstimatorConfig) or DEFAULT_CONFIG
        G = estimate_gradients(name, env, policy, batch, int(n_batches), c, conf, chunk)
        G = G.detach().to(torch.float64).cpu()
        out[name] = Measurement(
            estimator=name,
            stats=gradient_stats(G, reference.grad, reference.se2, reference.var,
                                 reference.noise_sample),
            reference=reference,
            n_batches=int(n_batches),
            batch_size=int(batch_size),
            n_steps=batch.n_steps,
            seed=int(seed),
            estimates=G if keep_estimates else None,
        )
        bar.update()
    bar.close()
    return out


def measure(env, policy: nn.Module, estimator: str, n_batches: int, batch_size: int, seed: int,
            critic: nn.Module | None = None, cfg: EstimatorConfig = DEFAULT_CONFIG,
            reference: Reference | None = None, chunk: int = 64, keep_estimates: bool = False,
            reference_kwargs: dict | None = None, progress: bool | None = None) -> Measurement:
    """Bias, variance, MSE, cosines and SNR of ``estimator`` with M = ``n_batches``
    batches of B = ``batch_size`` episodes, against ``reference`` (computed if None).

    Cost: on a Gymnasium environment the default Monte Carlo reference (10,000
    episodes) dominates, whatever ``n_batches`` and ``batch_size``: see ``measure_many``."""
    return measure_many(env, policy, [estimator], n_batches, batch_size, seed, critic, cfg,
                        reference, chunk, keep_estimates, reference_kwargs,
                        progress=progress)[estimator]
