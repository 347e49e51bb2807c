"""What the seed text claims for each estimator, and how a measurement is judged against it.

The seed's table (``shared/seed/policy-gradients-and-reinforce.txt``):

| Variant | Baseline | Bias | Variance |
| Vanilla REINFORCE | None | 0 | Very high |
| REINFORCE with mean baseline | Episode mean return | 0 | Moderate |
| Actor-critic (one-step) | V(s_t) | Small (bootstrap bias) | Low |
| GAE (Schulman et al. 2016) | V^lambda-weighted | Tunable | Very low |

plus claims in its prose: reward-to-go "reduces variance without introducing bias"; a
state-dependent baseline "leaves the estimator unbiased" and V is the best baseline.
Rows the seed says nothing about (leave-one-out, PPO) get "no claim".

The agreement rule (documented in ``experiments/table/README.md`` too):

Variance words are measured by the ratio ``r = Var(row) / Var(vanilla REINFORCE)`` on
the same environment at the same measured steps (variance = trace of the covariance of
one batch estimate), with a paired bootstrap interval across seeds. Bands, one per
decade below a factor 2:

    very high   r >= 0.5          (within a factor 2 of vanilla REINFORCE)
    moderate    0.1  <= r < 0.5
    low         0.01 <= r < 0.1
    very low    r < 0.01

A claim agrees when the whole 95% interval of r lies in the claimed band, disagrees when
it lies wholly outside, and is inconclusive when it straddles a band edge. "Lower than
vanilla" agrees when the interval lies below 1. Vanilla REINFORCE's own ratio is 1 by
definition, so its "very high" claim is judged by rank: it agrees when no other row of
the seed's table has a ratio whose interval lies above 1.

Bias words: "0" agrees when the bias is not distinguishable from zero (the 95%
interval of the mean unbiased squared-bias estimate contains 0) and disagrees when it
is. "small" agrees when the relative bias ||bias|| / ||grad J|| has its interval below
0.25 (the mean update still points within about 15 degrees of the true gradient) and
disagrees when the interval is above 0.25. "tunable" agrees when the GAE rows of one
environment at the smallest and the largest lambda have squared-bias intervals that do
not overlap (lambda moves the bias), and is untested with a single lambda.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.stats import Estimate

REFERENCE_ESTIMATOR = "reinforce"
SMALL_RELATIVE_BIAS = 0.25
VARIANCE_BANDS: dict[str, tuple[float, float]] = {
    "very high": (0.5, math.inf),
    "moderate": (0.1, 0.5),
    "low": (0.01, 0.1),
    "very low": (0.0, 0.01),
}
LOWER_THAN_VANILLA = "lower than vanilla REINFORCE"


@dataclass(frozen=True)
class Claim:
    """The descriptive columns and the bias / variance words a source gives a row."""

    variant: str
    baseline: str
    bias: str = ""  # "0", "small", "tunable" or "" (no claim)
    variance: str = ""  # a VARIANCE_BANDS key, LOWER_THAN_VANILLA or "" (no claim)
    source: str = ""  # where the words come from


SEED_TABLE_ROWS = ("reinforce", "mean_baseline", "actor_critic", "gae")

CLAIMS: dict[str, Claim] = {
    "reinforce": Claim("Vanilla REINFORCE", "None", "0", "very high", "seed table"),
    "mean_baseline": Claim("REINFORCE with mean baseline", "Episode mean return", "0",
                           "moderate", "seed table"),
    "actor_critic": Claim("Actor-critic (one-step)", "V(s_t)", "small", "low", "seed table"),
    "gae": Claim("GAE (Schulman et al. 2016)", "V^lambda-weighted", "tunable", "very low",
                 "seed table"),
    "reinforce_rtg": Claim("REINFORCE, reward-to-go", "None", "0", LOWER_THAN_VANILLA,
                           "seed text: reward-to-go reduces variance without bias"),
    "value_baseline": Claim("REINFORCE with value baseline", "V(s_t), learned", "0",
                            LOWER_THAN_VANILLA,
                            "seed text: a state baseline leaves it unbiased; V is best"),
    "rloo": Claim("REINFORCE, leave-one-out baseline", "mean return of the other episodes"),
    "ppo": Claim("PPO clipped surrogate", "GAE advantage"),
}


def claim_for(estimator: str) -> Claim:
    """The claim for a row: the seed's words for its four rows, else the pgvar registry's
    descriptive fields (when importable) over the fallback above, else no claim."""
    fallback = CLAIMS.get(estimator, Claim(estimator, ""))
    if estimator in SEED_TABLE_ROWS:
        return fallback
    entry = _registry_entry(estimator)
    if entry is None:
        return fallback
    variant = str(getattr(entry, "variant", "") or fallback.variant)
    baseline = str(getattr(entry, "baseline", "") or fallback.baseline)
    bias = fallback.bias
    source = fallback.source
    if not bias and getattr(entry, "claimed_unbiased", None):
        bias, source = "0", "pgvar registry: unbiased by construction"
    return Claim(variant, baseline, bias, fallback.variance, source)


def _registry_entry(estimator: str) -> object | None:
    """``pgvar.estimators.ESTIMATORS[estimator]`` or None when it is not available."""
    try:
        from pgvar.estimators import ESTIMATORS
    except ImportError:  # the registry is optional for the analysis
        return None
    return ESTIMATORS.get(estimator) if hasattr(ESTIMATORS, "get") else None


# ----------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Judgement:
    """One claim checked: 'agrees', 'disagrees', 'inconclusive' or 'no claim', in words."""

    verdict: str
    words: str


def variance_band(ratio: float) -> str:
    """The variance word for a ratio to vanilla REINFORCE's variance."""
    for word, (lo, hi) in VARIANCE_BANDS.items():
        if lo <= ratio < hi:
            return word
    return "very high" if ratio >= 0.5 else "very low"


