"""The experiment framework: what every ``experiments/NAME/analyze.py`` is built on.

How to write an experiment
--------------------------
An experiment tests one claim on the runs of its ``sweep.yaml``. ``pgvar-reproduce NAME``
loads ``experiments/NAME/analyze.py`` and calls its ``analyze(frame, out, preset)`` with
the tidy frame of ``analysis.loader.load_runs`` (one row per run and training iteration,
the run's flattened config as columns). Write the claim's own statistics as functions and
hand them to an ``Experiment``, whose ``analyze`` is what the module exports:

1. ``select(frame)``: the rows the claim is about (``first_measurements`` or
   ``late_measurements`` below, then a filter on estimators or environments);
2. ``per_run(rows)``: one row per run (or per paired replicate) with its quantities;
3. ``summarise(runs)``: the table of result.csv, every number with its 95% interval from
   ``analysis.stats`` (``mean_ci``, ``ratio_ci``, ``bootstrap_interval``: never a
   hand-rolled bootstrap), square roots of unbiased squared estimates with
   ``sqrt_estimate``;
4. ``verdict(summary)``: a ``Verdict``: ``confirmed``, ``qualified``, ``refuted`` or
   ``inconclusive``, always with the reason in numbers (``inconclusive`` too: say what is
   missing, such as too few seeds). An experiment with several claims states each as a
   ``Finding`` (tested, by construction, extra or measured; ``check`` for a yes/no one)
   and returns ``headline_verdict(findings)``, which only the tested ones make;
   ``findings_section`` renders them in result.md;
5. ``render(summary, verdict, preset)``: result.md, with ``analysis.render.format_ci`` for
   every interval and ``analysis.render.markdown_table`` for every table; ``figures``
   (optional) saves through ``analysis.figures.save_figure``.

A minimal experiment::

    import pandas as pd
    from analysis.experiment import Experiment, Verdict, first_measurements, inconclusive
    from analysis.experiment import estimate_columns
    from analysis.render import format_columns, markdown_table
    from analysis.stats import mean_ci

    def summarise(runs):
        return pd.DataFrame([{"env": env, "n": g["seed"].nunique(),
                              **estimate_columns("var", mean_ci(g["grad_rel_variance"]))}
                             for env, g in runs.groupby("env")])

    def verdict(summary):
        if summary["n"].min() < 3:
            return inconclusive("fewer than 3 seeds in some environment")
        below = bool((summary["var_hi"] < 1).all())
        return Verdict("confirmed" if below else "refuted",
                       f"upper 95% ends {list(summary['var_hi'].round(2))}")

    def render(summary, verdict, preset):
        rows = [[r["env"], format_columns(r, "var")] for _, r in summary.iterrows()]
        return "\\n".join([f"# Variance below one ({preset})", "",
                            *markdown_table(["env", "rel. variance"], rows), "",
                            verdict.line(), ""])

    EXPERIMENT = Experiment("Variance below one", summarise, verdict, render,
                            select=lambda frame: first_measurements(frame, ["reinforce"]))
    analyze = EXPERIMENT.analyze

A test feeds ``analyze`` synthetic frames on which the verdict must flip (see
``tests/test_experiment_*.py``), so that no verdict is a constant.

Shared per-run quantities live here too: ``direction_columns`` and ``pooled_cosine``
re-derive cos(E ĝ, ∇J) from the logged statistics, ``paired_difference`` pairs runs by
seed; a run's initial environment and policy come from ``run_env_and_policy`` (its config
through ``pgvar.run.initial_env_and_policy``, the one builder).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.figures import apply_theme, log_axis
from analysis.loader import measured_rows
from analysis.stats import N_RESAMPLES, Estimate, bootstrap_interval, expanded_level, mean_ci
from pgvar.stats import sqrt_clipped

VERDICTS = ("confirmed", "qualified", "refuted", "inconclusive")


# ----------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """A verdict word and the reason for it (numbers, or what is missing)."""

    word: str
    reason: str

    def __post_init__(self) -> None:
        if self.word not in VERDICTS:
            raise ValueError(f"verdict {self.word!r} is not one of {', '.join(VERDICTS)}")
        if not self.reason.strip():
            raise ValueError(f"a {self.word!r} verdict needs its reason")

    def line(self, label: str = "") -> str:
        """``Verdict (label): word — reason.``"""
        head = f"Verdict ({label})" if label else "Verdict"
        return f"{head}: {self.word} — {self.reason.rstrip('.')}."


def inconclusive(reason: str) -> Verdict:
    """The verdict of runs that cannot decide the claim, with what is missing."""
    return Verdict("inconclusive", reason)


def combined_word(words: list[str]) -> str:
    """One word for several parts: their word when all agree, else ``qualified``;
    ``inconclusive`` for no parts."""
    if not words:
        return "inconclusive"
    return words[0] if len(set(words)) == 1 else "qualified"


def share_word(words: list[str], good: str, undecided: tuple[str, ...] = ("inconclusive",)) -> str:
    """A claim's verdict from the words of its comparisons: confirmed when every one is
    ``good``, qualified when some are, refuted when none is; inconclusive when every word
    is ``undecided``."""
    if all(w in undecided for w in words):
        return "inconclusive"
    return "confirmed" if set(words) == {good} else "qualified" if good in words else "refuted"


def side_of(est: Estimate, at: float, below: str, above: str,
            same: str = "indistinguishable") -> str:
    """``below`` / ``above`` when the 95% interval lies entirely on that side of ``at``,
    ``same`` when it holds ``at``, ``inconclusive`` when it has no finite ends."""
    if not (math.isfinite(est.lo) and math.isfinite(est.hi)):
        return "inconclusive"
    return below if est.hi < at else above if est.lo > at else same


# ----------------------------------------------------------------------------- findings


TESTED, BY_CONSTRUCTION, EXTRA, MEASURED = "tested", "by construction", "extra", "measured"
FINDING_KINDS = (TESTED, BY_CONSTRUCTION, EXTRA, MEASURED)


@dataclass(frozen=True)
class Finding:
    """One claim of an experiment, its word, the reason in numbers and its class.

    ``tested``: the data could have contradicted it; only these make the headline
    (``headline_verdict``). ``by construction``: an identity or algebra that holds whatever
    was measured (a sanity check); ``extra``: tested, but not a claim of the source text;
    ``measured``: a number with no yes/no claim (word ``measured``). ``scope`` names where
    it was judged (an environment, a cell), empty for the whole experiment."""

    claim: str
    word: str
    reason: str
    kind: str = TESTED
    scope: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FINDING_KINDS:
            raise ValueError(f"finding class {self.kind!r} is not one of {', '.join(FINDING_KINDS)}")
        if (self.word == MEASURED) != (self.kind == MEASURED) or \
                self.word not in (*VERDICTS, MEASURED):
            raise ValueError(f"a {self.kind!r} finding cannot have the word {self.word!r}")

    @property
    def counted(self) -> bool:
        return self.kind == TESTED

    @property
    def label(self) -> str:
        return f"{self.scope}: {self.claim}" if self.scope else self.claim


def check(scope: str, claim: str, passed: bool | None, numbers: str, kind: str = TESTED) -> Finding:
    """A yes/no finding: confirmed when ``passed``, refuted when not, inconclusive when
    None (the runs cannot decide it)."""
    word = "inconclusive" if passed is None else "confirmed" if passed else "refuted"
    return Finding(claim, word, numbers, kind, scope)


def headline_verdict(findings: list[Finding], numbers: str = "") -> Verdict:
    """The experiment's verdict from its tested findings only: ``combined_word`` of the
    decided ones, but ``qualified`` instead of ``confirmed`` while a tested one is undecided
    (the claim is not shown everywhere); inconclusive when none is decided. The reason is
    ``numbers`` and the tested findings not confirmed, or without ``numbers`` every tested
    finding with its word."""
    counted = [f for f in findings if f.counted]
    decided = [f.word for f in counted if f.word != "inconclusive"]
    if not decided:
        return inconclusive("no tested claim could be decided ("
                            + ("; ".join(f"{f.label}: {f.reason}" for f in counted) or "none tested") + ")")
    word = combined_word(decided)
    word = "qualified" if word == "confirmed" and len(decided) < len(counted) else word
    if not numbers:
        return Verdict(word, "tested claims: " + "; ".join(f"{f.label}: {f.word}" for f in counted)
                       + " (checks by construction, extras and measurements are not counted)")
    off = [f for f in counted if f.word != "confirmed"]
    return Verdict(word, numbers + ("; not confirmed: " + "; ".join(
        f"{f.label}: {f.word} ({f.reason})" for f in off) if off else ""))


def findings_frame(findings: list[Finding]) -> pd.DataFrame:
    """The findings as a table (result.md's findings table, an experiment's checks.csv)."""
    return pd.DataFrame([{"scope": f.scope, "claim": f.claim, "class": f.kind, "counted": f.counted,
                          "verdict": f.word, "reason": f.reason} for f in findings])


def findings_table(findings: list[Finding]) -> list[str]:
    """result.md's table of the findings: (scope,) claim, class, counted, verdict, reason."""
    from analysis.render import markdown_table, yes_no

    scoped = any(f.scope for f in findings)
    return markdown_table(["scope"] * scoped + ["claim", "class", "counted", "verdict", "reason"],
                          [[f.scope] * scoped + [f.claim, f.kind, yes_no(f.counted), f"**{f.word}**",
                                                 f.reason] for f in findings])


