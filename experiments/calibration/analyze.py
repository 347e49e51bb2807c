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
# the parameter-space distance between a moving run's measured steps: over its 10 steps
# tr Cov falls about 6x on the tabular MDP and 13x on LQR
MOVING_STEP = {"tabular_moving": 0.5, "lqr_moving": 0.05}
MIN_M = 16  # the target holds from here (smaller M is reported, flagged, not judged)
INTERVALS = {"bias_sq": "squared bias ‖E ĝ − ∇J‖²", "variance": "variance tr Cov ĝ",
             "ratio": "variance ratio to REINFORCE (paired)"}
SCOPES = {"": "verdict", " where the run is not flagged": "verdict_unflagged"}


def cases_for(env: str) -> list[cal.Case]:
    """The grid of one environment: rloo (bias 0), mean_baseline at B = 8 (bias ∇J/8)
    and at B = 2 (bias ∇J/2); Monte Carlo environments skip the small bias; '_moving'
    ones measure each run's steps along exact gradient ascent (``MOVING_STEP``)."""
    moving = MOVING_STEP.get(env, 0.0)
    base = env.removesuffix("_moving") if moving else env
    if base in ("tabular", "lqr"):
        kw = TABULAR if base == "tabular" else LQR
        return [cal.Case(base, "rloo", 4, "zero", env_kwargs=kw, moving=moving),
                cal.Case(base, "mean_baseline", 8, "small", env_kwargs=kw, moving=moving),
                cal.Case(base, "mean_baseline", 2, "large", env_kwargs=kw, moving=moving)]
    if env in MC_EPISODES:
        name, kw = ("tabular", TABULAR) if env == "tabular_mc" else ("cartpole", {})
        n = MC_EPISODES[env]
        return [cal.Case(name, "rloo", 4, "zero", "monte_carlo", n, kw),
                cal.Case(name, "mean_baseline", 2, "large", "monte_carlo", n, kw)]
    raise ValueError(f"unknown calibration environment {env!r}; use tabular, lqr, "
                     f"tabular_mc, cartpole, tabular_moving or lqr_moving")


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
    none does, else qualified. And the flag's own claim: quiet where the targets hold.
    Cells whose runs move along training (``MOVING_STEP``) are judged apart, over every
    measurement: there the shape a run pools changes from step to step. The comparison
    table's interval pooled over a run is judged the same way (``pooled_finding``)."""
    judged = table[table["M"] >= MIN_M]
    moving = judged["policy_step"] > 0  # coverage_table gives every table this column
    fixed, parts = judged[~moving], []
    for (name, claim), (where, column) in itertools.product(CLAIMS.items(), SCOPES.items()):
        parts.append(cell_finding(fixed, name, claim + where, column))
    parts.append(pooled_finding(fixed, POOLED_CLAIM))
    if moving.any():
        parts += [cell_finding(judged[moving], name, claim + " along a moving policy", "verdict")
                  for name, claim in CLAIMS.items()]
        parts.append(pooled_finding(judged[moving], POOLED_CLAIM + " along a moving policy"))
    claim, words, why = cal.quiet_flag(fixed)
    return parts + [ex.Finding(claim, ex.share_word(words, "quiet"), why)]


CLAIMS = {**{n: f"the {t} interval covers {100 * cal.NOMINAL:.0f}% ± {100 * cal.TOLERANCE:.0f}"
             for n, t in INTERVALS.items()},
          "false positives": f"the bias verdict fires in {100 * cal.FP_TARGET[0]:.1f}-"
                             f"{100 * cal.FP_TARGET[1]:.1f}% of zero-bias measurements"}


POOLED_CLAIM = (f"the comparison table's squared-bias interval pooled over a run's {cal.POOLED_K} steps "
                f"covers {100 * cal.NOMINAL:.0f}% ± {100 * cal.TOLERANCE:.0f}")


def pooled_finding(judged: pd.DataFrame, claim: str) -> ex.Finding:
    """The table's pooled interval over the cells ``judged``: a cell meets the target when
    the Wilson interval of its coverage over its runs reaches 95% +- 2 (the runs are
    fewer than the measurements: 100 or 60 per cell in the full preset)."""
    band = (cal.NOMINAL - cal.TOLERANCE, cal.NOMINAL + cal.TOLERANCE)
    met = [cal.meets_band(lo, hi, band) for lo, hi in
           zip(judged["bias_sq_coverage_pooled_lo"], judged["bias_sq_coverage_pooled_hi"])]
    missed = judged[~pd.Series(met, index=judged.index, dtype=bool)]
    return cells_met(claim, len(judged), [f"{r.case} M={r.M} ({100 * r.bias_sq_coverage_pooled:.0f}%)"
                                          for r in missed.itertuples()])


def cells_met(claim: str, n_cells: int, missed: list[str]) -> ex.Finding:
    """A claim judged cell by cell: confirmed when every one of ``n_cells`` meets it,
    refuted when none does, else qualified, naming the cells ``missed``."""
    word = ex.share_word(["missed"] * len(missed) + ["met"] * (n_cells - len(missed)), "met")
    return ex.Finding(claim, word, f"met in {n_cells - len(missed)} of {n_cells} cells with "
                      f"M >= {MIN_M}" + "".join(f"; missed: {m}" for m in missed))


def cell_finding(judged: pd.DataFrame, name: str, claim: str, column: str) -> ex.Finding:
    """One claim over the cells ``judged`` (the zero-bias ones for the false positives), by
    their verdict ``column``; cells it calls 'flagged' are not judged."""
    cells = judged[judged["bias"] == "zero"] if name == "false positives" else judged
    cells = cells[cells[column] != "flagged"]
    missed = cells[cells[column].str.contains(name)]
    return cells_met(claim, len(cells), [f"{r.case} M={r.M}" for r in missed.itertuples()])


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
    """Coverage against M, one panel per (interval, environment, reference and whether the
    policy moves), a line per bias size; grey band: the target; error bars: Wilson 95%
    intervals. ``suffix`` "_unflagged": where the run is not flagged (gaps: all flagged;
    long bars: few left)."""
    moving = table["policy_step"] > 0
    table = table.assign(panel=table["env"] + table["reference"].map(
        lambda r: " (exact ∇J)" if r == "exact" else " (Monte Carlo ∇J)") + moving.map(
        {True: ", moving policy", False: ""}))
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
