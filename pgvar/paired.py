"""Paired measurement: several estimators scored on the same episodes against one reference.

At one parameter vector theta, ``measure_paired`` draws M x B episodes once and scores
every requested estimator (each with each requested critic) on them, against a single
reference gradient. Rows of one call therefore differ only in the estimator (and
critic): the sampling noise common to them cancels in their ratios, and the reference's
error is the same for all of them.

Three things make the rows fair comparisons:

- **Estimator specs.** A spec is a registry name (``"gae"``) or a name with knob
  overrides (``"gae(lam=0.5)"``). Its label is canonical (``spec_label``): the name and
  the knobs that differ from ``EstimatorConfig``'s defaults, so the same estimator gets
  the same label whoever asked for it.
- **Critic quality as a stated factor.** A critic-based estimator is scored with each
  ``CriticChoice``: the run's training critic (``"train"``), a fresh critic fitted on N
  episodes of this policy (``"fit:N"``), or the true V (``"exact"``, tabular). Each
  choice carries its error on the measurement episodes (held out from its fit):
  against the exact V where the environment has one, else against Monte Carlo returns.
- **No circular reference.** A Monte Carlo reference is the average of one unbiased
  estimator; a row of that same estimator (or of GAE(lambda = 1) against a value-baseline
  reference, the same estimator) would be tested against itself. ``References`` holds
  an alternate reference from a different estimator, on disjoint episodes, for those
  rows; a row with no non-circular reference is marked ``ref_circular``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from pgvar.batch import Batch
from pgvar.critics import mc_targets
from pgvar.estimators import (
    DEFAULT_CONFIG,
    ESTIMATORS,
    EstimatorConfig,
    estimate_gradients,
    get_estimator,
)
from pgvar.reference import Reference
from pgvar.stats import cross_spread_moment, gradient_stats

# Knobs a measured spec inherits from the training estimator's config unless it sets them:
# they say how the run's objective is read, not which estimator it is.
SHARED_KNOBS = ("discount_weighting", "normalize_advantages", "truncation_as_termination")

_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$")


# -------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class EstimatorSpec:
    """A registry name and knob overrides; ``config(base)`` gives its ``EstimatorConfig``."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    def config(self, base: EstimatorConfig = DEFAULT_CONFIG) -> EstimatorConfig:
        """The shared knobs of ``base``, then this spec's overrides, on the defaults."""
        shared = {k: getattr(base, k) for k in SHARED_KNOBS}
        return replace(DEFAULT_CONFIG, **{**shared, **dict(self.overrides)})

    @property
    def needs_critic(self) -> bool:
        return get_estimator(self.name).needs_critic


def _knob_value(key: str, text: str, default: Any) -> Any:
    """Parse one override's text as the type of the knob's default."""
    text = text.strip().strip("'\"")
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"knob {key} takes true or false, got {text!r}")
        return text.lower() == "true"
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def parse_spec(text: str) -> EstimatorSpec:
    """``"gae"`` or ``"gae(lam=0.5, normalize_advantages=true)"`` as an ``EstimatorSpec``.

    Raises ValueError naming the bad part and the valid choices."""
    match = _SPEC.match(str(text))
    if not match:
        raise ValueError(f"estimator spec {text!r} is not NAME or NAME(knob=value,...)")
    name, args = match.group(1), match.group(2)
    if name not in ESTIMATORS:
        raise ValueError(f"estimator spec {text!r}: unknown estimator {name!r}; known: "
                         f"{sorted(ESTIMATORS)}")
    defaults = {f.name: f.default for f in fields(EstimatorConfig)}
    overrides: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (args or "").split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(f"estimator spec {text!r}: {part!r} is not knob=value with a knob "
                             f"of EstimatorConfig ({sorted(defaults)})")
        try:
            overrides[key] = _knob_value(key, value, defaults[key])
        except ValueError as err:
            raise ValueError(f"estimator spec {text!r}: {err}") from None
    spec = EstimatorSpec(name, tuple(sorted(overrides.items())))
    spec.config()  # validates the knobs' ranges now, with EstimatorConfig's messages
    return spec


