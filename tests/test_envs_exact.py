"""Exact-gradient environments: exact J and its gradient, sampling, terminations, registry.

Tolerances, and why they are neither flaky nor vacuous:
- finite differences run in float64 with step h = 1e-5; the central difference errs by
  about h^2 |J'''| / 6 + eps |J| / h, i.e. ~1e-9 here, so a tolerance of 1e-6 (1 + |J|)
  is loose against round-off yet far below any real mistake (which shows at O(|grad|));
- Monte Carlo means are compared with |mean - J| < 4 SE on fixed seeds (deterministic),
  and each test also asserts that 4 SE is small against the gap between J and the J of
  another policy (the initial one), so the check has teeth.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from pgvar.envs.lqr import LinearQuadratic
from pgvar.envs.registry import ENVS, available_envs, make_env, make_policy, register_env
from pgvar.envs.tabular import RandomTabularMDP, SparseChain, TabularMDP
from pgvar.policies import (
    LinearGaussianPolicy,
    MLPCategoricalPolicy,
    MLPGaussianPolicy,
    TabularSoftmaxPolicy,
)
from pgvar.rollout import rollout

CPU = torch.device("cpu")

ENV_KWARGS = {
    "tabular": {"n_states": 5, "n_actions": 3, "horizon": 8, "gamma": 0.9, "seed": 3},
    "chain": {"length": 5, "horizon": 10, "gamma": 0.9, "slip": 0.1},
    "lqr": {"state_dim": 3, "action_dim": 2, "horizon": 8, "gamma": 0.9, "seed": 3,
            "process_noise": 0.3},
}


def build(name: str, objective: str = "finite", **overrides) -> object:
    """An env from the registry with the test settings above, on an explicit CPU device."""
    return make_env(name, objective=objective, device=CPU, **{**ENV_KWARGS[name], **overrides})


def random_policy(env, seed: int = 0) -> torch.nn.Module:
    """A non-trivial policy: random logits, or random gains with a non-zero offset and std."""
    g = torch.Generator().manual_seed(seed)
    policy = make_policy(env)
    with torch.no_grad():
        if isinstance(policy, TabularSoftmaxPolicy):
            policy.theta.copy_(torch.randn(policy.theta.shape, generator=g))
        else:
            policy.K.copy_(0.3 * torch.randn(policy.K.shape, generator=g))
            policy.k.copy_(0.5 * torch.randn(policy.k.shape, generator=g))
            policy.log_std.copy_(-0.5 + 0.3 * torch.randn(policy.log_std.shape, generator=g))
    return policy


def finite_difference_gradient(env, policy: torch.nn.Module, h: float = 1e-5) -> torch.Tensor:
    """Central differences (J(theta + h e_i) - J(theta - h e_i)) / 2h of the exact J."""
    params = list(policy.parameters())
    theta = parameters_to_vector(params).detach().clone()
    grad = torch.zeros_like(theta)
    with torch.no_grad():
        for i in range(theta.numel()):
            values = []
            for sign in (1.0, -1.0):
                shifted = theta.clone()
                shifted[i] += sign * h
                vector_to_parameters(shifted, params)
                values.append(env.exact_objective(policy))
            grad[i] = (values[0] - values[1]) / (2 * h)
        vector_to_parameters(theta, params)
    return grad


def autograd_gradient(env, policy: torch.nn.Module) -> torch.Tensor:
    """Gradient of the exact J by autograd, flattened in parameter order."""
    J = env.exact_objective(policy)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(J, list(policy.parameters()))])


# ----------------------------------------------------------------- exact gradients

@pytest.mark.parametrize("objective", ["finite", "discounted"])
@pytest.mark.parametrize("name", ["tabular", "chain", "lqr"])
def test_exact_gradient_matches_finite_differences(name: str, objective: str) -> None:
    env = build(name, objective)
    policy = random_policy(env).double()
    J = float(env.exact_objective(policy).detach())
    g_auto = autograd_gradient(env, policy)
    g_fd = finite_difference_gradient(env, policy)
    assert g_auto.norm() > 1e-3, "gradient is trivially zero: the test would be vacuous"
    torch.testing.assert_close(g_auto, g_fd, rtol=0.0, atol=1e-6 * (1 + abs(J)))


@pytest.mark.parametrize("name", ["tabular", "chain", "lqr"])
def test_exact_objective_keeps_policy_dtype_and_autograd(name: str) -> None:
    env = build(name)
    policy = random_policy(env)
    J = env.exact_objective(policy)
    assert J.shape == () and J.dtype == torch.float32 and J.requires_grad
    assert torch.isclose(J.double(), env.exact_objective(policy.double()), rtol=1e-6)


# ------------------------------------------------------- sampling against exact J

@pytest.mark.parametrize("name", ["tabular", "chain", "lqr"])
def test_sampled_returns_converge_to_exact_J(name: str) -> None:
    env = build(name)
    policy = random_policy(env, seed=1)
    n = 8000
    batch = rollout(env, policy, n, seed=11)
    returns = batch.episode_returns(env.gamma).double()
    mean, se = returns.mean(), returns.std() / n**0.5
    J = float(env.exact_objective(policy).detach())
    J_other = float(env.exact_objective(make_policy(env)).detach())  # the initial policy's J
    assert 4 * se < 0.25 * abs(J - J_other), "too noisy to tell this policy's J from another's"
    message = f"mean {float(mean):.4f}, exact J {J:.4f}, SE {float(se):.4f}"
    assert abs(float(mean) - J) < 4 * float(se), message


def test_random_mdp_never_terminates_and_runs_full_horizon() -> None:
    env = build("tabular")
    batch = rollout(env, random_policy(env), 200, seed=0)
    assert not batch.terminated.any()
    assert (batch.lengths == env.horizon).all()
    assert batch.truncated[:, -1].all() and not batch.truncated[:, :-1].any()
    assert batch.obs.dtype == torch.long and batch.obs.shape == (200, env.horizon)


# ------------------------------------------------------------------- sparse chain

def test_chain_terminations_masks_and_returns() -> None:
    env = build("chain", horizon=12, slip=0.2)
    goal = env.length - 1
    batch = rollout(env, make_policy(env), 2000, seed=5)
    returns = batch.episode_returns(env.gamma)
    n_reached = 0
    for i in range(batch.n_episodes):
        ends = torch.nonzero(batch.terminated[i]).flatten()
        visited_goal = (batch.next_obs[i][batch.mask[i]] == goal)
        if len(ends) == 0:
            assert not visited_goal.any() and batch.truncated[i, env.horizon - 1]
            assert batch.rewards[i].abs().sum() == 0 and returns[i] == 0
            continue
        n_reached += 1
        (t,) = ends.tolist()
        assert batch.next_obs[i, t] == goal and batch.obs[i, t] != goal
        assert not visited_goal[:t].any(), "goal entered before the termination flag"
        assert batch.mask[i, : t + 1].all() and not batch.mask[i, t + 1:].any()
        assert not batch.truncated[i].any()
        assert batch.rewards[i, t] == 1 and batch.rewards[i].sum() == 1
        assert torch.isclose(returns[i], torch.tensor(env.gamma**t))
    assert 50 < n_reached < 1950, "the check needs both outcomes"


def test_chain_always_right_reaches_goal_in_length_minus_one_steps() -> None:
    env = build("chain", slip=0.0)
    policy = make_policy(env)
    with torch.no_grad():
        policy.theta[:, 1] = 50.0  # pi(right) = 1 - e^-50
    batch = rollout(env, policy, 8, seed=0)
    t = env.length - 2  # L-1 moves: steps 0..L-2
    assert batch.terminated[:, t].all() and (batch.lengths == t + 1).all()
    expected = env.gamma**t
    assert torch.allclose(batch.episode_returns(env.gamma), torch.full((8,), expected))
    assert abs(float(env.exact_objective(policy).detach()) - expected) < 1e-6


def test_chain_is_a_tabular_mdp_with_absorbing_goal() -> None:
    env = build("chain")
    assert isinstance(env, TabularMDP) and env.terminal.tolist() == [False] * 4 + [True]
    V = env.exact_values(random_policy(env))
    assert torch.all(V[:, -1] == 0), "value of the terminal goal must be 0"


# --------------------------------------------------------------------- exact values

@pytest.mark.parametrize("objective", ["finite", "discounted"])
@pytest.mark.parametrize("name", ["tabular", "chain"])
def test_exact_values_agree_with_objective_and_q(name: str, objective: str) -> None:
    env = build(name, objective)
    policy = random_policy(env).double()
    V = env.exact_values(policy)
    assert V.shape == (env.horizon + 1, env.n_states)
    torch.testing.assert_close(env.mu @ V[0], env.exact_objective(policy))
    if objective == "finite":
        assert torch.all(V[-1] == 0)
    else:
        torch.testing.assert_close(V[-1], V[0])
    Q = env.exact_q_values(policy)
    pi = policy.probs_table()
    torch.testing.assert_close((pi * Q).sum(-1), V[:-1])


@pytest.mark.parametrize("name", ["tabular", "chain", "lqr"])
def test_long_finite_horizon_approaches_discounted(name: str) -> None:
    """gamma^T -> 0, so the finite sum over T = 400 steps equals the infinite one."""
    policy = random_policy(build(name)).double()
    finite = build(name, "finite", horizon=400).exact_objective(policy)
    discounted = build(name, "discounted").exact_objective(policy)
    torch.testing.assert_close(finite, discounted, rtol=1e-9, atol=1e-9)


# -------------------------------------------------------------------------- LQR

def test_lqr_discounted_refuses_unstable_closed_loop() -> None:
    env = build("lqr", "discounted")
    policy = make_policy(env)
    with torch.no_grad():
        policy.K.fill_(20.0)
    with pytest.raises(ValueError, match="diverges"):
        env.exact_objective(policy)
    # The finite objective is well defined whatever the gain.
    assert torch.isfinite(build("lqr").exact_objective(policy))


def test_lqr_instance_has_requested_spectral_radius() -> None:
    env = LinearQuadratic(state_dim=4, action_dim=2, spectral_radius=0.7, seed=9)
    assert abs(float(torch.linalg.eigvals(env.A).abs().max()) - 0.7) < 1e-9


def test_lqr_nested_actions_extend_the_smaller_system_and_default_is_unchanged() -> None:
    """nested_actions: A, m_0 and B's first columns do not depend on action_dim; the
    default draw (the published runs') is unchanged: B and m_0 drawn as before."""
    small = LinearQuadratic(state_dim=4, action_dim=2, seed=5, nested_actions=True)
    big = LinearQuadratic(state_dim=4, action_dim=8, seed=5, nested_actions=True)
    assert torch.equal(small.A, big.A) and torch.equal(small.m0, big.m0)
    assert torch.equal(small.B, big.B[:, :2])
    old = LinearQuadratic(state_dim=4, action_dim=2, seed=5)
    g = torch.Generator().manual_seed(5)
    torch.randn(4, 4, generator=g, dtype=torch.float64)
    B = torch.randn(4, 2, generator=g, dtype=torch.float64) / 2.0
    assert torch.equal(old.B, B) and torch.equal(old.A, small.A)
    assert torch.equal(old.m0, torch.randn(4, generator=g, dtype=torch.float64))
    assert not torch.equal(old.B, small.B)


# ------------------------------------------------------------------ seeding, device

@pytest.mark.parametrize("name", ["tabular", "chain", "lqr"])
def test_seed_reproduces_batch_on_explicit_cpu(name: str) -> None:
    env = build(name)
    assert env.device == CPU
    policy = random_policy(env)
    a, b, c = (rollout(env, policy, 64, seed=s) for s in (7, 7, 8))
    for field in ("obs", "actions", "rewards", "terminated", "mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.rewards, c.rewards)
    assert a.obs.device == CPU and a.obs.dtype == env.obs_dtype


def test_instance_seed_changes_the_mdp() -> None:
    same = [RandomTabularMDP(seed=1).P, RandomTabularMDP(seed=1).P, RandomTabularMDP(seed=2).P]
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], same[2])


