"""The exact mean E[ĝ] of an estimator on a tabular environment, by dynamic programming.

For the estimators whose per-step weight has a known conditional mean given (s_t, a_t)
when the critic is the exact V of the policy (reward-to-go, leave-one-out, value
baseline, one-step actor-critic, GAE), the expected estimate is

    E[ĝ] = grad over θ of  Σ_{t<T} c_t E_{s~d_t, a~π}[log π(a|s) W_t(s, a)]

with the state distributions d_t and the weights W_t = E[weight_t | s_t, a_t] held fixed
and c_t = γ^t (1 when the estimator drops γ^t). Comparing it with the exact gradient
(``exact_gradient``) gives an estimator's bias exactly, with no sampling: the bias of
dropping γ^t or of taking a time-limit cut as the end of the episode.
"""

from __future__ import annotations

import torch

EXACT_MEAN_ESTIMATORS = ("reinforce_rtg", "rloo", "value_baseline", "actor_critic", "gae")
ENVS_WITH_EXACT_MEAN = ("tabular", "chain")


def step_weights(env, pi: torch.Tensor, estimator: str, lam: float, discounted: bool,
                 bootstrap_cut: bool) -> list[torch.Tensor]:
    """W_t(s, a) = E[weight_t | s_t = s, a_t = a] for t < T (before gamma^t), exact critic.

    Under "finite" (or a tail that is not bootstrapped) an estimator of the reward-to-go
    family has mean Q^(T-t), the value with T-t steps left. Under "discounted" with the
    bootstrap, Q (infinite horizon). With the truncation habit, a critic estimator whose
    advantage is GAE(lam) (value_baseline: lam = 1, actor_critic: 0) loses the cut's tail:
    Q - (gamma lam)^(T-1-t) gamma E[V(s_T) | s_t, a_t].
    """
    T, gamma = env.horizon, env.gamma
    P, r = env.P, env.expected_reward
    P_pi = torch.einsum("sa,sat->st", pi, P)
    finite_q, v = [], torch.zeros(env.n_states, dtype=P.dtype)
    for _ in range(T):  # finite_q[k-1] = Q^(k)
        q = r + gamma * P @ v
        finite_q.append(q)
        v = (pi * q).sum(-1)
    if not discounted:
        return [finite_q[T - 1 - t] for t in range(T)]
    V = torch.linalg.solve(torch.eye(env.n_states, dtype=P.dtype) - gamma * P_pi, (pi * r).sum(-1))
    Q = r + gamma * P @ V
    if bootstrap_cut:
        return [Q] * T
    if estimator in ("reinforce_rtg", "rloo"):
        return [finite_q[T - 1 - t] for t in range(T)]
    lam_eff = {"value_baseline": 1.0, "actor_critic": 0.0}.get(estimator, lam)
    weights, future_v = [], V.clone()  # future_v = P_pi^(T-1-t) V, built from t = T-1 down
    for t in reversed(range(T)):
        weights.append(Q - (gamma * lam_eff) ** (T - 1 - t) * gamma * (P @ future_v))
        future_v = P_pi @ future_v
    return weights[::-1]


def expected_gradient(env, policy, estimator: str, lam: float, discount_weighting: bool,
                      truncation_as_termination: bool) -> torch.Tensor:
    """E[ĝ] of ``estimator`` at a tabular softmax policy, exactly, in float64 (module doc)."""
    if estimator not in EXACT_MEAN_ESTIMATORS:
        raise ValueError(f"no exact mean for estimator {estimator!r}; "
                         f"known: {', '.join(EXACT_MEAN_ESTIMATORS)}")
    theta = _logits64(policy)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    discounted = env.objective == "discounted"
    W = step_weights(env, pi, estimator, lam, discounted,
                     bootstrap_cut=discounted and not truncation_as_termination)
    P_pi = torch.einsum("sa,sat->st", pi, env.P)
    d, total = env.mu.clone(), torch.zeros((), dtype=torch.float64)
    for t in range(env.horizon):
        c = env.gamma ** t if discount_weighting else 1.0
        total = total + c * (d[:, None] * pi * logp * W[t]).sum()
        d = d @ P_pi
    return torch.autograd.grad(total, theta)[0].reshape(-1)


def exact_gradient(env, policy) -> torch.Tensor:
    """grad J at the tabular softmax policy's logits, in float64."""
    theta = _logits64(policy)
    J = env.objective_from_probs(torch.softmax(theta, -1))
    return torch.autograd.grad(J, theta)[0].reshape(-1)


def _logits64(policy) -> torch.Tensor:
    """The tabular softmax policy's logits as a float64 leaf tensor (gradients in float64)."""
    return next(policy.parameters()).detach().to(torch.float64).requires_grad_(True)
