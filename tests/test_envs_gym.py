"""GymVectorEnv: Gymnasium environments by id as pgvar batched environments."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch

from pgvar.batch import Batch
from pgvar.envs.base import BatchedEnv
from pgvar.envs.gym import GymVectorEnv
from pgvar.envs.registry import available_envs, make_env, make_policy
from pgvar.policies import MLPCategoricalPolicy, MLPGaussianPolicy
from pgvar.rollout import rollout


def cartpole_policy(seed: int = 0) -> MLPCategoricalPolicy:
    torch.manual_seed(seed)
    return MLPCategoricalPolicy(4, 2)


def pendulum_policy(seed: int = 0) -> MLPGaussianPolicy:
    torch.manual_seed(seed)
    return MLPGaussianPolicy(3, 1)


def assert_batches_equal(a: Batch, b: Batch) -> None:
    for name in ("obs", "actions", "rewards", "next_obs", "terminated", "truncated", "mask", "logp"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


class ConstantAction(torch.nn.Module):
    """A 'policy' that always emits the same continuous action (to probe clipping)."""

    def __init__(self, value: float, dim: int = 1):
        super().__init__()
        self.value, self.dim = value, dim

    def sample(self, obs, generator=None):
        return torch.full((obs.shape[0], self.dim), self.value)

    def log_prob(self, obs, actions):
        return torch.zeros(obs.shape[0])


# -- interface and shapes ------------------------------------------------------------------


def test_cartpole_is_a_batched_env_with_gymnasium_defaults():
    env = GymVectorEnv("CartPole-v1")
    assert isinstance(env, BatchedEnv)
    assert env.vectorization_mode == "vector_entry_point"
    assert (env.horizon, env.obs_shape, env.obs_dtype) == (500, (4,), torch.float32)
    assert (env.action_spec.kind, env.action_spec.n) == ("discrete", 2)


def test_pendulum_uses_sync_vector_env():
    env = GymVectorEnv("Pendulum-v1")
    assert env.vectorization_mode == "sync"
    assert (env.horizon, env.obs_shape) == (200, (3,))
    assert (env.action_spec.kind, env.action_spec.dim) == ("continuous", 1)


def test_cartpole_rollout_shapes_and_dtypes():
    batch = rollout(GymVectorEnv("CartPole-v1"), cartpole_policy(), 32, seed=0)
    N, T = batch.rewards.shape
    assert N == 32 and 1 <= T <= 500
    assert batch.obs.shape == batch.next_obs.shape == (N, T, 4)
    assert batch.obs.dtype == batch.next_obs.dtype == batch.rewards.dtype == torch.float32
    assert batch.actions.shape == (N, T) and batch.actions.dtype == torch.long
    for flag in (batch.terminated, batch.truncated, batch.mask):
        assert flag.shape == (N, T) and flag.dtype == torch.bool


def test_pendulum_rollout_shapes_and_dtypes():
    batch = rollout(GymVectorEnv("Pendulum-v1", horizon=20), pendulum_policy(), 6, seed=0)
    assert batch.obs.shape == batch.next_obs.shape == (6, 20, 3)
    assert batch.actions.shape == (6, 20, 1) and batch.actions.dtype == torch.float32
    assert batch.rewards.shape == (6, 20) and batch.rewards.dtype == torch.float32
    assert bool(batch.mask.all()) and bool((batch.rewards <= 0).all())


# -- determinism and the cached vector env -------------------------------------------------


@pytest.mark.parametrize("env_id, make_policy", [("CartPole-v1", cartpole_policy),
                                                 ("Pendulum-v1", pendulum_policy)])
def test_same_seed_gives_identical_batch(env_id, make_policy):
    env, policy = GymVectorEnv(env_id, horizon=50), make_policy()
    first = rollout(env, policy, 8, seed=3)
    again = rollout(env, policy, 8, seed=3)
    fresh_env = rollout(GymVectorEnv(env_id, horizon=50), policy, 8, seed=3)
    assert_batches_equal(first, again)
    assert_batches_equal(first, fresh_env)
    other = rollout(env, policy, 8, seed=4)
    assert not torch.equal(first.obs[:, 0], other.obs[:, 0])


def test_episode_count_can_change_between_calls():
    env, policy = GymVectorEnv("CartPole-v1"), cartpole_policy()
    eight = rollout(env, policy, 8, seed=1)
    three = rollout(env, policy, 3, seed=1)
    eight_again = rollout(env, policy, 8, seed=1)
    assert eight.n_episodes == 8 and three.n_episodes == 3
    assert_batches_equal(eight, eight_again)


# -- episode ends: terminated vs truncated, masks, no autoreset leak -----------------------


def test_cartpole_episodes_end_once_and_masks_follow():
    batch = rollout(GymVectorEnv("CartPole-v1"), cartpole_policy(), 64, seed=0)
    ends = batch.terminated | batch.truncated
    assert not bool((batch.terminated & batch.truncated).any())
    assert bool((ends.sum(dim=1) == 1).all()), "every episode ends exactly once"
    lengths = batch.lengths
    last = ends.float().argmax(dim=1)
    assert torch.equal(last + 1, lengths), "the end is the last masked step"
    t = batch.time_index
    assert torch.equal(batch.mask, t < lengths[:, None]), "mask is a prefix of ones"
    assert torch.equal(batch.rewards.sum(dim=1), lengths.float()), "CartPole pays 1 per step"
    # an untrained policy drops the pole: the final next_obs is really past a threshold
    term = batch.terminated.any(dim=1)
    assert bool(term.all())
    final = batch.next_obs[torch.arange(64), last]
    assert bool(((final[:, 0].abs() > 2.4) | (final[:, 2].abs() > 12 * 2 * np.pi / 360)).all())


def test_nothing_after_the_first_episode_leaks_into_the_batch():
    batch = rollout(GymVectorEnv("CartPole-v1"), cartpole_policy(), 64, seed=0)
    after = ~batch.mask
    assert bool(after.any()), "some lanes must end early for this test to bite"
    assert bool((batch.next_obs[after] == 0).all())
    # obs in the first padded column is the first episode's own terminal state; then zeros
    rows, L = torch.arange(64), batch.lengths
    padded_obs = batch.obs.clone()
    has_pad = L < batch.horizon
    assert torch.equal(padded_obs[rows[has_pad], L[has_pad]], batch.next_obs[rows[has_pad], L[has_pad] - 1])
    padded_obs[rows[has_pad], L[has_pad]] = 0
    assert bool((padded_obs[after] == 0).all())
    for name in ("rewards", "logp"):
        assert bool((getattr(batch, name)[after] == 0).all()), name
    assert not bool((batch.terminated | batch.truncated)[after].any())


def test_first_episode_matches_raw_gymnasium_then_lane_freezes():
    """Up to each lane's end the env reports exactly what Gymnasium does; after it, zeros."""
    n, seed = 16, 5
    raw = gymnasium.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point")
    raw_obs, _ = raw.reset(seed=seed)
    env = GymVectorEnv("CartPole-v1")
    obs = env.reset(n, seed)
    np.testing.assert_array_equal(obs.numpy(), raw_obs)
    rng = np.random.default_rng(0)
    ended = np.zeros(n, dtype=bool)
    raw_autoreset_seen = False
    for _ in range(60):
        actions = rng.integers(0, 2, size=n)
        r_obs, r_rew, r_term, r_trunc, _ = raw.step(actions)
        res = env.step(torch.from_numpy(actions))
        live = ~ended
        np.testing.assert_array_equal(res.obs.numpy()[live], r_obs[live])
        np.testing.assert_array_equal(res.reward.numpy()[live], r_rew[live])
        np.testing.assert_array_equal(res.terminated.numpy()[live], r_term[live])
        np.testing.assert_array_equal(res.truncated.numpy()[live], r_trunc[live])
        assert bool((res.obs[torch.from_numpy(ended)] == 0).all())
        assert not bool((res.reward.numpy()[ended]).any())
        assert not bool((res.terminated.numpy() | res.truncated.numpy())[ended].any())
        raw_autoreset_seen |= bool((r_obs[ended] != 0).any())
        ended |= r_term | r_trunc
    assert ended.any() and raw_autoreset_seen, "gymnasium autoreset lanes that pgvar froze"


