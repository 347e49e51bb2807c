"""pgvar's MLP policies as plain matrices: the folded forward and the hand-written backward.

``mlp_spec`` recognises an unmodified pgvar MLP policy; ``FoldedMLP`` holds its weights
with tanh's affine maps folded in. Sampling (``pgvar.rollout``) uses its forward, the
score gradients (``pgvar.gradients``) its per-group backward. It depends on the
policies only, so both can use it without depending on each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pgvar import policies as P

Params = dict[str, torch.Tensor]  # parameter name -> tensor, as ``named_parameters`` gives them

# pgvar's MLP policies are Linear layers with Tanh or ReLU between them. For them, the
# score gradients (``pgvar.gradients``) skip autograd: a hand-written forward and backward on the
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
