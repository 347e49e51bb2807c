"""Structured configs of ``pgvar-run``: typed dataclasses registered in Hydra's ConfigStore.

The YAML files in ``conf/`` choose values; the dataclasses here fix the schema. Hydra
checks types and unknown keys when it composes (``training.batch_size=abc`` or
``env.nope=1`` are refused there). Ranges and names (``env.gamma=1.5``,
``estimator.lam=-1``, ``training.batch_size=0``, an unknown estimator) are checked by
``validate_config``, which the console entry point runs on every job of a sweep before
Hydra starts any of them (see ``pgvar.cli.main``). Every field documents itself in the
comment next to it (the estimator's knobs in ``pgvar.estimators.EstimatorConfig``,
declared there once); ``pgvar-run --cfg job`` prints the composed values.

Layout of the composed config (``conf/config.yaml`` is the primary config)::

    seed, device, lr, threads, rerun_complete, preset_name
    env:        EnvConfig subclass, chosen by the ``env`` group (tabular, chain, lqr,
                cartpole, pendulum, gym)
    estimator:  EstimatorSettings, chosen by the ``estimator`` group (one file per name)
    policy:     PolicySettings, chosen by the ``policy`` group (default, small, large)
    training:   TrainingConfig, sized by the ``preset`` group (smoke, quick, full)
    debug:      DebugConfig, test-only switches
"""

from __future__ import annotations

import hashlib
import inspect
import re
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from functools import partial
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pgvar import checks, runlog
from pgvar.critics import CRITIC_KINDS
from pgvar.envs.base import OBJECTIVES
from pgvar.estimators import EstimatorConfig, check_estimator_knobs
from pgvar.paired import parse_spec

POLICY_ACTIVATIONS = ("tanh", "relu")
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|auto)$")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the valid values."""


# ----------------------------------------------------------------------------- checks
# pgvar.checks' rules, raising ConfigError (a configuration value, named by its key).

require = partial(checks.require, error=ConfigError)
require_positive_int = partial(checks.require_int, error=ConfigError)
require_in_range = partial(checks.require_in_range, error=ConfigError)
require_choice = partial(checks.require_choice, error=ConfigError)


def require_widths(key: str, hidden: list[int]) -> None:
    """Hidden layer widths: a non-empty list of positive integers."""
    require(len(hidden) >= 1 and all(isinstance(h, int) and h >= 1 for h in hidden),
            f"{key} must be a non-empty list of positive integers, got {list(hidden)}")


# ------------------------------------------------------------------------ environments


@dataclass
class EnvConfig:
    """Fields every environment shares: the objective J = E[sum_{t<T} gamma^t r_t]."""

    name: str = MISSING  # registry name passed to pgvar.envs.registry.make_env
    horizon: int | None = None  # T: steps per episode that count in J (gym: None = the env's time limit)
    gamma: float = 0.99  # discount in [0, 1]
    objective: str = "finite"  # "finite": horizon is part of J; "discounted": infinite-horizon J (gamma < 1)

    # Environments with an exact objective have no time limit of their own: T must be set.
    needs_horizon: ClassVar[bool] = False

    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``make_env``: every field except ``name``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}

    def check(self) -> None:
        """Range checks shared by all environments."""
        require(self.horizon is not None or not self.needs_horizon,
                f"env.horizon must be set for env={self.name}")
        if self.horizon is not None:
            require_positive_int("env.horizon", self.horizon)
        require_in_range("env.gamma", self.gamma, 0.0, 1.0)
        require_choice("env.objective", self.objective, OBJECTIVES)
        require(not (self.objective == "discounted" and self.gamma >= 1.0),
                "env.objective=discounted needs env.gamma < 1 (the infinite sum diverges)")


@dataclass
class TabularEnvConfig(EnvConfig):
    """A random tabular MDP (exact gradient by dynamic programming): transitions and
    rewards drawn once from the instance seed."""

    needs_horizon: ClassVar[bool] = True
    name: str = "tabular"
    horizon: int | None = 10  # T
    n_states: int = 5  # number of states
    n_actions: int = 3  # number of actions
    seed: int = 0  # seed of the random instance (transitions, rewards): the same MDP for every run seed

    def check(self) -> None:
        super().check()
        require_positive_int("env.n_states", self.n_states)
        require_positive_int("env.n_actions", self.n_actions)


