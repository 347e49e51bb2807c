"""Environments by name, and the natural policy for each.

``ENVS`` maps a name to a factory ``(**kwargs) -> BatchedEnv``. Other modules add
their environments with the decorator (or by plain assignment into ``ENVS``)::

    from pgvar.envs.registry import register_env

    @register_env("cartpole")
    def make_cartpole(**kwargs):
        return GymVectorEnv("CartPole-v1", **kwargs)

Modules listed in ``PLUGIN_MODULES`` are imported the first time a name is looked up,
so their registrations happen without the caller importing them (and without the cost
of importing Gymnasium when only the exact environments are used).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from pgvar.envs.base import BatchedEnv
from pgvar.envs.lqr import LinearQuadratic
from pgvar.envs.sequence import SequenceTask
from pgvar.envs.tabular import RandomTabularMDP, SparseChain
from pgvar.policies import MLPCategoricalPolicy, MLPGaussianPolicy

EnvFactory = Callable[..., BatchedEnv]

ENVS: dict[str, EnvFactory] = {}

PLUGIN_MODULES: tuple[str, ...] = ("pgvar.envs.gym",)
_plugins_loaded = False


def register_env(name: str, factory: EnvFactory | None = None):
    """Register ``factory`` under ``name``; usable as ``@register_env(name)`` too.

    Re-registering a name with a different factory is refused, so two modules cannot
    silently shadow each other.
    """
    def add(f: EnvFactory) -> EnvFactory:
        if name in ENVS and ENVS[name] is not f:
            raise ValueError(f"environment name {name!r} is already registered to {ENVS[name]!r}")
        ENVS[name] = f
        return f

    return add if factory is None else add(factory)


def load_plugins() -> None:
    """Import the modules in ``PLUGIN_MODULES`` once, so they register their names.

    A plugin module that does not exist (yet) is skipped; any other import error is
    raised, since it is a real bug in that module.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def available_envs() -> list[str]:
    """All registered names, sorted."""
    load_plugins()
    return sorted(ENVS)


def check_kwargs(target: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Refuse keyword arguments ``target`` does not accept, naming the accepted ones."""
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    by_name = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    accepted = [n for n, p in params.items() if p.kind in by_name]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{what} got unknown argument(s) {unknown}; accepted: {accepted}")


def make_env(name: str, **kwargs: Any) -> BatchedEnv:
    """Build the environment registered as ``name`` with ``kwargs``."""
    load_plugins()
    if name not in ENVS:
        raise ValueError(f"unknown environment {name!r}; valid choices: {sorted(ENVS)}")
    factory = ENVS[name]
    check_kwargs(factory, kwargs, f"environment {name!r}")
    return factory(**kwargs)


def make_policy(env: BatchedEnv, **kwargs: Any) -> torch.nn.Module:
    """The natural policy for ``env``, on the env's device.

    An env with a ``default_policy(**kwargs)`` method decides for itself (tabular softmax
    for tabular MDPs, linear-Gaussian for LQR). Otherwise the action spec decides: an MLP
    categorical policy for discrete actions, an MLP Gaussian one for continuous actions,
    with ``obs_dim`` the flattened observation size.
    """
    if callable(getattr(env, "default_policy", None)):
        check_kwargs(env.default_policy, kwargs, f"default policy of {env.name!r}")
        return env.default_policy(**kwargs)
    obs_dim = math.prod(env.obs_shape) if env.obs_shape else 1
    spec = env.action_spec
    if spec.kind == "discrete":
        cls, out = MLPCategoricalPolicy, spec.n
    elif spec.kind == "continuous":
        cls, out = MLPGaussianPolicy, spec.dim
    else:
        raise ValueError(f"action spec kind must be 'discrete' or 'continuous', got {spec.kind!r}")
    check_kwargs(cls, kwargs, cls.__name__)
    return cls(obs_dim, out, **kwargs).to(env.device)


register_env("tabular", RandomTabularMDP)
register_env("chain", SparseChain)
register_env("lqr", LinearQuadratic)
register_env("sequence", SequenceTask)