# ----------------------------------------------------------------- registry, errors

def test_make_policy_gives_the_natural_policy() -> None:
    assert isinstance(make_policy(build("tabular")), TabularSoftmaxPolicy)
    assert isinstance(make_policy(build("chain")), TabularSoftmaxPolicy)
    assert isinstance(make_policy(build("lqr"), init_log_std=-1.0), LinearGaussianPolicy)

    class FakeEnv:  # a Gymnasium-like env without default_policy
        name, obs_shape, device = "fake", (4,), CPU
        action_spec = None

    from pgvar.envs.base import ActionSpec
    fake = FakeEnv()
    fake.action_spec = ActionSpec("discrete", n=2)
    assert isinstance(make_policy(fake, hidden=(8,)), MLPCategoricalPolicy)
    fake.action_spec = ActionSpec("continuous", dim=3)
    assert isinstance(make_policy(fake), MLPGaussianPolicy)


def test_registry_names_and_registration_hook() -> None:
    assert {"tabular", "chain", "lqr"} <= set(available_envs())
    with pytest.raises(ValueError, match="valid choices.*'chain'.*'lqr'.*'tabular'"):
        make_env("no-such-env")
    with pytest.raises(ValueError, match="already registered"):
        register_env("chain", RandomTabularMDP)

    @register_env("test-tiny-chain")
    def tiny(**kwargs):
        return SparseChain(length=2, **kwargs)

    try:
        assert make_env("test-tiny-chain", horizon=3).length == 2
    finally:
        del ENVS["test-tiny-chain"]


