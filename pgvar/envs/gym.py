"""Gymnasium environments by id, as pgvar ``BatchedEnv``s over Gymnasium's vector API.

``GymVectorEnv("CartPole-v1")`` steps N episodes at once. Where the id has a native
vector implementation (``vector_entry_point``: CartPole-v1 has one, written in numpy)
that is used; otherwise N copies run in a ``SyncVectorEnv`` (Pendulum-v1).

Episode semantics pgvar needs, and how they are obtained from Gymnasium 1.x:

- Gymnasium's vector envs autoreset a lane after its episode ends (by default on the
  *next* ``step`` call, which then ignores that lane's action and returns the reset
  observation with reward 0). pgvar samples each lane's first episode only, so this env
  *freezes* a lane once its first episode has ended: from then on it reports a zero
  observation, reward 0 and neither flag. Nothing of the autoreset episodes reaches a
  ``Batch``, not even in its masked padding.
- ``terminated`` and ``truncated`` are passed on exactly as Gymnasium reports them: the
  env's own time limit (``max_episode_steps``) reports ``truncated``. When the objective's
  ``horizon`` is shorter, ``pgvar.rollout`` cuts at it and marks that step truncated.
- Continuous actions are clipped to the action space's bounds before the env sees them;
  the batch keeps the action the policy sampled (its log-probability is what the
  estimators differentiate).
"""

from __future__ import annotations

import difflib
import functools
import os
import warnings
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec
from gymnasium.vector import VectorEnv

from pgvar.checks import require_int
from pgvar.envs.base import ActionSpec, StepResult, check_objective_constants
from pgvar.envs.registry import register_env

try:  # gymnasium >= 1.1 names its autoreset modes; 1.0 always autoresets on the next step
    from gymnasium.vector import AutoresetMode
except ImportError:  # pragma: no cover - depends on the installed gymnasium
    AutoresetMode = None  # type: ignore[assignment,misc]


def is_installed(env_id: str) -> bool:
    """Whether ``env_id`` can be built here, i.e. its optional extra (MuJoCo, Box2D, ...)
    is installed: ``gymnasium.make`` succeeds (loading the entry point is not enough:
    older MuJoCo ids import their simulator only when built)."""
    try:
        with warnings.catch_warnings():  # deprecation notes of old versions: not ours to print
            warnings.simplefilter("ignore")
            gymnasium.make(env_id).close()
    except Exception:  # noqa: BLE001 - DependencyNotInstalled, DeprecatedEnv, ...: not usable
        return False
    return True


def installed_close_ids(env_id: str, n: int = 5) -> list[str]:
    """Up to ``n`` registered ids close to ``env_id`` whose environments are installed."""
    candidates = difflib.get_close_matches(env_id, list(gymnasium.registry.keys()), n=12,
                                           cutoff=0.5)
    return [c for c in candidates if is_installed(c)][:n]


def gym_spec(env_id: str) -> EnvSpec:
    """The registered ``EnvSpec`` of ``env_id``, or a ``ValueError`` that suggests ids
    (only installed ones: an id whose extra is missing would fail next)."""
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env_id must be a Gymnasium environment id such as 'CartPole-v1', got {env_id!r}")
    try:
        return gymnasium.spec(env_id)
    except gymnasium.error.Error:
        close = installed_close_ids(env_id)
        hint = f" Did you mean one of {close}?" if close else ""
        # raised without the registry's own error: its suggestion ignores what is installed
        raise ValueError(
            f"unknown Gymnasium environment id {env_id!r}.{hint} List the ids with "
            "gymnasium.pprint_registry(); ids of optional families (MuJoCo, Atari, Box2D) "
            "need their extra installed, e.g. pip install 'gymnasium[mujoco]'."
        ) from None


def vectorization_mode_for(spec: EnvSpec) -> str:
    """``"vector_entry_point"`` when the id has a native vector env, else ``"sync"``."""
    return "vector_entry_point" if spec.vector_entry_point is not None else "sync"


def action_spec_of(space: spaces.Space) -> ActionSpec:
    """pgvar's ``ActionSpec`` for one sub-environment's action space."""
    if isinstance(space, spaces.Discrete):
        return ActionSpec(kind="discrete", n=int(space.n))
    if isinstance(space, spaces.Box):
        return ActionSpec(kind="continuous", dim=int(np.prod(space.shape)))
    raise ValueError(f"GymVectorEnv supports Discrete and Box action spaces, got {space}")


