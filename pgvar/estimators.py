"""Policy-gradient estimators: one small function each, and a registry by name.

Most estimators are ``g = (1/B) sum_i sum_t w_{i,t} grad log pi(a_{i,t} | s_{i,t})`` with
weights computed without gradient (``pgvar.gradients.score_gradients`` turns weights of
many batches into their gradients at once). An estimator here gives an *advantage*
``a_{i,t}``; its weights are

    w_{i,t} = gamma^t * a_{i,t}          (the gamma^t only for estimators of the reward-to-go
                                          family and only with cfg.discount_weighting)

With ``G_t = sum_{t'>=t} gamma^(t'-t) r_t'`` (plus ``gamma^(L-t) V(s_L)`` after a
truncation under the "discounted" objective, see ``pgvar.returns.bootstrap_values``):

| name                  | a_t                                       | unbiased for J           |
| --------------------- | ----------------------------------------- | ------------------------ |
| reinforce             | R = G_0, every t (no gamma^t: none due)   | yes                      |
| reinforce_rtg         | G_t                                       | yes                      |
| mean_baseline         | G_t - mean_j G_{j,t} (all B episodes)     | no: E[g] = (1 - 1/B) dJ  |
| mean_baseline_episode | R - mean_j R_j (no gamma^t)               | no: E[g] = (1 - 1/B) dJ  |
| rloo                  | G_t - mean_{j != i} G_{j,t}               | yes (B >= 2)             |
| value_baseline        | G_t - V(s_t, t)                           | yes (V not from batch)   |
| actor_critic          | delta_t = r_t + gamma V(s_{t+1}) - V(s_t) | no, unless V exact       |
| gae                   | sum_l (gamma lambda)^l delta_{t+l}        | no, unless V exact/lam=1 |
| optimal_baseline      | per coordinate k: R - b*_k (Greensmith)   | yes (leave-one-out b*)   |
| ppo                   | its update direction after the epochs     | no                       |

Ended episodes count G = 0 in the per-step means. Without a critic the tail after a
truncation is 0 (exact under "finite"; under "discounted" the estimators that need no
critic then drop the future beyond the cut, as do all sampled scores beyond it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn
from torch.func import grad, vmap

from pgvar.batch import Batch
from pgvar.checks import require_choice, require_in_range, require_int
from pgvar.gradients import (
    flatten,
    functional_log_prob,
    mean_ascent_gradient,
    policy_params,
    score_gradient_blocks,
    score_gradients,
)
from pgvar.returns import bootstrap_values, discount_weights, gae, reward_to_go, td_errors

__all__ = [
    "DEFAULT_CONFIG",
    "ESTIMATORS",
    "Estimator",
    "EstimatorConfig",
    "EstimatorInputs",
    "check_estimator_knobs",
    "estimate_gradients",
    "estimator_weights",
    "get_estimator",
    "ppo_directions",
    "prepare_inputs",
]


# ------------------------------------------------------------------------------ config

def check_estimator_knobs(knobs, prefix: str = "EstimatorConfig",
                          error: type[Exception] = ValueError) -> None:
    """The ranges of ``EstimatorConfig``'s fields, checked on ``knobs`` (an
    ``EstimatorConfig`` or ``pgvar.config``'s settings with the same fields); messages
    name each field as ``prefix.field``."""
    require_in_range(f"{prefix}.lam", knobs.lam, 0.0, 1.0, error=error)
    require_in_range(f"{prefix}.ppo_clip", knobs.ppo_clip, 0.0, math.inf, low_open=True,
                     high_open=True, error=error)
    require_int(f"{prefix}.ppo_epochs", knobs.ppo_epochs, 1, error=error)
    require_in_range(f"{prefix}.ppo_lr", knobs.ppo_lr, 0.0, math.inf, low_open=True,
                     high_open=True, error=error)
    require_int(f"{prefix}.group_size", knobs.group_size, 1, error=error)
    require_in_range(f"{prefix}.kl_beta", knobs.kl_beta, 0.0, math.inf, high_open=True, error=error)
    require_choice(f"{prefix}.kl_mode", knobs.kl_mode, ("k1_reward", "k3_loss"), error=error)
    require_int(f"{prefix}.epochs", knobs.epochs, 1, error=error)
    require_choice(f"{prefix}.scale_rewards", knobs.scale_rewards, ("default", "group", "none"),
                   error=error)


@dataclass(frozen=True)
class EstimatorConfig:
    """Knobs shared by the estimators. Validated on construction.

    Declared once: ``pgvar.config``'s ``estimator`` section has these fields (plus the
    estimator's name) and these range rules (``check_estimator_knobs``).
    """

    lam: float = 0.95                   # GAE lambda in [0, 1] (gae only)
    discount_weighting: bool = True     # gamma^t on the score at t (unbiased for J);
                                        # False = the common-code habit
    normalize_advantages: bool = False  # per-batch advantage normalisation (a common, biased, trick)
    truncation_as_termination: bool = False  # value 0 after a time-limit cut even if "discounted"
    ppo_clip: float = 0.2               # PPO ratio clip epsilon, > 0 (ppo only)
    ppo_epochs: int = 4                 # PPO full-batch ascent steps on one batch, >= 1 (ppo only)
    ppo_lr: float = 0.05                # inner SGD step size of PPO, > 0 (ppo; sequence epochs > 1)
    # the sequence estimators' (env=sequence; pgvar.sequence_estimators):
    group_size: int = 4                 # G completions per prompt (batch_size / G prompts)
    kl_beta: float = 0.0                # weight of KL(pi || pi_ref), pi_ref = the initial policy
    kl_mode: str = "k3_loss"            # k1_reward (log-ratio in the reward) or k3_loss (GRPO's)
    epochs: int = 1                     # PPO-style clipped epochs on one batch (1: plain estimator)
    scale_rewards: str = "default"      # TRL's: group (divide by the group std), none, or default
                                        # (group for grpo, dapo, bnpo)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and its valid range."""
        check_estimator_knobs(self)


