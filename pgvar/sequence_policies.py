"""Autoregressive policies over completions of the ``sequence`` task (pgvar.envs.sequence).

A completion is a row of ``L`` token ids; token 0 is the end token and ends it (the
rows are padded with 0 after it). Every policy maps ``(prompt, tokens)`` to the logits
of each position given the prompt and the tokens before it (teacher forcing):

    token_logits(prompts [N], tokens [N, L]) -> [N, L, V]   (position t predicts tokens[:, t])
    token_log_probs(prompts, tokens, mask) -> [N, L]        (log pi(y_t | q, y_<t), 0 where masked)

Both are written with plain tensor ops so that ``torch.func`` (vmap over grad, with
``functional_call``) can compute many batches' gradients at once.

- ``TablePolicy``: every (prompt, prefix) has its own V logits (exact, no sharing).
- ``TransformerPolicy``: a small causal transformer whose parameters every prompt and
  prefix share, as a language model's do.
"""

from __future__ import annotations

import math

import torch
from torch import nn

END_TOKEN = 0


def token_log_probs_from_logits(logits: torch.Tensor, tokens: torch.Tensor,
                                mask: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[tokens]`` per position, 0 where ``mask`` is False."""
    logp = torch.log_softmax(logits, dim=-1)
    picked = torch.gather(logp, -1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked * mask.to(picked.dtype)


def flat_grad(value: torch.Tensor, module: nn.Module, retain_graph: bool = False) -> torch.Tensor:
    """Gradient of a scalar as one flat vector in ``module.parameters()`` order (zeros
    for parameters it does not depend on)."""
    params = list(module.parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=retain_graph)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)]).detach()


class SequencePolicy(nn.Module):
    """Base: subclasses give ``token_logits``; sizes are ``n_prompts``, ``vocab``, ``max_len``."""

    n_prompts: int
    vocab: int
    max_len: int

    def token_logits(self, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_log_probs(self, prompts: torch.Tensor, tokens: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` log pi(y_t | q, y_<t), 0 at padding."""
        return token_log_probs_from_logits(self.token_logits(prompts, tokens), tokens, mask)

    def forward(self, prompts: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """``token_log_probs``: what ``torch.func.functional_call`` calls."""
        return self.token_log_probs(prompts, tokens, mask)


def prefix_indices(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[N, L]`` index of the content prefix ``tokens[:, :t]`` among all content prefixes.

    Prefixes of length l are numbered in base (V-1) after the ``sum_{k<l} (V-1)^k``
    shorter ones; content tokens are 1..V-1. Positions after an end token get a valid
    but meaningless index (they are masked out by the caller).
    """
    base = vocab - 1
    n, length = tokens.shape
    digits = (tokens.long() - 1).clamp(min=0)
    idx = torch.zeros(n, dtype=torch.long, device=tokens.device)
    cols = []
    offset = 0
    for t in range(length):
        cols.append(offset + idx)
        offset += base ** t
        idx = idx * base + digits[:, t]
    return torch.stack(cols, dim=1)


def n_prefixes(vocab: int, max_len: int) -> int:
    """Number of content prefixes of length 0..L-1: sum_l (V-1)^l."""
    return sum((vocab - 1) ** t for t in range(max_len))


class TablePolicy(SequencePolicy):
    """A softmax per (prompt, prefix): ``logits[q, prefix(y_<t)]``; exact, no shared parameters.

    ``init_scale``: std of the initial logits (0: every token equally likely).
    """

    def __init__(self, n_prompts: int, vocab: int, max_len: int, init_scale: float = 0.0,
                 seed: int = 0):
        super().__init__()
        self.n_prompts, self.vocab, self.max_len = int(n_prompts), int(vocab), int(max_len)
        g = torch.Generator().manual_seed(int(seed))
        shape = (self.n_prompts, n_prefixes(self.vocab, self.max_len), self.vocab)
        self.logits_table = nn.Parameter(float(init_scale) * torch.randn(shape, generator=g))

    def token_logits(self, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        idx = prefix_indices(tokens, self.vocab)
        return self.logits_table[prompts.long()[:, None], idx]


class TransformerPolicy(SequencePolicy):
    """A small causal transformer (pre-norm, ``n_layers`` blocks of ``n_heads``-head
    attention and a 4x MLP). Input position 0 holds the prompt's embedding, position t
    the embedding of token t-1; the output at position t gives the logits of token t.

    ``init_scale`` scales the output layer's initial weights (0: a uniform policy).
    """

    def __init__(self, n_prompts: int, vocab: int, max_len: int, d_model: int = 32,
                 n_layers: int = 2, n_heads: int = 2, init_scale: float = 0.0, seed: int = 0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_prompts, self.vocab, self.max_len = int(n_prompts), int(vocab), int(max_len)
        self.n_heads = int(n_heads)
        torch.manual_seed(int(seed))
        self.prompt_emb = nn.Embedding(self.n_prompts, d_model)
        self.token_emb = nn.Embedding(self.vocab, d_model)
        self.pos_emb = nn.Parameter(0.1 * torch.randn(self.max_len, d_model))
        self.blocks = nn.ModuleList(_Block(d_model, self.n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, self.vocab)
        nn.init.normal_(self.head.weight, std=float(init_scale) / math.sqrt(d_model))
        nn.init.zeros_(self.head.bias)
        causal = torch.ones(self.max_len, self.max_len, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def token_logits(self, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        first = self.prompt_emb(prompts.long())[:, None]
        rest = self.token_emb(tokens[:, :length - 1].long())
        x = torch.cat([first, rest], dim=1) + self.pos_emb[:length]
        mask = self.causal[:length, :length]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


class _Block(nn.Module):
    """Pre-norm causal self-attention and MLP, each with a residual connection."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(n, length, h, d // h).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        scores = scores.masked_fill(~mask, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(n, length, d))
        return x + self.mlp(self.norm2(x))


POLICY_KINDS = ("table", "transformer")
