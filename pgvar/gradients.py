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

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from pgvar import policies as P

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


# ------------------------------------------------------------------------ fast MLP path
# pgvar's MLP policies are Linear layers with Tanh or ReLU between them. For them, the
# score gradients below skip autograd: a hand-written forward and backward on the
# packed rows, and per-group weight gradients as one batched matmul. Two tricks:
#
# - tanh(z) = 2 sigmoid(2 z) - 1, and torch's CPU sigmoid is ~6x faster than its tanh.
#   The affine maps around the sigmoid are folded into the next layer's weights: a tanh
#   layer keeps r = sigmoid(2 z) (so h = 2 r - 1), and the next layer computes
#   h W^T + b = r (2 W)^T + (b - W 1). Its derivative is 1 - h^2 = 4 r (1 - r).
# - a layer fed by h = alpha r + beta has the weight gradient
#   dz^T h = alpha dz^T r + beta (sum_rows dz) 1^T, so r is used as it is.
#
# Results equal autograd through ``policy.log_prob`` to float rounding (tested).


@dataclass(frozen=True)
class MLPLayer:
    """One ``nn.Linear`` of an MLP policy and the activation after it ("tanh", "relu", "none")."""

    weight: str
    bias: str
    activation: str


@dataclass(frozen=True)
class MLPSpec:
    """The structure of a pgvar MLP policy, by parameter name (see ``mlp_spec``)."""

    kind: str  # "categorical" (logits) or "gaussian" (mean, with a state-independent log_std)
    layers: tuple[MLPLayer, ...]
    names: tuple[str, ...]  # all parameter names, in ``named_parameters`` order
    log_std: str | None = None


_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu"}


def mlp_spec(policy: nn.Module) -> MLPSpec | None:
    """The ``MLPSpec`` of ``policy`` when the fast path applies, else None.

    It applies to pgvar's ``MLPCategoricalPolicy`` and ``MLPGaussianPolicy`` (and
    subclasses that override none of ``logits``/``mean``/``log_prob``) whose ``net`` is
    ``nn.Sequential`` of ``nn.Linear`` (with bias) layers separated by ``nn.Tanh`` or
    ``nn.ReLU``, and whose parameters are exactly those (plus ``log_std``).
    """
    cls = type(policy)
    if isinstance(policy, P.MLPCategoricalPolicy) and cls.logits is P.MLPCategoricalPolicy.logits \
            and cls.log_prob is P.CategoricalPolicy.log_prob:
        kind = "categorical"
    elif isinstance(policy, P.MLPGaussianPolicy) and cls.mean is P.MLPGaussianPolicy.mean \
            and cls.log_prob is P.GaussianPolicy.log_prob:
        kind = "gaussian"
    else:
        return None
    net = getattr(policy, "net", None)
    if type(net) is not nn.Sequential:
        return None
    mods = list(net.named_children())
    layers: list[MLPLayer] = []
    i = 0
    while i < len(mods):
        name, mod = mods[i]
        if type(mod) is not nn.Linear or mod.bias is None:
            return None
        act = "none"
        if i + 1 < len(mods):
            act = _ACTIVATIONS.get(type(mods[i + 1][1]))
            if act is None:
                return None
            i += 1
        layers.append(MLPLayer(f"net.{name}.weight", f"net.{name}.bias", act))
        i += 1
    if not layers or layers[-1].activation != "none":
        return None
    names = tuple(n for n, _ in policy.named_parameters())
    log_std = "log_std" if kind == "gaussian" else None
    expected = {n for layer in layers for n in (layer.weight, layer.bias)} | ({log_std} - {None})
    if set(names) != expected or len(names) != len(expected):
        return None
    return MLPSpec(kind, tuple(layers), names, log_std)


