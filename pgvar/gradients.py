"""Score-function gradients of many independent batches at once.

Most estimators are ``g = (1/B) sum_i sum_t w_{i,t} grad log pi(a_t|s_t)`` with weights
computed without gradient. Given weights for G batches of B episodes, this module
returns the G gradients as rows of a ``[G, P]`` matrix using ``torch.func``: one
``vmap`` over ``grad`` of a functional policy, chunked over batches so memory stays
bounded. ``score_gradients_loop`` is the plain one-backward-per-batch version that the
tests hold the fast path equal to.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

Params = dict[str, torch.Tensor]


def policy_params(policy: nn.Module) -> Params:
    """The policy's parameters as a detached dict, the input ``torch.func`` expects."""
    return {k: v.detach() for k, v in policy.named_parameters()}


def flatten(tree: Params, n_lead: int = 0) -> torch.Tensor:
    """Concatenate per-parameter tensors into vectors, keeping ``n_lead`` leading dims.

    With ``n_lead=1`` a vmapped gradient ``{name: [G, *shape]}`` becomes ``[G, P]``, in
    the same parameter order as ``nn.Module.parameters()``.
    """
    return torch.cat([v.reshape(*v.shape[:n_lead], -1) for v in tree.values()], dim=-1)


def unflatten(vector: torch.Tensor, like: Params) -> Params:
    """Inverse of ``flatten`` for a single vector: split it into tensors shaped as ``like``."""
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vector[i:i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def functional_log_prob(policy: nn.Module, params: Params, obs: torch.Tensor,
                        actions: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) with ``params`` substituted for the policy's own parameters."""
    # functional_call invokes forward(); log_prob is a method, so parameters are swapped
    # in through a one-line wrapper module that forwards to it.
    return functional_call(_LogProb(policy), {"p." + k: v for k, v in params.items()}, (obs, actions))


class _LogProb(nn.Module):
    """``forward(obs, actions) = policy.log_prob(obs, actions)``, for ``functional_call``."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.p = policy

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.p.log_prob(obs, actions)


def batch_surrogate(policy: nn.Module, params: Params, obs: torch.Tensor, actions: torch.Tensor,
                    weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_{i,t} w_{i,t} log pi(a_{i,t}|s_{i,t}) over one batch of B episodes.

    Its gradient in ``params`` is the score-function estimate g of that batch.
    """
    logp = functional_log_prob(policy, params, obs, actions)
    return (weights * mask * logp).sum() / weights.shape[0]


def score_gradients(policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor,
                    weights: torch.Tensor, mask: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Gradients of G batches at once: inputs are ``[G, B, T, ...]``, output ``[G, P]``.

    ``vmap(grad(batch_surrogate))`` over the batch dimension, ``chunk`` batches at a time
    so peak memory is that of ``chunk`` batches whatever G is.
    """
    params = policy_params(policy)
    weights = weights.detach().to(obs.device)
    mask = mask.to(weights.dtype)

    def one(o, a, w, m):
        return grad(lambda p: batch_surrogate(policy, p, o, a, w, m))(params)

    batched = vmap(one)
    rows = []
    for s in range(0, weights.shape[0], chunk):
        sl = slice(s, s + chunk)
        rows.append(flatten(batched(obs[sl], actions[sl], weights[sl], mask[sl]), n_lead=1))
    return torch.cat(rows)


def score_gradients_loop(policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor,
                         weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain reference for ``score_gradients``: one ``backward`` per batch."""
    rows = []
    for g in range(weights.shape[0]):
        policy.zero_grad(set_to_none=True)
        logp = policy.log_prob(obs[g], actions[g])
        surrogate = (weights[g].detach() * mask[g] * logp).sum() / weights.shape[1]
        grads = torch.autograd.grad(surrogate, list(policy.parameters()), allow_unused=True)
        rows.append(torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                               for gr, p in zip(grads, policy.parameters())]))
    return torch.stack(rows)