@dataclass
class ChainEnvConfig(EnvConfig):
    """The sparse-reward chain: reward only at the far end (exact gradient)."""

    needs_horizon: ClassVar[bool] = True
    name: str = "chain"
    horizon: int | None = 16  # T
    length: int = 8  # number of states in the chain (>= 2)
    slip: float = 0.0  # probability in [0, 1] that an action has the opposite effect

    def check(self) -> None:
        super().check()
        require_positive_int("env.length", self.length, 2)
        require_in_range("env.slip", self.slip, 0.0, 1.0)


@dataclass
class LQREnvConfig(EnvConfig):
    """Linear-quadratic control x' = A x + B u + noise (exact gradient by moments)."""

    needs_horizon: ClassVar[bool] = True
    name: str = "lqr"
    horizon: int | None = 20  # T
    state_dim: int = 2  # dimension of x
    action_dim: int = 1  # dimension of u
    spectral_radius: float = 0.9  # spectral radius of the random A
    control_cost: float = 0.1  # weight of |u|^2 in the cost
    process_noise: float = 0.1  # std of the additive state noise
    init_std: float = 0.5  # std of the initial state
    seed: int = 0  # seed of the random instance (A, B): the same system for every run seed
    nested_actions: bool = False  # A, m_0 and B's first columns the same for every action_dim

    def check(self) -> None:
        super().check()
        require_positive_int("env.state_dim", self.state_dim)
        require_positive_int("env.action_dim", self.action_dim)
        for key in ("spectral_radius", "control_cost", "process_noise", "init_std"):
            require_in_range(f"env.{key}", getattr(self, key), 0.0, float("inf"), high_open=True)


@dataclass
class GymEnvConfig(EnvConfig):
    """A Gymnasium environment through its vector API (Monte Carlo reference gradient)."""

    name: str = "gym"
    env_id: str = "CartPole-v1"  # Gymnasium id (used by env=gym only)
    make_kwargs: dict[str, Any] = field(default_factory=dict)  # extra gymnasium.make_vec kwargs

    def env_kwargs(self) -> dict[str, Any]:
        kwargs = {"env_id": self.env_id, "horizon": self.horizon, "gamma": self.gamma,
                  "objective": self.objective}
        kwargs.update(dict(self.make_kwargs))
        return kwargs


@dataclass
class NamedGymEnvConfig(EnvConfig):
    """A Gymnasium environment with a pgvar short name (cartpole, pendulum)."""

    make_kwargs: dict[str, Any] = field(default_factory=dict)  # extra gymnasium.make_vec kwargs

    def env_kwargs(self) -> dict[str, Any]:
        kwargs = {"horizon": self.horizon, "gamma": self.gamma, "objective": self.objective}
        kwargs.update(dict(self.make_kwargs))
        return kwargs


@dataclass
class SequenceEnvConfig(EnvConfig):
    """Prompts and completions with a verifiable 0/1 reward (pgvar.envs.sequence): exact
    J, grad J, success rates, expected length and KL by enumerating every completion."""

    name: str = "sequence"
    horizon: int | None = 5  # L: maximum completion length in tokens (end token included)
    gamma: float = 1.0  # must be 1: one reward per completion
    n_prompts: int = 6  # Q prompts, drawn uniformly
    vocab: int = 4  # V tokens; token 0 ends a completion
    max_answer_len: int = 3  # answer lengths cycle 1..max_answer_len over the prompts (<= L-1)
    seed: int = 0  # seed of the instance (accepted answer tokens): the same task for every run seed
    policy: str = "table"  # table (a softmax per prompt and prefix) or transformer (shared parameters)
    d_model: int = 32  # transformer width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 2  # attention heads (divide d_model)

    def check(self) -> None:
        super().check()
        require(self.horizon is not None, "env.horizon (the maximum length L) must be set for sequence")
        require(self.gamma == 1.0, f"env.gamma must be 1 for sequence (one reward per completion), got {self.gamma}")
        require_positive_int("env.n_prompts", self.n_prompts)
        require_positive_int("env.vocab", self.vocab, 2)
        require_positive_int("env.max_answer_len", self.max_answer_len)
        require_choice("env.policy", self.policy, ("table", "transformer"))
        for key in ("d_model", "n_layers", "n_heads"):
            require_positive_int(f"env.{key}", getattr(self, key))