def test_env_time_limit_reports_truncated_as_gymnasium_does():
    for env_id, n_actions in (("CartPole-v1", None), ("Pendulum-v1", 1)):
        env = GymVectorEnv(env_id, max_episode_steps=3)
        assert env.horizon == 3
        env.reset(4, seed=0)
        action = torch.zeros(4, dtype=torch.long) if n_actions is None else torch.zeros(4, 1)
        flags = [env.step(action) for _ in range(3)]
        assert not any(bool(f.truncated.any()) for f in flags[:2])
        assert bool((flags[2].truncated | flags[2].terminated).all())
        assert bool(flags[2].truncated.any())


def test_short_horizon_truncates_pendulum_at_its_last_step():
    batch = rollout(GymVectorEnv("Pendulum-v1", horizon=10), pendulum_policy(), 5, seed=0)
    assert batch.horizon == 10
    assert bool(batch.truncated[:, 9].all()) and not bool(batch.truncated[:, :9].any())
    assert not bool(batch.terminated.any())
    assert bool(batch.mask.all())


def test_short_horizon_truncates_cartpole_lanes_still_alive():
    batch = rollout(GymVectorEnv("CartPole-v1", horizon=12), cartpole_policy(), 64, seed=0)
    alive_at_end = batch.mask[:, -1]
    assert batch.horizon == 12 and bool(alive_at_end.any())
    ended_last = batch.terminated[:, -1] | batch.truncated[:, -1]
    assert torch.equal(ended_last, alive_at_end)
    assert torch.equal(batch.truncated[:, -1], alive_at_end & ~batch.terminated[:, -1])
    assert bool((batch.terminated.any(dim=1) | batch.truncated.any(dim=1)).all())


