"""Calibration of the per-measurement intervals (``simulate``, for ``pgvar-reproduce``): the
grid, its verdicts and its figure; the machinery is ``analysis.calibration``."""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd

from analysis import calibration as cal
from analysis import experiment as ex
from analysis.render import frame_table

TABULAR = {"n_states": 5, "n_actions": 3, "horizon": 8}
LQR = {"state_dim": 2, "action_dim": 1, "horizon": 20}
MC_EPISODES = {"tabular_mc": 1024, "cartpole": 2048}
MIN_M = 16  # the target holds from here (smaller M is reported, flagged, not judged)
INTERVALS = {"bias_sq": "squared bias ‖E ĝ − ∇J‖²", "variance": "variance tr Cov ĝ",
             "ratio": "variance ratio to REINFORCE (paired)"}
SCOPES = {"": "verdict", " where the run is not flagged": "verdict_unflagged"}


def cases_for(env: str) -> list[cal.Case]:
    """The grid of one environment: rloo (bias 0), mean_baseline at B = 8 (bias ∇J/8)
    and at B = 2 (bias ∇J/2); Monte Carlo environments skip the small bias."""
    if env in ("tabular", "lqr"):
        kw = TABULAR if env == "tabular" else LQR
        return [cal.Case(env, "rloo", 4, "zero", env_kwargs=kw),
                cal.Case(env, "mean_baseline", 8, "small", env_kwargs=kw),
                cal.Case(env, "mean_baseline", 2, "large", env_kwargs=kw)]
    if env in MC_EPISODES:
        name, kw = ("tabular", TABULAR) if env == "tabular_mc" else ("cartpole", {})
        n = MC_EPISODES[env]
        return [cal.Case(name, "rloo", 4, "zero", "monte_carlo", n, kw),
                cal.Case(name, "mean_baseline", 2, "large", "monte_carlo", n, kw)]
    raise ValueError(f"unknown calibration environment {env!r}; use tabular, lqr, "
                     f"tabular_mc or cartpole")


def simulate(out: Path, preset: str, params: dict) -> str:
    """Run the grid, write records.csv.gz and the report (``report``)."""
    cases = [c for env in params["envs"] for c in cases_for(env)]
    records = cal.run_calibration(cases, params["Ms"], int(params["repeats"]), params.get("mc_Ms"),
                                  params.get("mc_repeats"), seed=int(params.get("seed", 0)))
    out.mkdir(parents=True, exist_ok=True)
    records.to_csv(out / "records.csv.gz", index=False)
    return report(records, out, preset)


def parts_of(table: pd.DataFrame) -> list[ex.Finding]:
    """Per interval (and the bias verdict's false positives), over every measurement and
    over those whose run is not flagged: confirmed when every cell with M >= MIN_M meets
    its target (cells the flag covers almost wholly are not judged unflagged), refuted when
    none does, else qualified. And the flag's own claim: quiet where the targets hold."""
    judged = table[table["M"] >= MIN_M]
    fp = f"{100 * cal.FP_TARGET[0]:.1f}-{100 * cal.FP_TARGET[1]:.1f}%"
    claims = {**{n: f"the {t} interval covers {100 * cal.NOMINAL:.0f}% ± {100 * cal.TOLERANCE:.0f}"
                 for n, t in INTERVALS.items()},
              "false positives": f"the bias verdict fires in {fp} of zero-bias measurements"}
    parts = []
    for (name, claim), (where, column) in itertools.product(claims.items(), SCOPES.items()):
        cells = judged[judged["bias"] == "zero"] if name == "false positives" else judged
        cells = cells[cells[column] != "flagged"]
        missed = cells[cells[column].str.contains(name)]
        word = ex.share_word(["missed"] * len(missed) + ["met"] * (len(cells) - len(missed)), "met")
        parts.append(ex.Finding(claim + where, word, f"met in {len(cells) - len(missed)} of "
                                f"{len(cells)} cells with M >= {MIN_M}" + "".join(
                                    f"; missed: {r.case} M={r.M}" for r in missed.itertuples())))
    claim, words, why = cal.quiet_flag(judged)
    return parts + [ex.Finding(claim, ex.share_word(words, "quiet"), why)]


def render(table: pd.DataFrame, verdict: ex.Verdict, preset: str) -> str:
    """result.md: the verdicts, then the coverage table in percent."""
    return "\n".join([
        f"# Calibration of the per-measurement intervals ({preset} preset)", "",
        verdict.line(), "", *ex.findings_table(parts_of(table)), "",
        (f"Target: coverage {100 * cal.NOMINAL:.0f}% ± {100 * cal.TOLERANCE:.0f} points for every "
         f"interval; false positives of the bias verdict {100 * cal.FP_TARGET[0]:.1f}-"
         f"{100 * cal.FP_TARGET[1]:.1f}% where the bias is 0. Percentages; brackets: Wilson 95% "
         "binomial intervals over the repeats; the columns are explained in README.md."), "",
        *frame_table(cal.in_percent(table), cal.REPORT_COLUMNS), ""])


def plot_coverage(table: pd.DataFrame, fig_dir: Path, suffix: str = "") -> list[Path]:
    """Coverage against M, one panel per (interval, environment and reference), a line per
    bias size; grey band: the target; error bars: Wilson 95% intervals. ``suffix``
    "_unflagged": where the run is not flagged (gaps: all flagged; long bars: few left)."""
    table = table.assign(panel=table["env"] + table["reference"].map(
        lambda r: " (exact ∇J)" if r == "exact" else " (Monte Carlo ∇J)"))
    band = (cal.NOMINAL - cal.TOLERANCE, cal.NOMINAL + cal.TOLERANCE)
    panels = [{"frame": sub, "x": "M", "y": f"{name}_coverage{suffix}", "by": "bias", "title": panel,
               "ylabel": f"coverage: {title}", "band": band, "ylim": (0.6, 1.005), "xscale": "log"}
              for name, title in INTERVALS.items() for panel, sub in table.groupby("panel", sort=False)]
    return ex.plot_estimate_panels(panels, fig_dir, f"calibration_coverage{suffix}",
                                   ncols=table["panel"].nunique())


EXPERIMENT = ex.Experiment(
    "Calibration of the per-measurement intervals", cal.coverage_table,
    lambda table: ex.headline_verdict(parts_of(table)), render, select=lambda records: records,
    figures=lambda table, _, fig_dir: [*plot_coverage(table, fig_dir), *plot_coverage(
        table, fig_dir, "_unflagged")])
report = EXPERIMENT.analyze  # result.csv, the figure and result.md of the measurements in records
