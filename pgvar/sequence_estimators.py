"""Group-based estimators of language-model fine-tuning on the ``sequence`` task.

A batch holds P prompts (drawn uniformly, independently) and G completions of each
(``y_i``, reward ``r_i``, length ``|y_i|`` in tokens), N = P G completions in all. Every
estimator is the gradient of a surrogate made of per-token terms; with ``epochs = 1``
(the default) it is

    g = sum_i c_i A_i sum_t grad log pi(y_{i,t} | q, y_{i,<t})     (- beta k3 terms, below)

with an advantage ``A_i`` from the rewards of i's group and a normaliser ``c_i``. The
names are TRL's ``GRPOConfig.loss_type`` values (trl/trainer/grpo_trainer.py: advantage
``(r - group mean) / (group std + 1e-4)`` with the sample std, ddof 1; ``grpo`` averages
each completion's tokens over its own length, then over completions; ``dr_grpo`` sums
tokens over N * max_completion_length; ``dapo`` over the tokens of the whole batch;
``bnpo`` over the tokens of the local micro-batch, here one prompt group, then averages
the groups as gradient accumulation does):

| name      | A_i                                | c_i                  | E g (KL aside)                        |
| --------- | ---------------------------------- | -------------------- | ------------------------------------- |
| reinforce | r_i                                | 1/N                  | grad J (unbiased)                     |
| rloo      | r_i - mean_{j != i} r_j            | 1/N                  | grad J (unbiased, G >= 2)             |
| grpo      | (r_i - mean r) / (std r + 1e-4)    | 1/(N |y_i|)          | not a multiple of grad J: see below   |
| dr_grpo   | r_i - mean r                       | 1/(N L)              | (1 - 1/G)/L grad J (a scaled grad J)  |
| dapo      | as grpo                            | 1/sum_batch |y_j|    | not a multiple of grad J              |
| bnpo      | as grpo                            | 1/(P sum_group |y_j|)| not a multiple of grad J              |

(means and std over the G completions of i's group). Why: a score ``grad log pi(y_i)``
has mean 0 and is independent of the other completions, so only the part of A_i that
depends on r_i survives in the mean. With 0/1 rewards and p_q the success rate of q,
``E[A_i | y_i] = abar_q(r_i)``, the mean over the k ~ Binomial(G-1, p_q) successes of the
others, and for a normaliser of the own length only:

    E g = (1/Q) sum_q sum_y pi(y|q) abar_q(r(y)) h(|y|) grad log pi(y|q).

With h constant this is (1/Q) sum_q (abar_q(1) - abar_q(0)) h grad p_q: reinforce and
rloo weigh every prompt 1, dr_grpo (1 - 1/G) (own reward in the mean), grpo about
1/std_q (difficulty reweighting); grpo's h = 1/|y| further shifts weight to short
completions when A > 0 and to long ones when A < 0 (length bias). ``exact_mean`` computes
this expectation by enumeration; dapo and bnpo couple the completions through their
normaliser and have no such form (their mean is measured by Monte Carlo).

KL penalty of weight ``beta`` to a reference policy (``kl_mode``):

- ``k1_reward``: the reward becomes ``r_i - beta sum_t (log pi - log pi_ref)(y_{i,t})``
  (the sequence log-ratio, no gradient through it). For reinforce and rloo,
  ``E g = grad (J - beta KL(pi || pi_ref))`` exactly (unbiased); dr_grpo gives that times
  (1 - 1/G)/L; the std-normalised ones are biased as above.
- ``k3_loss`` (GRPO's): ``- beta k3_t``, ``k3 = exp(lr) - lr - 1``, ``lr = log pi_ref - log pi``,
  added to every token's term and normalised like it, differentiated through pi. Its
  mean is ``-beta sum_prefix d_pi(prefix) grad KL(pi_ref || pi)(prefix)`` (per token, the
  gradient of the *reverse* KL at the on-policy prefixes), not ``-beta grad KL(pi || pi_ref)``:
  biased for grad (J - beta KL) whenever pi != pi_ref.

``epochs = K > 1`` gives PPO's update direction on the same batch, as pgvar's ``ppo``:
K full-batch ascent steps of size ``ppo_lr`` on the clipped surrogate (each token's term
``min(rho A, clip(rho, 1-eps, 1+eps) A)``, eps = ``ppo_clip``, rho = pi/pi_old) with the normalisers above,
returning ``(theta_K - theta_0) / (lr K)``; K = 1 is the plain estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from pgvar.envs.sequence import SequenceTask
from pgvar.estimators import DEFAULT_CONFIG, EstimatorConfig
from pgvar.gradients import flatten, mean_ascent_gradient, policy_params
from pgvar.sequence_policies import SequencePolicy, flat_grad

STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def sequence_config(knobs) -> EstimatorConfig:
    """The estimator knobs of a run's ``estimator`` section (``pgvar.config``) as the one
    ``pgvar.estimators.EstimatorConfig`` the sequence estimators read: ``group_size``,
    ``kl_beta``, ``kl_mode``, ``epochs``, ``scale_rewards``, and PPO's ``ppo_clip`` and
    ``ppo_lr`` for ``epochs > 1`` (declared and validated there, once)."""
    return knobs if isinstance(knobs, EstimatorConfig) else EstimatorConfig(**knobs.core_kwargs())


# ----------------------------------------------------------------------------- batches


@dataclass
class SequenceBatch:
    """M batches of P prompt groups of G completions: ``prompts``, ``index`` (into the
    task's completions) and ``rewards``, each ``[M, P, G]``; tokens ``[M, N, L]``."""

    prompts: torch.Tensor
    index: torch.Tensor
    rewards: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor  # [M, N]

    @property
    def shape(self) -> tuple[int, int, int]:
        M, P, G = self.prompts.shape
        return M, P, G

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, P, G, ...]`` -> ``[M, N, ...]``."""
        M, P, G = self.shape
        return x.reshape(M, P * G, *x.shape[3:])


def sample_batches(task: SequenceTask, policy: SequencePolicy, n_batches: int,
                   prompts_per_batch: int, group_size: int, seed: int) -> SequenceBatch:
    """M = ``n_batches`` independent batches; prompts uniform with replacement."""
    g = torch.Generator(device=task.device).manual_seed(int(seed))
    shape = (int(n_batches), int(prompts_per_batch))
    prompts = torch.randint(task.n_prompts, shape, generator=g, device=task.device)
    prompts = prompts[..., None].expand(*shape, int(group_size)).contiguous()
    index, rewards = task.sample(policy, prompts, g)
    c = task.completions
    M, N = shape[0], shape[1] * int(group_size)
    return SequenceBatch(prompts, index, rewards, c.tokens[index].reshape(M, N, -1),
                         c.mask[index].reshape(M, N, -1), c.lengths[index].reshape(M, N))


# ----------------------------------------------------------------------------- advantages


def group_std(R: torch.Tensor) -> torch.Tensor:
    """Sample std (ddof 1) over the group axis (-1), as TRL's nanstd; 0 for G = 1."""
    G = R.shape[-1]
    if G < 2:
        return torch.zeros_like(R)
    return R.std(dim=-1, keepdim=True).expand_as(R)


