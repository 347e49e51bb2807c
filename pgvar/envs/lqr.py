"""Linear-quadratic control with an exact, differentiable objective.

Dynamics and reward (any state dimension n and action dimension m):

    x_{t+1} = A x_t + B u_t + w_t,   w_t ~ N(0, W),   x_0 ~ N(m_0, S_0)
    r_t     = -(x_t^T Q x_t + u_t^T R u_t)

Under a linear-Gaussian policy u = K x + k + diag(sigma) eps (``LinearGaussianPolicy``,
sigma = exp(log_std)) the state stays Gaussian, so J is a function of its moments. With
F = A + B K the closed loop and D = diag(sigma^2):

    m_{t+1} = F m_t + B k
    S_{t+1} = F S_t F^T + B D B^T + W
    E[r_t]  = -( tr(Q S_t) + m_t^T Q m_t + tr(R (K S_t K^T + D)) + mu_t^T R mu_t ),
              mu_t = K m_t + k

objective="finite" sums gamma^t E[r_t] over t < T. objective="discounted" sums to
infinity exactly: with the augmented state z = [x; 1], its second moment
Z_t = E[z z^T] obeys Z_{t+1} = F~ Z_t F~^T + N (F~ = [[F, Bk], [0, 1]],
N = blockdiag(B D B^T + W, 0)), so X = sum_t gamma^t Z_t solves the Stein equation

    X = Z_0 + gamma/(1-gamma) N + gamma F~ X F~^T,

a linear solve in vec(X) with the Kronecker matrix I - gamma F~ (x) F~ (size (n+1)^2,
hence the limit on n). Then J = -tr(M X) - tr(R D)/(1-gamma), M = blockdiag(Q, 0) +
[K, k]^T R [K, k]. The sum converges only if gamma * rho(F)^2 < 1; otherwise a
ValueError says so.

The random instance (from ``seed``): A = spectral_radius * G / rho(G) with G having
i.i.d. N(0, 1) entries (so the open loop has exactly that spectral radius);
B has i.i.d. N(0, 1/n) entries; m_0 ~ N(0, I); Q = I, R = control_cost * I,
W = process_noise^2 I, S_0 = init_std^2 I. With ``nested_actions=True`` m_0 is drawn
before B and B column by column, so that A, m_0 and B's first columns are the same for
every action dimension of one seed (the system with d actuators extends the one with
fewer; used to vary d alone). The default keeps the original draw order.
"""

from __future__ import annotations

import torch
from torch import nn

from pgvar.checks import require_in_range, require_int
from pgvar.envs.base import ActionSpec, StepResult, check_objective_constants
from pgvar.envs.tabular import EXACT_DTYPE
from pgvar.policies import LinearGaussianPolicy

MAX_DISCOUNTED_STATE_DIM = 40  # the Kronecker solve is ((n+1)^2)^3 work


def spectral_radius(M: torch.Tensor) -> float:
    """max |eigenvalue| of a square matrix (no gradient)."""
    return float(torch.linalg.eigvals(M.detach()).abs().max())


def stein_solve(F: torch.Tensor, C: torch.Tensor, gamma: float) -> torch.Tensor:
    """X = sum_t gamma^t F^t C (F^T)^t, i.e. X = C + gamma F X F^T, by a vec solve.

    Row-major vec satisfies vec(F X F^T) = (F (x) F) vec(X).
    """
    d = F.shape[0]
    eye = torch.eye(d * d, dtype=F.dtype, device=F.device)
    x = torch.linalg.solve(eye - gamma * torch.kron(F, F), C.reshape(-1))
    return x.reshape(d, d)