DEFAULT_CONFIG = EstimatorConfig()  # frozen, so one shared default is safe


# ------------------------------------------------------------------------------ inputs

@dataclass
class EstimatorInputs:
    """Everything an estimator reads, computed once per call.

    ``batch`` is flat ``[N, T]`` with N = n_batches * B; ``values`` is ``V(s_t, t)`` (None
    without a critic); ``bootstrap`` the value after each step (``bootstrap_values``;
    zeros without a critic).
    """

    batch: Batch
    n_batches: int
    gamma: float
    objective: str
    cfg: EstimatorConfig
    values: torch.Tensor | None
    bootstrap: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.batch.n_episodes // self.n_batches

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` -> ``[n_batches, B, ...]``."""
        return x.reshape(self.n_batches, self.batch_size, *x.shape[1:])

    @cached_property
    def reward_to_go(self) -> torch.Tensor:
        """``G_t`` ``[N, T]``, with the bootstrap tail where one applies."""
        tail = None if self.values is None else self.bootstrap  # no critic: no tail
        return reward_to_go(self.batch.rewards, self.batch.mask, self.gamma, tail)

    @cached_property
    def episode_return(self) -> torch.Tensor:
        """``R = G_0`` ``[N]``: the discounted return (plus tail)."""
        return self.reward_to_go[:, 0]

    def critic_values(self, name: str) -> torch.Tensor:
        if self.values is None:
            raise ValueError(f"estimator {name!r} needs a critic: pass critic= "
                             "(e.g. pgvar.critics.make_critic(env))")
        return self.values

    def require_batch_size(self, name: str, minimum: int) -> None:
        if self.batch_size < minimum:
            raise ValueError(f"estimator {name!r} needs at least {minimum} episodes per batch, "
                             f"got B = {self.batch_size}")


def prepare_inputs(env, batch: Batch, n_batches: int, critic: nn.Module | None = None,
                   cfg: EstimatorConfig = DEFAULT_CONFIG) -> EstimatorInputs:
    """Critic values and bootstrap tails for ``batch``; gamma and objective from ``env``."""
    require_int("n_batches", n_batches)
    if batch.n_episodes % n_batches:
        raise ValueError(f"{batch.n_episodes} episodes do not split into {n_batches} equal batches")
    gamma, objective = float(env.gamma), env.objective
    if critic is None:
        values, boot = None, torch.zeros_like(batch.rewards)
    else:
        values, v_next = critic.values(batch)
        boot = bootstrap_values(batch, v_next, objective, cfg.truncation_as_termination)
    return EstimatorInputs(batch, int(n_batches), gamma, objective, cfg, values, boot)


# -------------------------------------------------------------------------- advantages
# Each returns a_{i,t} as [N, T] (before gamma^t and normalisation).

def reinforce_advantage(x: EstimatorInputs) -> torch.Tensor:
    """Williams' REINFORCE: the whole return R on every step's score."""
    return x.episode_return[:, None].expand_as(x.batch.rewards)


def reward_to_go_advantage(x: EstimatorInputs) -> torch.Tensor:
    """G_t: rewards before t are independent of a_t, so dropping them keeps the mean."""
    return x.reward_to_go


def mean_baseline_advantage(x: EstimatorInputs) -> torch.Tensor:
    """G_t - b_t, b_t = (1/B) sum_j G_{j,t} over the batch (ended episodes: G = 0).

    b_t includes episode i's own G_t, so E[g] = (1 - 1/B) grad J: biased by O(1/B).
    """
    G = x.grouped(x.reward_to_go)
    return (G - G.mean(dim=1, keepdim=True)).reshape_as(x.reward_to_go)


def mean_baseline_episode_advantage(x: EstimatorInputs) -> torch.Tensor:
    """R - (1/B) sum_j R_j on every step: the "episode mean return" baseline, O(1/B) biased."""
    R = x.grouped(x.episode_return)
    a = (R - R.mean(dim=1, keepdim=True)).reshape(-1)
    return a[:, None].expand_as(x.batch.rewards)


def rloo_advantage(x: EstimatorInputs) -> torch.Tensor:
    """G_t - (1/(B-1)) sum_{j != i} G_{j,t}: the baseline is independent of episode i."""
    x.require_batch_size("rloo", 2)
    G = x.grouped(x.reward_to_go)
    B = G.shape[1]
    others = (G.sum(dim=1, keepdim=True) - G) / (B - 1)
    return (G - others).reshape_as(x.reward_to_go)


def value_baseline_advantage(x: EstimatorInputs) -> torch.Tensor:
    """G_t - V(s_t, t): a baseline of the state alone keeps the estimator unbiased."""
    return x.reward_to_go - x.critic_values("value_baseline")


def actor_critic_advantage(x: EstimatorInputs) -> torch.Tensor:
    """delta_t = r_t + gamma b_t - V(s_t, t): biased unless V is the true value."""
    V = x.critic_values("actor_critic")
    return td_errors(x.batch.rewards, V, x.bootstrap, x.batch.mask, x.gamma)


def gae_advantage(x: EstimatorInputs) -> torch.Tensor:
    """sum_l (gamma lambda)^l delta_{t+l}: lambda=1 is value_baseline, lambda=0 actor_critic."""
    V = x.critic_values("gae")
    return gae(x.batch.rewards, V, x.bootstrap, x.batch.mask, x.gamma, x.cfg.lam)


# -------------------------------------------------------------------------- weights

def normalize_per_batch(a: torch.Tensor, mask: torch.Tensor, n_batches: int) -> torch.Tensor:
    """(a - mean) / (std + 1e-8) over each batch's valid steps; padding stays 0."""
    m = mask.to(a.dtype).reshape(n_batches, -1)
    ag = a.reshape(n_batches, -1)
    count = m.sum(1, keepdim=True).clamp(min=1.0)
    mean = (ag * m).sum(1, keepdim=True) / count
    std = (((ag - mean) ** 2 * m).sum(1, keepdim=True) / count).sqrt()
    return ((ag - mean) / (std + 1e-8) * m).reshape_as(a)


# -------------------------------------------------------------------------- registry

AdvantageFn = Callable[[EstimatorInputs], torch.Tensor]
DirectionFn = Callable[[EstimatorInputs, nn.Module, int], torch.Tensor]


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: words for the comparison table and how to compute it.

    Either ``advantage`` (a score-function estimator with weights ``w = gamma^t a``;
    ``discounted`` says whether the gamma^t factor applies) or ``direction`` (an
    estimator that is not a weighted score sum: it returns ``[n_batches, P]`` itself).
    """

    name: str
    variant: str
    baseline: str
    needs_critic: bool
    claimed_unbiased: bool
    description: str
    advantage: AdvantageFn | None = field(default=None, repr=False)
    discounted: bool = True
    direction: DirectionFn | None = field(default=None, repr=False)

    def weights(self, x: EstimatorInputs) -> torch.Tensor:
        """``w_{i,t}`` ``[N, T]``: normalised (if asked) advantage times gamma^t (if due)."""
        if self.advantage is None:
            raise ValueError(f"estimator {self.name!r} is not a weighted score sum; "
                             "use estimate_gradients")
        a = self.advantage(x)
        mask = x.batch.mask
        if x.cfg.normalize_advantages:
            a = normalize_per_batch(a, mask, x.n_batches)
        if self.discounted and x.cfg.discount_weighting:
            a = a * discount_weights(a.shape[1], x.gamma, a.dtype, a.device)
        return a * mask.to(a.dtype)


def optimal_baseline_direction(x: EstimatorInputs, policy: nn.Module, chunk: int) -> torch.Tensor:
    """REINFORCE with the variance-optimal constant baseline per coordinate (Greensmith
    et al. 2004): ``g_k = (1/B) sum_i d_{i,k} (R_i - b_k)``, ``b*_k = E[d_k^2 R] / E[d_k^2]``,
    ``d_i = sum_t grad log pi(a_{i,t}|s_{i,t})``.

    b is estimated leave-one-out, ``b_{-i,k} = sum_{j != i} d_{j,k}^2 R_j / sum_{j != i}
    d_{j,k}^2`` (0 where the denominator is 0), so it is independent of episode i and the
    estimator stays unbiased. Per-episode scores come from ``score_gradients`` with
    groups of one episode. Normalisation and gamma^t do not apply (full-return form).
    """
    x.require_batch_size("optimal_baseline", 2)
    b = x.batch
    ones = b.mask.to(b.rewards.dtype)
    d = score_gradients(policy, b.obs[:, None], b.actions[:, None], ones[:, None], b.mask[:, None],
                        chunk=max(1, chunk) * x.batch_size)            # [N, P]
    d = x.grouped(d.to(torch.float64))                                # [G, B, P]
    R = x.grouped(x.episode_return.to(torch.float64))[..., None]      # [G, B, 1]
    d2 = d ** 2
    num = (d2 * R).sum(1, keepdim=True) - d2 * R
    den = d2.sum(1, keepdim=True) - d2
    safe = den > 0
    ratio = num / torch.where(safe, den, torch.ones_like(den))
    baseline = torch.where(safe, ratio, torch.zeros_like(den))
    g = (d * (R - baseline)).mean(1)
    return g.to(next(policy.parameters()).dtype)


def ppo_directions(policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor,
                   logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   clip: float, epochs: int, lr: float, chunk: int = 64) -> torch.Tensor:
    """PPO's update direction for G batches at once (inputs ``[G, B, T, ...]``, out ``[G, P]``).

    From the current parameters theta_0, ``epochs`` full-batch ascent steps
    ``theta_{k+1} = theta_k + lr * grad L(theta_k)`` on the clipped surrogate

        L(theta) = (1/B) sum_{i,t} min(rho A, clip(rho, 1-eps, 1+eps) A),
        rho = pi_theta(a|s) / pi_old(a|s),

    and returns ``(theta_K - theta_0) / (lr K)``, computed as the mean of the K step
    gradients (the same number, exact for K = 1). At theta_0, rho = 1 and the clip is
    inactive, so one epoch gives the score estimator with weights A. ``vmap`` over a
    functional inner loop, ``chunk`` batches at a time.
    """
    params0 = policy_params(policy)
    mask_f = mask.to(advantages.dtype)

    def surrogate(p, o, a, lo, adv, m, mf):
        logp = functional_log_prob(policy, p, o, a)
        ratio = torch.exp(torch.where(m, logp - lo, torch.zeros_like(logp)))
        clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
        return (torch.minimum(ratio * adv, clipped * adv) * mf).sum() / adv.shape[0]

    def one(o, a, lo, adv, m, mf):
        return mean_ascent_gradient(lambda p: grad(surrogate)(p, o, a, lo, adv, m, mf),
                                    params0, epochs, lr)

    batched = vmap(one)
    rows = []
    for s in range(0, advantages.shape[0], chunk):
        sl = slice(s, s + chunk)
        out = batched(obs[sl], actions[sl], logp_old[sl].detach(), advantages[sl].detach(),
                      mask[sl].bool(), mask_f[sl])
        rows.append(flatten(out, n_lead=1))
    return torch.cat(rows)


def ppo_direction(x: EstimatorInputs, policy: nn.Module, chunk: int) -> torch.Tensor:
    """PPO with advantages = the ``gae`` weights (gamma^t and normalisation as configured)."""
    A = ESTIMATORS["gae"].weights(x)
    g = x.batch
    cfg = x.cfg
    return ppo_directions(policy, x.grouped(g.obs), x.grouped(g.actions), x.grouped(g.logp),
                          x.grouped(A), x.grouped(g.mask), cfg.ppo_clip, int(cfg.ppo_epochs),
                          cfg.ppo_lr, chunk)


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in [
    Estimator("reinforce", "Vanilla REINFORCE", "none", False, True,
              "Williams (1992): full discounted return R on every step's score.",
              reinforce_advantage, discounted=False),
    Estimator("reinforce_rtg", "REINFORCE, reward-to-go", "none", False, True,
              "gamma^t G_t: past rewards dropped (unbiased, less variance).",
              reward_to_go_advantage),
    Estimator("mean_baseline", "REINFORCE with mean baseline", "batch mean of G_t per step",
              False, False,
              "gamma^t (G_t - mean_j G_{j,t}); own episode in the mean: E[g] = (1-1/B) grad J.",
              mean_baseline_advantage),
    Estimator("mean_baseline_episode", "REINFORCE with mean baseline", "episode mean return",
              False, False,
              "(R - mean_j R_j) on every step; own episode in the mean: E[g] = (1-1/B) grad J.",
              mean_baseline_episode_advantage, discounted=False),
    Estimator("rloo", "REINFORCE, leave-one-out baseline", "mean G_t of the other episodes",
              False, True, "gamma^t (G_t - mean_{j!=i} G_{j,t}); unbiased, B >= 2.",
              rloo_advantage),
    Estimator("value_baseline", "REINFORCE with value baseline", "V(s_t)", True, True,
              "gamma^t (G_t - V(s_t, t)); unbiased for a critic independent of the batch.",
              value_baseline_advantage),
    Estimator("actor_critic", "Actor-critic (one-step)", "V(s_t)", True, False,
              "gamma^t (r_t + gamma V(s_{t+1}) - V(s_t)); bootstrap bias unless V is exact.",
              actor_critic_advantage),
    Estimator("gae", "GAE (Schulman et al. 2016)", "V^lambda-weighted", True, False,
              "gamma^t sum_l (gamma lambda)^l delta_{t+l}; bias tunable by lambda (0 at 1).",
              gae_advantage),
    Estimator("optimal_baseline", "REINFORCE, optimal constant baseline",
              "b*_k = E[d_k^2 R]/E[d_k^2] (leave-one-out)", False, True,
              "Greensmith et al. (2004) variance-optimal constant baseline per coordinate.",
              direction=optimal_baseline_direction, discounted=False),
    Estimator("ppo", "PPO clipped surrogate", "V^lambda-weighted (GAE)", True, False,
              "update direction (theta_K - theta_0)/(lr K) of K ascent epochs on the clipped "
              "surrogate with GAE advantages.",
              direction=ppo_direction),
]}


def get_estimator(name: str) -> Estimator:
    """The registered estimator ``name``, or a ValueError listing the valid names."""
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown estimator {name!r}; valid names: {sorted(ESTIMATORS)}") from None


def _check_critic(est: Estimator, critic: nn.Module | None) -> None:
    if est.needs_critic and critic is None:
        raise ValueError(f"estimator {est.name!r} needs a critic: pass critic= "
                         "(e.g. pgvar.critics.make_critic(env), fitted on earlier data)")


def estimator_weights(name: str, env, batch: Batch, n_batches: int, critic: nn.Module | None = None,
                      cfg: EstimatorConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """The ``[N, T]`` score weights ``w_{i,t}`` of a weighted-score estimator."""
    est = get_estimator(name)
    _check_critic(est, critic)
    return est.weights(prepare_inputs(env, batch, n_batches, critic, cfg))


def estimate_gradients(name: str, env, policy: nn.Module, batch: Batch, n_batches: int,
                       critic: nn.Module | None = None, cfg: EstimatorConfig = DEFAULT_CONFIG,
                       chunk: int = 64) -> torch.Tensor:
    """``[n_batches, P]``: row m is estimator ``name`` on episodes ``[m B, (m+1) B)``.

    Each row estimates the ascent direction grad J, in ``policy.parameters()`` order.
    gamma and the objective come from ``env``.
    """
    est, x = checked_inputs(name, env, batch, n_batches, critic, cfg)
    if est.direction is not None:
        return est.direction(x, policy, chunk)
    return score_gradients(policy, *score_inputs(est, x), chunk)


def checked_inputs(name: str, env, batch: Batch, n_batches: int, critic: nn.Module | None,
                   cfg: EstimatorConfig) -> tuple[Estimator, EstimatorInputs]:
    """The estimator ``name`` and its inputs, after checking the config and the critic."""
    est = get_estimator(name)
    cfg.validate()
    _check_critic(est, critic)
    return est, prepare_inputs(env, batch, n_batches, critic, cfg)


def score_inputs(est: Estimator, x: EstimatorInputs
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(obs, actions, weights, mask)`` grouped ``[n_batches, B, T, ...]`` for
    ``pgvar.gradients``: the score sum of a weighted-score estimator."""
    g = x.batch.groups(x.n_batches)
    return g.obs, g.actions, x.grouped(est.weights(x)), g.mask


def estimate_gradient_blocks(name: str, env, policy: nn.Module, batch: Batch, n_batches: int,
                             critic: nn.Module | None = None,
                             cfg: EstimatorConfig = DEFAULT_CONFIG, chunk: int = 64
                             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The rows of ``estimate_gradients`` as blocks ``(indices [k], rows [k, P])``: row i
    of a block is estimate number ``indices[i]``. Blocks come in no particular order (they
    follow the packing of pairs, so neighbouring rows share episode lengths): a consumer
    that wants a random sample of the rows selects them by index.

    For consumers that reduce the rows (a running mean and variance) without holding
    all ``[n_batches, P]`` of them; estimators with a direction of their own (PPO, the
    optimal baseline) give one block.
    """
    est, x = checked_inputs(name, env, batch, n_batches, critic, cfg)
    if est.direction is not None:
        rows = est.direction(x, policy, chunk)
        yield torch.arange(rows.shape[0], device=rows.device), rows
        return
    yield from score_gradient_blocks(policy, *score_inputs(est, x), chunk)
