"""Score-function gradients of many independent batches at once.

Most estimators are ``g = (1/B) sum_i sum_t w_{i,t} grad log pi(a_t|s_t)`` with weights
computed without gradient. Given weights for G batches of B episodes, this module
returns the G gradients as rows of a ``[G, P]`` matrix (``score_gradients``):

1. Pack: only pairs with a non-zero ``w * mask`` contribute, so just those are gathered
   out of the padded ``[G, B, T]`` inputs (at a random CartPole policy about a fifth of
   a padded batch is real), group after group (``pack_pairs``).
2. Bucket: groups are sorted by their number of pairs and cut into buckets of similar
   sizes, each padded with weight-0 rows to ``[k, L]`` and bounded by ``PAIR_BUDGET``
   rows and ``chunk`` groups, so memory stays bounded whatever G is. A group larger
   than the budget is split into pieces whose gradients add up (``plan_buckets``).
3. Per bucket, the k gradients: for pgvar's MLP policies a hand-written forward and
   backward over all k L rows with the per-group weight gradients as one batched
   matmul (``FoldedMLP``); for any other policy ``torch.func``: ``vmap`` over the
   groups of ``grad`` of the weighted log-likelihood of a functional policy.

``score_gradients_loop`` is the plain one-backward-per-batch version that the tests hold
the fast path equal to (to float rounding).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from pgvar.checks import require_int
from pgvar.folded import FoldedMLP, Params, mlp_spec
from pgvar.policies import flat_autograd


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


def mean_ascent_gradient(step_gradient, params0: Params, epochs: int, lr: float) -> Params:
    """PPO-style update direction: from ``params0``, ``epochs`` ascent steps
    ``theta_{k+1} = theta_k + lr * step_gradient(theta_k)``; returns the mean of the step
    gradients, ``(theta_K - theta_0) / (lr K)``. Written for ``torch.func`` (vmap-able)."""
    p = params0
    total = {k: torch.zeros_like(v) for k, v in params0.items()}
    for _ in range(epochs):
        step = step_gradient(p)
        total = {k: total[k] + step[k] for k in total}
        p = {k: params0[k] + lr * total[k] for k in total}
    return {k: v / epochs for k, v in total.items()}


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


# ---------------------------------------------------------------------------- packing

PAIR_BUDGET = 16384  # rows per bucket: bounds memory and keeps a bucket's work in cache
# the fixed cost of one more bucket, in padded rows of work: a vmap(grad) call costs a few
# ms of Python dispatch whatever its size, a FoldedMLP bucket a few dozen torch calls
CALL_ROWS_VMAP, CALL_ROWS_MLP = 4096, 256


@dataclass
class PackedPairs:
    """The pairs of G groups that carry a non-zero weight, gathered out of the padding.

    Rows are group-major, followed by one dummy row (a copy of row 0, weight 0) that
    pads the buckets. ``buckets`` is a list of ``(index [k, L], owner [k])``: rows of k
    pieces of groups (a group larger than the bucket budget is split in pieces, whose
    gradients add up), and the group each piece belongs to.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    weights: torch.Tensor
    buckets: list[tuple[torch.Tensor, torch.Tensor]]
    n_pairs: int