class LinearQuadratic:
    """Batched linear-quadratic control; see the module docstring for the maths.

    Observations are the float state ``[state_dim]``; actions are real ``[action_dim]``.
    There are no terminal states and no time limit of its own (``pgvar.rollout`` applies
    the horizon).
    """

    def __init__(self, state_dim: int = 2, action_dim: int = 1, horizon: int = 20,
                 gamma: float = 0.99, objective: str = "finite", spectral_radius: float = 0.9,
                 control_cost: float = 0.1, process_noise: float = 0.1, init_std: float = 0.5,
                 seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, nested_actions: bool = False):
        require_int("state_dim", state_dim, 1)
        require_int("action_dim", action_dim, 1)
        check_objective_constants(horizon, gamma, objective)
        require_in_range("spectral_radius", spectral_radius, 0.0, float("inf"), high_open=True)
        require_in_range("control_cost", control_cost, 0.0, float("inf"), high_open=True)
        require_in_range("process_noise", process_noise, 0.0, float("inf"), high_open=True)
        require_in_range("init_std", init_std, 0.0, float("inf"), high_open=True)
        if objective == "discounted" and state_dim > MAX_DISCOUNTED_STATE_DIM:
            raise ValueError(f"objective='discounted' solves a Kronecker system of size "
                             f"(state_dim+1)^2; use state_dim <= {MAX_DISCOUNTED_STATE_DIM} "
                             f"(got {state_dim}) or objective='finite'")
        self.name = "lqr"
        self.device = torch.device(device)
        self.dtype = dtype
        self.horizon, self.gamma, self.objective = int(horizon), float(gamma), objective
        self.state_dim, self.action_dim, self.seed = state_dim, action_dim, seed
        self.obs_shape = (state_dim,)
        self.obs_dtype = dtype
        self.action_spec = ActionSpec("continuous", dim=action_dim)
        self.nested_actions = bool(nested_actions)
        A, B, m0 = self.draw_instance(state_dim, action_dim, float(spectral_radius), seed,
                                      self.nested_actions)
        to = {"device": self.device, "dtype": EXACT_DTYPE}
        self.A, self.B, self.m0 = A.to(**to), B.to(**to), m0.to(**to)
        self.Q = torch.eye(state_dim, **to)
        self.R = float(control_cost) * torch.eye(action_dim, **to)
        self.W = float(process_noise) ** 2 * torch.eye(state_dim, **to)
        self.S0 = float(init_std) ** 2 * torch.eye(state_dim, **to)
        self.process_noise, self.init_std = float(process_noise), float(init_std)
        self._state: torch.Tensor | None = None
        self._generator: torch.Generator | None = None

    @staticmethod
    def draw_instance(state_dim: int, action_dim: int, radius: float, seed: int,
                      nested_actions: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, m_0) in float64 from a CPU generator seeded by ``seed``; nested: m_0
        before B, B drawn column after column (its first columns do not depend on d)."""
        g = torch.Generator().manual_seed(int(seed))
        G = torch.randn(state_dim, state_dim, generator=g, dtype=EXACT_DTYPE)
        rho = spectral_radius(G)
        A = radius * G / rho if rho > 0 else torch.zeros_like(G)
        if nested_actions:
            m0 = torch.randn(state_dim, generator=g, dtype=EXACT_DTYPE)
            # one call per column: torch draws a tensor of 16+ entries differently
            columns = [torch.randn(state_dim, generator=g, dtype=EXACT_DTYPE)
                       for _ in range(action_dim)]
            return A, torch.stack(columns, dim=1) / state_dim**0.5, m0
        B = torch.randn(state_dim, action_dim, generator=g, dtype=EXACT_DTYPE) / state_dim**0.5
        m0 = torch.randn(state_dim, generator=g, dtype=EXACT_DTYPE)
        return A, B, m0

    # ------------------------------------------------------------------ exact quantities

    def policy_gains(self, policy: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K [m, n], k [m], log_std [m]) of a linear-Gaussian policy, checked for shape."""
        try:
            K, k, log_std = policy.K, policy.k, policy.log_std
        except AttributeError:
            raise TypeError(f"{type(policy).__name__} is not linear-Gaussian (needs K, k, "
                            "log_std); use LinearGaussianPolicy") from None
        m, n = self.action_dim, self.state_dim
        if K.shape != (m, n) or k.shape != (m,) or log_std.shape != (m,):
            raise ValueError(f"policy gains have shapes K{tuple(K.shape)}, k{tuple(k.shape)}, "
                             f"log_std{tuple(log_std.shape)}; this problem needs "
                             f"K({m}, {n}), k({m},), log_std({m},)")
        return K, k, log_std

    def objective_from_gains(self, K: torch.Tensor, k: torch.Tensor,
                             log_std: torch.Tensor) -> torch.Tensor:
        """J for gains (K, k, log_std), finite or discounted per ``self.objective``."""
        K64, k64 = K.to(EXACT_DTYPE), k.to(EXACT_DTYPE)
        var = torch.exp(2 * log_std.to(EXACT_DTYPE))
        if self.objective == "finite":
            J = self._finite_objective(K64, k64, var)
        else:
            J = self._discounted_objective(K64, k64, var)
        return J.to(K.dtype)

    def expected_reward(self, m: torch.Tensor, S: torch.Tensor, K: torch.Tensor,
                        k: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """E[r] for x ~ N(m, S), u = K x + k + sigma eps: E[x^T Q x] = tr(Q S) + m^T Q m etc."""
        mu_u = K @ m + k
        cov_u = K @ S @ K.T + torch.diag(var)
        state_cost = torch.trace(self.Q @ S) + m @ self.Q @ m
        action_cost = torch.trace(self.R @ cov_u) + mu_u @ self.R @ mu_u
        return -(state_cost + action_cost)

    def _finite_objective(self, K: torch.Tensor, k: torch.Tensor,
                          var: torch.Tensor) -> torch.Tensor:
        """sum_{t<T} gamma^t E[r_t] by propagating the mean m_t and covariance S_t."""
        F = self.A + self.B @ K
        drift, noise = self.B @ k, self.B @ torch.diag(var) @ self.B.T + self.W
        m, S, J = self.m0, self.S0, self.m0.new_zeros(())
        for t in range(self.horizon):
            J = J + self.gamma**t * self.expected_reward(m, S, K, k, var)
            m = F @ m + drift
            S = F @ S @ F.T + noise
        return J

    def _discounted_objective(self, K: torch.Tensor, k: torch.Tensor,
                              var: torch.Tensor) -> torch.Tensor:
        """sum_{t>=0} gamma^t E[r_t] by the augmented-state Stein equation (module docstring)."""
        n, g = self.state_dim, self.gamma
        F = self.A + self.B @ K
        rho = spectral_radius(F)
        if g * rho**2 >= 1.0:
            raise ValueError(f"the discounted sum diverges: gamma * rho(A + B K)^2 = "
                             f"{g * rho**2:.4g} >= 1 (rho = {rho:.4g}); use a stabilising "
                             "gain K, a smaller gamma, or objective='finite'")
        F_aug = torch.zeros(n + 1, n + 1, dtype=F.dtype, device=F.device)
        F_aug[:n, :n], F_aug[:n, n], F_aug[n, n] = F, self.B @ k, 1.0
        N = torch.zeros_like(F_aug)
        N[:n, :n] = self.B @ torch.diag(var) @ self.B.T + self.W
        Z0 = torch.zeros_like(F_aug)
        Z0[:n, :n] = self.S0 + torch.outer(self.m0, self.m0)
        Z0[:n, n], Z0[n, :n], Z0[n, n] = self.m0, self.m0, 1.0
        X = stein_solve(F_aug, Z0 + g / (1.0 - g) * N, g)
        K_aug = torch.cat([K, k.unsqueeze(1)], dim=1)
        M = K_aug.T @ self.R @ K_aug
        M = M + torch.block_diag(self.Q, torch.zeros(1, 1, dtype=M.dtype, device=M.device))
        return -(torch.trace(M @ X) + torch.trace(self.R @ torch.diag(var)) / (1.0 - g))

    def exact_objective(self, policy: nn.Module) -> torch.Tensor:
        """J(theta) exactly, a scalar with autograd history (see the module docstring)."""
        return self.objective_from_gains(*self.policy_gains(policy))

    def default_policy(self, **kwargs) -> LinearGaussianPolicy:
        """The natural policy class here: u ~ N(K x + k, diag(exp(log_std))^2)."""
        return LinearGaussianPolicy(self.state_dim, self.action_dim, **kwargs).to(self.device)

    # ------------------------------------------------------------------------ sampling

    def reset(self, n: int, seed: int) -> torch.Tensor:
        """Start ``n`` episodes at x_0 ~ N(m_0, S_0); the generator seeded here drives noise."""
        require_int("n", n, 1)
        self._generator = torch.Generator(device=self.device).manual_seed(int(seed))
        z = self._noise(n)
        self._state = self.m0 + self.init_std * z
        return self._state.to(self.dtype)

    def _noise(self, n: int) -> torch.Tensor:
        """``[n, state_dim]`` standard normal draws from the episode generator (float64)."""
        return torch.randn(n, self.state_dim, generator=self._generator, device=self.device,
                           dtype=EXACT_DTYPE)

    def step(self, actions: torch.Tensor) -> StepResult:
        """r = -(x^T Q x + u^T R u) at the current x; then x' = A x + B u + w."""
        if self._state is None:
            raise RuntimeError("call reset(n, seed) before step()")
        x = self._state
        u = actions.to(device=self.device, dtype=EXACT_DTYPE).reshape(x.shape[0], self.action_dim)
        reward = -(((x @ self.Q) * x).sum(-1) + ((u @ self.R) * u).sum(-1))
        self._state = x @ self.A.T + u @ self.B.T + self.process_noise * self._noise(x.shape[0])
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=self.device)
        return StepResult(obs=self._state.to(self.dtype), reward=reward.to(self.dtype),
                          terminated=done, truncated=done.clone())
