"""The padded batch of whole episodes that sampling produces and every estimator reads.

A plain data type with no sampling logic, so the maths that reads it (``pgvar.returns``,
``pgvar.critics``, ``pgvar.estimators``) does not depend on the sampler
(``pgvar.rollout``, ``pgvar.refill``) that fills it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """N padded episodes of at most T steps. Leading dimensions are ``[N, T]``.

    ``terminated[i, t]``: step t of episode i entered a terminal state (value after: 0).
    ``truncated[i, t]``: step t was the last one because of a time limit (the env's own,
    or the objective's horizon). Which value follows a truncation depends on the
    objective; see ``pgvar.returns.bootstrap_values``.
    """

    obs: torch.Tensor  # [N, T, *obs_shape]
    actions: torch.Tensor  # [N, T] long, or [N, T, act_dim] float
    rewards: torch.Tensor  # [N, T]
    next_obs: torch.Tensor  # [N, T, *obs_shape]
    terminated: torch.Tensor  # [N, T] bool
    truncated: torch.Tensor  # [N, T] bool
    mask: torch.Tensor  # [N, T] bool: step t exists in episode i
    logp: torch.Tensor  # [N, T]: log-probability under the sampling policy (for PPO)

    @property
    def n_episodes(self) -> int:
        return self.rewards.shape[0]

    @property
    def horizon(self) -> int:
        return self.rewards.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """Number of steps of each episode, ``[N]``."""
        return self.mask.sum(dim=1)

    @property
    def n_steps(self) -> int:
        """Total state-action pairs in the batch."""
        return int(self.mask.sum())

    @property
    def time_index(self) -> torch.Tensor:
        """``[N, T]`` step index t of every entry (all episodes start at t=0)."""
        t = torch.arange(self.horizon, device=self.rewards.device)
        return t.expand(self.n_episodes, -1)

    def episode_returns(self, gamma: float) -> torch.Tensor:
        """Discounted return sum_t gamma^t r_t of each episode, ``[N]``."""
        disc = gamma ** torch.arange(self.horizon, device=self.rewards.device, dtype=self.rewards.dtype)
        return (self.rewards * self.mask * disc).sum(dim=1)

    def map(self, fn) -> Batch:
        """A new Batch with ``fn`` applied to every field (slicing, reshaping, moving)."""
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def select(self, index) -> Batch:
        """Episodes ``index`` (a slice, index tensor or boolean mask)."""
        return self.map(lambda x: x[index])

    def groups(self, n_groups: int) -> Batch:
        """Reshape to ``[G, B, T, ...]`` for G independent batches of B = N / G episodes."""
        if self.n_episodes % n_groups:
            raise ValueError(f"{self.n_episodes} episodes do not split into {n_groups} equal batches")
        return self.map(lambda x: x.reshape(n_groups, -1, *x.shape[1:]))

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        """Stack episodes of several batches, padding shorter horizons with masked zeros."""
        T = max(b.horizon for b in batches)

        def pad(x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] == T:
                return x
            shape = (x.shape[0], T - x.shape[1], *x.shape[2:])
            return torch.cat([x, torch.zeros(shape, dtype=x.dtype, device=x.device)], dim=1)

        names = [f.name for f in fields(Batch)]
        return Batch(**{n: torch.cat([pad(getattr(b, n)) for b in batches]) for n in names})