# -- continuous actions: clipped for the env, recorded as sampled --------------------------


def test_out_of_bounds_actions_are_clipped_for_env_but_recorded_as_sampled():
    env = GymVectorEnv("Pendulum-v1", horizon=5)
    seen: list[np.ndarray] = []
    env.reset(3, seed=0)
    vec_step = env._vec.step

    def spy(actions):
        seen.append(np.array(actions))
        return vec_step(actions)

    env._vec.step = spy
    batch = rollout(env, ConstantAction(5.0), 3, seed=0)
    assert bool((batch.actions == 5.0).all()), "the batch keeps the sampled action"
    assert seen and all(a.dtype == np.float32 and np.all(a == 2.0) for a in seen)
    at_bound = rollout(GymVectorEnv("Pendulum-v1", horizon=5), ConstantAction(2.0), 3, seed=0)
    assert torch.equal(batch.next_obs, at_bound.next_obs)
    assert torch.equal(batch.rewards, at_bound.rewards)
    low = rollout(GymVectorEnv("Pendulum-v1", horizon=5), ConstantAction(-7.0), 3, seed=0)
    low_bound = rollout(GymVectorEnv("Pendulum-v1", horizon=5), ConstantAction(-2.0), 3, seed=0)
    assert torch.equal(low.next_obs, low_bound.next_obs)


# -- other spaces --------------------------------------------------------------------------


