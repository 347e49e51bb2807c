"""Critics: state-value functions ``V(s, t)`` for baselines, TD errors and GAE.

Every critic is an ``nn.Module`` with

- ``forward(obs, t) -> V``: ``obs [..., *obs_shape]``, ``t [...]`` long time index;
- ``values(batch) -> (V(s_t, t), V(s_{t+1}, t+1))``, both ``[N, T]``, without gradient;
- ``fit(batch, gamma, objective, steps, lr) -> loss``: regression on Monte Carlo
  reward-to-go targets of the run's own data, ``G_t`` with the bootstrap rules of
  ``pgvar.returns.bootstrap_values`` (under "discounted" a truncated episode's tail is
  the critic's own current ``V``, fitted-value-iteration style).

Why time-aware. Under ``objective="finite"`` the horizon is part of J, so the true value
``V_t(s)`` depends on the time left and ``V_T = 0``; a critic that ignores t is
misspecified (Pardo et al. 2018). The critics here take t: tabular and quadratic ones
keep one set of coefficients per step, the MLP gets the remaining-time fraction
``(T - t) / T`` as an input, and all return exactly 0 at ``t >= T`` under "finite".
Under "discounted" the true value is stationary, so ``make_critic`` builds them
time-independent.

A critic fitted on the very batch it then serves as a baseline for correlates with that
batch's returns and biases ``value_baseline``; fit on earlier data for unbiasedness.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pgvar.batch import Batch
from pgvar.checks import require_choice, require_int
from pgvar.returns import bootstrap_values, reward_to_go

__all__ = [
    "CRITIC_KINDS",
    "Critic",
    "ExactTabularCritic",
    "MLPCritic",
    "QuadraticCritic",
    "TabularCritic",
    "make_critic",
    "mc_targets",
]

CRITIC_KINDS = ("auto", "tabular", "quadratic", "mlp", "exact")


def mc_targets(critic: Critic, batch: Batch, gamma: float, objective: str,
               truncation_as_termination: bool = False) -> torch.Tensor:
    """Regression targets ``G_t`` ``[N, T]``: reward-to-go plus ``gamma^(L-t) b_{L-1}``.

    ``b_{L-1}`` is 0 after a termination, and after a truncation 0 under "finite" or the
    critic's current ``V(s_L)`` under "discounted" (see ``bootstrap_values``).
    """
    _, v_next = critic.values(batch)
    tail = bootstrap_values(batch, v_next, objective, truncation_as_termination)
    return reward_to_go(batch.rewards, batch.mask, gamma, tail)


class Critic(nn.Module):
    """Base class: time handling, batch evaluation and the Monte Carlo ``fit`` loop.

    Subclasses implement ``value(obs, t)`` (for ``t < T``) and ``regress(obs, t, y,
    mask, steps, lr) -> loss``. With ``time_aware`` (the default for "finite") the value
    at ``t >= T`` is 0, since nothing after the horizon counts.
    """

    def __init__(self, horizon: int, time_aware: bool = True):
        super().__init__()
        self.horizon = require_int("horizon", horizon)
        self.time_aware = bool(time_aware)

    def value(self, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def regress(self, obs: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor, steps: int, lr: float) -> float:
        raise NotImplementedError

    def forward(self, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=obs.device).long()
        v = self.value(obs, t.clamp(max=self.horizon - 1))
        if self.time_aware:
            v = torch.where(t >= self.horizon, torch.zeros_like(v), v)
        return v

    @torch.no_grad()
    def values(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V(s_t, t), V(s_{t+1}, t+1))`` for every entry of the batch, ``[N, T]`` each.

        Entries at padding are whatever the critic says there; every consumer masks them.
        """
        t = batch.time_index
        dtype = batch.rewards.dtype
        return self(batch.obs, t).to(dtype), self(batch.next_obs, t + 1).to(dtype)

    #: Target/regression rounds under "discounted", where a truncated episode's target
    #: bootstraps from the critic itself (fitted value iteration). Closed-form critics
    #: iterate to the fixed point; gradient-trained ones take one round per ``fit`` call.
    bootstrap_rounds: int = 1

    def fit(self, batch: Batch, gamma: float, objective: str, steps: int = 200,
            lr: float = 1e-2, *, truncation_as_termination: bool = False) -> float:
        """Regress ``V(s_t, t)`` on the Monte Carlo targets ``G_t`` of ``batch``.

        Under "finite" (or with ``truncation_as_termination``) the targets do not depend
        on the critic and one regression suffices. Returns the final mean squared error
        over valid steps.
        """
        bootstraps = objective == "discounted" and not truncation_as_termination
        loss = 0.0
        for _ in range(self.bootstrap_rounds if bootstraps else 1):
            y = mc_targets(self, batch, gamma, objective, truncation_as_termination)
            loss = float(self.regress(batch.obs, batch.time_index, y, batch.mask.bool(),
                                      int(steps), float(lr)))
        return loss

    def _row(self, t: torch.Tensor) -> torch.Tensor:
        """Which coefficient row serves time t: t itself, or row 0 when time-independent."""
        return t if self.time_aware else torch.zeros_like(t)