def _fmt_ratio(r: Estimate) -> str:
    if math.isfinite(r.lo):
        return f"{r.value:.3g}x [{r.lo:.3g}, {r.hi:.3g}] vanilla"
    return f"{r.value:.3g}x vanilla (no CI)"


def judge_variance(claim: str, ratio: Estimate, others_above_one: bool | None = None,
                   is_reference: bool = False) -> Judgement:
    """Check a variance word against the ratio to vanilla REINFORCE (see module doc)."""
    if not claim:
        return Judgement("no claim", "variance: no claim")
    if not math.isfinite(ratio.value):
        return Judgement("inconclusive", "variance: no vanilla REINFORCE row to compare with")
    if is_reference:
        if others_above_one is None:
            return Judgement("inconclusive", "variance: no other seed row to rank against")
        if others_above_one:
            return Judgement("disagrees", "variance: seed says very high, but another seed row "
                                          "is higher than vanilla REINFORCE")
        return Judgement("agrees", "variance: seed says very high, measured the highest of the "
                                   "seed's rows (the 1x reference)")
    measured = variance_band(ratio.value)
    lo = ratio.lo if math.isfinite(ratio.lo) else ratio.value
    hi = ratio.hi if math.isfinite(ratio.hi) else ratio.value
    if claim == LOWER_THAN_VANILLA:
        band = (0.0, 1.0)
        measured = "lower" if ratio.value < 1 else "not lower"
    else:
        band = VARIANCE_BANDS[claim]
    if band[0] <= lo and hi < band[1]:
        verdict = "agrees"
    elif hi < band[0] or lo >= band[1]:
        verdict = "disagrees"
    else:
        verdict = "inconclusive"
    text = f"variance: seed says {claim}, measured {measured} ({_fmt_ratio(ratio)})"
    return Judgement(verdict, text)


def judge_bias(claim: str, distinguishable: bool | None, rel_bias: Estimate,
               tunable: Judgement | None = None) -> Judgement:
    """Check a bias word against the measured bias (see module doc)."""
    if not claim:
        return Judgement("no claim", "bias: no claim")
    if claim == "tunable":
        return tunable or Judgement("inconclusive", "bias: tunable untested (one lambda)")
    if distinguishable is None:
        return Judgement("inconclusive", "bias: not measured")
    seen = "distinguishable from 0" if distinguishable else "not distinguishable from 0"
    if claim == "0":
        verdict = "disagrees" if distinguishable else "agrees"
        return Judgement(verdict, f"bias: seed says 0, measured {seen}")
    if claim == "small":
        hi = rel_bias.hi if math.isfinite(rel_bias.hi) else rel_bias.value
        lo = rel_bias.lo if math.isfinite(rel_bias.lo) else rel_bias.value
        if hi < SMALL_RELATIVE_BIAS:
            verdict = "agrees"
        elif lo > SMALL_RELATIVE_BIAS:
            verdict = "disagrees"
        else:
            verdict = "inconclusive"
        return Judgement(verdict, f"bias: seed says small, measured {rel_bias.value:.3g} "
                                  f"of ‖∇J‖ ({seen})")
    return Judgement("inconclusive", f"bias: unknown claim {claim!r}")


def combine(*judgements: Judgement) -> Judgement:
    """One verdict for a row: disagrees if any claim does, agrees if all stated ones do."""
    stated = [j for j in judgements if j.verdict != "no claim"]
    words = "; ".join(_tagged(j) for j in judgements)
    if not stated:
        return Judgement("no claim", "no claim in the seed")
    if any(j.verdict == "disagrees" for j in stated):
        return Judgement("disagrees", words)
    if all(j.verdict == "agrees" for j in stated):
        return Judgement("agrees", words)
    return Judgement("inconclusive", words)


def _tagged(judgement: Judgement) -> str:
    """``bias (agrees): seed says 0, ...``: the part's own verdict after its name."""
    part, _, rest = judgement.words.partition(": ")
    if judgement.verdict == "no claim" or not rest:
        return judgement.words
    return f"{part} ({judgement.verdict}): {rest}"