def obs_shape_of(space: spaces.Space) -> tuple[int, ...]:
    """Shape of one observation as pgvar hands it out (Discrete ones become one-hot)."""
    if isinstance(space, spaces.Box):
        return tuple(int(d) for d in space.shape)
    if isinstance(space, spaces.Discrete):
        return (int(space.n),)
    raise ValueError(f"GymVectorEnv supports Box and Discrete observation spaces, got {space}")


def env_time_limit(spec: EnvSpec, make_kwargs: dict[str, Any]) -> int | None:
    """The env's own episode step limit: ``max_episode_steps`` if given, else the spec's."""
    limit = make_kwargs.get("max_episode_steps", spec.max_episode_steps)
    return None if limit is None else int(limit)


def resolve_horizon(spec: EnvSpec, horizon: int | None, time_limit: int | None) -> int:
    """The objective's horizon T: the env's own time limit unless a shorter one is asked for."""
    if horizon is None:
        if time_limit is None:
            raise ValueError(f"{spec.id} has no time limit (max_episode_steps); pass horizon=T")
        return time_limit
    horizon = require_int("horizon", horizon)
    if time_limit is not None and horizon > time_limit:
        raise ValueError(
            f"horizon={horizon} exceeds {spec.id}'s own time limit of {time_limit} steps; "
            f"pass max_episode_steps={horizon} to raise the limit, or a horizon <= {time_limit}"
        )
    return horizon


