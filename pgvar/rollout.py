"""Batched sampling of whole episodes into one padded batch.

All N episodes are stepped together; step t of every episode sits in column t, so the
time index of ``obs[:, t]`` is t. After an episode ends its lane keeps a zero mask.
Actions are sampled without autograd; log-probabilities are re-computed later in one
batched forward pass (``pgvar.gradients``), which is both faster and what
``torch.func`` needs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from pgvar.envs.base import BatchedEnv


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

    def map(self, fn) -> "Batch":
        """A new Batch with ``fn`` applied to every field (slicing, reshaping, moving)."""
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def select(self, index) -> "Batch":
        """Episodes ``index`` (a slice, index tensor or boolean mask)."""
        return self.map(lambda x: x[index])

    def groups(self, n_groups: int) -> "Batch":
        """Reshape to ``[G, B, T, ...]`` for G independent batches of B = N / G episodes."""
        if self.n_episodes % n_groups:
            raise ValueError(f"{self.n_episodes} episodes do not split into {n_groups} equal batches")
        return self.map(lambda x: x.reshape(n_groups, -1, *x.shape[1:]))

    @staticmethod
    def concat(batches: list["Batch"]) -> "Batch":
        """Stack episodes of several batches, padding shorter horizons with masked zeros."""
        T = max(b.horizon for b in batches)

        def pad(x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] == T:
                return x
            shape = (x.shape[0], T - x.shape[1], *x.shape[2:])
            return torch.cat([x, torch.zeros(shape, dtype=x.dtype, device=x.device)], dim=1)

        names = [f.name for f in fields(Batch)]
        return Batch(**{n: torch.cat([pad(getattr(b, n)) for b in batches]) for n in names})


@torch.no_grad()
def rollout(env: BatchedEnv, policy: torch.nn.Module, n_episodes: int, seed: int) -> Batch:
    """Sample ``n_episodes`` episodes of at most ``env.horizon`` steps, all at once.

    Deterministic given ``seed``: the environment and the action sampler each get a
    generator derived from it. The loop stops as soon as every episode has ended.
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be at least 1, got {n_episodes}")
    obs = env.reset(n_episodes, seed)
    device = obs.device
    gen = torch.Generator(device=device).manual_seed(int(seed) * 2654435761 % (2**63) + 1)
    T = env.horizon
    alive = torch.ones(n_episodes, dtype=torch.bool, device=device)
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in
                                           ("obs", "actions", "rewards", "next_obs", "terminated",
                                            "truncated", "mask", "logp")}
    for t in range(T):
        actions = policy.sample(obs, gen)
        logp = policy.log_prob(obs, actions)
        res = env.step(actions)
        truncated = res.truncated | (t == T - 1)
        terminated = res.terminated & alive
        truncated = truncated & alive & ~terminated
        for k, v in (("obs", obs), ("actions", actions), ("rewards", res.reward * alive),
                     ("next_obs", res.obs), ("terminated", terminated), ("truncated", truncated),
                     ("mask", alive.clone()), ("logp", logp * alive)):
            cols[k].append(v)
        alive = alive & ~(terminated | truncated)
        obs = res.obs
        if not bool(alive.any()):
            break
    return Batch(**{k: torch.stack(v, dim=1) for k, v in cols.items()})