@pytest.mark.parametrize("name, kwargs, message", [
    ("tabular", {"n_states": 0}, "n_states"),
    ("tabular", {"n_actions": 2.5}, "n_actions"),
    ("tabular", {"horizon": 0}, "horizon"),
    ("tabular", {"gamma": 1.5}, "gamma"),
    ("tabular", {"objective": "average"}, "objective"),
    ("tabular", {"objective": "discounted", "gamma": 1.0}, "gamma < 1"),
    ("tabular", {"colour": "red"}, "unknown argument.*colour.*accepted"),
    ("chain", {"length": 1}, "length"),
    ("chain", {"slip": 1.0}, "slip"),
    ("lqr", {"state_dim": 0}, "state_dim"),
    ("lqr", {"process_noise": -1.0}, "process_noise"),
    ("lqr", {"objective": "discounted", "state_dim": 100}, "state_dim <= 40"),
])
def test_bad_arguments_raise_helpful_errors(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_env(name, **kwargs)


def test_mismatched_policy_and_bad_actions_are_refused() -> None:
    env = build("tabular")
    with pytest.raises(ValueError, match=r"\[S, A\]"):
        env.exact_objective(TabularSoftmaxPolicy(env.n_states + 1, env.n_actions))
    with pytest.raises(TypeError, match="probs_table"):
        env.exact_objective(LinearGaussianPolicy(2, 1))
    with pytest.raises(ValueError, match="K\\(2, 3\\)"):
        build("lqr").exact_objective(LinearGaussianPolicy(2, 2))
    with pytest.raises(RuntimeError, match="reset"):
        RandomTabularMDP().step(torch.zeros(3, dtype=torch.long))
    env.reset(3, seed=0)
    with pytest.raises(ValueError, match="actions must lie"):
        env.step(torch.full((3,), env.n_actions))