def resident_bytes() -> int | None:
    """This process's resident memory in bytes (Linux ``/proc``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


FALLBACK_LANE_BYTES = 2 << 20  # 2 MiB a lane where resident memory cannot be read
PROBE_LANES = 16


@functools.cache
def lane_bytes_of(env_id: str, mode: str, make_kwargs: tuple = ()) -> int:
    """Memory one more lane of ``env_id``'s vector env takes, measured once per id: the
    growth of resident memory while ``PROBE_LANES`` lanes are built, over their number.
    A lane of a simulator (a MuJoCo model and its data) costs about 1 MiB; a lane of a
    native vector env (CartPole) a few hundred bytes. At least 4 KiB."""
    def build(n: int) -> VectorEnv:
        vec = gymnasium.make_vec(env_id, num_envs=n, vectorization_mode=mode, **dict(make_kwargs))
        vec.reset(seed=0)
        return vec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(1).close()  # imports and one-time set-up are not a lane's cost
        before = resident_bytes()
        vec = build(PROBE_LANES)
        after = resident_bytes()
        vec.close()
    if before is None or after is None:
        return FALLBACK_LANE_BYTES
    return max((after - before) // PROBE_LANES, 4096)


class GymVectorEnv:
    """Any Gymnasium environment id as a ``BatchedEnv``: N seeded episodes on torch tensors.

    ``horizon`` defaults to the env's own ``max_episode_steps`` (500 for CartPole-v1, 200
    for Pendulum-v1); ``make_kwargs`` go to ``gymnasium.make_vec`` (and so to the env
    constructor), e.g. ``max_episode_steps`` or ``g`` for Pendulum. The vector env is
    created once per episode count N and re-seeded by every ``reset``.
    """

    def __init__(self, env_id: str = "CartPole-v1", horizon: int | None = None, gamma: float = 0.99,
                 objective: str = "finite", device: str | torch.device = "cpu", **make_kwargs: Any):
        self.spec = gym_spec(env_id)
        self.make_kwargs = dict(make_kwargs)
        self.time_limit = env_time_limit(self.spec, self.make_kwargs)
        self.horizon = resolve_horizon(self.spec, horizon, self.time_limit)
        check_objective_constants(self.horizon, gamma, objective)
        self.name = env_id
        self.gamma = float(gamma)
        self.objective = objective
        self.device = torch.device(device)
        self.vectorization_mode = vectorization_mode_for(self.spec)
        self._vec: VectorEnv | None = None
        self._n = 0
        self._ended: np.ndarray | None = None  # lanes whose first episode has ended
        self._refill: VectorEnv | None = None  # lanes that autoreset (pgvar.refill)
        self._build(1)  # reads the spaces and checks make_kwargs early
        self.obs_space = self._vec.single_observation_space
        self.act_space = self._vec.single_action_space
        self.obs_shape = obs_shape_of(self.obs_space)
        self.obs_dtype = torch.float32
        self.action_spec = action_spec_of(self.act_space)

    def __repr__(self) -> str:
        return (f"GymVectorEnv({self.name!r}, horizon={self.horizon}, gamma={self.gamma}, "
                f"objective={self.objective!r}, mode={self.vectorization_mode!r})")

    @property
    def lane_bytes(self) -> int:
        """Memory of one lane of this env's vector env (``lane_bytes_of``): what bounds
        how many lanes a Monte Carlo reference runs at once (``pgvar.reference``)."""
        return lane_bytes_of(self.spec.id, self.vectorization_mode,
                             tuple(sorted(self.make_kwargs.items())))

    # -- BatchedEnv -------------------------------------------------------------------

    def reset(self, n: int, seed: int) -> torch.Tensor:
        """Start ``n`` episodes seeded by ``seed``; returns float32 observations ``[n, *obs_shape]``."""
        require_int("n", n)
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer (Gymnasium seeds numpy), got {seed}")
        if int(n) != self._n:
            self._build(int(n))
        obs, _ = self._vec.reset(seed=int(seed))
        self._ended = np.zeros(self._n, dtype=bool)
        return self._obs_to_torch(obs)

    def step(self, actions: torch.Tensor) -> StepResult:
        """Step every lane; lanes whose first episode already ended stay frozen (zeros, no flags)."""
        if self._ended is None:
            raise RuntimeError("call reset(n, seed) before step()")
        obs, reward, terminated, truncated, info = self._vec.step(self._actions_to_env(actions))
        obs = self._final_obs_if_same_step(obs, terminated | truncated, info)
        frozen = self._ended
        obs = self._obs_to_numpy(obs)
        obs[frozen] = 0.0
        reward = np.where(frozen, 0.0, reward).astype(np.float32)
        terminated = np.asarray(terminated, dtype=bool) & ~frozen
        truncated = np.asarray(truncated, dtype=bool) & ~frozen
        self._ended = frozen | terminated | truncated
        return StepResult(obs=self._to_device(obs), reward=self._to_device(reward),
                          terminated=self._to_device(terminated), truncated=self._to_device(truncated))

    # -- lane refill (pgvar.refill) ----------------------------------------------------

    def supports_refill(self) -> bool:
        """Lanes can run episodes back to back: the vector env autoresets on the next step."""
        return self._autoreset_next_step(self._vec)

    def refill_reset(self, n: int, seed: int) -> torch.Tensor:
        """Start ``n`` lanes that autoreset (Gymnasium's next-step mode), with the
        objective's horizon as the env's own time limit, so every episode ends by T."""
        require_int("n", n)
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer (Gymnasium seeds numpy), got {seed}")
        if self._refill is None or self._refill.num_envs != int(n):
            if self._refill is not None:
                self._refill.close()
            kwargs = {**self.make_kwargs, "max_episode_steps": self.horizon}
            self._refill = gymnasium.make_vec(self.spec.id, num_envs=int(n),
                                              vectorization_mode=self.vectorization_mode, **kwargs)
            if not self._autoreset_next_step(self._refill):
                raise TypeError(f"{self.name} does not autoreset on the next step; lanes cannot refill")
        obs, _ = self._refill.reset(seed=int(seed))
        return self._obs_to_torch(obs)

    def refill_step(self, actions: torch.Tensor) -> StepResult:
        """Step every refill lane; a lane that ended at the previous call comes back with its
        next episode's first observation (Gymnasium ignores its action, reward 0, no flags)."""
        if self._refill is None:
            raise RuntimeError("call refill_reset(n, seed) before refill_step()")
        vec = self._refill
        obs, reward, terminated, truncated, _ = vec.step(self._actions_to_env(actions, vec.num_envs))
        return StepResult(obs=self._obs_to_torch(obs),
                          reward=self._to_device(np.asarray(reward, dtype=np.float32)),
                          terminated=self._to_device(np.asarray(terminated, dtype=bool)),
                          truncated=self._to_device(np.asarray(truncated, dtype=bool)))

    @staticmethod
    def _autoreset_next_step(vec: VectorEnv) -> bool:
        if AutoresetMode is None:  # gymnasium 1.0: always the next step
            return True
        return vec.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP) == AutoresetMode.NEXT_STEP

    def close(self) -> None:
        """Release the cached vector envs."""
        for vec in (self._vec, self._refill):
            if vec is not None:
                vec.close()
        self._vec, self._n, self._ended, self._refill = None, 0, None, None

    # -- helpers ----------------------------------------------------------------------

    def _build(self, n: int) -> None:
        """(Re)create the vector env for ``n`` lanes; creating is costly, so it is cached."""
        if self._vec is not None:
            self._vec.close()
        try:
            self._vec = gymnasium.make_vec(self.spec.id, num_envs=n,
                                           vectorization_mode=self.vectorization_mode, **self.make_kwargs)
        except TypeError as err:
            raise ValueError(f"{self.spec.id} refused the arguments {sorted(self.make_kwargs)}: {err}") from err
        self._n = n
        self._same_step = AutoresetMode is not None and \
            self._vec.metadata.get("autoreset_mode") == AutoresetMode.SAME_STEP

    def _final_obs_if_same_step(self, obs: Any, done: np.ndarray, info: dict) -> Any:
        """Under same-step autoreset the true last observation sits in ``info``; put it back."""
        if not self._same_step or not np.any(done):
            return obs
        obs = np.array(obs, copy=True)
        for i in np.flatnonzero(info.get("_final_obs", done)):
            obs[i] = info["final_obs"][i]
        return obs

    def _obs_to_numpy(self, obs: Any) -> np.ndarray:
        """A fresh float32 ``[n, *obs_shape]`` array (one-hot for Discrete observations)."""
        if isinstance(self.obs_space, spaces.Discrete):
            index = np.asarray(obs, dtype=np.int64) - int(self.obs_space.start)
            return np.eye(int(self.obs_space.n), dtype=np.float32)[index]
        return np.array(obs, dtype=np.float32, copy=True)

    def _obs_to_torch(self, obs: Any) -> torch.Tensor:
        return self._to_device(self._obs_to_numpy(obs))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def _actions_to_env(self, actions: torch.Tensor, n: int | None = None) -> np.ndarray:
        """Torch actions as the vector env wants them: ints, or floats clipped to the Box."""
        n = self._n if n is None else n
        a = actions.detach().cpu().numpy()
        if a.shape[0] != n:
            raise ValueError(f"expected actions for {n} lanes, got shape {tuple(a.shape)}")
        space = self.act_space
        if isinstance(space, spaces.Discrete):
            return a.astype(np.int64).reshape(n) + int(space.start)
        a = a.astype(space.dtype).reshape(n, *space.shape)
        return np.clip(a, space.low, space.high)