def findings_section(findings: list[Finding], verdict: Verdict) -> list[str]:
    """result.md's closing lines: the findings table, then the experiment's verdict."""
    return ["## Findings", "", ("Only *tested* findings count toward the verdict; *by "
                                "construction*, *extra* and *measured* ones are shown, not counted."),
            "", *findings_table(findings), "", verdict.line(), ""]


# ----------------------------------------------------------------------------- the protocol


def _same(x):
    return x


def _no_figures(summary, runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    return []


@dataclass
class Experiment:
    """An experiment's five steps (module doc); ``analyze`` runs them and writes
    result.csv, result.md and the figures into ``out``."""

    title: str
    summarise: Callable[[pd.DataFrame], Any]  # runs -> summary (result.csv by default)
    verdict: Callable[[Any], Verdict]  # summary -> verdict
    render: Callable[[Any, Verdict, str], str]  # summary, verdict, preset -> result.md
    select: Callable[[pd.DataFrame], pd.DataFrame] = measured_rows  # frame -> rows
    per_run: Callable[[pd.DataFrame], pd.DataFrame] = _same  # rows -> one row per run
    figures: Callable[[Any, pd.DataFrame, Path], list[Path]] = _no_figures
    result_frame: Callable[[Any], pd.DataFrame] = _same  # summary -> result.csv's table
    more_tables: Callable[[Any], dict[str, pd.DataFrame]] = lambda summary: {}  # name.csv
    empty_reason: str = "the runs hold no measurement this experiment can use"

    def analyze(self, frame: pd.DataFrame, out: Path, preset: str) -> str:
        """Run the five steps on ``frame`` and write the results into ``out``; returns the
        markdown. Runs with nothing to measure (no rows, or an empty summary table) give an
        ``inconclusive`` result with ``empty_reason``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.select(frame)
        runs = self.per_run(rows) if not rows.empty else pd.DataFrame()
        if runs.empty:
            return write_inconclusive(out, self.title, self.empty_reason)
        summary = self.summarise(runs)
        if isinstance(summary, pd.DataFrame) and summary.empty:
            return write_inconclusive(out, self.title, self.empty_reason)
        verdict = self.verdict(summary)
        self.result_frame(summary).to_csv(out / "result.csv", index=False)
        for name, table in self.more_tables(summary).items():
            table.to_csv(out / f"{name}.csv", index=False)
        apply_theme()
        self.figures(summary, runs, out / "figures")
        text = self.render(summary, verdict, preset)
        (out / "result.md").write_text(text)
        return text


def write_inconclusive(out: Path, title: str, reason: str) -> str:
    """result.md with an 'inconclusive' verdict and an empty result.csv, for runs that
    hold nothing this experiment can measure; returns the markdown."""
    text = f"# {title}\n\n{inconclusive(reason).line()}\n"
    (out / "result.md").write_text(text)
    pd.DataFrame().to_csv(out / "result.csv", index=False)
    return text


def sections_frame(**sections: pd.DataFrame) -> pd.DataFrame:
    """Several tables in one, told apart by a leading ``section`` column (result.csv of
    an experiment with more than one table)."""
    both = pd.concat([frame.assign(section=name) for name, frame in sections.items()],
                     ignore_index=True)
    return both[["section"] + [c for c in both.columns if c != "section"]]


# ----------------------------------------------------------------------------- selecting and pairing runs
# The rows a claim is about, one row per run or per paired replicate, a run's config and
# rebuilt initial policy.


def first_measurements(frame: pd.DataFrame, estimators=None) -> pd.DataFrame:
    """The first measured row of every run (of ``estimators`` when given)."""
    rows = measured_rows(frame)
    if estimators is not None:
        rows = rows[rows["estimator"].isin(estimators)]
    run = "run_dir" if "run_dir" in rows.columns else "run_id"
    return rows[rows["step"] == rows.groupby(run)["step"].transform("min")]


def late_measurements(frame: pd.DataFrame, min_step: int) -> pd.DataFrame:
    """Measured rows at steps >= ``min_step`` (all of them when no run has any there, as
    in smoke runs), for claims about a fitted critic."""
    rows = measured_rows(frame)
    late = rows[rows["step"] >= min_step]
    return late if not late.empty else rows


def instance_column(rows: pd.DataFrame) -> pd.Series:
    """``env.seed`` as an int column (-1 where the environment has none)."""
    instance = rows["env.seed"] if "env.seed" in rows.columns else pd.Series(-1, index=rows.index)
    return instance.fillna(-1).astype(int)


def config_of(row: pd.Series) -> dict:
    """A run's nested config from its flattened ``env.*``/``policy.*``/... columns and
    ``seed`` (missing values left to the schema defaults), for ``initial_env_and_policy``."""
    config: dict = {}
    for column, value in row.items():
        column = str(column)
        if column != "seed" and not column.startswith(("env.", "policy.", "estimator.",
                                                       "training.")):
            continue
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        if isinstance(value, str) and value.startswith("["):  # a list, flattened to text
            value = json.loads(value)
        *path, key = column.split(".")
        node = config
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value.item() if isinstance(value, np.generic) else value
    return config


def logged_bool(value: object) -> bool | None:
    """A boolean config value as logged (True/False, or the text 'true'/'false'); None when
    the run did not log it (NaN or None)."""
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else bool(value)


def one_run_each(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The rows of the first run of every configuration ``keys``: a configuration run
    twice (a sweep re-run into new job folders) counts once."""
    run = "run_dir" if "run_dir" in rows.columns else "run_id"
    first = rows.drop_duplicates(run).drop_duplicates(keys)
    return rows[rows[run].isin(first[run])]


def paired_columns(rows: pd.DataFrame, keys: list[str], by: str, values: list[str],
                   arms: tuple) -> pd.DataFrame:
    """One line per replicate (``keys``: the runs that share episodes) with every one of
    ``values`` for every arm (a value of ``by``, such as the estimator) as ``VALUE_ARM``
    columns; replicates missing an arm's first value dropped (an empty frame with the
    ``keys`` when an arm has no run)."""
    wide = rows.pivot_table(index=keys, columns=by, values=values, aggfunc="mean")
    wide.columns = [f"{value}_{arm}" for value, arm in wide.columns]
    needed = [f"{values[0]}_{arm}" for arm in arms]
    if not set(needed) <= set(wide.columns):
        return pd.DataFrame(columns=keys)
    return wide.dropna(subset=needed).reset_index()


def per_run_table(rows: pd.DataFrame, first=(), mean=()) -> pd.DataFrame:
    """One line per run: its mean statistics (``analysis.table.per_run_values``), the run's
    first value of each ``first`` column (its settings) and its mean of each ``mean``
    column (statistics an experiment derived per measured row)."""
    from analysis.table import per_run_values

    groups = rows.groupby("run_dir", sort=False)
    return per_run_values(rows).join(groups[list(first)].first()).join(
        groups[list(mean)].mean()).reset_index()


def measured_with_previous(frame: pd.DataFrame, column: str, name: str) -> pd.DataFrame:
    """The measured rows (``measured_rows``) with, as ``name``, their run's ``column`` as
    logged at the iteration before (NaN where there is none): what an iteration's
    measurement inherits, such as the fit that made its critic (``critic_loss``)."""
    frame = frame.sort_values(["run_dir", "step"])
    logged = frame[column] if column in frame else pd.Series(np.nan, frame.index)
    previous = frame[["run_dir", "step"]].assign(**{name: logged.groupby(frame["run_dir"]).shift(1)})
    return measured_rows(frame).merge(previous, on=["run_dir", "step"], how="left")


def run_env_and_policy(row: pd.Series):
    """The environment and initial policy of the run ``row`` comes from, rebuilt as pgvar-run
    built them (``pgvar.run.initial_env_and_policy`` of ``config_of(row)``)."""
    from pgvar.run import initial_env_and_policy

    return initial_env_and_policy(config_of(row))


# ----------------------------------------------------------------------------- references and exact quantities
# Which reference a run was scored against; exact J at parameters, exact gains, a held-out critic.


def reference_estimator(rows: pd.DataFrame) -> str | None:
    """The estimator a Monte Carlo reference gradient averaged
    (``training.reference.estimator``, reward-to-go where unset); None for an exact one."""
    from analysis.table import reference_kind

    if reference_kind(rows) == "exact" or "training.reference.estimator" not in rows:
        return None
    return str(rows["training.reference.estimator"].fillna("reinforce_rtg").iloc[0])


def reference_label(rows: pd.DataFrame) -> str:
    """How the reference gradient of ``rows`` was obtained, for a table: 'exact', or
    'Monte Carlo (N episodes of ESTIMATOR)' (``analysis.table.reference_kind``)."""
    from analysis.table import reference_kind

    episodes = rows["ref_episodes"].max() if "ref_episodes" in rows else math.nan
    return reference_kind(rows) + (f" ({episodes:.0f} episodes of {reference_estimator(rows)})"
                                   if math.isfinite(episodes) and episodes else "")


def exact_objective_at(env, policy, theta) -> float:
    """The exact J of ``policy`` with its parameters replaced by the flat vector ``theta``
    (``policy.parameters()`` order); the policy itself is left as it was."""
    import copy

    import torch
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    moved = copy.deepcopy(policy)
    vector_to_parameters(theta.to(parameters_to_vector(policy.parameters()).dtype),
                         moved.parameters())
    with torch.no_grad():
        return float(env.exact_objective(moved))


def initial_exact_objective(row: pd.Series) -> float:
    """The exact J of the initial policy of the run ``row`` comes from (``run_env_and_policy``):
    the return's scale, which a variance divided by J² is free of."""
    import torch

    env, policy = run_env_and_policy(row)
    with torch.no_grad():
        return float(env.exact_objective(policy))


def exact_gains(env, policy, moves: dict[str, Any]) -> dict[str, float]:
    """Per named set of moves (rows of flat parameter displacements in
    ``policy.parameters()`` order), the mean over its rows of the exact J(θ_0 + move) −
    J(θ_0), θ_0 the policy's parameters (``exact_objective_at``; the policy is left as it
    was): what a step buys on the objective itself rather than on an estimate of it."""
    from torch.nn.utils import parameters_to_vector

    theta0 = parameters_to_vector(policy.parameters()).detach().double()
    j0 = exact_objective_at(env, policy, theta0)
    return {name: float(np.mean([exact_objective_at(env, policy, theta0 + m) - j0 for m in rows]))
            for name, rows in moves.items()}


def held_out_critic(run_cfg, env, policy, index: int, episodes: int):
    """A critic independent of any batch it will serve: the exact V where the environment
    has one (tabular), else the run's kind of critic fitted on ``episodes`` fresh episodes
    of ``policy`` (``pgvar.measured_step.fresh_critic`` at step ``index``)."""
    from pgvar.critics import make_critic
    from pgvar.measured_step import fresh_critic

    if callable(getattr(env, "exact_values", None)):
        return make_critic(env, "exact", policy=policy)
    return fresh_critic(run_cfg, env, policy, index, episodes)


# ----------------------------------------------------------------------------- estimates and their intervals
# An Estimate as columns and back, means with intervals, and tests on an interval.


def sqrt_estimate(est: Estimate) -> Estimate:
    """An interval of an unbiased squared quantity (a squared bias) on the root scale:
    sqrt(max(x, 0)) of the value and both ends (NaN stays NaN)."""
    return est.map(sqrt_clipped)


def estimate_columns(name: str, est: Estimate) -> dict[str, float]:
    """``{name: value, name_lo: lo, name_hi: hi}`` for a summary record."""
    return {name: est.value, f"{name}_lo": est.lo, f"{name}_hi": est.hi}


def estimate_of(record, name: str, n: int = 0) -> Estimate:
    """The ``Estimate`` a record holds as ``name``, ``name_lo`` and ``name_hi`` (the inverse
    of ``estimate_columns``), to judge a summary's interval again."""
    return Estimate(record[name], record[f"{name}_lo"], record[f"{name}_hi"], n)


def mean_columns(runs: pd.DataFrame, metrics) -> dict[str, float]:
    """``estimate_columns`` of the mean across runs (``mean_ci``) of each of ``metrics``:
    column names, or ``{name in the record: column}``."""
    named = metrics if isinstance(metrics, dict) else {m: m for m in metrics}
    return {k: v for name, m in named.items() for k, v in
            estimate_columns(name, mean_ci(runs[m].to_numpy(float))).items()}


def means_by_group(rows: pd.DataFrame, keys: list[str], columns: list[str]) -> pd.DataFrame:
    """Per group of ``keys``: ``runs`` (rows in it) and, per column, its mean with a 95%
    interval (``COL``, ``COL_lo``, ``COL_hi``; NaN when absent): ``mean_ci``'s bootstrap,
    or for a column with its logged standard errors beside it (``COL_se``: unbiased
    estimates such as U) ``analysis.table.squared_bias_interval``'s hull of both."""
    from analysis.table import squared_bias_interval

    out = []
    for key, g in rows.groupby(keys, sort=True):
        rec: dict[str, object] = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        rec["runs"] = len(g)
        for col in columns:
            est = Estimate(math.nan, math.nan, math.nan, 0) if col not in g else \
                squared_bias_interval(g, col) if f"{col}_se" in g else mean_ci(g[col].to_numpy(float))
            rec.update(estimate_columns(col, est))
        out.append(rec)
    return pd.DataFrame(out)


def bias_columns(rows: pd.DataFrame) -> dict[str, object]:
    """The de-noised relative squared bias of one estimator's runs across replicates
    (``analysis.table.squared_bias_interval``), its root, and whether the bias is
    distinguishable from 0 (absolute and relative intervals above 0, as the table
    decides; None without an interval)."""
    from analysis.table import per_run_values, squared_bias_interval

    values = per_run_values(rows)
    b2 = squared_bias_interval(values, "grad_bias_sq")
    rel = squared_bias_interval(values, "grad_rel_bias_sq")
    decided = math.isfinite(b2.lo) and math.isfinite(rel.lo)
    return {**estimate_columns("rel_bias_sq", rel), **estimate_columns("rel_bias", sqrt_estimate(rel)),
            "bias_distinguishable": bool(b2.lo > 0 and rel.lo > 0) if decided else None}


def relative_mse(rows: pd.DataFrame) -> pd.Series:
    """Per measured row, the mean squared error of a batch estimate relative to ‖∇J‖²,
    the reference's own noise taken out: (grad_mse − SE_ref²) / ‖∇J‖² (SE_ref 0 where
    the reference is exact or its standard error was not logged)."""
    ref_se = rows["ref_se"].fillna(0.0) if "ref_se" in rows else pd.Series(0.0, rows.index)
    return (rows["grad_mse"] - ref_se ** 2) / rows["ref_norm"] ** 2


def in_interval(rows, name: str, value: float):
    """Whether ``value`` lies in ``name``'s 95% interval (``name_lo`` to ``name_hi``): a
    bool for a record, a boolean Series for a table; False where an end is NaN."""
    return (rows[f"{name}_lo"] <= value) & (rows[f"{name}_hi"] >= value)


def holds(value: float) -> Callable[[float, float], bool]:
    """The test ``interval_check`` applies for 'the 95% interval holds ``value``'."""
    return lambda lo, hi: bool(lo <= value <= hi)


def interval_check(record, name: str, test: Callable[[float, float], bool | None],
                   n: int = 0, min_n: int = 0) -> bool | None:
    """``test(lo, hi)`` on the 95% interval of ``name`` in ``record`` (``name_lo``,
    ``name_hi``): a check's outcome, None (undecided) when the interval has no finite ends
    or rests on fewer than ``min_n`` replicates (``n``)."""
    lo, hi = record[f"{name}_lo"], record[f"{name}_hi"]
    if n < min_n or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return test(lo, hi)


def interval_sign(record, name: str, at: float = 0.0) -> int:
    """``side_of`` as a number for a record's ``name`` interval (``name_lo`` to ``name_hi``):
    1 when it lies above ``at``, -1 when below, 0 when it holds ``at`` or an end is missing
    or NaN."""
    est = Estimate(math.nan, record.get(f"{name}_lo", math.nan), record.get(f"{name}_hi", math.nan), 0)
    return {"below": -1, "above": 1}.get(side_of(est, at, "below", "above"), 0)


def closeness(est: Estimate, factor: float) -> str:
    """``close`` when a ratio's 95% interval lies within [1/factor, factor], ``not close``
    when it lies entirely outside, else (or without finite ends) ``inconclusive``."""
    if not (math.isfinite(est.lo) and math.isfinite(est.hi)):
        return "inconclusive"
    if 1 / factor <= est.lo and est.hi <= factor:
        return "close"
    return "not close" if est.lo > factor or est.hi < 1 / factor else "inconclusive"


def reciprocal(est: Estimate, numerator: float = 1.0) -> Estimate:
    """``numerator / est`` (numerator > 0) with the interval inverted: the lower end from
    the upper one, the upper end infinite when the interval reaches 0 (a rate's interval
    turned into one of the count it takes)."""
    return Estimate(numerator / est.value, numerator / est.hi,
                    numerator / est.lo if est.lo > 0 else math.inf, est.n)


# ----------------------------------------------------------------------------- directions
# cos(E ĝ, ∇J) re-derived from the logged statistics, pooled over runs and paired.


def direction_columns(rows: pd.DataFrame) -> pd.DataFrame:
    """Add, per measured row, ``rel_proj`` = <ḡ, g>/||g||², ``rel_sq_norm`` =
    (||ḡ||² - trCov/M)/||g||² (both unbiased: ||ḡ||² = snr trCov, ||ḡ - g||² = U + trCov/M
    + SE_ref²) and ``rel_perp_sq`` = rel_sq_norm - rel_proj²: the logged statistics
    re-derived into the parts of E ĝ along and across the reference gradient g."""
    df = rows.copy()
    var = df["grad_variance"].astype(float)
    m = df["n_estimates"].astype(float) if "n_estimates" in df else pd.Series(np.nan, df.index)
    se2 = df["ref_se"].fillna(0.0).astype(float) ** 2 if "ref_se" in df else 0.0
    ref2 = df["ref_norm"].astype(float) ** 2
    ref2 = ref2.where(ref2 > 0)
    mean_sq = df["snr"].astype(float) * var
    dist_sq = df["grad_bias_sq"].astype(float) + var / m + se2
    df["rel_proj"] = (mean_sq + ref2 - dist_sq) / 2.0 / ref2
    df["rel_sq_norm"] = (mean_sq - var / m) / ref2
    df["rel_perp_sq"] = df["rel_sq_norm"] - df["rel_proj"] ** 2
    return df


def cosine_of_means(proj: np.ndarray, perp_sq: np.ndarray, axis: int = -1) -> np.ndarray:
    """cos(E ĝ, g) = p / sqrt(p² + q), p and q the means over seeds of ``rel_proj`` and
    ``rel_perp_sq`` (means of unbiased estimates; the per-seed ratio would be biased)."""
    p = np.mean(proj, axis=axis)
    return p / np.sqrt(p ** 2 + np.clip(np.mean(perp_sq, axis=axis), 0.0, None))


def _cosine_difference(a, b, c, d, axis: int = -1) -> np.ndarray:
    return cosine_of_means(a, b, axis) - cosine_of_means(c, d, axis)


def _paired_estimate(arrays: tuple[np.ndarray, ...], statistic) -> Estimate:
    """``statistic`` of paired arrays with its bootstrap interval over seeds (NaN ends
    below two seeds)."""
    n = len(arrays[0])
    if n < 2:
        return Estimate(float(statistic(*arrays)) if n else math.nan, math.nan, math.nan, n)
    lo, hi = bootstrap_interval(arrays, statistic, paired=True, seed=0)
    return Estimate(float(statistic(*arrays)), lo, hi, n)


def pooled_cosine(runs: pd.DataFrame, proj: str = "rel_proj") -> Estimate:
    """cos(E ĝ, ∇J) over the seeds of ``runs`` (``cosine_of_means``), 95% paired bootstrap."""
    a, b = runs[proj].to_numpy(float), runs["rel_perp_sq"].to_numpy(float)
    ok = np.isfinite(a) & np.isfinite(b)
    return _paired_estimate((a[ok], b[ok]), cosine_of_means)


def pooled_cosine_difference(runs: pd.DataFrame, baseline: pd.DataFrame,
                             proj: str = "rel_proj") -> Estimate:
    """pooled_cosine(runs) - pooled_cosine(baseline) over the seeds both have, paired."""
    cols = [proj, "rel_perp_sq"]
    j = runs[["seed", *cols]].merge(baseline[["seed", *cols]], on="seed",
                                    suffixes=("", "_b")).dropna()
    arrays = tuple(j[c].to_numpy(float) for c in (*cols, *(f"{c}_b" for c in cols)))
    return _paired_estimate(arrays, _cosine_difference)


# ----------------------------------------------------------------------------- paired replicates and bootstraps
# Statistics over replicates (seeds, instances) paired across the settings they share.


def replicate_resamples(n: int, seed: int = 0, n_resamples: int = N_RESAMPLES) -> np.ndarray:
    """[n_resamples, n] indices of whole replicates (seeds, systems) drawn with replacement.

    ``analysis.stats.bootstrap_interval`` resamples for one scalar statistic at a time; a
    curve or a fit needs the same draws for everything it reports (a trend across points,
    an argmin and the share of resamples choosing each point, coefficients solved at
    once), so those resample with these indices and ``percentile_ends``."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def percentile_ends(draws: np.ndarray, n: int, axis: int = 0) -> tuple:
    """The expanded percentile interval (``analysis.stats.expanded_level`` at ``n``
    replicates) of bootstrap draws along ``axis``, NaN draws left out."""
    q = (1 - expanded_level(n)) / 2
    lo, hi = np.nanquantile(draws, [q, 1 - q], axis=axis)
    return lo, hi


def bootstrap_rows(w: np.ndarray, statistic, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``statistic(w)`` (a scalar or a vector) and its expanded-percentile 95% interval
    from resampling the rows (replicates) of ``w`` (``replicate_resamples``); NaN ends
    below two rows."""
    value = np.atleast_1d(np.asarray(statistic(w), float))
    if w.shape[0] < 2:
        return value, np.full_like(value, math.nan), np.full_like(value, math.nan)
    draws = np.array([np.atleast_1d(statistic(w[idx]))
                      for idx in replicate_resamples(w.shape[0], seed)], float)
    return (value, *percentile_ends(draws, w.shape[0]))


def bootstrap_estimates(w: np.ndarray, statistic, seed: int = 0) -> list[Estimate]:
    """``bootstrap_rows`` as one ``Estimate`` per entry of the statistic (a curve's points,
    a fit's coefficients), for ``estimate_columns``."""
    return [Estimate(float(v), float(lo), float(hi), w.shape[0])
            for v, lo, hi in zip(*bootstrap_rows(w, statistic, seed))]


def paired_matrix(runs: pd.DataFrame, x: str, column: str,
                  replicate: str | list[str] = "seed") -> tuple[np.ndarray, np.ndarray]:
    """(x values [L], ``column`` [R, L]) of the replicates (a column, or several that
    together name one, such as instance and seed) that have every x: a curve per
    replicate, the pairs of a paired comparison along x."""
    wide = runs.pivot_table(index=replicate, columns=x, values=column, aggfunc="mean").dropna()
    return wide.columns.to_numpy(float), wide.to_numpy(float)


def with_min_n(est: Estimate, min_n: int) -> Estimate:
    """The estimate, without its interval when it rests on fewer than ``min_n`` replicates."""
    return est if est.n >= min_n else Estimate(est.value, math.nan, math.nan, est.n)


def paired_mean(values: np.ndarray, min_n: int = 3) -> Estimate:
    """``mean_ci`` of per-replicate values, without an interval below ``min_n`` of them."""
    return with_min_n(mean_ci(values), min_n)


def paired_difference(runs: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> Estimate:
    """Mean over seeds of metric(run) - metric(baseline run of the same seed), 95% CI."""
    both = runs.set_index("seed")[metric].to_frame("x").join(
        baseline.set_index("seed")[metric].rename("b"), how="inner")
    return mean_ci((both["x"] - both["b"]).to_numpy())


def paired_difference_columns(runs: pd.DataFrame, baseline: pd.DataFrame, metrics,
                              proj: str = "rel_proj") -> dict[str, float]:
    """``estimate_columns`` ``d_METRIC`` of each metric's ``paired_difference`` from the
    baseline's runs of the same seeds, then ``d_cos_mean``, the paired change of
    cos(E ĝ, ∇J) (``pooled_cosine_difference``)."""
    return {**{k: v for m in metrics
               for k, v in estimate_columns(f"d_{m}", paired_difference(runs, baseline, m)).items()},
            **estimate_columns("d_cos_mean", pooled_cosine_difference(runs, baseline, proj))}


def geometric_mean_ratio(numerator: dict, denominator: dict, min_n: int = 3) -> Estimate:
    """Geometric mean over the keys both hold (seeds) of ``numerator[k] / denominator[k]``,
    with the interval of the mean log ratio (``mean_ci``) mapped back by exp: paired and
    scale-free, so every replicate weighs the same (a ratio of means is dominated by the
    replicate with the largest values). Non-positive pairs are left out; no interval below
    ``min_n`` pairs; NaN with none."""
    keys = [k for k in numerator if k in denominator and numerator[k] > 0 and denominator[k] > 0]
    if not keys:
        return Estimate(math.nan, math.nan, math.nan, 0)
    return with_min_n(mean_ci(np.log([numerator[k] / denominator[k] for k in keys])).map(math.exp),
                       min_n)


def paired_geometric_ratio(runs: pd.DataFrame, baseline: pd.DataFrame, metric: str,
                           min_n: int = 3) -> Estimate:
    """``geometric_mean_ratio`` of metric(run) / metric(baseline run of the same seed): the
    ratio counterpart of ``paired_difference``."""
    return geometric_mean_ratio(dict(zip(runs["seed"], runs[metric])),
                                dict(zip(baseline["seed"], baseline[metric])), min_n)


def paired_ratio(xs: np.ndarray, values: np.ndarray, num: float, den: float,
                 min_n: int = 3) -> Estimate:
    """The curve at x=``num`` over the curve at x=``den`` (nearest x), replicate by
    replicate: ``geometric_mean_ratio`` of the two columns of ``values`` [R, L]."""
    if values.shape[0] < 1 or not (math.isfinite(num) and math.isfinite(den)):
        return Estimate(math.nan, math.nan, math.nan, 0)
    a, b = (dict(enumerate(values[:, int(np.argmin(np.abs(xs - v)))])) for v in (num, den))
    return geometric_mean_ratio(a, b, min_n)


def curve_trend(xs: np.ndarray, values: np.ndarray, min_n: int = 3) -> Estimate:
    """Spearman correlation of x with the mean curve of ``values`` [R, L], with the
    bootstrap interval over whole replicates (curves resampled jointly across x)."""
    from scipy import stats

    n = values.shape[0]
    if n < 1 or values.shape[1] < 3:
        return Estimate(math.nan, math.nan, math.nan, n)
    point = float(stats.spearmanr(xs, values.mean(0)).statistic)
    if n < min_n:
        return Estimate(point, math.nan, math.nan, n)
    ranks = stats.rankdata(values[replicate_resamples(n)].mean(1), axis=1)
    ranks -= ranks.mean(1, keepdims=True)
    x_ranks = stats.rankdata(xs) - (len(xs) + 1) / 2
    norms = np.sqrt((ranks ** 2).sum(1) * (x_ranks ** 2).sum())
    rho = np.divide(ranks @ x_ranks, norms, out=np.zeros(len(ranks)), where=norms > 0)  # 0: flat
    lo, hi = map(float, percentile_ends(rho, n))
    return Estimate(point, lo, hi, n)


def curve_argmin(xs: np.ndarray, values: np.ndarray,
                 min_n: int = 3) -> tuple[Estimate, dict[float, float]]:
    """The x minimising the mean curve of ``values`` [R, L] with its bootstrap interval
    over replicates (no interval below ``min_n``; NaN without replicates), and the share
    of resamples choosing each x."""
    n = values.shape[0]
    if n < 1:
        return Estimate(math.nan, math.nan, math.nan, 0), {}
    best = float(xs[int(np.argmin(values.mean(0)))])
    if n < min_n:
        return Estimate(best, math.nan, math.nan, n), {}
    picks = xs[np.argmin(values[replicate_resamples(n, seed=1)].mean(1), axis=1)]
    lo, hi = map(float, percentile_ends(picks, n))
    return Estimate(best, lo, hi, n), {float(v): float(np.mean(picks == v)) for v in xs
                                       if np.any(picks == v)}


def slope_estimate(x: np.ndarray, y: np.ndarray) -> Estimate:
    """Least-squares slope of y on x with the paired bootstrap interval over the points
    (NaN below three points or without spread in x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0:
        return Estimate(math.nan, math.nan, math.nan, len(x))
    lo, hi = bootstrap_interval((x, y), _slope, paired=True, seed=0)
    return Estimate(float(_slope(x, y)), lo, hi, len(x))


def _slope(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    xc = x - x.mean(axis=axis, keepdims=True)
    return (xc * (y - y.mean(axis=axis, keepdims=True))).sum(axis) / (xc ** 2).sum(axis)


def _log_design(rows: pd.DataFrame, factors: dict[str, str]) -> np.ndarray:
    """Columns 1 and log x for every factor column x."""
    return np.column_stack([np.ones(len(rows)), *(np.log(rows[c].to_numpy()) for c in factors.values())])


def _replicate_least_squares(rows: pd.DataFrame, y: str, factors: dict[str, str],
                             replicate: str) -> tuple[np.ndarray, np.ndarray]:
    """Expanded-percentile 95% ends of ``log_linear_fit``'s coefficients when whole
    replicates (with all their rows) are resampled (NaN below two). Least squares is
    additive over replicates in XᵀX and Xᵀy, so a resample is a count-weighted sum of the
    replicates' parts: all resamples are solved at once."""
    keys = np.array(sorted(rows[replicate].unique()))
    if len(keys) < 2:
        return np.full(len(factors) + 1, np.nan), np.full(len(factors) + 1, np.nan)
    parts = [(X.T @ X, X.T @ np.log(g[y].to_numpy()))
             for g in (rows[rows[replicate] == k] for k in keys)
             for X in [_log_design(g, factors)]]
    counts = np.stack([np.bincount(p, minlength=len(keys)) for p in replicate_resamples(len(keys))])
    A = np.einsum("rs,sij->rij", counts.astype(float), np.array([p[0] for p in parts]))
    b = counts @ np.array([p[1] for p in parts])
    ok = np.linalg.matrix_rank(A) == len(factors) + 1
    return percentile_ends(np.linalg.solve(A[ok], b[ok][..., None])[..., 0], len(keys))


def log_linear_fit(rows: pd.DataFrame, y: str, factors: dict[str, str],
                   replicate: str = "seed") -> dict[str, float]:
    """The power law y ∝ Π x^k fitted as ``log y = c + Σ k log x`` by least squares over
    ``rows`` (``factors`` maps each exponent's name to its column x; y > 0): every exponent
    with its 95% interval from resampling whole replicates (``name``, ``name_lo``,
    ``name_hi``), then the intercept ``c`` and ``r2`` on the log scale."""
    X, log_y = _log_design(rows, factors), np.log(rows[y].to_numpy())
    beta = np.linalg.lstsq(X, log_y, rcond=None)[0]
    lo, hi = _replicate_least_squares(rows, y, factors, replicate)
    r2 = 1 - ((log_y - X @ beta) ** 2).sum() / ((log_y - log_y.mean()) ** 2).sum()
    exponents = {f"{name}{end}": ends[i] for i, name in enumerate(factors, start=1)
                 for end, ends in (("", beta), ("_lo", lo), ("_hi", hi))}
    return {**exponents, "c": beta[0], "r2": r2}


# ----------------------------------------------------------------------------- figures


def shade_band(ax, frame: pd.DataFrame, x: str, lo: float | str, hi: float | str) -> None:
    """Shade the region between ``lo`` and ``hi`` behind a panel's lines: constant ends as a
    horizontal span, a column name as an end that follows ``frame``'s value at each x."""
    if isinstance(lo, str) or isinstance(hi, str):
        edge = frame.drop_duplicates(x).sort_values(x)
        ends = [edge[v] if isinstance(v, str) else v for v in (lo, hi)]
        ax.fill_between(edge[x], *ends, color="0.85", step="mid", zorder=0, lw=0)
    else:
        ax.axhspan(lo, hi, color="0.85", zorder=0)


def plot_estimate_panels(panels: list[dict], out_dir: Path, name: str, ncols: int = 3) -> list[Path]:
    """A grid of panels, each a line per group with its 95% interval: a panel is a dict of
    ``frame``, ``x``, ``y`` (with ``y_lo``/``y_hi`` columns), ``by`` (the lines) and
    optionally ``title``, ``xlabel``, ``ylabel``, ``xscale``/``yscale``, ``band`` (a shaded
    (lo, hi) region: numbers, or column names for ends that change with x), ``ylim``,
    ``prediction`` (a column drawn as a dotted line per group: a law's value, or a second
    series), ``diagonal`` (the dashed y = x over an (lo, hi) range) and ``hlines`` /
    ``vlines`` (dotted reference levels: a threshold, a typical size). Error bars, or
    a shaded band for lines of over 30 points; one colour per group across panels, one
    legend below; ``analysis.figures.save_figure``."""
    import matplotlib.pyplot as plt

    from analysis.figures import PANEL_HEIGHT, PAPER_WIDTH, error_bars, save_figure

    apply_theme()
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(PAPER_WIDTH * max(1.0, ncols / 3), PANEL_HEIGHT * nrows + 0.4))
    labels: dict = {}
    for ax, p in zip(axes.flat, panels):
        if "band" in p:
            shade_band(ax, p["frame"], p["x"], *p["band"])
        for level in p.get("hlines", ()):
            ax.axhline(level, color="0.4", lw=0.8, ls=":")
        for level in p.get("vlines", ()):
            ax.axvline(level, color="0.4", lw=0.8, ls=":")
        for key, g in p["frame"].groupby(p["by"], sort=False) if len(p["frame"]) else []:
            g = g.sort_values(p["x"])
            colour = f"C{list(labels).index(key) if key in labels else len(labels)}"
            if len(g) > 30:
                labels[key], = ax.plot(g[p["x"]], g[p["y"]], color=colour, lw=1, label=str(key))
                ax.fill_between(g[p["x"]], g[f"{p['y']}_lo"], g[f"{p['y']}_hi"], color=colour,
                                alpha=0.2, lw=0)
            else:
                labels[key] = ax.errorbar(g[p["x"]], g[p["y"]], yerr=error_bars(g, p["y"]),
                                          marker="o", ms=2.5, capsize=2, lw=1, color=colour,
                                          label=str(key))
            if "prediction" in p:
                ax.plot(g[p["x"]], g[p["prediction"]], color=colour, lw=1, ls=":")
        if "diagonal" in p:
            ax.plot(p["diagonal"], p["diagonal"], color="0.4", ls="--", lw=0.8)
        ax.set(xlabel=p.get("xlabel", p["x"]), ylabel=p.get("ylabel", p["y"]), title=p.get("title", ""),
               **{k: p[k] for k in ("yscale", "ylim") if k in p})
        if p.get("xscale") == "log":  # plain-number ticks, no crowded minor labels
            log_axis(ax, "x", p["frame"][p["x"]])
        elif "xscale" in p:
            ax.set_xscale(p["xscale"])
        if len(p["frame"]) and not pd.api.types.is_numeric_dtype(p["frame"][p["x"]]):
            ax.tick_params(axis="x", labelrotation=35)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.legend(list(labels.values()), [str(k) for k in labels], loc="lower center",
               ncol=min(6, max(1, len(labels))), frameon=False, fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, out_dir, name)