ENV_SCHEMAS: dict[str, type] = {
    "sequence": SequenceEnvConfig,
    "tabular": TabularEnvConfig,
    "chain": ChainEnvConfig,
    "lqr": LQREnvConfig,
    "gym": GymEnvConfig,
    "named_gym": NamedGymEnvConfig,
}


# -------------------------------------------------------------------------- estimators


def _estimator_core_kwargs(self) -> dict[str, Any]:
    """Keyword arguments for ``pgvar.estimators.EstimatorConfig``: every field but ``name``."""
    return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


def _check_estimator(self) -> None:
    """``EstimatorConfig``'s own range rules, with the keys named ``estimator.*``."""
    check_estimator_knobs(self, prefix="estimator", error=ConfigError)


def _estimator_fields() -> list[tuple[str, Any, Any]]:
    """``name`` (the registry name, from the ``estimator`` group) and then every knob of
    ``pgvar.estimators.EstimatorConfig`` with its type and default: declared there once."""
    hints = typing.get_type_hints(EstimatorConfig)
    knobs = [(f.name, hints[f.name], field(default=f.default)) for f in fields(EstimatorConfig)]
    return [("name", str, field(default=MISSING)), *knobs]


EstimatorSettings = make_dataclass(
    "EstimatorSettings", _estimator_fields(),
    namespace={"__module__": __name__, "core_kwargs": _estimator_core_kwargs,
               "check": _check_estimator,
               "__doc__": "Which gradient estimator a run trains and is measured with: "
                          "``name`` (pgvar.estimators.ESTIMATORS) and the fields of "
                          "``pgvar.estimators.EstimatorConfig``."})


# ---------------------------------------------------------------------------- policies


@dataclass
class PolicySettings:
    """Options of the environment's natural policy (``pgvar.envs.registry.make_policy``).

    Only the options the policy class accepts are passed on: ``hidden`` and
    ``activation`` reach MLP policies, ``init_scale`` the tabular softmax,
    ``init_gain_scale`` the linear-Gaussian one, ``init_log_std`` Gaussian ones.
    """

    hidden: list[int] = field(default_factory=lambda: [64, 64])  # MLP hidden layer widths
    activation: str = "tanh"  # MLP activation
    init_log_std: float | None = None  # Gaussian policies: initial log std (null = the class default)
    init_scale: float = 0.0  # tabular softmax: std of the initial logits (0 = uniform policy)
    init_gain_scale: float = 0.0  # linear-Gaussian: std of the initial gain K

    def check(self) -> None:
        require_widths("policy.hidden", self.hidden)
        require_choice("policy.activation", self.activation, POLICY_ACTIVATIONS)
        require_in_range("policy.init_scale", self.init_scale, 0.0, float("inf"), high_open=True)
        require_in_range("policy.init_gain_scale", self.init_gain_scale, 0.0, float("inf"),
                         high_open=True)


# ---------------------------------------------------------------------------- training


@dataclass
class CriticConfig:
    """The critic of estimators that need one (value_baseline, actor_critic, gae, ppo)."""

    kind: str = "auto"  # auto (tabular / quadratic / mlp by env), tabular, quadratic, mlp, exact (tabular envs: true V)
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # MLP critic hidden widths
    fit_steps: int = 50  # regression steps on each training batch, after the policy step
    lr: float = 0.01  # regression step size
    perturb_scale: float = 0.0  # kind=exact only: std of fixed noise added to the true V (a deliberately imperfect critic)

    def check(self) -> None:
        require_choice("training.critic.kind", self.kind, CRITIC_KINDS)
        require_widths("training.critic.hidden", self.hidden)
        require_positive_int("training.critic.fit_steps", self.fit_steps, 0)
        require_in_range("training.critic.lr", self.lr, 0.0, float("inf"), low_open=True,
                         high_open=True)
        require_in_range("training.critic.perturb_scale", self.perturb_scale, 0.0, float("inf"),
                         high_open=True)


# the alternate reference's estimators for ``alternate: auto``, in order: critic-free, unbiased
AUTO_ALTERNATES = ("rloo", "reinforce_rtg")