def reward_advantage(R: torch.Tensor) -> torch.Tensor:
    """REINFORCE: the reward itself."""
    return R


def rloo_advantage(R: torch.Tensor) -> torch.Tensor:
    """r_i - mean of the other G-1 rewards (independent of y_i: unbiased)."""
    G = R.shape[-1]
    if G < 2:
        raise ValueError("rloo needs group_size >= 2 (a mean over the other completions)")
    return R - (R.sum(-1, keepdim=True) - R) / (G - 1)


def centred_advantage(R: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: r_i - group mean (own reward included)."""
    return R - R.mean(-1, keepdim=True)


def standardised_advantage(R: torch.Tensor) -> torch.Tensor:
    """GRPO: (r_i - group mean) / (group std + 1e-4)."""
    return centred_advantage(R) / (group_std(R) + STD_EPS)


def is_scaled(est: SequenceEstimator, cfg: EstimatorConfig) -> bool:
    """Whether the advantages are divided by the group std (``cfg.scale_rewards``)."""
    return est.scaled if cfg.scale_rewards == "default" else cfg.scale_rewards == "group"


def advantages(est: SequenceEstimator, R: torch.Tensor, scaled: bool) -> torch.Tensor:
    """The estimator's advantage of rewards ``R`` ``[..., G]``, divided by (group std +
    1e-4) when ``scaled``."""
    A = est.advantage(R)
    return A / (group_std(R) + STD_EPS) if scaled else A


# ----------------------------------------------------------------------------- normalisers
# Each returns c [M, N] from the lengths [M, P, G] and the maximum length L.


def per_completion_mean(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """1/N: the mean over completions of each completion's token sum."""
    M, P, G = lengths.shape
    return torch.full((M, P * G), 1.0 / (P * G), device=lengths.device)


