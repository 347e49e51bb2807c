"""The batched environment interface every pgvar environment implements.

An environment steps N independent episodes at once on torch tensors. It owns the
objective's constants (horizon T, discount gamma, objective kind) because the
reference gradient is the gradient of exactly that objective:

    J(theta) = E[ sum_{t<T} gamma^t r_t ]            (objective="finite", the default)
    J(theta) = E[ sum_{t>=0} gamma^t r_t ]           (objective="discounted")

Under "finite" the horizon is part of J, so the value after step T-1 is 0. Under
"discounted" the horizon only cuts sampling short, so a cut must bootstrap with V.
Episodes always start at t=0; ``terminated`` (a terminal state, value 0 after it) and
``truncated`` (a time-limit cut) are kept apart from the environment to the estimators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from pgvar.checks import require_choice, require_in_range, require_int

OBJECTIVES = ("finite", "discounted")


@dataclass(frozen=True)
class ActionSpec:
    """What the policy must emit: ``n`` discrete actions, or a real vector of ``dim``."""

    kind: str  # "discrete" or "continuous"
    n: int = 0
    dim: int = 0


@dataclass
class StepResult:
    """One batched transition: next observation, reward, and the two ways of ending."""

    obs: torch.Tensor  # [N, *obs_shape]
    reward: torch.Tensor  # [N] float
    terminated: torch.Tensor  # [N] bool: reached a terminal state
    truncated: torch.Tensor  # [N] bool: cut by the environment's own time limit


@runtime_checkable
class BatchedEnv(Protocol):
    """Resets and steps N episodes at once. Seeded by ``reset``; deterministic given it."""

    name: str
    horizon: int
    gamma: float
    objective: str
    obs_shape: tuple[int, ...]
    obs_dtype: torch.dtype
    action_spec: ActionSpec
    device: torch.device

    def reset(self, n: int, seed: int) -> torch.Tensor:
        """Start ``n`` episodes; returns the first observations ``[n, *obs_shape]``."""
        ...

    def step(self, actions: torch.Tensor) -> StepResult:
        """Apply one action per episode and return the batched transition."""
        ...


@runtime_checkable
class ExactEnv(BatchedEnv, Protocol):
    """An environment whose objective J(theta) is computable exactly and differentiably."""

    def exact_objective(self, policy: torch.nn.Module) -> torch.Tensor:
        """J at the policy's current parameters, as a scalar with autograd history."""
        ...


def is_exact(env: object) -> bool:
    """True when the environment can give the exact objective (and so exact gradients)."""
    return callable(getattr(env, "exact_objective", None))


def check_objective_constants(horizon: int, gamma: float, objective: str) -> None:
    """Refuse impossible objective settings with a message that names the fix."""
    require_int("horizon", horizon)
    require_in_range("gamma", gamma, 0.0, 1.0)
    require_choice("objective", objective, OBJECTIVES)
    if objective == "discounted" and float(gamma) >= 1.0:
        raise ValueError("objective='discounted' needs gamma < 1 (the infinite sum diverges)")
