"""Tabular environments with an exact, differentiable objective: a random MDP and a
sparse-reward chain.

Both are instances of ``TabularMDP``: a transition tensor ``P[s, a, s']``, a transition
reward ``reward[s, a, s']``, a start distribution ``mu[s]`` and a mask of terminal states.
A terminal state is absorbing with zero reward, so the exact dynamic programming below
needs no special case for it: once there, nothing more is earned. For a policy table
``pi[s, a]`` write

    P_pi[s, s'] = sum_a pi(a|s) P(s'|s, a)            (state-to-state transitions)
    r_pi[s]     = sum_a pi(a|s) r(s, a),   r(s, a) = sum_s' P(s'|s, a) reward(s, a, s')

Then, exactly and differentiably in pi (and so in the policy parameters):

    finite:      d_0 = mu,  d_{t+1} = d_t P_pi,     J = sum_{t<T} gamma^t d_t . r_pi
                 V_T = 0,   V_t = r_pi + gamma P_pi V_{t+1}
    discounted:  V = (I - gamma P_pi)^{-1} r_pi,     J = mu . V

Constants are stored in float64 and the DP runs in float64 whatever the policy's dtype,
so reference gradients are accurate to ~1e-12; the result is cast back to the policy's
dtype with its autograd history intact.
"""

from __future__ import annotations

import torch
from torch import nn

from pgvar.checks import require_in_range, require_int
from pgvar.envs.base import ActionSpec, StepResult, check_objective_constants
from pgvar.policies import TabularSoftmaxPolicy

EXACT_DTYPE = torch.float64


# --------------------------------------------------------------------- exact DP helpers