def own_length_mean(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """1/(N |y_i|): each completion's tokens averaged over its own length (grpo)."""
    M, P, G = lengths.shape
    return (1.0 / (P * G * lengths.to(torch.float32))).reshape(M, P * G)


def constant_length_mean(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """1/(N L): a constant normaliser, L = max_completion_length (dr_grpo)."""
    M, P, G = lengths.shape
    return torch.full((M, P * G), 1.0 / (P * G * max_len), device=lengths.device)


def batch_token_mean(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """1/sum_batch |y_j|: a mean over every token of the batch (dapo)."""
    M, P, G = lengths.shape
    total = lengths.to(torch.float32).sum((1, 2))
    return (1.0 / total)[:, None].expand(M, P * G)


def group_token_mean(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """1/(P sum_group |y_j|): a token mean per micro-batch of one group, then a mean over
    the P groups (bnpo with one group per device step)."""
    M, P, G = lengths.shape
    per_group = lengths.to(torch.float32).sum(2, keepdim=True)
    return (1.0 / (P * per_group)).expand(M, P, G).reshape(M, P * G)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SequenceEstimator:
    """A registered sequence estimator: its advantage, normaliser and what it estimates.

    ``length_weight``: h(|y|, L) of the module docstring for estimators whose normaliser
    depends only on the own length (None: coupled through the batch; no exact mean);
    ``scale``: E g = scale(G, L) * grad J for the unbiased-up-to-scale ones (None: not a
    multiple of grad J), without reward scaling; ``scaled``: whether the advantage is
    divided by the group std by default (TRL's ``scale_rewards="group"``).
    """

    name: str
    description: str
    unbiased_for: str
    advantage: Callable[[torch.Tensor], torch.Tensor]
    normaliser: Callable[[torch.Tensor, int], torch.Tensor]
    min_group: int = 1
    length_weight: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    scale: Callable[[int, int], float] | None = None
    scaled: bool = False


def _ones(lengths: torch.Tensor, L: int) -> torch.Tensor:
    return torch.ones_like(lengths, dtype=torch.float64)


SEQUENCE_ESTIMATORS: dict[str, SequenceEstimator] = {e.name: e for e in [
    SequenceEstimator("reinforce", "sequence REINFORCE: r_i sum_t grad log pi, mean over the batch",
                      "grad J (grad (J - beta KL) with k1_reward)", reward_advantage,
                      per_completion_mean, 1, _ones, lambda G, L: 1.0),
    SequenceEstimator("rloo", "RLOO (Ahmadian et al. 2024): r_i - mean of the others' rewards",
                      "grad J (grad (J - beta KL) with k1_reward)", rloo_advantage,
                      per_completion_mean, 2, _ones, lambda G, L: 1.0),
    SequenceEstimator("grpo", "GRPO (Shao et al. 2024): standardised advantage, tokens averaged "
                      "over each completion's length", "no multiple of grad J: prompts weighted "
                      "~1/std, completions by 1/|y|", centred_advantage, own_length_mean, 2,
                      lambda n, L: 1.0 / n.to(torch.float64), None, scaled=True),
    SequenceEstimator("dr_grpo", "Dr. GRPO (Liu et al. 2025): centred advantage, constant "
                      "normaliser N L", "(1 - 1/G)/L grad J (a scaled grad J)", centred_advantage,
                      constant_length_mean, 2, lambda n, L: torch.full_like(n, 1.0 / L,
                                                                            dtype=torch.float64),
                      lambda G, L: (1.0 - 1.0 / G) / L),
    SequenceEstimator("dapo", "DAPO (Yu et al. 2025): standardised advantage, mean over every "
                      "token of the batch", "no multiple of grad J (normaliser couples the batch)",
                      centred_advantage, batch_token_mean, 2, scaled=True),
    SequenceEstimator("bnpo", "BNPO (TRL): standardised advantage, token mean per prompt group "
                      "(micro-batch), mean over groups", "no multiple of grad J",
                      centred_advantage, group_token_mean, 2, scaled=True),
]}


def get_sequence_estimator(name: str) -> SequenceEstimator:
    """The registered sequence estimator ``name``, or a ValueError naming the valid ones."""
    try:
        return SEQUENCE_ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sequence estimator {name!r}; valid names: "
                         f"{sorted(SEQUENCE_ESTIMATORS)}") from None


def check_group_size(est: SequenceEstimator, group_size: int) -> None:
    """Group-baseline estimators need G >= 2."""
    if group_size < est.min_group:
        raise ValueError(f"estimator {est.name!r} needs group_size >= {est.min_group}, "
                         f"got {group_size}")


# ----------------------------------------------------------------------------- directions


def k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 = exp(lr) - lr - 1, lr = log pi_ref - log pi (Schulman's estimator of KL(pi||pi_ref))."""
    lr = logp_ref - logp
    return torch.exp(lr) - lr - 1.0


def batch_log_probs(policy: SequencePolicy, batch: SequenceBatch) -> torch.Tensor:
    """``[M, N, L]`` token log-probabilities of the sampled completions (no gradient)."""
    M, N, L = batch.tokens.shape
    with torch.no_grad():
        lp = policy.token_log_probs(batch.flat(batch.prompts).reshape(-1),
                                    batch.tokens.reshape(M * N, L), batch.mask.reshape(M * N, L))
    return lp.reshape(M, N, L)


def shaped_rewards(batch: SequenceBatch, cfg: EstimatorConfig, logp_old: torch.Tensor,
                   logp_ref: torch.Tensor | None) -> torch.Tensor:
    """``[M, P, G]`` rewards, minus beta times the sequence log-ratio under ``k1_reward``."""
    R = batch.rewards.to(logp_old.dtype)
    if cfg.kl_mode == "k1_reward" and cfg.kl_beta > 0 and logp_ref is not None:
        M, P, G = batch.shape
        R = R - cfg.kl_beta * (logp_old - logp_ref).sum(-1).reshape(M, P, G)
    return R


def estimate_directions(name: str, task: SequenceTask, policy: SequencePolicy,
                        batch: SequenceBatch, cfg: EstimatorConfig = DEFAULT_CONFIG,
                        reference: SequencePolicy | None = None, chunk: int = 256) -> torch.Tensor:
    """``[M, P]``: estimator ``name`` on each of the M batches (ascent directions).

    ``reference`` is pi_ref of the KL penalty (needed when ``cfg.kl_beta > 0``).
    """
    est = get_sequence_estimator(name)
    cfg.validate()
    M, P_, G = batch.shape
    check_group_size(est, G)
    if cfg.kl_beta > 0 and reference is None:
        raise ValueError("kl_beta > 0 needs a reference policy (reference=...)")
    logp_old = batch_log_probs(policy, batch)
    logp_ref = batch_log_probs(reference, batch) if reference is not None else torch.zeros_like(logp_old)
    A = batch.flat(advantages(est, shaped_rewards(batch, cfg, logp_old, logp_ref),
                              is_scaled(est, cfg)))
    c = est.normaliser(batch.lengths.reshape(M, P_, G), task.max_len).to(logp_old.dtype)
    beta_k3 = float(cfg.kl_beta) if cfg.kl_mode == "k3_loss" else 0.0
    return surrogate_directions(policy, batch.flat(batch.prompts), batch.tokens, batch.mask,
                                logp_old, logp_ref, A.detach(), c, beta_k3, cfg, chunk)


def surrogate_directions(policy: SequencePolicy, prompts: torch.Tensor, tokens: torch.Tensor,
                         mask: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor,
                         A: torch.Tensor, c: torch.Tensor, beta_k3: float,
                         cfg: EstimatorConfig, chunk: int) -> torch.Tensor:
    """``[M, P]`` mean of the K ascent steps' gradients of the clipped surrogate
    ``sum_{i,t} c_i [min(rho A_i, clip(rho) A_i) - beta_k3 k3_t]`` per batch (vmap over M)."""
    params0 = policy_params(policy)
    eps, K, lr = float(cfg.ppo_clip), int(cfg.epochs), float(cfg.ppo_lr)

    def surrogate(p, q, y, m, lo, lref, a, cc):
        lp = functional_call(policy, p, (q, y, m))
        mf = m.to(lp.dtype)
        ratio = torch.exp((lp - lo) * mf)
        term = torch.minimum(ratio * a[:, None], ratio.clamp(1 - eps, 1 + eps) * a[:, None])
        if beta_k3 > 0:
            term = term - beta_k3 * k3(lp, lref)
        return (term * mf * cc[:, None]).sum()

    def one(q, y, m, lo, lref, a, cc):
        return mean_ascent_gradient(lambda p: grad(surrogate)(p, q, y, m, lo, lref, a, cc),
                                    params0, K, lr)

    batched = vmap(one)
    rows = []
    for s in range(0, A.shape[0], chunk):
        sl = slice(s, s + chunk)
        out = batched(prompts[sl], tokens[sl], mask[sl], logp_old[sl], logp_ref[sl], A[sl], c[sl])
        rows.append(flatten(out, n_lead=1).detach())
    return torch.cat(rows)


# ----------------------------------------------------------------------------- exact means


def binomial_pmf(n: int, p: torch.Tensor) -> torch.Tensor:
    """``[Q, n+1]`` P(k successes of n) for success rates ``p`` ``[Q]``."""
    k = torch.arange(n + 1, dtype=torch.float64, device=p.device)
    log_c = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1) \
        - torch.lgamma(n - k + 1)
    p = p.to(torch.float64).clamp(0.0, 1.0)[:, None]
    return torch.exp(log_c) * p ** k * (1 - p) ** (n - k)


def mean_advantage(est: SequenceEstimator, p: torch.Tensor, G: int,
                   scaled: bool | None = None) -> torch.Tensor:
    """``[Q, 2]``: abar_q(r) = E[A_i | r_i = r], over k ~ Binomial(G-1, p_q) successes of
    the other G-1 completions, computed with the estimator's own advantage function."""
    k = torch.arange(G, dtype=torch.float64, device=p.device)
    out = []
    for r in (0.0, 1.0):
        R = (torch.arange(G, dtype=torch.float64, device=p.device)[None, :] < k[:, None])
        R = torch.cat([torch.full((G, 1), r, dtype=torch.float64, device=p.device),
                       R[:, :G - 1].to(torch.float64)], dim=1)  # row k: own r, then k ones
        scale = est.scaled if scaled is None else scaled
        out.append(advantages(est, R, scale)[:, 0])             # [G] A_own for k = 0..G-1
    A = torch.stack(out, dim=1)                                 # [G, 2]
    return binomial_pmf(G - 1, p) @ A                           # [Q, 2]


def has_exact_mean(name: str, cfg: EstimatorConfig) -> bool:
    """Whether ``exact_mean`` can give E g by enumeration for this estimator and config."""
    est = get_sequence_estimator(name)
    if est.length_weight is None or int(cfg.epochs) != 1:
        return False
    return not (cfg.kl_beta > 0 and cfg.kl_mode == "k1_reward" and is_scaled(est, cfg))


def exact_mean_surrogate(name: str, task: SequenceTask, policy: SequencePolicy,
                         cfg: EstimatorConfig, reference: SequencePolicy | None = None,
                         prompts: list[int] | None = None) -> torch.Tensor:
    """A scalar whose gradient is E g (module docstring), summed over ``prompts`` (all by
    default) and divided by Q. Only where ``has_exact_mean``."""
    est = get_sequence_estimator(name)
    if not has_exact_mean(name, cfg):
        raise ValueError(f"no exact mean for {name!r} with {cfg}: its normaliser couples the "
                         "batch, or epochs > 1, or k1_reward with std-scaled rewards")
    G, L = int(cfg.group_size), task.max_len
    check_group_size(est, G)
    tok = task.completion_token_log_probs(policy)                       # [Q, C, L]
    logp = tok.sum(-1)
    p = logp.detach().exp().to(torch.float64)
    h = est.length_weight(task.completions.lengths, L)[None, :]        # [1, C]
    beta = float(cfg.kl_beta)
    tok_ref = None
    if beta > 0:
        if reference is None:
            raise ValueError("kl_beta > 0 needs a reference policy")
        with torch.no_grad():
            tok_ref = task.completion_token_log_probs(reference)
    if beta > 0 and cfg.kl_mode == "k1_reward":
        shaped = task.rewards.to(torch.float64) - beta * (logp - tok_ref.sum(-1)).detach().to(torch.float64)
        own = torch.zeros(1, G, dtype=torch.float64)
        own[0, 0] = 1.0
        coefficient = float(est.advantage(own)[0, 0])  # A_i = coefficient r_i + (others' part)
        weight = p * shaped * coefficient
    else:
        success = (p * task.rewards).sum(1)
        abar = mean_advantage(est, success, G, is_scaled(est, cfg))     # [Q, 2]
        weight = p * torch.where(task.rewards > 0.5, abar[:, 1:2], abar[:, 0:1])
    surrogate = (weight * h).to(logp.dtype) * logp                     # [Q, C]
    if beta > 0 and cfg.kl_mode == "k3_loss":
        kl_tok = k3(tok, tok_ref) * task.completions.mask.to(tok.dtype)[None]
        surrogate = surrogate - beta * (p * h).to(tok.dtype) * kl_tok.sum(-1)
    keep = range(task.n_prompts) if prompts is None else prompts
    return surrogate[list(keep)].sum() / task.n_prompts


def exact_mean(name: str, task: SequenceTask, policy: SequencePolicy,
               cfg: EstimatorConfig, reference: SequencePolicy | None = None,
               prompts: list[int] | None = None) -> torch.Tensor:
    """``[P]`` E g of estimator ``name`` (the part from ``prompts``), by enumeration."""
    return flat_grad(exact_mean_surrogate(name, task, policy, cfg, reference, prompts), policy)


def grpo_weight_prediction(p: torch.Tensor, G: int) -> torch.Tensor:
    """1/sigma_q = 1/sqrt(p_q (1 - p_q)): the large-G weight GRPO's std gives prompt q."""
    p = p.to(torch.float64)
    return 1.0 / torch.sqrt((p * (1 - p)).clamp_min(1e-12))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b); nan when either is zero."""
    na, nb = float(a.norm()), float(b.norm())
    return float(a.double() @ b.double()) / (na * nb) if na > 0 and nb > 0 else math.nan
