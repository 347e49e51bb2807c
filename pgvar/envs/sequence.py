"""The ``sequence`` task: prompts, completions and a verifiable 0/1 reward, small enough
to enumerate every completion, so that everything language-model fine-tuning is
argued about has an exact value.

- Q prompts, a vocabulary of V tokens (token 0 ends a completion, 1..V-1 are content),
  completions of at most L tokens (a completion that reaches L tokens without the end
  token is cut: truncated). Its length |y| counts its tokens, the end token included.
- Prompt q has an answer of ``answer_len[q]`` content tokens; position k of it accepts
  any token of ``allowed[q][k]`` (a set of 1..V-1 tokens). The reward is 1 when the
  completion ends with the end token and its content starts with an accepted answer
  (anything may follow the answer), else 0. Answer lengths and set sizes differ between
  prompts, so prompts differ in difficulty and in the length of their correct answers.
- Prompts are drawn uniformly; the objective is the mean success rate
  ``J = (1/Q) sum_q sum_y pi(y|q) r(q, y)``, and with a KL penalty of weight beta to a
  reference policy, ``J_beta = J - beta KL``, ``KL = (1/Q) sum_q KL(pi(.|q) || pi_ref(.|q))``.

Exact quantities come from all ``C = sum_{l<L} (V-1)^l + (V-1)^L`` completions of every
prompt, scored by the policy in chunks with autograd (``exact``); sampling draws
completions from those exact probabilities (the same distribution as token-by-token
sampling, without a loop over positions).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from pgvar.sequence_policies import (
    END_TOKEN,
    POLICY_KINDS,
    SequencePolicy,
    TablePolicy,
    TransformerPolicy,
    flat_grad,
)

EXACT_CHUNK = 8192  # completions scored per policy call when enumerating


@dataclass
class Completions:
    """Completions as padded rows: ``tokens [N, L]`` (0 after the end), ``mask [N, L]``
    (True on the completion's tokens, end token included), ``lengths [N]``, ``ended [N]``."""

    tokens: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    ended: torch.Tensor


def all_completions(vocab: int, max_len: int, device: torch.device | str = "cpu") -> Completions:
    """Every completion: l content tokens then the end token (l < L), or L content tokens."""
    rows: list[list[int]] = []
    for n_content in range(max_len + 1):
        for content in itertools.product(range(1, vocab), repeat=n_content):
            row = list(content) + ([END_TOKEN] if n_content < max_len else [])
            rows.append(row + [END_TOKEN] * (max_len - len(row)))
    tokens = torch.tensor(rows, dtype=torch.long, device=device).reshape(-1, max_len)
    lengths = torch.tensor([min(n + 1, max_len) for n in range(max_len + 1)
                            for _ in range((vocab - 1) ** n)], device=device)
    ended = torch.tensor([n < max_len for n in range(max_len + 1) for _ in range((vocab - 1) ** n)],
                         device=device)
    mask = torch.arange(max_len, device=device)[None, :] < lengths[:, None]
    return Completions(tokens, mask, lengths, ended)


@dataclass
class Exact:
    """Exact quantities at the current policy (tensors with autograd history).

    ``objective`` is J - beta KL; ``success`` ``[Q]`` the per-prompt success rates,
    ``length`` ``[Q]`` the per-prompt expected completion lengths, ``kl`` ``[Q]`` the
    per-prompt KL(pi || pi_ref) (zeros without a reference); ``J``, ``mean_length`` and
    ``mean_kl`` their means over prompts.
    """

    objective: torch.Tensor
    J: torch.Tensor
    success: torch.Tensor
    length: torch.Tensor
    kl: torch.Tensor
    log_probs: torch.Tensor  # [Q, C] log pi(y|q) of every completion

    @property
    def mean_length(self) -> torch.Tensor:
        return self.length.mean()

    @property
    def mean_kl(self) -> torch.Tensor:
        return self.kl.mean()


class SequenceTask:
    """The enumerable prompt-completion task of the module docstring (env name ``sequence``).

    ``horizon`` is L, the maximum completion length. The instance (answer lengths and
    accepted sets) comes from ``seed``. ``policy``/``d_model``/``n_layers``/``n_heads``
    choose the default policy (``default_policy``).
    """

    is_sequence_task = True

    def __init__(self, n_prompts: int = 6, vocab: int = 4, horizon: int = 5,
                 max_answer_len: int = 3, seed: int = 0, policy: str = "table",
                 d_model: int = 32, n_layers: int = 2, n_heads: int = 2, gamma: float = 1.0,
                 objective: str = "finite", device: torch.device | str = "cpu"):
        check_sizes(n_prompts, vocab, horizon, max_answer_len, policy, gamma, objective)
        self.name = "sequence"
        self.n_prompts, self.vocab, self.horizon = int(n_prompts), int(vocab), int(horizon)
        self.max_len = self.horizon
        self.gamma, self.objective = 1.0, "finite"
        self.policy_kind, self.d_model, self.n_layers, self.n_heads = policy, d_model, n_layers, n_heads
        self.device = torch.device(device)
        self.answer_len, self.allowed = random_answers(self.n_prompts, self.vocab,
                                                       int(max_answer_len), int(seed))
        self.completions = all_completions(self.vocab, self.max_len, self.device)
        self.rewards = self.reward_table()  # [Q, C]

    # ------------------------------------------------------------------ instance

    @property
    def n_completions(self) -> int:
        return int(self.completions.tokens.shape[0])

    def reward_table(self) -> torch.Tensor:
        """``[Q, C]`` 0/1 reward of every completion of every prompt."""
        c = self.completions
        out = torch.zeros(self.n_prompts, self.n_completions, device=self.device)
        content_len = c.lengths - c.ended.long()
        for q in range(self.n_prompts):
            ok = c.ended & (content_len >= self.answer_len[q])
            for k, accepted in enumerate(self.allowed[q]):
                ok = ok & torch.isin(c.tokens[:, k], torch.tensor(accepted, device=self.device))
            out[q] = ok.float()
        return out

    def describe(self) -> list[str]:
        """One line per prompt: answer length and accepted tokens per position."""
        return [f"prompt {q}: answer of {self.answer_len[q]} token(s), accepted {self.allowed[q]}"
                for q in range(self.n_prompts)]

    # ------------------------------------------------------------------ policies

    def default_policy(self, init_scale: float = 0.0, seed: int = 0) -> SequencePolicy:
        """The task's policy (``policy`` of the constructor), initialised from ``seed``."""
        if self.policy_kind == "table":
            policy = TablePolicy(self.n_prompts, self.vocab, self.max_len, init_scale, seed)
        else:
            policy = TransformerPolicy(self.n_prompts, self.vocab, self.max_len, self.d_model,
                                       self.n_layers, self.n_heads, init_scale, seed)
        return policy.to(self.device)

    # ------------------------------------------------------------------ exact

    def completion_token_log_probs(self, policy: SequencePolicy) -> torch.Tensor:
        """``[Q, C, L]`` log pi(y_t|q, y_<t) of every completion (0 at padding), with
        autograd, in chunks of ``EXACT_CHUNK`` completions."""
        c = self.completions
        C = self.n_completions
        prompts = torch.arange(self.n_prompts, device=self.device).repeat_interleave(C)
        tokens, mask = c.tokens.repeat(self.n_prompts, 1), c.mask.repeat(self.n_prompts, 1)
        parts = [policy.token_log_probs(prompts[s:s + EXACT_CHUNK], tokens[s:s + EXACT_CHUNK],
                                        mask[s:s + EXACT_CHUNK])
                 for s in range(0, prompts.numel(), EXACT_CHUNK)]
        return torch.cat(parts).reshape(self.n_prompts, C, self.max_len)

    def completion_log_probs(self, policy: SequencePolicy) -> torch.Tensor:
        """``[Q, C]`` log pi(y|q) of every completion, with autograd."""
        return self.completion_token_log_probs(policy).sum(-1)

    def exact(self, policy: SequencePolicy, reference: SequencePolicy | None = None,
              beta: float = 0.0) -> Exact:
        """J, per-prompt success, expected length and KL(pi || reference), exactly."""
        logp = self.completion_log_probs(policy)
        p = logp.exp()
        success = (p * self.rewards).sum(1)
        length = (p * self.completions.lengths.to(p.dtype)).sum(1)
        if reference is None:
            kl = torch.zeros_like(success)
        else:
            with torch.no_grad():
                logp_ref = self.completion_log_probs(reference)
            kl = (p * (logp - logp_ref)).sum(1)
        J = success.mean()
        return Exact(J - float(beta) * kl.mean(), J, success, length, kl, logp)

    def exact_gradient(self, policy: SequencePolicy, reference: SequencePolicy | None = None,
                       beta: float = 0.0, what: str = "objective") -> torch.Tensor:
        """``[P]`` gradient of one exact quantity (``objective``, ``J``, ``mean_length``,
        ``mean_kl``) in ``policy.parameters()`` order."""
        return flat_grad(getattr(self.exact(policy, reference, beta), what), policy)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, policy: SequencePolicy, prompts: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One completion per entry of ``prompts`` (any shape): completion indices into
        ``self.completions`` and their rewards, both shaped like ``prompts``."""
        probs = self.completion_log_probs(policy).exp()
        flat = prompts.reshape(-1).long()
        idx = torch.multinomial(probs[flat], 1, generator=generator).squeeze(1)
        rewards = self.rewards[flat, idx]
        return idx.reshape(prompts.shape), rewards.reshape(prompts.shape)


def check_sizes(n_prompts: int, vocab: int, horizon: int, max_answer_len: int, policy: str,
                gamma: float, objective: str) -> None:
    """Refuse sizes the task cannot have, naming the fix."""
    for key, value, low in (("n_prompts", n_prompts, 1), ("vocab", vocab, 2),
                            ("horizon", horizon, 2), ("max_answer_len", max_answer_len, 1)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise ValueError(f"sequence task: {key} must be an integer >= {low}, got {value}")
    if max_answer_len > horizon - 1:
        raise ValueError(f"sequence task: max_answer_len ({max_answer_len}) must leave room for "
                         f"the end token: at most horizon - 1 = {horizon - 1}")
    if policy not in POLICY_KINDS:
        raise ValueError(f"sequence task: policy must be one of {POLICY_KINDS}, got {policy!r}")
    if float(gamma) != 1.0 or objective != "finite":
        raise ValueError("sequence task: the reward comes once per completion; use gamma=1 "
                         f"and objective=finite (got gamma={gamma}, objective={objective!r})")
    n = sum((vocab - 1) ** t for t in range(horizon + 1))
    if n * n_prompts > 5_000_000:
        raise ValueError(f"sequence task: {n} completions x {n_prompts} prompts is too many to "
                         "enumerate; lower vocab or horizon")


def random_answers(n_prompts: int, vocab: int, max_answer_len: int,
                   seed: int) -> tuple[list[int], list[list[list[int]]]]:
    """Answer lengths cycling 1..max_answer_len over the prompts, and per position a random
    non-empty set of accepted content tokens: prompts differ in difficulty and length."""
    g = torch.Generator().manual_seed(int(seed))
    lengths, allowed = [], []
    for q in range(n_prompts):
        n = 1 + q % max_answer_len
        sets = []
        for _ in range(n):
            size = int(torch.randint(1, vocab, (1,), generator=g))
            perm = torch.randperm(vocab - 1, generator=g)[:size] + 1
            sets.append(sorted(int(t) for t in perm))
        lengths.append(n)
        allowed.append(sets)
    return lengths, allowed