@dataclass
class ReferenceConfig:
    """The Monte Carlo reference gradient of environments without an exact one.

    Exact environments (tabular, chain, lqr) ignore this section: their reference is
    autograd of J. Elsewhere the reference is the mean of ``estimator`` over sub-batches
    of ``batch_size`` fresh episodes, with its standard error (``pgvar.reference``).
    """

    n_episodes: int = 2000  # episodes per reference (the cap when target_rel_se is set)
    target_rel_se: float | None = None  # stop early once SE/|g_ref| <= this (null: use all n_episodes)
    estimator: str = "reinforce_rtg"  # an unbiased estimator; value_baseline uses the run's critic
    batch_size: int = 4  # episodes per sub-batch estimate (its spread gives the SE)
    chunk_episodes: int = 1024  # episodes rolled out at once (bounds memory)
    # Gymnasium envs: lanes that start a new episode when one ends (pgvar.refill; 0: one
    # episode per lane). 512 was fastest for 2000-episode references on CartPole here.
    lanes: int = 512
    memory_mb: float = 512.0  # what one chunk may hold; chunk and lanes shrink to fit (pgvar.reference.chunk_plan)
    # a second reference from this DIFFERENT unbiased estimator (same budget, disjoint
    # episodes), made only at steps where a measured row would otherwise be tested against
    # its own estimator (pgvar.paired.is_circular); auto: the first of AUTO_ALTERNATES
    # that is not ``estimator``; null: such rows are flagged ref_circular
    alternate: str | None = "auto"

    def alternate_estimator(self) -> str | None:
        """The alternate reference's estimator, ``auto`` resolved (None: no alternate)."""
        if self.alternate == "auto":
            return next(name for name in AUTO_ALTERNATES if name != self.estimator)
        return self.alternate

    def check(self) -> None:
        require_positive_int("training.reference.n_episodes", self.n_episodes, 2)
        require(self.alternate_estimator() != self.estimator,
                f"training.reference.alternate ({self.alternate}) must differ from "
                f"training.reference.estimator ({self.estimator}), or be null")
        require_in_range("training.reference.memory_mb", self.memory_mb, 0.0, float("inf"),
                         low_open=True, high_open=True)
        if self.target_rel_se is not None:
            require_in_range("training.reference.target_rel_se", self.target_rel_se, 0.0,
                             float("inf"), low_open=True, high_open=True)
        require_positive_int("training.reference.batch_size", self.batch_size)
        require_positive_int("training.reference.chunk_episodes", self.chunk_episodes)
        require(isinstance(self.lanes, int) and not isinstance(self.lanes, bool) and self.lanes >= 0,
                f"training.reference.lanes must be a non-negative integer (0: no refill), got {self.lanes!r}")
        require(self.n_episodes >= 2 * self.batch_size,
                f"training.reference.n_episodes ({self.n_episodes}) must be at least twice "
                f"training.reference.batch_size ({self.batch_size}) for a standard error")


@dataclass
class MeasureConfig:
    """What a measured step scores besides the training estimator (``pgvar.paired``).

    Every estimator listed is scored on the same M x B episodes as the training
    estimator and against the same reference (a paired comparison); rows go to the job's
    paired.csv, one per estimator and critic. Cost: about one estimator's gradients per
    row, plus ``sum(critic_episodes)`` extra episodes a measured step for fresh critics.
    """

    # estimator specs: a registry name ("gae") or name(knob=value,...) ("gae(lam=0.5)")
    estimators: list[str] = field(default_factory=list)
    # critic-based estimators are also scored with a fresh critic fitted on this many
    # episodes of the measured policy each (e.g. [32, 320]): critic quality as a factor
    critic_episodes: list[int] = field(default_factory=list)
    critic_fit_steps: int = 200  # regression steps of a fresh MLP critic (closed-form critics ignore it)
    exact_critic: bool = False  # tabular envs: also score critic-based estimators with the true V
    checkpoints: bool = True  # save the policy (and critic) at each measured step (checkpoints/)

    def check(self) -> None:
        for text in self.estimators:
            try:
                parse_spec(text)
            except ValueError as err:
                raise ConfigError(f"training.measure.estimators: {err}") from None
        for n in self.critic_episodes:
            require_positive_int("training.measure.critic_episodes[]", n, 2)
        require_positive_int("training.measure.critic_fit_steps", self.critic_fit_steps, 0)


