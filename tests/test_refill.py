"""pgvar.refill: lanes that run episodes back to back, handed out in whole chunks.

What must hold, and how it is checked:

- every chunk is a valid padded Batch whose steps chain (step t's next_obs is step
  t+1's obs), with flags only at each episode's last step and log-probabilities of the
  policy that sampled them;
- the episodes are draws of the episode distribution, not tilted towards short ones:
  their mean length agrees with that of plain one-episode-per-lane rollouts within a
  z-test on standard errors, and the same test rejects "the first K to finish";
- a Monte Carlo reference sampled this way is unbiased for the exact gradient: on
  FrozenLake (a Gymnasium env whose transition table is public) against grad J by
  dynamic programming, with the tolerance of ``tests/test_reference.py``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import sys

import gymnasium
import pytest
import torch

from pgvar.envs.gym import GymVectorEnv
from pgvar.envs.registry import make_env, make_policy
from pgvar.policies import MLPCategoricalPolicy, MLPGaussianPolicy, flat_autograd
from pgvar.prefetch import background
from pgvar.reference import exact_reference, monte_carlo_reference
from pgvar.refill import reference_chunks, rollout_stream, supports_refill
from pgvar.rollout import rollout

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cartpole(horizon: int | None = None):
    torch.manual_seed(0)
    env = GymVectorEnv("CartPole-v1", horizon=horizon)
    return env, MLPCategoricalPolicy(4, 2)


def chunks(env, policy, sizes, seed=0, lanes=64, **kw):
    return list(rollout_stream(env, policy, sizes, seed, lanes, **kw))


def assert_valid_chunk(batch, policy, horizon: int) -> None:
    """Prefix masks, chained steps, flags at the end only, zero padding, true log-probs."""
    m = batch.mask
    L = m.sum(1)
    assert bool((L >= 1).all()) and bool((L <= horizon).all())
    assert torch.equal(m, torch.arange(m.shape[1])[None] < L[:, None])  # a prefix
    ended = batch.terminated | batch.truncated
    last = torch.zeros_like(m)
    last[torch.arange(len(L)), L - 1] = True
    assert torch.equal(ended, last), "each episode ends exactly once, at its last step"
    assert not bool((batch.terminated & batch.truncated).any())
    cut = L == horizon
    assert bool(batch.truncated[torch.arange(len(L)), L - 1][cut & ~batch.terminated[torch.arange(len(L)), L - 1]].all())
    inner = m[:, 1:] & m[:, :-1]  # step t+1 exists: its obs is step t's next_obs
    assert torch.equal(batch.next_obs[:, :-1][inner], batch.obs[:, 1:][inner])
    for name in ("rewards", "logp", "actions"):
        assert not bool(getattr(batch, name)[~m].any()), name
    with torch.no_grad():
        lp = policy.log_prob(batch.obs[m], batch.actions[m])
    torch.testing.assert_close(batch.logp[m], lp, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- the stream


def test_chunks_have_the_asked_sizes_and_valid_layout():
    env, policy = cartpole()
    got = chunks(env, policy, [5, 17, 300, 3], lanes=32)
    assert [b.n_episodes for b in got] == [5, 17, 300, 3]
    for b in got:
        assert_valid_chunk(b, policy, env.horizon)


def test_first_observations_are_fresh_starts():
    """CartPole starts uniformly in [-0.05, 0.05]^4: a lane's next episode must not
    continue from where its previous one ended."""
    env, policy = cartpole()
    (b,) = chunks(env, policy, [2000], lanes=100)
    assert float(b.obs[:, 0].abs().max()) <= 0.05


def test_same_seed_same_chunks_other_seed_other_chunks():
    env, policy = cartpole()
    a = chunks(env, policy, [40, 40], seed=3, lanes=16)
    b = chunks(env, policy, [40, 40], seed=3, lanes=16)
    c = chunks(env, policy, [40, 40], seed=4, lanes=16)
    for x, y in zip(a, b):
        for name in ("obs", "actions", "rewards", "mask", "terminated", "truncated"):
            assert torch.equal(getattr(x, name), getattr(y, name))
    assert not torch.equal(a[0].mask, c[0].mask) or not torch.equal(a[0].obs, c[0].obs)


def test_more_lanes_than_episodes_and_a_single_lane():
    env, policy = cartpole()
    (b,) = chunks(env, policy, [10], lanes=64)
    assert b.n_episodes == 10
    one = chunks(env, policy, [3, 2], lanes=1)
    assert [x.n_episodes for x in one] == [3, 2]
    for x in one:
        assert_valid_chunk(x, policy, env.horizon)


def test_a_shorter_horizon_cuts_and_restarts_lanes():
    env, policy = cartpole(horizon=8)
    with torch.no_grad():  # a policy that balances for a while, so many episodes reach 8
        policy.net[-1].weight.zero_()
    got = chunks(env, policy, [400], lanes=50)
    assert_valid_chunk(got[0], policy, 8)
    assert int((got[0].lengths == 8).sum()) > 0 and got[0].horizon == 8


def test_continuous_actions_on_a_sync_vector_env():
    """Pendulum (N copies in a SyncVectorEnv, fixed-length episodes, Gaussian policy)."""
    torch.manual_seed(1)
    env = GymVectorEnv("Pendulum-v1", horizon=7)
    policy = MLPGaussianPolicy(3, 1)
    got = chunks(env, policy, [9, 5], lanes=4)
    assert [b.n_episodes for b in got] == [9, 5]
    for b in got:
        assert_valid_chunk(b, policy, 7)
        assert bool((b.lengths == 7).all()) and bool(b.truncated[:, -1].all())


def test_infinite_sizes_with_a_pair_budget_stop_after_it():
    env, policy = cartpole()
    taken = list(reference_chunks(env, policy, itertools.repeat(64), seed=0, lanes=32,
                                  prefetch=False, max_pairs=3000))
    pairs = [b.n_steps for b in taken]
    assert sum(pairs) >= 3000 and sum(pairs[:-1]) < 3000


def test_stream_refuses_envs_without_refill_and_bad_arguments():
    env = make_env("tabular", n_states=3, n_actions=2, horizon=4)
    assert not supports_refill(env)
    with pytest.raises(TypeError, match="cannot refill"):
        next(rollout_stream(env, make_policy(env), [4], 0))
    env, policy = cartpole()
    assert supports_refill(env)
    with pytest.raises(ValueError, match="lanes"):
        next(rollout_stream(env, policy, [4], 0, lanes=0))
    with pytest.raises(ValueError, match="chunk sizes"):
        next(rollout_stream(env, policy, [0], 0, lanes=4))


# ------------------------------------------------------- no tilt towards short episodes


def length_z(sample: torch.Tensor, other: torch.Tensor) -> float:
    """z statistic of the difference of two independent sample means."""
    se = math.sqrt(sample.var() / len(sample) + other.var() / len(other))
    return float((sample.mean() - other.mean()) / se)


def test_episode_lengths_match_plain_rollouts_and_first_to_finish_would_not():
    env, policy = cartpole()
    stream = torch.cat([b.lengths.float() for b in chunks(env, policy, [4000] * 3, seed=1, lanes=256)])
    plain = rollout(env, policy, 12000, seed=2).lengths.float()
    # |z| < 4: a correct sampler fails with probability 6e-5
    assert abs(length_z(stream, plain)) < 4.0
    # power: of 14000 episodes started on 2048 refilling lanes, the first 12000 to
    # *finish* are tilted towards short ones (z = -7.3 at these seeds), and the same
    # test sees it
    (b,) = chunks(env, policy, [14000], seed=1, lanes=2048)
    first_to_finish = b.lengths.float()[finish_order(b.lengths, lanes=2048)[:12000]]
    assert length_z(first_to_finish, plain) < -4.0


def finish_order(lengths: torch.Tensor, lanes: int) -> torch.Tensor:
    """Episode numbers (start order) sorted by the step at which each episode ends,
    replaying the stream's schedule: a free lane takes the next number (lowest lane
    first), runs it for its length, then spends one step on the reset."""
    free = [(0, lane) for lane in range(lanes)]
    heapq.heapify(free)
    ends = []
    for e, L in enumerate(lengths.tolist()):
        start, lane = heapq.heappop(free)
        ends.append((start + int(L) - 1, e))
        heapq.heappush(free, (start + int(L) + 1, lane))
    return torch.tensor([e for _, e in sorted(ends)])


# ------------------------------------------------- unbiased against an exact gradient


def frozen_lake_objective(policy, horizon: int, gamma: float, **make_kwargs) -> torch.Tensor:
    """J = E[sum_{t<T} gamma^t r_t] on FrozenLake by dynamic programming over its public
    transition table ``P`` (differentiable in the policy's parameters)."""
    env = gymnasium.make("FrozenLake-v1", **make_kwargs).unwrapped
    S, A = env.observation_space.n, env.action_space.n
    reward = torch.zeros(S, A, dtype=torch.float64)
    going_on = torch.zeros(S, A, S, dtype=torch.float64)  # P(s' and not terminated | s, a)
    for s in range(S):
        for a in range(A):
            for p, s2, r, terminated in env.P[s][a]:
                reward[s, a] += p * r
                if not terminated:
                    going_on[s, a, s2] += p
    probs = torch.softmax(policy.logits(torch.eye(S)), dim=-1).double()
    v = torch.zeros(S, dtype=torch.float64)
    for _ in range(horizon):
        v = (probs * (reward + gamma * (going_on @ v))).sum(1)
    return torch.as_tensor(env.initial_state_distrib, dtype=torch.float64) @ v


@pytest.mark.parametrize("slippery", [False, True])
def test_refill_reference_is_unbiased_for_the_exact_frozen_lake_gradient(slippery):
    torch.manual_seed(0)
    policy = MLPCategoricalPolicy(16, 4, hidden=(8,))
    with torch.no_grad():  # lean down and right, towards the goal
        policy.net[-1].bias.copy_(torch.tensor([0.0, 1.0, 1.0, 0.0]))
    env = GymVectorEnv("FrozenLake-v1", horizon=16, gamma=0.95, is_slippery=slippery)
    J = frozen_lake_objective(policy, 16, 0.95, is_slippery=slippery)
    exact = flat_autograd(J, policy).double()
    mc = monte_carlo_reference(env, policy, n_episodes=16384, seed=0, lanes=512)
    assert mc.n_episodes == 16384
    if not slippery:
        assert mc.rel_se < 0.1  # the error allowed is a small fraction of the gradient
    # ||mc - exact||^2 / se2 < 9 fails a correct sampler with probability <= 0.27%
    # (tests/test_reference.py says why)
    assert float(((mc.grad - exact) ** 2).sum()) / mc.se2 < 9.0
    assert abs(mc.objective - float(J.detach())) < 3 * mc.objective_se


def test_reference_with_and_without_refill_agree_on_cartpole():
    env, policy = cartpole()
    a = monte_carlo_reference(env, policy, n_episodes=4096, seed=0, lanes=256)
    b = monte_carlo_reference(env, policy, n_episodes=4096, seed=1, lanes=None)
    # two independent unbiased estimates: ||a - b||^2 / (se2_a + se2_b) < 9 as above
    assert float(((a.grad - b.grad) ** 2).sum()) / (a.se2 + b.se2) < 9.0
    assert a.n_episodes == b.n_episodes == 4096


def test_exact_environments_ignore_lanes():
    env = make_env("tabular", n_states=4, n_actions=2, horizon=5)
    policy = make_policy(env, init_scale=0.5)
    mc = monte_carlo_reference(env, policy, n_episodes=512, seed=0, lanes=64)
    ex = exact_reference(env, policy)
    assert float(((mc.grad - ex.grad) ** 2).sum()) / mc.se2 < 9.0


# --------------------------------------------------------------- the env's refill API


def test_gym_refill_step_restarts_a_lane_on_the_call_after_it_ends():
    env = GymVectorEnv("CartPole-v1", horizon=3)
    obs = env.refill_reset(2, seed=0)
    assert obs.shape == (2, 4)
    actions = torch.zeros(2, dtype=torch.long)
    flags = [env.refill_step(actions) for _ in range(3)]
    assert bool(flags[2].truncated.all())  # the horizon is the env's own time limit here
    restart = env.refill_step(actions)  # ignores the action: first observation, no reward
    assert float(restart.reward.abs().sum()) == 0.0 and not bool(restart.terminated.any())
    assert float(restart.obs.abs().max()) <= 0.05
    with pytest.raises(RuntimeError, match="refill_reset"):
        GymVectorEnv("CartPole-v1").refill_step(actions)


# ------------------------------------------------------------------ background thread


def test_background_hands_items_over_in_order_and_restores_the_switch_interval():
    before = sys.getswitchinterval()
    assert list(background(iter(range(50)))) == list(range(50))
    assert sys.getswitchinterval() == before


def test_background_passes_errors_on_and_stops_when_closed_early():
    def failing():
        yield 1
        raise ValueError("boom")

    it = background(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)
    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    it = background(endless())
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the producer stops within a couple of items
    n = len(produced)
    assert n <= 6 and len(produced) == n
