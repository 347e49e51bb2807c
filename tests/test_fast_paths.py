"""The fast paths of rollout and score gradients equal their plain definitions.

- ``rollout`` (live lanes only, one forward per step, inverse-CDF sampling, scatter into
  the padded batch at the end) equals a plain per-step, per-lane loop that draws the
  same uniforms/normals from the same generator;
- ``score_gradients`` (packed pairs, size buckets, hand-written MLP backward or vmap)
  equals ``score_gradients_loop`` (one ``backward`` per batch) to float tolerance, for
  categorical and Gaussian MLPs, tabular and linear policies, with masks, zero weights,
  empty groups and groups split across buckets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Normal

from pgvar import gradients
from pgvar.batch import Batch
from pgvar.envs.gym import GymVectorEnv
from pgvar.envs.lqr import LinearQuadratic
from pgvar.envs.tabular import RandomTabularMDP, SparseChain
from pgvar.folded import FoldedMLP, mlp_spec
from pgvar.gradients import (
    plan_buckets,
    policy_params,
    score_gradients,
    score_gradients_loop,
)
from pgvar.policies import (
    CategoricalPolicy,
    LinearGaussianPolicy,
    MLPCategoricalPolicy,
    MLPGaussianPolicy,
    TabularSoftmaxPolicy,
)
from pgvar.rollout import (
    categorical_sample,
    make_sampler,
    rollout,
    rollout_chunks,
    rollout_generator,
    sample_with_log_prob,
)

FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated", "truncated", "mask", "logp")


def perturbed(policy: nn.Module, scale: float, seed: int = 0) -> nn.Module:
    """Move every parameter by N(0, scale^2) so that no policy is near-uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy


# ------------------------------------------------------------------ reference rollout


def reference_rollout(env, policy: nn.Module, n: int, seed: int) -> Batch:
    """A plain rollout: per step, each live lane's action from its own ``dist``.

    The draws match the fast rollout's stream by construction: per step one
    ``torch.rand(n_live)`` (categorical) or ``torch.randn(n_live, dim)`` (Gaussian)
    from ``rollout_generator(seed)``, used by the live lanes in increasing order. Ended
    lanes get action 0. Padded entries stay zero (the comparison is on live steps).
    """
    obs = env.reset(n, seed)
    gen = rollout_generator(seed, obs.device)
    categorical = isinstance(policy, CategoricalPolicy)
    T = env.horizon
    alive = [True] * n
    steps: list[list[dict]] = [[] for _ in range(n)]
    for t in range(T):
        live = [i for i in range(n) if alive[i]]
        if not live:
            break
        if categorical:
            draws = torch.rand(len(live), generator=gen)
            actions = torch.zeros(n, dtype=torch.long)
        else:
            dim = env.action_spec.dim
            draws = torch.randn(len(live), dim, generator=gen)
            actions = torch.zeros(n, dim)
        logp = {}
        with torch.no_grad():
            for j, i in enumerate(live):
                o = obs[i:i + 1]
                if categorical:
                    dist = Categorical(logits=policy.logits(o)[0])
                    probs = dist.probs
                    a, acc = 0, float(probs[0])
                    while a < len(probs) - 1 and float(draws[j]) >= acc:  # inverse CDF
                        a += 1
                        acc += float(probs[a])
                    actions[i] = a
                    logp[i] = dist.log_prob(torch.tensor(a))
                else:
                    mean, std = policy.mean(o)[0], torch.exp(policy.log_std)
                    actions[i] = mean + std * draws[j]
                    logp[i] = Normal(mean, std).log_prob(actions[i]).sum()
        res = env.step(actions)
        for i in live:
            term = bool(res.terminated[i])
            trunc = (bool(res.truncated[i]) or t == T - 1) and not term
            steps[i].append({"obs": obs[i], "actions": actions[i], "rewards": res.reward[i],
                             "next_obs": res.obs[i], "terminated": term, "truncated": trunc,
                             "logp": logp[i]})
            if term or trunc:
                alive[i] = False
        obs = res.obs
    T_end = max(len(s) for s in steps)
    out = {}
    for name in FIELDS[:-2] + ("logp",):
        first = steps[0][0][name]
        like = torch.as_tensor(first)
        buf = torch.zeros((n, T_end, *like.shape), dtype=like.dtype if name not in
                          ("terminated", "truncated") else torch.bool)
        for i, s in enumerate(steps):
            for t, step in enumerate(s):
                buf[i, t] = torch.as_tensor(step[name])
        out[name] = buf
    mask = torch.zeros(n, T_end, dtype=torch.bool)
    for i, s in enumerate(steps):
        mask[i, :len(s)] = True
    return Batch(mask=mask, **out)


