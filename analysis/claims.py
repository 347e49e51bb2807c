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
definition (a band check of it could not fail), so its "very high" is tested against the
other source rows instead (``judge_vanilla_variance``): it agrees when every other source
row's paired ratio interval lies below 1 (vanilla's variance is separated above each),
disagrees when one lies above 1, and is inconclusive when one contains 1.

Every judgement is classed (``Judgement.kind``): ``tested`` when the measurement could
have contradicted it, ``by construction`` when it could not (a bias test against a
reference built from the tested estimator itself: "not tested (circular reference)").
Only tested judgements count towards a row's verdict.

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
disagrees when the interval is above 0.25. "tunable" (``judge_tunable``, per critic)
agrees when, between the GAE rows at the smallest and the largest lambda (one-step
actor-critic, which is GAE at lambda = 0, giving the lambda = 0 end), BOTH the bias
falls as lambda rises (relative squared-bias intervals separated, the smaller lambda's
above) AND the variance rises (their paired variance ratio's interval above 1); it
disagrees when either moves the other way with separated intervals, or when the bias is
not distinguishable from 0 at any lambda (nothing to tune: e.g. with the exact V, GAE is
unbiased at every lambda); otherwise inconclusive. "Falls with critic data"
(``judge_bias_trend``, a finding about actor-critic and GAE rather than a source claim)
agrees when the relative squared bias at the fewest critic episodes is separated above
the one at the most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.experiment import BY_CONSTRUCTION, TESTED  # the verdict classes, defined once
from analysis.render import format_ci
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


SEED_TABLE_ROWS = ("reinforce", "mean_baseline_episode", "actor_critic", "gae")

CLAIMS: dict[str, Claim] = {
    "reinforce": Claim("Vanilla REINFORCE", "None", "0", "very high", "seed table"),
    "mean_baseline_episode": Claim("REINFORCE with mean baseline", "Episode mean return", "0",
                                   "moderate", "seed table"),
    # the per-step batch mean of G_t: NOT the source's estimator, kept as an extra row
    "mean_baseline": Claim("REINFORCE with per-step mean baseline (extra row)",
                           "batch mean of G_t at each t"),
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
    kind: str = TESTED  # TESTED or BY_CONSTRUCTION (module doc); only tested ones count

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


def judge_variance(claim: str, ratio: Estimate, is_reference: bool = False,
                   n_runs: int | None = None) -> Judgement:
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
        return Judgement("agrees", "variance: seed says very high; vanilla REINFORCE is the 1x "
                         "reference of the ratio (true by definition; judge_vanilla_variance "
                         "tests it against the other rows)", kind=BY_CONSTRUCTION)
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
               tunable: Judgement | None = None, note: str = "", note_short: str = "",
               circular: bool = False) -> Judgement:
    """Check a bias word against the measured bias (see module doc). ``note`` says why
    ``distinguishable`` is None when the bias test could not be read. ``circular``: the
    reference came from the tested estimator itself (no independent one existed), so the
    test could not fail: 'not tested', by construction."""
    if not claim:
        return Judgement("no claim", "bias: no claim")
    if circular:
        return Judgement("not tested", f"bias: seed says {claim}; not tested (circular "
                         "reference: built from the tested estimator)", "circular reference",
                         "circular ref", BY_CONSTRUCTION)
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
    """One verdict for a row from its TESTED parts: disagrees if any does, agrees if all
    do, else inconclusive with their reasons; 'not tested' when no stated part was tested
    (parts true by construction are listed in the words but never counted)."""
    stated = [j for j in judgements if j.verdict != "no claim"]
    tested = [j for j in stated if j.kind == TESTED]
    words = "; ".join(_tagged(j) for j in judgements)
    if not stated:
        return Judgement("no claim", "no claim in the seed")
    if not tested:
        shorts = ", ".join(dict.fromkeys(j.short for j in stated if j.short))
        return Judgement("not tested", words, "no part of the claim was tested", shorts,
                         BY_CONSTRUCTION)
    if any(j.verdict == "disagrees" for j in tested):
        return Judgement("disagrees", words)
    if all(j.verdict == "agrees" for j in tested):
        return Judgement("agrees", words)
    open_parts = [j for j in tested if j.verdict == "inconclusive"]
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
    if judgement.kind != TESTED:
        verdict += f", {judgement.kind}, not counted"
    return f"{part} ({verdict}): {rest}"


# ----------------------------------------------------------------------------- tests across rows


def judge_vanilla_variance(others: list[tuple[str, Estimate]]) -> Judgement:
    """'Very high' for vanilla REINFORCE as a test that can fail: ``others`` are the other
    source rows' (label, paired ratio Var(row) / Var(vanilla)). Agrees when every interval
    lies below 1, disagrees when one lies above 1, inconclusive when one contains 1 or a
    ratio rests on fewer than ``MIN_RUNS_FOR_SEED_BOOTSTRAP`` runs."""
    others = [(label, r) for label, r in others if math.isfinite(r.value)]
    if not others:
        return inconclusive("variance: seed says very high", "no other source row to compare with",
                            "nothing to rank")
    few = [label for label, r in others if r.n < MIN_RUNS_FOR_SEED_BOOTSTRAP]
    if few:
        return too_few_runs("variance", min(r.n for _, r in others))
    above = [label for label, r in others if r.lo > 1]
    crossing = [label for label, r in others if not r.hi < 1 and not r.lo > 1]
    ratios = ", ".join(f"{label} {_fmt_ratio(r)}" for label, r in others)
    text = f"variance: seed says very high (above every other source row); measured {ratios}"
    if above:
        return Judgement("disagrees", text + f"; above vanilla: {', '.join(above)}")
    if crossing:
        return inconclusive(text, f"not separated from vanilla: {', '.join(crossing)}", "CIs overlap")
    return Judgement("agrees", text)


@dataclass(frozen=True)
class LambdaEnd:
    """One end of a GAE lambda sweep at one critic: lambda, the pooled relative squared
    bias with its interval, and whether the bias is distinguishable from 0 (None: no test)."""

    lam: float
    rel_bias_sq: Estimate
    distinguishable: bool | None
    note: str = ""


def judge_tunable(low: LambdaEnd, high: LambdaEnd, var_high_over_low: Estimate,
                  any_biased: bool | None) -> Judgement:
    """'Tunable' bias as a test that can fail (module doc): between the smallest (``low``)
    and the largest (``high``) lambda, the bias must fall (intervals separated) AND the
    variance rise (``var_high_over_low``, the paired ratio, above 1). ``any_biased``:
    whether any lambda's bias is distinguishable from 0 (False: nothing to tune)."""
    words = (f"bias: seed says tunable; relative squared bias {_fmt_est(low.rel_bias_sq)} at "
             f"lambda={low.lam:g} vs {_fmt_est(high.rel_bias_sq)} at lambda={high.lam:g}, "
             f"variance ratio lambda={high.lam:g}/lambda={low.lam:g} {_fmt_est(var_high_over_low)}")
    for end in (low, high):
        if end.distinguishable is None:
            return inconclusive(words, f"lambda={end.lam:g}: {end.note or 'no bias test'}",
                                "no bias test")
    if not math.isfinite(var_high_over_low.value):
        return inconclusive(words, "no paired variance ratio between the two lambdas", "no ratio")
    if var_high_over_low.n < MIN_RUNS_FOR_SEED_BOOTSTRAP:
        return too_few_runs("bias", var_high_over_low.n)
    bias_falls = low.rel_bias_sq.lo > high.rel_bias_sq.hi
    bias_rises = high.rel_bias_sq.lo > low.rel_bias_sq.hi
    var_rises, var_falls = var_high_over_low.lo > 1, var_high_over_low.hi < 1
    if any_biased is False:
        return Judgement("disagrees", words + "; the bias is not distinguishable from 0 at any "
                         "lambda (nothing to tune)")
    if bias_rises or var_falls:
        return Judgement("disagrees", words + "; lambda moves them the other way")
    if bias_falls and var_rises:
        return Judgement("agrees", words)
    reason = ("the bias intervals at the two lambdas overlap" if not bias_falls
              else "the variance ratio's interval contains 1")
    return inconclusive(words, reason, "CIs overlap")


def judge_bias_trend(points: list[tuple[int, Estimate]]) -> Judgement:
    """Does the bootstrap bias fall with the critic's data? ``points``: (critic episodes,
    relative squared bias) of one estimator at fitted critics. Agrees when the fewest
    episodes' interval lies above the most's, disagrees when below, else inconclusive."""
    points = sorted((n, e) for n, e in points if math.isfinite(e.value))
    if len(points) < 2:
        return inconclusive("bias falls with critic data", "fewer than two critic sizes",
                            "one critic size")
    (n_lo, few), (n_hi, many) = points[0], points[-1]
    words = (f"bias falls with critic data: relative squared bias {_fmt_est(few)} with "
             f"{n_lo} episodes vs {_fmt_est(many)} with {n_hi}")
    if few.lo > many.hi:
        return Judgement("agrees", words)
    if many.lo > few.hi:
        return Judgement("disagrees", words)
    return inconclusive(words, "the intervals overlap", "CIs overlap")


def _fmt_est(e: Estimate) -> str:
    if not math.isfinite(e.value):
        return f"{e.value:.3g}"
    return format_ci(e.value, e.lo, e.hi)