def policy_transition(P: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """P_pi[s, s'] = sum_a pi(a|s) P(s'|s, a)."""
    return torch.einsum("sa,sat->st", pi, P)


def policy_reward(r: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """r_pi[s] = sum_a pi(a|s) r(s, a)."""
    return (pi * r).sum(-1)


def finite_horizon_objective(P_pi: torch.Tensor, r_pi: torch.Tensor, mu: torch.Tensor,
                             horizon: int, gamma: float) -> torch.Tensor:
    """J = sum_{t<T} gamma^t d_t . r_pi by forward DP over state distributions d_t."""
    d, J = mu, r_pi.new_zeros(())
    for t in range(horizon):
        J = J + gamma**t * (d @ r_pi)
        d = d @ P_pi
    return J


def finite_horizon_values(P_pi: torch.Tensor, r_pi: torch.Tensor, horizon: int,
                          gamma: float) -> torch.Tensor:
    """``[T+1, S]``: V_T = 0 and V_t = r_pi + gamma P_pi V_{t+1} (backward DP)."""
    values = [torch.zeros_like(r_pi)]
    for _ in range(horizon):
        values.append(r_pi + gamma * P_pi @ values[-1])
    return torch.stack(values[::-1])


def discounted_values(P_pi: torch.Tensor, r_pi: torch.Tensor, gamma: float) -> torch.Tensor:
    """``[S]``: V = (I - gamma P_pi)^{-1} r_pi, the infinite-horizon discounted value."""
    eye = torch.eye(P_pi.shape[0], dtype=P_pi.dtype, device=P_pi.device)
    return torch.linalg.solve(eye - gamma * P_pi, r_pi)


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of ``probs [n, K]`` by inverse-CDF sampling with ``generator``.

    The CDF is divided by its last entry, so its end is exactly 1 and a zero-probability
    index can never be returned (searchsorted finds the first CDF value > u).
    """
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    u = torch.rand(probs.shape[:-1], generator=generator, device=probs.device, dtype=probs.dtype)
    return torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)


# -------------------------------------------------------------------------- base class

class TabularMDP:
    """A finite MDP stepped N episodes at a time, with exact objective and values.

    Observations are state indices (``obs_shape=()``, long). ``terminated`` is True on
    the step that enters a terminal state from a non-terminal one. There is no time limit
    of the environment's own (``truncated`` is always False); the objective's horizon is
    applied by ``pgvar.rollout``.
    """

    obs_shape: tuple[int, ...] = ()
    obs_dtype: torch.dtype = torch.long

    def __init__(self, P: torch.Tensor, reward: torch.Tensor, mu: torch.Tensor,
                 terminal: torch.Tensor | None = None, *, horizon: int, gamma: float,
                 objective: str = "finite", name: str = "tabular",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        check_objective_constants(horizon, gamma, objective)
        self.device = torch.device(device)
        self.dtype = dtype
        self.name = name
        self.horizon = int(horizon)
        self.gamma = float(gamma)
        self.objective = objective
        self.P = P.to(device=self.device, dtype=EXACT_DTYPE)
        self.reward = reward.to(device=self.device, dtype=EXACT_DTYPE)
        self.mu = mu.to(device=self.device, dtype=EXACT_DTYPE)
        S = self.P.shape[0]
        if terminal is None:
            terminal = torch.zeros(S, dtype=torch.bool)
        self.terminal = terminal.to(device=self.device, dtype=torch.bool)
        self._check_tables()
        self.n_states, self.n_actions = self.P.shape[0], self.P.shape[1]
        self.action_spec = ActionSpec("discrete", n=self.n_actions)
        self._state: torch.Tensor | None = None
        self._generator: torch.Generator | None = None

    def _check_tables(self) -> None:
        """Shapes agree, rows are distributions, terminal states absorb with zero reward."""
        P, R, mu, term = self.P, self.reward, self.mu, self.terminal
        if P.dim() != 3 or P.shape[0] != P.shape[2]:
            raise ValueError(f"P must have shape [S, A, S], got {tuple(P.shape)}")
        if R.shape != P.shape:
            raise ValueError(f"reward must have P's shape {tuple(P.shape)}, got {tuple(R.shape)}")
        if mu.shape != P.shape[:1] or term.shape != P.shape[:1]:
            raise ValueError(f"mu and terminal must have shape [S]=[{P.shape[0]}]")
        for label, dist in (("P[s, a, :]", P), ("mu", mu)):
            sums = dist.sum(-1)
            if bool((dist < 0).any()) or not torch.allclose(sums, torch.ones_like(sums)):
                raise ValueError(f"{label} must be non-negative and sum to 1")
        idx = torch.nonzero(term).flatten()
        stay = P[idx, :, idx]
        if len(idx) and (not torch.allclose(stay, torch.ones_like(stay)) or bool(R[idx].any())):
            raise ValueError("terminal states must be absorbing (P[s, a, s] = 1) with zero reward")

    # ------------------------------------------------------------------ exact quantities

    @property
    def expected_reward(self) -> torch.Tensor:
        """r(s, a) = sum_s' P(s'|s, a) reward(s, a, s'), ``[S, A]`` float64."""
        return (self.P * self.reward).sum(-1)

    def policy_table(self, policy: nn.Module) -> torch.Tensor:
        """pi[s, a] from ``policy.probs_table()``, checked for shape."""
        if not callable(getattr(policy, "probs_table", None)):
            raise TypeError(f"{type(policy).__name__} has no probs_table(); "
                            "use TabularSoftmaxPolicy")
        pi = policy.probs_table()
        if pi.shape != (self.n_states, self.n_actions):
            raise ValueError(f"policy table has shape {tuple(pi.shape)}, "
                             f"this MDP needs [S, A]=[{self.n_states}, {self.n_actions}]")
        return pi

    def objective_from_probs(self, pi: torch.Tensor) -> torch.Tensor:
        """J for a policy table ``pi [S, A]`` (finite or discounted per ``self.objective``)."""
        pi64 = pi.to(EXACT_DTYPE)
        P_pi, r_pi = policy_transition(self.P, pi64), policy_reward(self.expected_reward, pi64)
        if self.objective == "finite":
            J = finite_horizon_objective(P_pi, r_pi, self.mu, self.horizon, self.gamma)
        else:
            J = self.mu @ discounted_values(P_pi, r_pi, self.gamma)
        return J.to(pi.dtype)

    def values_from_probs(self, pi: torch.Tensor) -> torch.Tensor:
        """``[T+1, S]`` values V_t(s) for a policy table; stationary V repeated if discounted."""
        return self._values64(pi.to(EXACT_DTYPE)).to(pi.dtype)

    def _values64(self, pi64: torch.Tensor) -> torch.Tensor:
        """``values_from_probs`` in float64, for callers that keep computing with it."""
        P_pi, r_pi = policy_transition(self.P, pi64), policy_reward(self.expected_reward, pi64)
        if self.objective == "finite":
            return finite_horizon_values(P_pi, r_pi, self.horizon, self.gamma)
        return discounted_values(P_pi, r_pi, self.gamma).repeat(self.horizon + 1, 1)

    def exact_objective(self, policy: nn.Module) -> torch.Tensor:
        """J(theta) exactly, a scalar with autograd history (see the module docstring)."""
        return self.objective_from_probs(self.policy_table(policy))

    def exact_values(self, policy: nn.Module) -> torch.Tensor:
        """V_t^pi(s) as ``[T+1, S]`` (V_T = 0 under "finite"): an exact critic or baseline.

        Under "discounted" the value does not depend on t, and row T is the bootstrap
        value a horizon cut must use.
        """
        return self.values_from_probs(self.policy_table(policy))

    def exact_q_values(self, policy: nn.Module) -> torch.Tensor:
        """Q_t(s, a) = r(s, a) + gamma sum_s' P(s'|s, a) V_{t+1}(s'), ``[T, S, A]``."""
        pi = self.policy_table(policy)
        V = self._values64(pi.to(EXACT_DTYPE))
        Q = self.expected_reward + self.gamma * torch.einsum("sat,kt->ksa", self.P, V[1:])
        return Q.to(pi.dtype)

    def default_policy(self, **kwargs) -> TabularSoftmaxPolicy:
        """The natural policy class here: a tabular softmax over [S, A]."""
        return TabularSoftmaxPolicy(self.n_states, self.n_actions, **kwargs).to(self.device)

    # ------------------------------------------------------------------------ sampling

    def reset(self, n: int, seed: int) -> torch.Tensor:
        """Start ``n`` episodes from mu; the generator seeded here drives all transitions."""
        require_int("n", n, 1)
        self._generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self._state = inverse_cdf_sample(self.mu.expand(n, -1), self._generator)
        return self._state.clone()

    def step(self, actions: torch.Tensor) -> StepResult:
        """Sample s' ~ P(.|s, a); reward(s, a, s'); terminated on entering a terminal state."""
        if self._state is None or self._generator is None:
            raise RuntimeError("call reset(n, seed) before step()")
        s = self._state
        a = actions.to(self.device).long().reshape(s.shape)
        if bool(((a < 0) | (a >= self.n_actions)).any()):
            raise ValueError(f"actions must lie in [0, {self.n_actions}), got {actions}")
        s_next = inverse_cdf_sample(self.P[s, a], self._generator)
        reward = self.reward[s, a, s_next].to(self.dtype)
        terminated = self.terminal[s_next] & ~self.terminal[s]
        self._state = s_next
        return StepResult(obs=s_next.clone(), reward=reward, terminated=terminated,
                          truncated=torch.zeros_like(terminated))


# ----------------------------------------------------------------------- random MDP

class RandomTabularMDP(TabularMDP):
    """A random finite MDP with no terminal states, drawn from ``seed``.

    Rows P(.|s, a) and mu are flat-Dirichlet (uniform on the simplex: normalised Exp(1)
    draws); rewards r(s, a) ~ N(0, 1), received whatever the next state.
    """

    def __init__(self, n_states: int = 5, n_actions: int = 3, horizon: int = 10,
                 gamma: float = 0.99, objective: str = "finite", seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        require_int("n_states", n_states, 1)
        require_int("n_actions", n_actions, 1)
        check_objective_constants(horizon, gamma, objective)
        P, r, mu = self.draw_instance(n_states, n_actions, seed)
        reward = r.unsqueeze(-1).expand(-1, -1, n_states).clone()
        super().__init__(P, reward, mu, horizon=horizon, gamma=gamma, objective=objective,
                         name="tabular", device=device, dtype=dtype)
        self.seed = seed

    @staticmethod
    def draw_instance(n_states: int, n_actions: int, seed: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P [S, A, S], r [S, A], mu [S]) in float64 from a CPU generator seeded by ``seed``."""
        g = torch.Generator().manual_seed(int(seed))

        def flat_dirichlet(*shape: int) -> torch.Tensor:
            x = torch.empty(*shape, dtype=EXACT_DTYPE).exponential_(generator=g)
            return x / x.sum(-1, keepdim=True)

        P = flat_dirichlet(n_states, n_actions, n_states)
        r = torch.randn(n_states, n_actions, generator=g, dtype=EXACT_DTYPE)
        mu = flat_dirichlet(n_states)
        return P, r, mu


# --------------------------------------------------------------------- sparse chain

class SparseChain(TabularMDP):
    """States 0..L-1 in a line; start at 0; reward 1 only on entering the goal L-1.

    Actions: 0 = left, 1 = right (moves clamp at state 0). With probability ``slip`` the
    opposite move happens. The goal is terminal (absorbing, zero reward after entry), so
    the return of an episode that reaches it at step t is gamma^t, and 0 otherwise. A
    uniform policy reaches the goal rarely when L is large against T: the sparse-reward
    failure mode where the gradient signal is (near) zero.
    """

    def __init__(self, length: int = 8, horizon: int = 16, gamma: float = 0.99,
                 objective: str = "finite", slip: float = 0.0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        require_int("length", length, 2)
        require_in_range("slip", slip, 0.0, 1.0, high_open=True)
        check_objective_constants(horizon, gamma, objective)
        P, reward, mu, terminal = self.build_chain(length, float(slip))
        super().__init__(P, reward, mu, terminal, horizon=horizon, gamma=gamma,
                         objective=objective, name="chain", device=device, dtype=dtype)
        self.length = length
        self.slip = float(slip)

    @staticmethod
    def build_chain(length: int, slip: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, reward, mu, terminal) of the chain, with the goal absorbing."""
        L, goal = length, length - 1
        P = torch.zeros(L, 2, L, dtype=EXACT_DTYPE)
        for s in range(goal):
            left, right = max(s - 1, 0), s + 1
            P[s, 0, left] += 1.0 - slip
            P[s, 0, right] += slip
            P[s, 1, right] += 1.0 - slip
            P[s, 1, left] += slip
        P[goal, :, goal] = 1.0
        reward = torch.zeros(L, 2, L, dtype=EXACT_DTYPE)
        reward[:goal, :, goal] = 1.0
        mu = torch.zeros(L, dtype=EXACT_DTYPE)
        mu[0] = 1.0
        terminal = torch.zeros(L, dtype=torch.bool)
        terminal[goal] = True
        return P, reward, mu, terminal