def plan_buckets(counts, max_pairs: int, max_groups: int | None = None, slack: float = 1.25,
                 call_rows: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut groups of ``counts`` contiguous rows into padded buckets ``(index, owner)``.

    Groups are split into pieces of at most ``max_pairs`` rows, sorted by size, and cut
    into runs with at most ``max_pairs`` padded rows and ``max_groups`` pieces. A run
    whose largest piece has L rows takes the next piece while that piece's padding,
    L minus its size, is at most ``max(L (1 - 1/slack), call_rows)``: ``call_rows`` is the
    fixed cost of one more bucket (one more call) in rows of work. Padding points at row
    ``sum(counts)`` (the dummy row).
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    starts = np.cumsum(counts) - counts
    n_pieces = -(-counts // max_pairs)
    owner = np.repeat(np.arange(len(counts)), n_pieces)
    j = np.arange(len(owner)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    p_start = starts[owner] + j * max_pairs
    p_len = np.minimum(counts[owner] - j * max_pairs, max_pairs)
    order = np.argsort(-p_len, kind="stable")
    lens = p_len[order]
    neg = -lens  # ascending
    buckets, i = [], 0
    while i < len(order):
        L = int(lens[i])
        k = max(1, max_pairs // L)
        if max_groups is not None:
            k = min(k, max(1, int(max_groups)))
        smallest = L - max(L * (1.0 - 1.0 / float(slack)), float(call_rows))
        end = min(i + k, int(np.searchsorted(neg, -smallest, side="right")))
        end = max(end, i + 1)
        sel = order[i:end]
        cols = np.arange(L)
        index = np.where(cols[None] < p_len[sel][:, None], p_start[sel][:, None] + cols[None], n)
        buckets.append((index, owner[sel]))
        i = end
    return buckets


def pack_pairs(obs: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
               max_pairs: int = PAIR_BUDGET, max_groups: int | None = None,
               slack: float = 1.25, call_rows: int = 0) -> PackedPairs:
    """Gather the pairs with ``weights * mask != 0`` of ``[G, B, T, ...]`` inputs; weights
    become ``w * mask / B`` (the surrogate's scale). See ``PackedPairs``."""
    G, B = weights.shape[:2]
    lead = weights.dim()
    w = weights.detach().to(obs.device)
    w = (w * mask.to(device=w.device, dtype=w.dtype) / B).reshape(G, -1)
    sel = w != 0
    counts = sel.sum(1).cpu().numpy()
    pos = sel.reshape(-1).nonzero().squeeze(1)
    n = int(pos.numel())
    if n:
        pos = torch.cat([pos, pos[:1]])
    o = obs.reshape(-1, *obs.shape[lead:]).index_select(0, pos)
    a = actions.reshape(-1, *actions.shape[lead:]).index_select(0, pos)
    ww = w.reshape(-1).index_select(0, pos)
    if n:
        ww[-1] = 0.0
    buckets = []
    if n:
        for index, owner in plan_buckets(counts, max_pairs, max_groups, slack, call_rows):
            buckets.append((torch.from_numpy(index).to(obs.device), torch.from_numpy(owner).to(obs.device)))
    return PackedPairs(o, a, ww, buckets, n)


# ----------------------------------------------------------------------- score gradients


def score_gradient_blocks(policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor,
                          weights: torch.Tensor, mask: torch.Tensor, chunk: int = 64
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The rows of ``score_gradients`` as blocks ``(groups [k], rows [k, P])``: every group
    g in ``range(G)`` is in exactly one block, whole (groups without a pair get zero rows).

    A consumer that only needs statistics of the rows (``pgvar.reference``'s running
    moments) reduces block after block and never holds the ``[G, P]`` matrix.
    """
    require_int("chunk", chunk)
    params = policy_params(policy)
    G = weights.shape[0]
    per_batch = int(np.prod(weights.shape[1:]))
    max_pairs = max(1, min(PAIR_BUDGET, int(chunk) * per_batch))
    ref = next(iter(params.values()))
    P = sum(v.numel() for v in params.values())
    spec = mlp_spec(policy)
    fast_ok = spec is not None and obs.dtype == ref.dtype and obs.is_floating_point()
    with torch.no_grad():
        packed = pack_pairs(obs, actions, weights, mask, max_pairs, int(chunk),
                            call_rows=CALL_ROWS_MLP if fast_ok else CALL_ROWS_VMAP)
    owners = [owner for _, owner in packed.buckets]
    counts = torch.bincount(torch.cat(owners), minlength=G) if owners else \
        torch.zeros(G, dtype=torch.long, device=ref.device)
    if bool((counts == 0).any()):  # groups without a pair: their gradient is 0
        empty = (counts == 0).nonzero().squeeze(1)
        yield empty, torch.zeros(int(empty.numel()), P, dtype=ref.dtype, device=ref.device)
    if not packed.buckets:
        return
    if fast_ok:
        fast = FoldedMLP.build(spec, params)

        def bucket_grads(o, a, w):
            with torch.no_grad():
                return fast.group_grads(o, a, w)
    else:
        def one(o, a, w):
            return grad(lambda p: (w * functional_log_prob(policy, p, o, a)).sum())(params)
        bucket_grads = vmap(one)
    split = counts > 1  # groups cut into pieces across buckets: summed, handed out last
    pieces = None
    if bool(split.any()):
        split_groups = split.nonzero().squeeze(1)
        slot = torch.full((G,), -1, dtype=torch.long, device=ref.device)
        slot[split_groups] = torch.arange(split_groups.numel(), device=ref.device)
        pieces = torch.zeros(split_groups.numel(), P, dtype=ref.dtype, device=ref.device)
    for index, owner in packed.buckets:
        tree = bucket_grads(packed.obs[index], packed.actions[index], packed.weights[index])
        k = owner.numel()
        rows = torch.cat([tree[name].reshape(k, -1).to(ref.dtype) for name in params], dim=1)
        if pieces is None:
            yield owner, rows
            continue
        whole = ~split[owner]
        if bool(whole.all()):
            yield owner, rows
            continue
        pieces.index_add_(0, slot[owner[~whole]], rows[~whole])
        if bool(whole.any()):
            yield owner[whole], rows[whole]
    if pieces is not None:
        yield split_groups, pieces


def score_gradients(policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor,
                    weights: torch.Tensor, mask: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Gradients of G batches at once: inputs are ``[G, B, T, ...]``, output ``[G, P]``.

    Row g is the gradient of ``(1/B) sum_{i,t} w_{g,i,t} m_{g,i,t} log pi(a|s)``. Only
    pairs with a non-zero ``w m`` are computed (``pack_pairs``), in buckets of groups of
    similar size of at most ``PAIR_BUDGET`` rows and ``chunk`` groups, so peak memory is
    bounded whatever G is (and never above that of ``chunk`` padded batches). MLP
    policies take the hand-written path (``FoldedMLP``); any other policy
    ``vmap(grad(...))`` over the groups of a bucket. See ``score_gradient_blocks``.
    """
    params = policy_params(policy)
    ref = next(iter(params.values()))
    P = sum(v.numel() for v in params.values())
    out = torch.empty(weights.shape[0], P, dtype=ref.dtype, device=ref.device)
    for groups, rows in score_gradient_blocks(policy, obs, actions, weights, mask, chunk):
        out.index_copy_(0, groups, rows)
    return out


def score_gradients_loop(policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor,
                         weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain reference for ``score_gradients``: one ``backward`` per batch."""
    rows = []
    for g in range(weights.shape[0]):
        policy.zero_grad(set_to_none=True)
        logp = policy.log_prob(obs[g], actions[g])
        surrogate = (weights[g].detach() * mask[g] * logp).sum() / weights.shape[1]
        rows.append(flat_autograd(surrogate, policy))
    return torch.stack(rows)