def _masked_mse(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(pred.dtype)
    return ((pred - y.to(pred.dtype)) ** 2 * m).sum() / m.sum().clamp(min=1.0)


class TabularCritic(Critic):
    """A table ``V[t, s]`` (``[T, S]``; ``[1, S]`` when time-independent).

    ``fit`` is the exact least-squares solution on the batch: each visited ``(t, s)``
    entry becomes the mean target there; unvisited entries keep their value. ``steps``
    and ``lr`` are not needed and are ignored.
    """

    bootstrap_rounds = 50

    def __init__(self, n_states: int, horizon: int, time_aware: bool = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__(horizon, time_aware)
        self.n_states = int(n_states)
        rows = self.horizon if self.time_aware else 1
        self.table = nn.Parameter(torch.zeros(rows, self.n_states, dtype=dtype),
                                  requires_grad=False)

    def value(self, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.table[self._row(t), obs.long()]

    @torch.no_grad()
    def regress(self, obs: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor, steps: int, lr: float) -> float:
        rows, S = self.table.shape
        cell = (self._row(t) * S + obs.long())[mask]
        target = y[mask].to(torch.float64)
        sums = torch.bincount(cell, weights=target, minlength=rows * S)
        counts = torch.bincount(cell, minlength=rows * S).to(torch.float64)
        seen = counts > 0
        flat = self.table.data.reshape(-1)
        flat[seen] = (sums[seen] / counts[seen]).to(flat.dtype)
        return float(_masked_mse(self.value(obs, t), y, mask))


def quadratic_features(x: torch.Tensor) -> torch.Tensor:
    """``[..., F]`` features ``(x_i x_j for i <= j, x, 1)`` of a linear-in-parameters quadratic."""
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d, device=x.device)
    quad = x[..., i] * x[..., j]
    return torch.cat([quad, x, torch.ones_like(x[..., :1])], dim=-1)


class QuadraticCritic(Critic):
    """``V_t(x) = x^T P_t x + p_t^T x + c_t`` for linear-quadratic control.

    Under a linear-Gaussian policy the true value is exactly of this form, so the critic
    is well specified. ``fit`` solves ridge-regularised least squares per time step in
    closed form (float64); ``steps`` and ``lr`` are ignored. ``ridge`` is relative to the
    mean feature second moment.
    """

    bootstrap_rounds = 50

    def __init__(self, state_dim: int, horizon: int, time_aware: bool = True,
                 ridge: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__(horizon, time_aware)
        self.state_dim = int(state_dim)
        self.ridge = float(ridge)
        rows, d = (self.horizon if self.time_aware else 1), self.state_dim
        self.P = nn.Parameter(torch.zeros(rows, d, d, dtype=dtype), requires_grad=False)
        self.p = nn.Parameter(torch.zeros(rows, d, dtype=dtype), requires_grad=False)
        self.c = nn.Parameter(torch.zeros(rows, dtype=dtype), requires_grad=False)

    def value(self, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r = self._row(t)
        x = obs.to(self.P.dtype)
        quad = torch.einsum("...i,...ij,...j->...", x, self.P[r], x)
        return quad + (self.p[r] * x).sum(-1) + self.c[r]

    @torch.no_grad()
    def regress(self, obs: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor, steps: int, lr: float) -> float:
        phi = quadratic_features(obs.to(torch.float64)) * mask.unsqueeze(-1)  # [N, T, F]
        y64 = y.to(torch.float64) * mask
        if not self.time_aware:  # one regression over all steps
            phi, y64 = phi.reshape(1, -1, phi.shape[-1]), y64.reshape(1, -1)
            mask_t = mask.reshape(1, -1)
        else:
            phi, y64, mask_t = phi.transpose(0, 1), y64.transpose(0, 1), mask.transpose(0, 1)
        gram = phi.transpose(1, 2) @ phi                       # [rows, F, F]
        rhs = (phi * y64.unsqueeze(-1)).sum(1)                  # [rows, F]
        F = gram.shape[-1]
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
        eye = torch.eye(F, dtype=gram.dtype, device=gram.device)
        w = torch.linalg.solve(gram + (self.ridge * scale)[:, None, None] * eye, rhs)
        seen = mask_t.any(1)
        self._set_coefficients(w, seen)
        return float(_masked_mse(self.value(obs, t), y, mask))

    def _set_coefficients(self, w: torch.Tensor, seen: torch.Tensor) -> None:
        """Write solved feature weights ``w [rows, F]`` into (P, p, c) for rows with data."""
        d = self.state_dim
        i, j = torch.triu_indices(d, d)
        n_quad = i.numel()
        P = torch.zeros(w.shape[0], d, d, dtype=w.dtype, device=w.device)
        P[:, i, j] += 0.5 * w[:, :n_quad]
        P[:, j, i] += 0.5 * w[:, :n_quad]  # diagonal gets both halves
        rows = torch.nonzero(seen).flatten()
        self.P.data[rows] = P[rows].to(self.P.dtype)
        self.p.data[rows] = w[rows, n_quad:n_quad + d].to(self.p.dtype)
        self.c.data[rows] = w[rows, -1].to(self.c.dtype)


class MLPCritic(Critic):
    """An MLP on ``(obs, (T - t) / T)`` (the remaining-time input of Pardo et al. 2018).

    Integer observations are one-hot encoded when ``n_states`` is given. The network
    predicts standardised values; ``fit`` refreshes the target mean and scale from the
    batch, then takes ``steps`` Adam steps of size ``lr`` on the squared error: full-batch,
    or on ``minibatch`` random samples each when set (a fixed cost per step whatever the
    data: a critic fitted on 320 CartPole episodes, ~150k samples, took 143 s full-batch).
    """

    minibatch: int | None = None

    def __init__(self, obs_shape: tuple[int, ...], horizon: int, hidden: tuple[int, ...] = (64, 64),
                 time_aware: bool = True, n_states: int | None = None, activation: str = "tanh"):
        super().__init__(horizon, time_aware)
        self.obs_shape = tuple(obs_shape)
        self.n_states = n_states
        obs_dim = int(n_states) if n_states is not None else math.prod(self.obs_shape)
        in_dim = obs_dim + (1 if self.time_aware else 0)
        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        layers: list[nn.Module] = []
        for a, b in zip((in_dim, *hidden), hidden):
            layers += [nn.Linear(a, b), act()]
        layers.append(nn.Linear((in_dim, *hidden)[-1], 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def features(self, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Flattened (or one-hot) observation, plus the remaining-time fraction if time-aware."""
        if self.n_states is not None:
            x = nn.functional.one_hot(obs.long(), self.n_states).float()
        else:
            n_lead = obs.dim() - len(self.obs_shape)
            x = obs.float().reshape(*obs.shape[:n_lead], -1)
        if self.time_aware:
            remaining = (self.horizon - t).float() / self.horizon
            x = torch.cat([x, remaining.unsqueeze(-1)], dim=-1)
        return x

    def value(self, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(self.features(obs, t)).squeeze(-1)
        return self.target_mean + self.target_std * out

    def regress(self, obs: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor, steps: int, lr: float) -> float:
        valid_y = y[mask].float()
        if valid_y.numel() == 0:
            return 0.0
        self.target_mean.fill_(float(valid_y.mean()))
        self.target_std.fill_(float(valid_y.std()) if valid_y.numel() > 1 else 1.0)
        self.target_std.clamp_(min=1e-6)
        x = self.features(obs[mask], t[mask]).detach()
        z = ((valid_y - self.target_mean) / self.target_std).detach()
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        n = z.shape[0]
        sample = self.minibatch is not None and n > self.minibatch
        draws = torch.Generator().manual_seed(n)  # deterministic: the same data, the same fit
        for _ in range(steps):
            opt.zero_grad()
            rows = torch.randint(n, (self.minibatch,), generator=draws) if sample else slice(None)
            loss = ((self.net(x[rows]).squeeze(-1) - z[rows]) ** 2).mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(_masked_mse(self.value(obs, t), y, mask))


class ExactTabularCritic(Critic):
    """The exact ``V_t^pi(s)`` of a tabular environment, from ``env.exact_values(policy)``.

    A snapshot at construction; ``fit`` (or ``refresh``) recomputes it for the policy's
    current parameters. ``perturb_scale > 0`` adds fixed Gaussian noise of that standard
    deviation to every entry ``t < T`` (drawn once from ``seed``): a deliberately
    imperfect critic, under which ``actor_critic`` and ``gae`` become biased while
    ``value_baseline`` stays unbiased.
    """

    def __init__(self, env, policy: nn.Module, perturb_scale: float = 0.0, seed: int = 0):
        if not callable(getattr(env, "exact_values", None)):
            raise TypeError(f"{type(env).__name__} has no exact_values(policy); "
                            "ExactTabularCritic needs a tabular environment")
        super().__init__(env.horizon, time_aware=env.objective == "finite")
        self.env = env
        object.__setattr__(self, "policy", policy)  # not a submodule: not the critic's parameters
        self.perturb_scale = float(perturb_scale)
        self.seed = int(seed)
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(env.horizon + 1, env.n_states, generator=g, dtype=torch.float64)
        noise[env.horizon] = 0.0  # the value after the horizon stays exact
        self.register_buffer("noise", self.perturb_scale * noise)
        self.register_buffer("table", torch.zeros_like(self.noise))
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the table as the exact values of the policy's current parameters."""
        exact = self.env.exact_values(self.policy).detach().to(torch.float64)
        self.table.copy_(exact + self.noise)

    def perturb(self, scale: float, seed: int = 0) -> ExactTabularCritic:
        """A new critic for the same env and policy with noise of standard deviation ``scale``."""
        return ExactTabularCritic(self.env, self.policy, perturb_scale=scale, seed=seed)

    def forward(self, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the table has T+1 rows (row T: 0 under "finite", the bootstrap value if "discounted")
        t = torch.as_tensor(t, device=obs.device).long().clamp(max=self.horizon)
        return self.table[t, obs.long()]

    def fit(self, batch: Batch, gamma: float, objective: str, steps: int = 0, lr: float = 0.0,
            **_: object) -> float:
        """No regression: refresh to the current policy's exact values (noise kept)."""
        self.refresh()
        return 0.0


def _is_tabular(env) -> bool:
    obs_dtype = getattr(env, "obs_dtype", torch.float32)
    return hasattr(env, "n_states") and not obs_dtype.is_floating_point


def _is_linear_quadratic(env) -> bool:
    return getattr(env, "name", "") == "lqr" or type(env).__name__ == "LinearQuadratic"


def make_critic(env, kind: str = "auto", **kw) -> Critic:
    """A critic suited to ``env``: ``"tabular"``, ``"quadratic"`` (LQR), ``"mlp"`` or
    ``"exact"`` (needs ``policy=``; tabular only). ``"auto"`` picks tabular for tabular
    environments, quadratic for linear-quadratic control and an MLP otherwise.

    Time-aware under ``env.objective == "finite"`` (override with ``time_aware=``).
    Other keywords go to the critic's constructor.
    """
    require_choice("critic kind", kind, CRITIC_KINDS)
    if kind == "auto":
        kind = ("tabular" if _is_tabular(env)
                else "quadratic" if _is_linear_quadratic(env) else "mlp")
    if kind == "exact":
        if "policy" not in kw:
            raise ValueError("make_critic(kind='exact') needs policy=<the policy to evaluate>")
        return ExactTabularCritic(env, **kw)
    kw.setdefault("time_aware", env.objective == "finite")
    if kind == "tabular":
        if not hasattr(env, "n_states"):
            raise ValueError(f"a tabular critic needs an environment with n_states; "
                             f"{env.name} has none")
        return TabularCritic(env.n_states, env.horizon, **kw)
    if kind == "quadratic":
        if len(env.obs_shape) != 1:
            raise ValueError(f"a quadratic critic needs vector observations, "
                             f"got obs_shape {env.obs_shape}")
        return QuadraticCritic(env.obs_shape[0], env.horizon, **kw)
    if _is_tabular(env):
        kw.setdefault("n_states", env.n_states)
    return MLPCritic(env.obs_shape, env.horizon, **kw)