@dataclass
class TrainingConfig:
    """The training and measurement loop (sizes come from the ``preset`` group)."""

    iterations: int = 50  # N: policy updates; metrics.csv has one row per iteration
    measure_every: int = 10  # k: measure gradient statistics every k iterations (and at the first and last)
    n_batches: int = 16  # M: independent batch estimates per measurement (>= 4)
    batch_size: int = 16  # B: episodes per batch, for training and for each measured estimate
    log_every: int = 0  # progress line every this many iterations (0: about ten lines per run)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def check(self) -> None:
        require_positive_int("training.iterations", self.iterations)
        require_positive_int("training.measure_every", self.measure_every)
        require_positive_int("training.n_batches", self.n_batches, 4)  # the bias CI needs M >= 4
        require_positive_int("training.batch_size", self.batch_size)
        require_positive_int("training.log_every", self.log_every, 0)
        self.critic.check()
        self.reference.check()
        self.measure.check()


@dataclass
class DebugConfig:
    """Test-only switches; leave them at their defaults for real experiments."""

    nan_at_step: int = -1  # replace the training gradient at this iteration by NaN (-1: never)
    raise_at_step: int = -1  # raise a RuntimeError at this iteration (-1: never)
    sleep_s: float = 0.0  # sleep this long after each iteration (to catch a run mid-way)

    def check(self) -> None:
        require_in_range("debug.sleep_s", self.sleep_s, 0.0, float("inf"), high_open=True)


# ------------------------------------------------------------------------- top level


