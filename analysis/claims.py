"""What the seed text claims for each estimator, and how a measurement is judged against it.

The seed text's table (its policy-gradient estimators and what it says of each):

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

A variance verdict rests on a bootstrap over seeds, so below
``MIN_RUNS_FOR_SEED_BOOTSTRAP`` (5) seeds it is 'inconclusive: too few runs (n=2 < 5)'
(``analysis.stats`` gives the measured coverage behind that number). Every
'inconclusive' says why: too few runs, an interval across a band edge, no vanilla row.

Bias words use the table's pooled bias (``analysis.table``: mean squared bias over all
measured steps and runs, relative to the mean ||grad J||^2, one interval from the logged
per-measurement standard errors). "0" agrees when the bias is not distinguishable from
zero (the interval contains 0) and disagrees when it is; without a readable test (fewer
than 16 estimates per measurement) it is inconclusive and says so. "small" agrees when
the relative bias sqrt(pooled squared bias / pooled ||grad J||^2) has its interval below
0.25 (the mean update still points within about 15 degrees of the true gradient) and
disagrees when the interval is above 0.25. "tunable" agrees when the GAE rows of one
environment at the smallest and the largest lambda have relative squared-bias intervals
that do not overlap (lambda moves the bias), and is untested with a single lambda.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.stats import MIN_RUNS_FOR_SEED_BOOTSTRAP, Estimate

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
    """One claim checked: 'agrees', 'disagrees', 'inconclusive' or 'no claim', in words.

    Every 'inconclusive' carries its ``reason`` (a phrase) and a ``short`` tag of a few
    characters for the compact table, e.g. ``n < 5``.
    """

    verdict: str
    words: str
    reason: str = ""
    short: str = ""

    @property
    def cell(self) -> str:
        """The verdict in a word or two: ``agrees``, ``inconclusive (n < 5)``."""
        return f"{self.verdict} ({self.short})" if self.short else self.verdict


def inconclusive(words: str, reason: str, short: str) -> Judgement:
    """An 'inconclusive' judgement, which must say why."""
    return Judgement("inconclusive", words, reason, short)


def too_few_runs(part: str, n: int, needed: int = MIN_RUNS_FOR_SEED_BOOTSTRAP) -> Judgement:
    """'inconclusive: too few runs (n=2 < 5)' for a test that rests on a bootstrap over seeds."""
    return inconclusive(f"{part}: no verdict from {n} run(s)",
                        f"too few runs (n={n} < {needed})", f"n < {needed}")


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


def _band_words(claim: str, band: tuple[float, float]) -> str:
    """``moderate (0.1-0.5x vanilla)``: a claim with the ratios it stands for."""
    lo, hi = band
    if claim == LOWER_THAN_VANILLA:
        return claim
    upper = "" if math.isinf(hi) else f"{hi:g}"
    return f"{claim} ({lo:g}-{upper}x vanilla)" if upper else f"{claim} (>= {lo:g}x vanilla)"


def judge_variance(claim: str, ratio: Estimate, others_above_one: bool | None = None,
                   is_reference: bool = False, n_runs: int | None = None) -> Judgement:
    """Check a variance word against the ratio to vanilla REINFORCE (see module doc).

    ``n_runs``: the seeds behind the paired ratio (the fewer of the two rows'); below
    ``MIN_RUNS_FOR_SEED_BOOTSTRAP`` the verdict is 'inconclusive: too few runs'.
    """
    if not claim:
        return Judgement("no claim", "variance: no claim")
    if not math.isfinite(ratio.value):
        return inconclusive("variance: not compared", "no vanilla REINFORCE row to compare with",
                            "no vanilla row")
    if n_runs is not None and n_runs < MIN_RUNS_FOR_SEED_BOOTSTRAP:
        return too_few_runs("variance", n_runs)
    if is_reference:
        if others_above_one is None:
            return inconclusive("variance: seed says very high",
                                "no other seed-table row with enough runs to rank against",
                                "nothing to rank")
        if others_above_one:
            return Judgement("disagrees", "variance: seed says very high, but another seed row "
                                          "is higher than vanilla REINFORCE")
        return Judgement("agrees", "variance: seed says very high, measured the highest of the "
                                   "seed's rows (the 1x reference)")
    lo = ratio.lo if math.isfinite(ratio.lo) else ratio.value
    hi = ratio.hi if math.isfinite(ratio.hi) else ratio.value
    if claim == LOWER_THAN_VANILLA:
        band = (0.0, 1.0)
        measured = "lower" if ratio.value < 1 else "not lower"
    else:
        band = VARIANCE_BANDS[claim]
        measured = variance_band(ratio.value)
    text = (f"variance: seed says {_band_words(claim, band)}, measured {measured} "
            f"({_fmt_ratio(ratio)})")
    if band[0] <= lo and hi < band[1]:
        return Judgement("agrees", text)
    if hi < band[0] or lo >= band[1]:
        return Judgement("disagrees", text)
    edge = band[0] if lo < band[0] else band[1]
    return inconclusive(text, f"the interval crosses the band edge {edge:g}", "band edge")


def judge_bias(claim: str, distinguishable: bool | None, rel_bias: Estimate,
               tunable: Judgement | None = None, note: str = "", note_short: str = "") -> Judgement:
    """Check a bias word against the measured bias (see module doc). ``note`` says why
    ``distinguishable`` is None when the bias test could not be read."""
    if not claim:
        return Judgement("no claim", "bias: no claim")
    if claim == "tunable":
        return tunable or inconclusive("bias: seed says tunable", "one lambda in the sweep",
                                       "one lambda")
    if distinguishable is None:
        return inconclusive(f"bias: seed says {claim}", note or "bias not measured",
                            note_short or "no bias test")
    seen = "distinguishable from 0" if distinguishable else "not distinguishable from 0"
    if claim == "0":
        verdict = "disagrees" if distinguishable else "agrees"
        return Judgement(verdict, f"bias: seed says 0, measured {seen}")
    if claim == "small":
        hi = rel_bias.hi if math.isfinite(rel_bias.hi) else rel_bias.value
        lo = rel_bias.lo if math.isfinite(rel_bias.lo) else rel_bias.value
        text = (f"bias: seed says small (< {SMALL_RELATIVE_BIAS:g} of ‖∇J‖), measured "
                f"{rel_bias.value:.3g} [{lo:.3g}, {hi:.3g}] of ‖∇J‖ ({seen})")
        if hi < SMALL_RELATIVE_BIAS:
            return Judgement("agrees", text)
        if lo > SMALL_RELATIVE_BIAS:
            return Judgement("disagrees", text)
        return inconclusive(text, f"the interval contains {SMALL_RELATIVE_BIAS:g}", "band edge")
    return inconclusive(f"bias: seed says {claim}", f"unknown claim {claim!r}", "unknown claim")


def combine(*judgements: Judgement) -> Judgement:
    """One verdict for a row: disagrees if any claim does, agrees if all stated ones do,
    else inconclusive with the reasons of the inconclusive parts."""
    stated = [j for j in judgements if j.verdict != "no claim"]
    words = "; ".join(_tagged(j) for j in judgements)
    if not stated:
        return Judgement("no claim", "no claim in the seed")
    if any(j.verdict == "disagrees" for j in stated):
        return Judgement("disagrees", words)
    if all(j.verdict == "agrees" for j in stated):
        return Judgement("agrees", words)
    open_parts = [j for j in stated if j.verdict == "inconclusive"]
    reason = "; ".join(dict.fromkeys(j.reason for j in open_parts))
    short = ", ".join(dict.fromkeys(j.short for j in open_parts if j.short))
    return Judgement("inconclusive", words, reason, short)


def _tagged(judgement: Judgement) -> str:
    """``bias (agrees): seed says 0, ...``: the part's own verdict (and, when
    inconclusive, why) after its name."""
    part, _, rest = judgement.words.partition(": ")
    if judgement.verdict == "no claim" or not rest:
        return judgement.words
    verdict = f"{judgement.verdict}: {judgement.reason}" if judgement.reason else judgement.verdict
    return f"{part} ({verdict}): {rest}"
