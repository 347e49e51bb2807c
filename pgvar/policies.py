"""Policies: tabular softmax and linear-Gaussian for the exact environments, MLP
categorical and Gaussian for Gymnasium ones.

Every policy is an ``nn.Module`` with three methods:

- ``log_prob(obs, actions)``: log pi(a|s), summed over action dimensions. Written with
  plain tensor ops (no ``torch.distributions`` validation) so it runs under
  ``torch.func.vmap`` and ``functional_call``: pgvar gets per-batch gradients that way.
- ``sample(obs, generator)``: actions drawn with an explicit generator (reproducible).
- ``dist(obs)``: the ``torch.distributions`` object, for users and tests.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.distributions import Categorical, Independent, Normal
from torch.nn.utils import parameters_to_vector

LOG_2PI = math.log(2.0 * math.pi)


def mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...], activation: str = "tanh") -> nn.Sequential:
    """A plain MLP; the last layer starts small so initial policies are near uniform."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    dims = (in_dim, *hidden)
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), act()]
    last = nn.Linear(dims[-1], out_dim)
    nn.init.normal_(last.weight, std=0.01)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class CategoricalPolicy(nn.Module):
    """Base for discrete policies: subclasses give ``logits(obs)``."""

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.logits(obs), dim=-1)
        return torch.gather(logp, -1, actions.long().unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        probs = torch.softmax(self.logits(obs), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])

    def dist(self, obs: torch.Tensor) -> Categorical:
        return Categorical(logits=self.logits(obs), validate_args=False)


class GaussianPolicy(nn.Module):
    """Base for diagonal-Gaussian policies: subclasses give ``mean(obs)`` and own ``log_std``."""

    log_std: nn.Parameter

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        z = (actions - self.mean(obs)) * torch.exp(-self.log_std)
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * LOG_2PI).sum(-1)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mu = self.mean(obs)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(self.log_std) * noise

    def dist(self, obs: torch.Tensor) -> Independent:
        mu = self.mean(obs)
        return Independent(Normal(mu, torch.exp(self.log_std).expand_as(mu), validate_args=False), 1)


class TabularSoftmaxPolicy(CategoricalPolicy):
    """pi(a|s) = softmax(theta[s])_a over integer states; theta starts at zero (uniform)."""

    def __init__(self, n_states: int, n_actions: int, init_scale: float = 0.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(init_scale * torch.randn(n_states, n_actions, generator=g))

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        return self.theta[obs.long()]

    def probs_table(self) -> torch.Tensor:
        """pi as an ``[S, A]`` table, differentiable: what exact dynamic programming needs."""
        return torch.softmax(self.theta, dim=-1)


class LinearGaussianPolicy(GaussianPolicy):
    """u ~ N(K x + k, diag(exp(log_std))^2): the policy class of linear-quadratic control."""

    def __init__(self, state_dim: int, action_dim: int, init_log_std: float = -0.5,
                 init_gain_scale: float = 0.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.K = nn.Parameter(init_gain_scale * torch.randn(action_dim, state_dim, generator=g))
        self.k = nn.Parameter(torch.zeros(action_dim))
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        return obs @ self.K.T + self.k


class MLPCategoricalPolicy(CategoricalPolicy):
    """Softmax over an MLP's logits, for discrete Gymnasium environments."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: tuple[int, ...] = (64, 64),
                 activation: str = "tanh"):
        super().__init__()
        self.net = mlp(obs_dim, n_actions, tuple(hidden), activation)

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class MLPGaussianPolicy(GaussianPolicy):
    """Gaussian with an MLP mean and a state-independent log standard deviation."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...] = (64, 64),
                 activation: str = "tanh", init_log_std: float = 0.0):
        super().__init__()
        self.net = mlp(obs_dim, action_dim, tuple(hidden), activation)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def flat_grad_dim(module: nn.Module) -> int:
    """Number of scalar parameters: the dimension of every gradient pgvar compares."""
    return sum(p.numel() for p in module.parameters())


# Flat parameter vectors: pgvar's one convention, ``parameters()`` order, as
# ``torch.nn.utils.parameters_to_vector`` lays them out (``pgvar.gradients.flatten`` does
# the same for dicts of batched per-parameter tensors).


def flatten_params(module: nn.Module) -> torch.Tensor:
    """All parameters as one detached vector, in ``named_parameters`` order."""
    return parameters_to_vector(module.parameters()).detach()


def flat_autograd(scalar: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """d scalar / d theta as one detached vector in ``parameters()`` order (unused
    parameters: 0), laid out as ``flatten_params``."""
    params = list(module.parameters())
    grads = torch.autograd.grad(scalar, params, allow_unused=True)
    return parameters_to_vector([g if g is not None else torch.zeros_like(p)
                                 for g, p in zip(grads, params)]).detach()