@dataclass
class RunConfig:
    """One run: train a policy with one estimator, measuring its gradient as it goes."""

    env: Any = MISSING  # an EnvConfig subclass, from the env group
    estimator: EstimatorSettings = MISSING  # from the estimator group
    policy: PolicySettings = MISSING  # from the policy group
    training: TrainingConfig = field(default_factory=TrainingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    seed: int = 0  # run seed: policy init, every sampled batch, the Monte Carlo references
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto (cuda when present)
    lr: float = 0.05  # Adam step size of the policy's gradient-ascent updates
    threads: int = 1  # torch intra-op threads per run (1 suits parallel sweeps; 0: torch's default)
    rerun_complete: bool = False  # redo a run even when its run.json says complete
    preset_name: str = "custom"  # which preset sized the run (set by the preset group; informational)
    logger: str = "csv"  # csv: metrics.csv; tensorboard: also TensorBoard events in the job dir

    def check(self) -> None:
        require(isinstance(self.env, EnvConfig),
                f"env must be chosen from the env group; got {type(self.env).__name__}")
        self.env.check()
        self.estimator.check()
        self.policy.check()
        self.training.check()
        self.debug.check()
        require(bool(DEVICE_PATTERN.match(self.device)),
                f"device={self.device!r} is not valid; valid values: cpu, cuda, cuda:N, auto")
        require_in_range("lr", self.lr, 0.0, float("inf"), low_open=True, high_open=True)
        require_positive_int("threads", self.threads, 0)
        require_choice("logger", self.logger, runlog.LOGGERS)
        require(self.logger != "tensorboard" or runlog.tensorboard_installed(),
                "logger=tensorboard needs the tensorboard package: "
                f"{runlog.TENSORBOARD_INSTALL} (or pip install tensorboard)")


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent).

    ``base_config`` is the primary schema. Group files pick theirs with a defaults entry
    such as ``- /schema/env/tabular@_here_``; the schemas live in their own ``schema/``
    groups so they never show up as choices of ``env``, ``estimator`` or ``policy``.
    """
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    for name, schema in ENV_SCHEMAS.items():
        cs.store(group="schema/env", name=name, node=schema)
    cs.store(group="schema", name="estimator", node=EstimatorSettings)
    cs.store(group="schema", name="policy", node=PolicySettings)


MAX_SUBDIR_BYTES = 200  # file systems refuse names over 255 bytes; leave room for a hash


def subdir_name(override_dirname: str) -> str:
    """Job sub-directory of a sweep: the job's overrides, or ``default`` when it has none.

    A name too long for the file system keeps a readable prefix and ends with a hash of
    the whole override string, so it stays unique and the same on every re-run (which
    is what skipping complete runs relies on).
    """
    name = override_dirname or "default"
    if len(name.encode()) <= MAX_SUBDIR_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    prefix = name.encode()[:MAX_SUBDIR_BYTES - 14].decode(errors="ignore")
    return f"{prefix}~{digest}"


def register_resolvers() -> None:
    """OmegaConf resolvers that ``conf/config.yaml`` uses (idempotent)."""
    if not OmegaConf.has_resolver("pgvar_subdir"):
        OmegaConf.register_new_resolver("pgvar_subdir", subdir_name)


# --------------------------------------------------------- from config to objects


def build_env(env_cfg: EnvConfig, device: Any = "cpu"):
    """The environment of ``env_cfg`` on ``device`` (Gymnasium envs emit tensors there)."""
    from pgvar.envs.registry import make_env

    return make_env(env_cfg.name, device=device, **env_cfg.env_kwargs())


def policy_kwargs(policy_cls: type, settings: PolicySettings, seed: int) -> dict[str, Any]:
    """The options of ``settings`` (and ``seed``) that the policy class accepts."""
    accepted = set(inspect.signature(policy_cls.__init__).parameters)
    candidates = {"hidden": tuple(settings.hidden), "activation": settings.activation,
                  "init_log_std": settings.init_log_std, "init_scale": settings.init_scale,
                  "init_gain_scale": settings.init_gain_scale, "seed": seed}
    return {k: v for k, v in candidates.items() if k in accepted and v is not None}


def build_policy(env: Any, settings: PolicySettings, seed: int):
    """The environment's natural policy with the configured options, initialised from ``seed``.

    The policy class is whatever ``make_policy`` picks for the env; only the options
    that class accepts are passed. MLP weights come from torch's global generator,
    seeded here.
    """
    import torch

    from pgvar.envs.registry import make_policy

    policy_cls = type(make_policy(env))
    torch.manual_seed(seed)
    return make_policy(env, **policy_kwargs(policy_cls, settings, seed)).to(env.device)


def build_critic(env: Any, policy: Any, critic_cfg: CriticConfig, seed: int):
    """The critic of ``critic_cfg`` for ``env``; an MLP critic is initialised from ``seed``.

    ``auto`` is ``pgvar.critics.make_critic``'s choice (tabular, quadratic for LQR, MLP
    otherwise); ``hidden`` applies whenever the choice is an MLP.
    """
    import torch

    from pgvar.critics import MLPCritic, make_critic

    torch.manual_seed(seed)
    if critic_cfg.kind == "exact":
        critic = make_critic(env, "exact", policy=policy, perturb_scale=critic_cfg.perturb_scale,
                             seed=seed)
    else:
        critic = make_critic(env, critic_cfg.kind)
        if isinstance(critic, MLPCritic):
            torch.manual_seed(seed)
            critic = make_critic(env, "mlp", hidden=tuple(critic_cfg.hidden))
    return critic.to(env.device)


# ------------------------------------------------------------------------ validation


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The composed DictConfig as a typed ``RunConfig`` object."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, RunConfig):
        raise ConfigError("the composed config is not a RunConfig; is conf/config.yaml's "
                          "defaults list missing 'base_config'?")
    return obj


def validate_config(cfg: DictConfig) -> RunConfig:
    """Check every value of a composed config; returns it typed, or raises ConfigError.

    Beyond the ranges of each section, names are checked against the registries (the
    estimator and environment names), and the environment and its policy are built
    once on the CPU so the core library's own checks (a Gymnasium id, a horizon beyond
    the env's time limit, ...) fail here rather than inside a job. ``pgvar.preflight``
    adds unknown keys, the device, and whether the job fits this machine's memory.
    """
    from pgvar import preflight  # imports this module

    preflight.check_known_keys(cfg)
    run_cfg = to_run_config(cfg)
    run_cfg.check()
    check_names_against_registries(run_cfg)
    preflight.check_before_build(run_cfg)
    check_buildable(run_cfg)
    return run_cfg


# Estimators whose baseline leaves each episode out of a mean over the others: B >= 2.
LEAVE_ONE_OUT_ESTIMATORS = ("rloo", "optimal_baseline")


def check_names_against_registries(run_cfg: RunConfig) -> None:
    """Estimator and environment names must be registered in the core library."""
    from pgvar.envs.registry import available_envs
    from pgvar.estimators import ESTIMATORS

    if run_cfg.env.name == "sequence":
        check_sequence_estimator(run_cfg)
        return
    names = sorted(ESTIMATORS)
    require(run_cfg.estimator.name in names or not is_sequence_estimator(run_cfg.estimator.name),
            f"estimator {run_cfg.estimator.name} is a sequence estimator: it needs env=sequence")
    require_choice("estimator.name", run_cfg.estimator.name, names)
    require_choice("env.name", run_cfg.env.name, available_envs())
    require(not (run_cfg.estimator.name in LEAVE_ONE_OUT_ESTIMATORS
                 and run_cfg.training.batch_size < 2),
            f"estimator {run_cfg.estimator.name} needs training.batch_size >= 2 "
            f"(its baseline is a mean over the other episodes), got {run_cfg.training.batch_size}")
    reference = run_cfg.training.reference
    unbiased = [n for n in names if ESTIMATORS[n].claimed_unbiased]
    require_choice("training.reference.estimator", reference.estimator, unbiased)
    alternate = reference.alternate_estimator()
    if alternate is not None:
        require_choice("training.reference.alternate", alternate, unbiased)
    has_critic = run_has_critic(run_cfg)
    for key, name in (("estimator", reference.estimator), ("alternate", alternate)):
        require(name is None or has_critic or not ESTIMATORS[name].needs_critic,
                f"training.reference.{key}={name} needs the run's critic, and neither "
                f"estimator {run_cfg.estimator.name} nor training.measure.estimators use one; "
                f"use one of {[n for n in unbiased if not ESTIMATORS[n].needs_critic]}")


def measured_specs(run_cfg: RunConfig) -> list:
    """``training.measure.estimators`` parsed (``pgvar.paired.EstimatorSpec``)."""
    return [parse_spec(text) for text in run_cfg.training.measure.estimators]


def run_has_critic(run_cfg: RunConfig) -> bool:
    """Whether the run builds and fits a critic: its training estimator or one of the
    estimators it measures needs one."""
    from pgvar.estimators import ESTIMATORS

    return (ESTIMATORS[run_cfg.estimator.name].needs_critic
            or any(spec.needs_critic for spec in measured_specs(run_cfg)))


def is_sequence_estimator(name: str) -> bool:
    """Whether ``name`` is registered among the sequence estimators."""
    from pgvar.sequence_estimators import SEQUENCE_ESTIMATORS

    return name in SEQUENCE_ESTIMATORS


def check_sequence_estimator(run_cfg: RunConfig) -> None:
    """env=sequence takes the sequence estimators, whose groups must fill the batch."""
    from pgvar.sequence_estimators import SEQUENCE_ESTIMATORS

    est = run_cfg.estimator
    require_choice("estimator.name (with env=sequence)", est.name, sorted(SEQUENCE_ESTIMATORS))
    minimum = SEQUENCE_ESTIMATORS[est.name].min_group
    require(est.group_size >= minimum,
            f"estimator {est.name} needs estimator.group_size >= {minimum}, got {est.group_size}")
    require(run_cfg.training.batch_size % est.group_size == 0,
            f"training.batch_size ({run_cfg.training.batch_size}) must be a multiple of "
            f"estimator.group_size ({est.group_size}): batches hold whole prompt groups")


def check_buildable(run_cfg: RunConfig) -> None:
    """Build the environment and policy on the CPU; re-raise their errors as ConfigError;
    then check that the whole job fits this machine's memory."""
    from pgvar.preflight import check_job_duration, check_job_memory

    try:
        env = build_env(run_cfg.env, device="cpu")
        policy = build_policy(env, run_cfg.policy, seed=run_cfg.seed)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"env={run_cfg.env.name}: {err}") from err
    else:
        check_job_memory(run_cfg, env, policy)
        check_job_duration(run_cfg, env)
    finally:
        close = getattr(locals().get("env"), "close", None)
        if callable(close):
            close()