def test_discrete_observations_become_one_hot():
    env = GymVectorEnv("FrozenLake-v1", horizon=20)
    assert env.obs_shape == (16,)
    torch.manual_seed(0)
    batch = rollout(env, MLPCategoricalPolicy(16, 4), 4, seed=0)
    live = batch.obs[batch.mask]
    assert torch.equal(live.sum(dim=-1), torch.ones(live.shape[0]))
    assert torch.equal(batch.obs[:, 0].argmax(dim=-1), torch.zeros(4, dtype=torch.long))


# -- validation ----------------------------------------------------------------------------


def test_unknown_env_id_suggests_installed_ids():
    with pytest.raises(ValueError, match="unknown Gymnasium environment id") as err:
        GymVectorEnv("Cartpole-v1")
    assert "CartPole-v1" in str(err.value)


def test_suggestions_leave_out_ids_whose_extra_is_missing():
    """'Nope-v0' is close to 'Hopper-v5'; it is suggested only where MuJoCo is installed."""
    from pgvar.envs.gym import installed_close_ids, is_installed

    suggested = installed_close_ids("Nope-v0")
    assert ("Hopper-v5" in suggested) == is_installed("Hopper-v5")
    assert all(is_installed(i) for i in suggested)


def test_refused_gym_id_is_described_once():
    """The config error wraps the env's: the message appears once, not once per cause."""
    from pgvar.cli import CommandLine, validate_jobs

    problems = validate_jobs(CommandLine(["env=gym", "env.env_id=Nope-v0", "preset=smoke"]))
    assert len(problems) == 1
    assert problems[0].count("unknown Gymnasium environment id") == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"horizon": 0}, "horizon"),
    ({"horizon": 2.5}, "horizon"),
    ({"horizon": 501}, "time limit"),
    ({"gamma": 1.5}, "gamma"),
    ({"gamma": -0.1}, "gamma"),
    ({"objective": "average"}, "objective"),
])
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GymVectorEnv("CartPole-v1", **kwargs)


def test_longer_horizon_needs_a_raised_time_limit():
    env = GymVectorEnv("CartPole-v1", horizon=800, max_episode_steps=800)
    assert env.horizon == env.time_limit == 800


def test_reset_refuses_bad_arguments():
    env = GymVectorEnv("CartPole-v1")
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="n must"):
        env.reset(0, seed=0)
    env.reset(4, seed=0)
    with pytest.raises(ValueError, match="4 lanes"):
        env.step(torch.zeros(3, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rollout_on_cuda():
    env = GymVectorEnv("CartPole-v1", device="cuda")
    batch = rollout(env, cartpole_policy().cuda(), 16, seed=0)
    assert batch.obs.device.type == "cuda"
    cpu = rollout(GymVectorEnv("CartPole-v1"), cartpole_policy(), 16, seed=0)
    assert torch.equal(batch.lengths.cpu(), cpu.lengths)


# -- registry --------------------------------------------------------------------------------


def test_registry_names_build_gym_envs_and_their_policies():
    assert {"cartpole", "pendulum", "gym"} <= set(available_envs())
    cartpole = make_env("cartpole", horizon=50, gamma=0.9)
    assert isinstance(cartpole, GymVectorEnv) and cartpole.name == "CartPole-v1"
    assert (cartpole.horizon, cartpole.gamma) == (50, 0.9)
    policy = make_policy(cartpole)
    assert isinstance(policy, MLPCategoricalPolicy)
    assert rollout(cartpole, policy, 4, seed=0).obs.shape[-1] == 4
    pendulum = make_env("pendulum")
    assert pendulum.name == "Pendulum-v1" and pendulum.horizon == 200
    assert isinstance(make_policy(pendulum), MLPGaussianPolicy)
    acrobot = make_env("gym", env_id="Acrobot-v1", horizon=30)
    assert acrobot.obs_shape == (6,) and acrobot.action_spec.n == 3
    assert isinstance(make_policy(acrobot), MLPCategoricalPolicy)


def test_unknown_make_kwargs_are_refused_clearly():
    with pytest.raises(ValueError, match="refused the arguments"):
        make_env("pendulum", gravity_typo=9.8)
