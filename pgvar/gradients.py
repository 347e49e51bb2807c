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

    ``weights[i]`` ``[out, in]`` and ``biases[i]`` give layer i's computed pre-activation
    ``r_in W'^T + b'``; ``alphas[i], betas[i]`` say how its input r_in relates to the
    true input h_in = alpha r_in + beta; ``back[i]`` is the matrix that takes dz_i to
    the gradient of the previous layer's (sigmoid or relu) pre-activation.

    Layouts are chosen by measurement on CPU (float32, one thread): a ``[R, 64]`` by
    ``[64, 2]`` matmul costs 4x more with a contiguous right factor than with the
    transposed view of a ``[2, 64]`` weight, and a layer's weight gradient is cheapest
    as ``r^T dz`` when it has fewer inputs than outputs (the 4-input first layer: 7x).
    With two actions only the logit difference matters: ``p_1 = sigmoid(u)``,
    ``u = r (W_1 - W_0)^T + b_1 - b_0``, one matrix-vector product (``diff``).
    """

    spec: MLPSpec
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    alphas: list[float]
    betas: list[float]
    back: list[torch.Tensor]
    log_std: torch.Tensor | None
    diff: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (w, b, back) of u

    @staticmethod
    def build(spec: MLPSpec, params: Params) -> FoldedMLP:
        ws, bs, alphas, betas, back = [], [], [], [], []
        alpha, beta = 1.0, 0.0  # the raw observation: h_in = x
        for i, layer in enumerate(spec.layers):
            W, b = params[layer.weight], params[layer.bias]
            gamma = 2.0 if layer.activation == "tanh" else 1.0
            Wf = (gamma * alpha) * W
            bf = gamma * (b + beta * W.sum(1)) if beta else gamma * b
            ws.append(Wf.contiguous())
            bs.append(bf.contiguous())
            alphas.append(alpha)
            betas.append(beta)
            prev = spec.layers[i - 1].activation if i else None
            back.append((4.0 * W if prev == "tanh" else W).contiguous())
            alpha, beta = (2.0, -1.0) if layer.activation == "tanh" else (1.0, 0.0)
        log_std = params[spec.log_std] if spec.log_std else None
        diff = None
        if spec.kind == "categorical" and ws[-1].shape[0] == 2:
            diff = ((ws[-1][1] - ws[-1][0]).contiguous(), bs[-1][1] - bs[-1][0],
                    (back[-1][1] - back[-1][0]).contiguous())
        return FoldedMLP(spec, ws, bs, alphas, betas, back, log_std, diff)

    def hidden(self, x: torch.Tensor, keep: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last layer's input r for rows ``x [R, in]``; with ``keep`` also every
        layer's input representation (what the backward needs), else an empty list."""
        r, inputs = x, []
        for w, b, layer in zip(self.weights[:-1], self.biases[:-1], self.spec.layers[:-1]):
            if keep:
                inputs.append(r)
            r = torch.addmm(b, r, w.t())
            if layer.activation == "tanh":
                r = r.sigmoid_()
            elif layer.activation == "relu":
                r = r.relu_()
        if keep:
            inputs.append(r)
        return r, inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output (logits or mean) for rows ``x [R, in]``."""
        r, _ = self.hidden(x)
        return torch.addmm(self.biases[-1], r, self.weights[-1].t())

    def logit_difference(self, x: torch.Tensor) -> torch.Tensor:
        """``u = z_1 - z_0`` ``[R]`` of a two-action policy: p(a=1) = sigmoid(u)."""
        if self.diff is None:
            raise ValueError("logit_difference needs a categorical policy with two actions")
        r, _ = self.hidden(x)
        return torch.addmv(self.diff[1], r, self.diff[0])

    def group_grads(self, obs: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor
                    ) -> Params:
        """``{name: [k, *shape]}``: the gradient of sum_l w[g, l] log pi(a[g, l] | s[g, l])
        for each of the k groups of rows (inputs ``[k, L, ...]``)."""
        k, L = weights.shape
        R = k * L
        r, inputs = self.hidden(obs.reshape(R, -1), keep=True)
        w = weights.reshape(R, 1)
        grads: Params = {}
        last = len(self.spec.layers) - 1
        if self.diff is not None:  # two actions: dz_1 = w (a - sigmoid(u)) = -dz_0
            g = torch.addmv(self.diff[1], r, self.diff[0]).sigmoid_()
            g = torch.sub(actions.reshape(R).to(g.dtype), g).mul_(weights.reshape(R))
            self._two_action_last_layer(g.view(k, L), r.view(k, L, -1), grads)
            if last == 0:
                return grads
            dz = self._activation_backward(torch.outer(g, self.diff[2]), inputs[last], last)
            first = last - 1
        else:
            out = torch.addmm(self.biases[-1], r, self.weights[-1].t())
            dz = self._output_grad(out, actions, w, k, L, grads)
            first = last
        for i in range(first, -1, -1):
            grads[self.spec.layers[i].weight], grads[self.spec.layers[i].bias] = \
                self._layer_grads(dz.view(k, L, -1), inputs[i].view(k, L, -1), i)
            if i:
                dz = self._activation_backward(torch.mm(dz, self.back[i]), inputs[i], i)
        return grads

    def _output_grad(self, out: torch.Tensor, actions: torch.Tensor, w: torch.Tensor, k: int,
                     L: int, grads: Params) -> torch.Tensor:
        """d(w log pi)/d(output) for categorical (any number of actions) and Gaussian heads;
        the Gaussian's log_std gradient goes into ``grads``."""
        R = k * L
        if self.spec.kind == "categorical":
            dz = torch.softmax(out, dim=-1).mul_(-w)
            return dz.scatter_add_(1, actions.reshape(R, 1).long(), w)
        inv_std = torch.exp(-self.log_std)
        z = (actions.reshape(R, -1) - out).mul_(inv_std)
        dz = z * inv_std * w
        grads[self.spec.log_std] = (z.square_().sub_(1.0).mul_(w)).reshape(k, L, -1).sum(1)
        return dz

    def _two_action_last_layer(self, g: torch.Tensor, r: torch.Tensor, grads: Params) -> None:
        """Last-layer gradients of a two-action head from g = dz_1 ``[k, L]`` (dz_0 = -g)."""
        i = len(self.spec.layers) - 1
        layer = self.spec.layers[i]
        sg = g.sum(1)  # [k]
        s = torch.bmm(g.unsqueeze(1), r).squeeze(1)  # [k, in]: sum_l g r
        s = s.mul_(self.alphas[i])
        if self.betas[i] != 0.0:
            s.add_(sg.unsqueeze(1), alpha=self.betas[i])
        grads[layer.weight] = torch.stack([-s, s], dim=1)
        grads[layer.bias] = torch.stack([-sg, sg], dim=1)

    def _layer_grads(self, dz: torch.Tensor, r: torch.Tensor, i: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's per-group ``(dW [k, out, in], db [k, out])`` from ``dz [k, L, out]`` and
        its input representation ``r [k, L, in]``: dW = alpha dz^T r + beta db 1^T."""
        db = dz.sum(1)
        alpha, beta = self.alphas[i], self.betas[i]
        transposed = r.shape[2] < dz.shape[2]  # fewer inputs than outputs: (r^T dz)^T
        if transposed:
            a, b, bias = r.transpose(1, 2), dz, db.unsqueeze(1)
        else:
            a, b, bias = dz.transpose(1, 2), r, db.unsqueeze(2)
        if beta != 0.0:
            dW = torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)
        else:
            dW = torch.bmm(a, b)
            if alpha != 1.0:
                dW.mul_(alpha)
        return (dW.transpose(1, 2) if transposed else dW), db

    def _activation_backward(self, dz: torch.Tensor, r: torch.Tensor, i: int) -> torch.Tensor:
        """dz (already multiplied by ``back[i]``) times the derivative of layer i-1's
        activation at its output r, in place: 4 r (1 - r) for tanh (the 4 is in ``back``),
        the step function for relu."""
        if self.spec.layers[i - 1].activation == "tanh":
            return dz.mul_(torch.addcmul(r, r, r, value=-1.0))
        return dz.mul_(r > 0)


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
        grads = torch.autograd.grad(surrogate, list(policy.parameters()), allow_unused=True)
        rows.append(torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                               for gr, p in zip(grads, policy.parameters())]))
    return torch.stack(rows)