@dataclass
class FoldedMLP:
    """The MLP with tanh's affine maps folded in (see the comment above ``MLPLayer``).

    ``weights_t[i]`` and ``biases[i]`` give layer i's computed pre-activation
    ``r_in W'^T + b'``; ``alphas[i], betas[i]`` say how its input r_in relates to the
    true input h_in = alpha r_in + beta; ``back[i]`` is the matrix that takes dz_i to
    the gradient of the previous layer's (sigmoid or relu) pre-activation.
    """

    spec: MLPSpec
    weights_t: list[torch.Tensor]
    biases: list[torch.Tensor]
    alphas: list[float]
    betas: list[float]
    back: list[torch.Tensor]
    log_std: torch.Tensor | None

    @staticmethod
    def build(spec: MLPSpec, params: Params) -> FoldedMLP:
        wts, bs, alphas, betas, back = [], [], [], [], []
        alpha, beta = 1.0, 0.0  # the raw observation: h_in = x
        for i, layer in enumerate(spec.layers):
            W, b = params[layer.weight], params[layer.bias]
            gamma = 2.0 if layer.activation == "tanh" else 1.0
            Wf = (gamma * alpha) * W
            bf = gamma * (b + beta * W.sum(1)) if beta else gamma * b
            wts.append(Wf.t().contiguous())
            bs.append(bf.contiguous())
            alphas.append(alpha)
            betas.append(beta)
            prev = spec.layers[i - 1].activation if i else None
            back.append((4.0 * W if prev == "tanh" else W).contiguous())
            alpha, beta = (2.0, -1.0) if layer.activation == "tanh" else (1.0, 0.0)
        log_std = params[spec.log_std] if spec.log_std else None
        return FoldedMLP(spec, wts, bs, alphas, betas, back, log_std)

    def forward(self, x: torch.Tensor, keep: bool = False):
        """Output (logits or mean) for rows ``x [R, in]``; with ``keep`` the list of every
        layer's input representation r_in too (what the backward needs)."""
        r, inputs = x, []
        for wt, b, layer in zip(self.weights_t, self.biases, self.spec.layers):
            if keep:
                inputs.append(r)
            r = torch.addmm(b, r, wt)
            if layer.activation == "tanh":
                r = r.sigmoid_()
            elif layer.activation == "relu":
                r = r.relu_()
        return (r, inputs) if keep else r

    def group_grads(self, obs: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor
                    ) -> Params:
        """``{name: [k, *shape]}``: the gradient of sum_l w[g, l] log pi(a[g, l] | s[g, l])
        for each of the k groups of rows (inputs ``[k, L, ...]``)."""
        k, L = weights.shape
        R = k * L
        x = obs.reshape(R, -1)
        out, inputs = self.forward(x, keep=True)
        w = weights.reshape(R, 1)
        grads: Params = {}
        if self.spec.kind == "categorical" and out.shape[1] == 2:
            # two actions: p_1 = sigmoid(z_1 - z_0), dz_1 = w (a - p_1) = -dz_0
            p1 = torch.sigmoid(out[:, 1:] - out[:, :1])
            g = (actions.reshape(R, 1).to(p1.dtype) - p1).mul_(w)
            dz = torch.cat([-g, g], dim=1)
        elif self.spec.kind == "categorical":
            dz = torch.softmax(out, dim=-1).mul_(-w)
            dz.scatter_add_(1, actions.reshape(R, 1).long(), w)
        else:
            inv_std = torch.exp(-self.log_std)
            z = (actions.reshape(R, -1) - out).mul_(inv_std)
            dz = z * inv_std * w
            grads[self.spec.log_std] = (z.square_().sub_(1.0).mul_(w)).reshape(k, L, -1).sum(1)
        for i in reversed(range(len(self.spec.layers))):
            layer, r_in = self.spec.layers[i], inputs[i]
            dz3 = dz.view(k, L, -1)
            db = dz3.sum(1)
            if self.betas[i] != 0.0:  # dW = alpha dz^T r + beta db 1^T, in one call
                dW = torch.baddbmm(db.unsqueeze(2), dz3.transpose(1, 2), r_in.view(k, L, -1),
                                   beta=self.betas[i], alpha=self.alphas[i])
            else:
                dW = torch.bmm(dz3.transpose(1, 2), r_in.view(k, L, -1))
                if self.alphas[i] != 1.0:
                    dW.mul_(self.alphas[i])
            grads[layer.weight], grads[layer.bias] = dW, db
            if i:
                dz = torch.mm(dz, self.back[i])
                if self.spec.layers[i - 1].activation == "tanh":
                    dz.mul_(torch.addcmul(r_in, r_in, r_in, value=-1.0))  # 4 r (1 - r), 4 in back
                else:
                    dz.mul_(r_in > 0)
        return grads


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


def score_gradients(policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor,
                    weights: torch.Tensor, mask: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Gradients of G batches at once: inputs are ``[G, B, T, ...]``, output ``[G, P]``.

    Row g is the gradient of ``(1/B) sum_{i,t} w_{g,i,t} m_{g,i,t} log pi(a|s)``. Only
    pairs with a non-zero ``w m`` are computed (``pack_pairs``), in buckets of groups of
    similar size of at most ``PAIR_BUDGET`` rows and ``chunk`` groups, so peak memory is
    bounded whatever G is (and never above that of ``chunk`` padded batches). MLP
    policies take the hand-written path (``FoldedMLP``); any other policy
    ``vmap(grad(...))`` over the groups of a bucket.
    """
    if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk}")
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
    owners = torch.cat([owner for _, owner in packed.buckets]) if packed.buckets else None
    # each group in exactly one bucket: rows are copied in; else (empty or split groups) added
    once = owners is not None and owners.numel() == G and bool(torch.bincount(owners, minlength=G).eq(1).all())
    out = (torch.empty if once else torch.zeros)(G, P, dtype=ref.dtype, device=ref.device)
    if not packed.buckets:
        return out
    fast = None
    if fast_ok:
        fast = FoldedMLP.build(spec, params)
    else:
        def one(o, a, w):
            return grad(lambda p: (w * functional_log_prob(policy, p, o, a)).sum())(params)
        batched = vmap(one)
    # each parameter's gradient goes straight into its columns of the output rows (no
    # cat, no second [G, P] buffer: first-touching a large fresh buffer is what costs)
    offsets = np.cumsum([0] + [v.numel() for v in params.values()])
    for index, owner in packed.buckets:
        o, a, w = packed.obs[index], packed.actions[index], packed.weights[index]
        if fast is not None:
            with torch.no_grad():
                tree = fast.group_grads(o, a, w)
        else:
            tree = batched(o, a, w)
        k = owner.numel()
        for (name, _), lo, hi in zip(params.items(), offsets[:-1], offsets[1:]):
            part = tree[name].reshape(k, -1).to(out.dtype)
            if once:
                out[:, lo:hi].index_copy_(0, owner, part)
            else:
                out[:, lo:hi].index_add_(0, owner, part)
    return out


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