# -- registry names ------------------------------------------------------------------------


@register_env("gym")
def make_gym_env(env_id: str, horizon: int | None = None, gamma: float = 0.99, objective: str = "finite",
                 device: str | torch.device = "cpu", **make_kwargs: Any) -> GymVectorEnv:
    """Any Gymnasium id, e.g. ``make_env("gym", env_id="Acrobot-v1")``."""
    return GymVectorEnv(env_id, horizon=horizon, gamma=gamma, objective=objective, device=device,
                        **make_kwargs)


@register_env("cartpole")
def make_cartpole(horizon: int | None = None, gamma: float = 0.99, objective: str = "finite",
                  device: str | torch.device = "cpu", **make_kwargs: Any) -> GymVectorEnv:
    """CartPole-v1 (native numpy vector env; time limit 500 steps)."""
    return make_gym_env("CartPole-v1", horizon, gamma, objective, device, **make_kwargs)


@register_env("pendulum")
def make_pendulum(horizon: int | None = None, gamma: float = 0.99, objective: str = "finite",
                  device: str | torch.device = "cpu", **make_kwargs: Any) -> GymVectorEnv:
    """Pendulum-v1 (sync vector env; time limit 200 steps; torque clipped to [-2, 2])."""
    return make_gym_env("Pendulum-v1", horizon, gamma, objective, device, **make_kwargs)