def assert_live_steps_equal(fast: Batch, ref: Batch, exact_floats: bool) -> None:
    assert fast.obs.shape == ref.obs.shape and fast.actions.shape == ref.actions.shape
    assert torch.equal(fast.mask, ref.mask)
    m = ref.mask
    for name in ("terminated", "truncated"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
    for name in ("obs", "actions", "rewards", "next_obs"):
        a, b = getattr(fast, name)[m], getattr(ref, name)[m]
        if exact_floats or not a.is_floating_point():
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(fast.logp[m], ref.logp[m], rtol=1e-5, atol=1e-5)
    # padded entries: no reward, flag or log-probability
    for name in ("rewards", "logp"):
        assert not bool(getattr(fast, name)[~m].any()), name
    assert not bool((fast.terminated | fast.truncated)[~m].any())


def cartpole_case():
    torch.manual_seed(0)
    return GymVectorEnv("CartPole-v1"), perturbed(MLPCategoricalPolicy(4, 2), 0.2), 24, True


def pendulum_case():
    torch.manual_seed(1)
    return GymVectorEnv("Pendulum-v1", horizon=15), perturbed(MLPGaussianPolicy(3, 1), 0.2), 5, False


def chain_case():
    env = SparseChain(length=4, horizon=12, slip=0.2)
    return env, perturbed(TabularSoftmaxPolicy(4, 2), 1.0), 16, True


def tabular_case():
    env = RandomTabularMDP(n_states=5, n_actions=4, horizon=6, seed=3)
    return env, perturbed(TabularSoftmaxPolicy(5, 4), 1.0), 12, True


def lqr_case():
    env = LinearQuadratic(state_dim=3, action_dim=2, horizon=7, seed=2)
    return env, perturbed(LinearGaussianPolicy(3, 2), 0.3), 6, False


def relu_cartpole_case():
    torch.manual_seed(2)
    policy = perturbed(MLPCategoricalPolicy(4, 2, hidden=(16, 8), activation="relu"), 0.3)
    return GymVectorEnv("CartPole-v1", horizon=40), policy, 10, True


CASES = [cartpole_case, pendulum_case, chain_case, tabular_case, lqr_case, relu_cartpole_case]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_fast_rollout_equals_plain_per_lane_loop(case):
    env, policy, n, discrete = case()
    fast = rollout(env, policy, n, seed=7)
    ref = reference_rollout(env, policy, n, seed=7)
    # discrete actions are identical, so the env sees the same actions: exact floats;
    # continuous actions differ by rounding (batched vs one-row forward)
    assert_live_steps_equal(fast, ref, exact_floats=discrete)


def test_cartpole_episodes_end_at_different_steps_in_this_test():
    """The comparison above covers lanes that end early and lanes that run on."""
    env, policy, n, _ = cartpole_case()
    lengths = rollout(env, policy, n, seed=7).lengths
    assert int(lengths.min()) < int(lengths.max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_rollout_is_deterministic_given_the_seed(case):
    env, policy, n, _ = case()
    a, b = rollout(env, policy, n, seed=3), rollout(env, policy, n, seed=3)
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = rollout(env, policy, n, seed=4)
    assert not all(torch.equal(getattr(a, k), getattr(c, k)) for k in ("actions", "rewards"))


def test_fallback_policy_without_fast_sampler_is_deterministic_and_masked():
    """A policy overriding ``sample`` takes the two-forward fallback."""

    class MultinomialPolicy(MLPCategoricalPolicy):
        def sample(self, obs, generator=None):
            probs = torch.softmax(self.logits(obs), dim=-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    torch.manual_seed(0)
    policy = MultinomialPolicy(4, 2)
    assert mlp_spec(policy) is not None  # logits/log_prob are the base ones ...
    env = GymVectorEnv("CartPole-v1", horizon=30)
    a, b = rollout(env, policy, 8, seed=1), rollout(env, policy, 8, seed=1)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.obs, b.obs)
    with torch.no_grad():
        want = policy.log_prob(a.obs, a.actions)
    torch.testing.assert_close(a.logp[a.mask], want[a.mask])


def test_policy_can_bring_its_own_sampler():
    class Own(MLPCategoricalPolicy):
        def sample_with_log_prob(self, obs, generator=None):
            a = torch.ones(obs.shape[0], dtype=torch.long)
            return a, self.log_prob(obs, a)

    torch.manual_seed(0)
    batch = rollout(GymVectorEnv("CartPole-v1", horizon=20), Own(4, 2), 4, seed=0)
    assert bool((batch.actions[batch.mask] == 1).all())


def test_rollout_chunks_with_prefetch_equal_plain_rollouts():
    env, policy, n, _ = cartpole_case()
    plan = [(n, 11), (n // 2, 12), (n, 13)]
    fetched = list(rollout_chunks(env, policy, plan, prefetch=True))
    plain = [rollout(env, policy, k, seed) for k, seed in plan]
    assert len(fetched) == len(plain) == 3
    for a, b in zip(fetched, plain):
        for name in FIELDS:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    stream = rollout_chunks(env, policy, ((n, s) for s in range(100)), prefetch=True)
    first = next(stream)
    stream.close()  # stops early: the prefetched chunk is discarded, the thread joined
    assert torch.equal(first.actions, rollout(env, policy, n, 0).actions)
    for prefetch in (True, False):  # a pair budget stops before the chunk that is not needed
        sizes = [b.n_steps for b in rollout_chunks(env, policy, plan, prefetch, max_pairs=1)]
        assert sizes == [plain[0].n_steps]
        budget = plain[0].n_steps + 1
        assert len(list(rollout_chunks(env, policy, plan, prefetch, max_pairs=budget))) == 2


# ------------------------------------------------------------------------ samplers


def test_categorical_sample_follows_the_probabilities():
    """Empirical frequencies within 5 standard errors of the probabilities (K = 2 and 4)."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for logits in (torch.tensor([0.3, -0.4]), torch.tensor([1.0, -2.0, 0.0, 0.5])):
        a, lp = categorical_sample(logits.expand(n, -1), g)
        p = torch.softmax(logits, -1)
        freq = torch.bincount(a, minlength=len(p)).double() / n
        se = (p.double() * (1 - p.double()) / n).sqrt()
        assert bool(((freq - p.double()).abs() < 5 * se).all()), (freq, p)
        torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[a])


def test_categorical_sample_never_draws_a_zero_probability_action():
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([[-math.inf, 0.0, -math.inf, 0.0], [0.0, -math.inf, -math.inf, -math.inf]])
    a, _ = categorical_sample(logits.repeat(5000, 1), g)
    a = a.reshape(5000, 2)
    assert set(a[:, 0].tolist()) <= {1, 3} and bool((a[:, 1] == 0).all())


@pytest.mark.parametrize("make", [lambda: MLPCategoricalPolicy(4, 3), lambda: MLPGaussianPolicy(4, 2),
                                  lambda: MLPCategoricalPolicy(4, 3, (32,), "relu"),
                                  lambda: LinearGaussianPolicy(4, 2, init_gain_scale=0.5)])
def test_sampler_log_prob_equals_policy_log_prob(make):
    torch.manual_seed(0)
    policy = perturbed(make(), 0.3)
    obs = torch.randn(500, 4)
    a, lp = sample_with_log_prob(policy, obs, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = policy.log_prob(obs, a)
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)


def test_gaussian_sampler_has_the_policy_mean_and_std():
    torch.manual_seed(0)
    policy = perturbed(MLPGaussianPolicy(3, 2, init_log_std=-0.5), 0.2)
    obs = torch.randn(1, 3).expand(100_000, -1)
    a, _ = make_sampler(policy)(obs, torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean, std = policy.mean(obs[:1])[0], torch.exp(policy.log_std)
    se = std / math.sqrt(obs.shape[0])
    assert bool(((a.mean(0) - mean).abs() < 5 * se).all())
    torch.testing.assert_close(a.std(0), std, rtol=0.02, atol=0.0)


def test_folded_mlp_forward_equals_the_network():
    for act in ("tanh", "relu"):
        torch.manual_seed(0)
        policy = perturbed(MLPCategoricalPolicy(5, 3, (32, 16, 8), act), 0.5)
        folded = FoldedMLP.build(mlp_spec(policy), policy_params(policy))
        x = 3 * torch.randn(300, 5)
        with torch.no_grad():
            torch.testing.assert_close(folded.forward(x), policy.logits(x), rtol=1e-5, atol=1e-5)


def test_mlp_spec_only_for_unmodified_mlp_policies():
    assert mlp_spec(MLPCategoricalPolicy(4, 2)) is not None
    assert mlp_spec(MLPGaussianPolicy(3, 1)).log_std == "log_std"
    assert mlp_spec(TabularSoftmaxPolicy(3, 2)) is None
    assert mlp_spec(LinearGaussianPolicy(3, 2)) is None

    class Scaled(MLPCategoricalPolicy):
        def logits(self, obs):
            return 2 * self.net(obs)

    assert mlp_spec(Scaled(4, 2)) is None
    odd = MLPCategoricalPolicy(4, 2)
    odd.net[1] = nn.Sigmoid()
    assert mlp_spec(odd) is None


# ------------------------------------------------------------------ score gradients


def random_groups(G: int, B: int, T: int, obs_fn, act_fn, seed: int, empty_group: bool = True):
    """Random ``[G, B, T]`` inputs: prefix masks of random lengths (some 0 and T), weights
    with exact zeros, and (optionally) one group with no valid step at all."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (G, B), generator=g)
    lengths[0, 0], lengths[-1, -1] = T, 1
    mask = torch.arange(T) < lengths[..., None]
    if empty_group:
        mask[G // 2] = False
    weights = torch.randn(G, B, T, generator=g)
    weights[torch.rand(G, B, T, generator=g) < 0.2] = 0.0
    return obs_fn(g, (G, B, T)), act_fn(g, (G, B, T)), weights, mask


def categorical_inputs(obs_dim, n_actions):
    return (lambda g, s: 2 * torch.randn(*s, obs_dim, generator=g),
            lambda g, s: torch.randint(0, n_actions, s, generator=g))


def gaussian_inputs(obs_dim, act_dim):
    return (lambda g, s: 2 * torch.randn(*s, obs_dim, generator=g),
            lambda g, s: torch.randn(*s, act_dim, generator=g))


def tabular_inputs(n_states, n_actions):
    return (lambda g, s: torch.randint(0, n_states, s, generator=g),
            lambda g, s: torch.randint(0, n_actions, s, generator=g))


POLICIES = {
    "categorical_mlp": (lambda: MLPCategoricalPolicy(4, 3), categorical_inputs(4, 3)),
    "categorical_mlp_relu": (lambda: MLPCategoricalPolicy(4, 2, (16, 8), "relu"),
                             categorical_inputs(4, 2)),
    # two actions take the logit-difference head; tanh layers its folded affine maps
    "two_action_mlp_tanh": (lambda: MLPCategoricalPolicy(4, 2, (8, 6)), categorical_inputs(4, 2)),
    "two_action_linear": (lambda: MLPCategoricalPolicy(4, 2, ()), categorical_inputs(4, 2)),
    "categorical_linear": (lambda: MLPCategoricalPolicy(4, 3, ()), categorical_inputs(4, 3)),
    "gaussian_mlp": (lambda: MLPGaussianPolicy(3, 2, init_log_std=-0.3), gaussian_inputs(3, 2)),
    "tabular": (lambda: TabularSoftmaxPolicy(6, 3), tabular_inputs(6, 3)),
    "linear_gaussian": (lambda: LinearGaussianPolicy(3, 2, init_gain_scale=0.5),
                        gaussian_inputs(3, 2)),
}


def assert_grads_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_score_gradients_equal_the_plain_loop(name, chunk):
    make, (obs_fn, act_fn) = POLICIES[name]
    torch.manual_seed(0)
    policy = perturbed(make(), 0.3)
    obs, actions, weights, mask = random_groups(7, 5, 9, obs_fn, act_fn, seed=1)
    got = score_gradients(policy, obs, actions, weights, mask, chunk=chunk)
    want = score_gradients_loop(policy, obs, actions, weights, mask)
    assert_grads_close(got, want)
    assert bool((got[7 // 2] == 0).all()), "a group with no valid step has gradient 0"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_score_gradients_with_groups_split_across_buckets(name, monkeypatch):
    """With a bucket budget smaller than a group, groups are cut into pieces that add up."""
    monkeypatch.setattr(gradients, "PAIR_BUDGET", 7)
    make, (obs_fn, act_fn) = POLICIES[name]
    torch.manual_seed(1)
    policy = perturbed(make(), 0.3)
    obs, actions, weights, mask = random_groups(4, 6, 8, obs_fn, act_fn, seed=2)
    got = score_gradients(policy, obs, actions, weights, mask)
    want = score_gradients_loop(policy, obs, actions, weights, mask)
    assert_grads_close(got, want)


def test_score_gradients_float_masks_scale_the_weights():
    torch.manual_seed(0)
    policy = perturbed(MLPCategoricalPolicy(4, 3), 0.3)
    obs_fn, act_fn = categorical_inputs(4, 3)
    obs, actions, weights, mask = random_groups(3, 4, 5, obs_fn, act_fn, seed=3)
    fmask = mask * torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))
    got = score_gradients(policy, obs, actions, weights, fmask)
    want = score_gradients_loop(policy, obs, actions, weights, fmask)
    assert_grads_close(got, want)


def test_score_gradients_all_zero_weights_give_zero_rows():
    policy = MLPCategoricalPolicy(4, 2)
    obs, actions = torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, dtype=torch.long)
    got = score_gradients(policy, obs, actions, torch.zeros(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.bool))
    assert got.shape == (2, sum(p.numel() for p in policy.parameters())) and not bool(got.any())


def test_score_gradients_on_a_real_rollout_with_per_episode_groups():
    """Groups of one episode (as the optimal-baseline estimator uses) on CartPole data."""
    torch.manual_seed(0)
    env, policy = GymVectorEnv("CartPole-v1"), perturbed(MLPCategoricalPolicy(4, 2), 0.2)
    batch = rollout(env, policy, 40, seed=0)
    w = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(0))
    for groups in (batch.groups(40), batch.groups(8)):
        got = score_gradients(policy, groups.obs, groups.actions, w.reshape(groups.mask.shape), groups.mask)
        want = score_gradients_loop(policy, groups.obs, groups.actions, w.reshape(groups.mask.shape),
                                    groups.mask)
        assert_grads_close(got, want)


def test_plan_buckets_covers_every_row_once():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 40, size=57)
    counts[3] = 0
    n = int(counts.sum())
    starts = np.cumsum(counts) - counts
    for max_pairs, max_groups in ((16, None), (100, 4), (1000, 64)):
        seen = np.zeros(n + 1, dtype=int)
        per_group = np.zeros(len(counts), dtype=int)
        for index, owner in plan_buckets(counts, max_pairs, max_groups):
            assert index.size <= max(max_pairs, index.shape[1])
            assert max_groups is None or index.shape[0] <= max_groups
            for row, g in zip(index, owner):
                real = row[row < n]
                assert bool(((real >= starts[g]) & (real < starts[g] + counts[g])).all())
                per_group[g] += len(real)
            np.add.at(seen, index.reshape(-1), 1)
        assert bool((seen[:n] == 1).all()), "each real row in exactly one bucket slot"
        assert np.array_equal(per_group, counts)