def _format_knob(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def spec_label(name: str, cfg: EstimatorConfig) -> str:
    """Canonical label: the name and, in field order, the knobs that differ from the defaults."""
    changed = [f"{f.name}={_format_knob(getattr(cfg, f.name))}" for f in fields(EstimatorConfig)
               if getattr(cfg, f.name) != f.default]
    return f"{name}({','.join(changed)})" if changed else name


# ------------------------------------------------------------------------- critics


@dataclass
class CriticChoice:
    """A critic a critic-based estimator is scored with, and how good it is.

    ``label``: ``"train"`` (the run's own critic), ``"fit:N"`` (fresh, fitted on
    ``episodes`` = N episodes of the current policy) or ``"exact"`` (the true V).
    ``error``/``error_kind`` are filled by ``critic_error`` on the measurement episodes.
    """

    label: str
    critic: nn.Module
    episodes: int = 0
    error: float = math.nan
    error_kind: str = ""


def critic_error(env, policy: nn.Module, critic: nn.Module, batch: Batch,
                 truncation_as_termination: bool = False) -> tuple[float, str]:
    """Root mean squared error of ``critic`` over the valid steps of ``batch``.

    Against the exact V (``"exact_v_rmse"``) where the environment has ``exact_values``,
    else against the Monte Carlo returns G_t of those episodes (``"heldout_rmse"``, which
    also holds the returns' own noise). ``batch`` must not be the critic's fitting data.
    """
    values, _ = critic.values(batch)
    mask = batch.mask.bool()
    if callable(getattr(env, "exact_values", None)):
        with torch.no_grad():
            table = env.exact_values(policy).to(values.dtype)  # [T+1, S]
        t = batch.time_index.clamp(max=table.shape[0] - 1)
        target, kind = table[t, batch.obs.long()], "exact_v_rmse"
    else:
        target = mc_targets(critic, batch, float(env.gamma), env.objective,
                            truncation_as_termination).to(values.dtype)
        kind = "heldout_rmse"
    err = (values - target)[mask].double()
    return (float(err.square().mean().sqrt()) if err.numel() else math.nan), kind


# ---------------------------------------------------------------------- references


def is_circular(spec: EstimatorSpec, reference: Reference) -> bool:
    """Whether ``spec``'s bias test against ``reference`` would assume its own answer:
    the reference averages the same estimator (or GAE(lambda = 1), which with the same
    critic is the value baseline). An exact reference is never circular."""
    if reference.exact:
        return False
    ref_name = reference.method.split(":", 1)[-1]
    if spec.name == ref_name:
        return True
    same_as_value_baseline = spec.name == "gae" and spec.config().lam == 1.0
    return ref_name == "value_baseline" and (spec.name == "value_baseline" or same_as_value_baseline)


def reference_disagreement(a: Reference, b: Reference) -> float:
    """||g_a - g_b||^2 / (se2_a + se2_b): about 1 when two independent unbiased
    references agree, well above 1 when one of them is biased."""
    denom = a.se2 + b.se2
    diff = float((a.grad - b.grad).square().sum())
    return diff / denom if denom > 0 else math.inf


@dataclass
class References:
    """The shared reference of a measured step and, where one is needed, an alternate
    from a different unbiased estimator (computed lazily by ``make_alternate``)."""

    primary: Reference
    make_alternate: Callable[[], Reference] | None = None
    _alternate: Reference | None = field(default=None, init=False)

    @property
    def alternate(self) -> Reference | None:
        if self._alternate is None and self.make_alternate is not None:
            self._alternate = self.make_alternate()
        return self._alternate

    def for_spec(self, spec: EstimatorSpec) -> tuple[Reference, bool]:
        """(reference to score ``spec`` against, whether that test is still circular)."""
        if not is_circular(spec, self.primary):
            return self.primary, False
        alt = self.alternate
        if alt is not None and not is_circular(spec, alt):
            return alt, False
        return self.primary, True

    @property
    def disagreement(self) -> float | None:
        """``reference_disagreement`` of primary and alternate, once both exist."""
        if self._alternate is None:
            return None
        return reference_disagreement(self.primary, self._alternate)


# --------------------------------------------------------------------- measurement


@dataclass
class PairedRow:
    """One estimator spec with one critic choice, scored at one parameter vector."""

    label: str
    spec: EstimatorSpec
    critic: CriticChoice | None
    stats: dict[str, Any]
    reference: Reference
    circular: bool

    def cells(self) -> dict[str, Any]:
        """The row's paired.csv cells that do not depend on the run (``pgvar.runlog``)."""
        c = self.critic
        return {"estimator": self.label, "estimator_name": self.spec.name,
                "critic": c.label if c else "", "critic_episodes": c.episodes if c else 0,
                "critic_error": c.error if c and math.isfinite(c.error) else None,
                "critic_error_kind": c.error_kind if c else "",
                **self.stats,
                "ref_exact": bool(self.reference.exact),
                "ref_episodes": 0 if self.reference.exact else int(self.reference.n_episodes),
                "ref_method": self.reference.method,
                "ref_rel_se": 0.0 if self.reference.exact else float(self.reference.rel_se),
                "ref_circular": self.circular}


def measure_paired(env, policy: nn.Module, specs: Sequence[EstimatorSpec],
                   configs: Sequence[EstimatorConfig], critics: Sequence[CriticChoice],
                   batch: Batch, n_batches: int, references: References,
                   chunk: int = 64, on_row: Callable[[PairedRow], None] | None = None
                   ) -> list[PairedRow]:
    """Score each spec (with its config) on ``batch`` split into ``n_batches`` batches.

    A spec that needs a critic gets one row per choice in ``critics``; the others one
    row. Every critic's error is computed once on ``batch``. ``on_row`` is called after
    each row (progress)."""
    for choice in critics:
        choice.error, choice.error_kind = critic_error(
            env, policy, choice.critic, batch,
            truncation_as_termination=bool(configs[0].truncation_as_termination) if configs else False)
    rows: list[PairedRow] = []
    first = None  # the first row's estimates: the training estimator's in a run
    for spec, cfg in zip(specs, configs):
        for choice in (critics if spec.needs_critic else [None]):
            G = estimate_gradients(spec.name, env, policy, batch, int(n_batches),
                                   choice.critic if choice else None, cfg, chunk)
            G = G.detach().to(torch.float64).cpu()
            first = G if first is None else first
            ref, circular = references.for_spec(spec)
            stats = gradient_stats(G, ref.grad, ref.se2, ref.var, ref.noise_sample).as_dict()
            stats["spread_z_cross"] = cross_spread_moment(G, first)
            row = PairedRow(spec_label(spec.name, cfg), spec, choice, stats, ref, circular)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
