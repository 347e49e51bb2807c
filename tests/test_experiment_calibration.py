"""experiments/calibration: its verdicts (all tested) flip on synthetic measurement records
whose intervals hold the truth at the nominal rate or far below it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.reproduce import load_experiment_module

FOLDER = Path(__file__).resolve().parent.parent / "experiments" / "calibration"


def records(cover_rate: float, fire_rate: float, n: int = 400) -> pd.DataFrame:
    """A zero-bias and a large-bias cell at M = 32 whose intervals hold their truth (1.0)
    in ``cover_rate`` of ``n`` measurements and lie above it otherwise; the bias verdict
    fires in ``fire_rate`` of them."""
    lo = np.where(np.arange(n) < round(cover_rate * n), 0.5, 1.5)
    cells = []
    for bias in ("zero", "large"):
        cells.append(pd.DataFrame({
            "case": f"tabular (exact) {bias}", "env": "tabular", "estimator": "x", "batch_size": 2,
            "bias": bias, "reference": "exact", "M": 32, "repeat": np.arange(n),
            "truth_bias_sq": 1.0, "truth_rel_bias_sq": 0.25, "bias_sq": lo + 0.5,
            "bias_sq_se": 0.25, "bias_sq_lo": lo, "bias_sq_hi": lo + 1.0,
            "distinguishable": np.arange(n) < round(fire_rate * n), "truth_variance": 1.0,
            "variance": lo + 0.5, "variance_lo": lo, "variance_hi": lo + 1.0, "truth_ratio": 1.0,
            "ratio": lo + 0.5, "ratio_lo": lo, "ratio_hi": lo + 1.0, "tail_index": 1.2,
            "ci_reliable": True, "ref_rel_se": 0.0, "truth_se2": 0.0}))
    return pd.concat(cells, ignore_index=True)


def test_every_part_is_tested_and_flips_with_the_coverage(tmp_path):
    m = load_experiment_module(FOLDER)
    good = m.report(records(0.95, 0.025), tmp_path / "good", "synthetic")
    bad = m.report(records(0.80, 0.025), tmp_path / "bad", "synthetic")
    assert "Verdict: confirmed" in good
    assert "Verdict: qualified" in bad  # the intervals miss, the false-positive rate holds
    for name in ("squared bias", "variance tr Cov", "variance ratio", "comparison table's"):
        line = next(x for x in bad.splitlines() if name in x and x.startswith("| the "))
        assert "| tested | yes | **refuted** |" in line
    assert "| tested | yes | **confirmed** |" in next(
        x for x in bad.splitlines() if x.startswith("| the bias verdict fires"))
    assert (tmp_path / "good" / "figures" / "calibration_coverage.png").exists()


def test_moving_policy_cells_are_judged_apart(tmp_path):
    """Cells whose runs move along training get their own claims ('... along a moving
    policy'); a moving cell that misses refutes those and leaves the fixed-policy ones."""
    m = load_experiment_module(FOLDER)
    fixed = records(0.95, 0.025).assign(policy_step=0.0)
    moving = records(0.80, 0.025).assign(policy_step=0.5)
    moving["case"] = moving["case"] + ", moving policy"
    text = m.report(pd.concat([fixed, moving], ignore_index=True), tmp_path, "synthetic")
    rows = [x for x in text.splitlines() if x.startswith("| the ")]
    along = [x for x in rows if "along a moving policy" in x]
    assert len(along) == 5 and all("**refuted**" in x for x in along[:3] + along[4:])
    assert "**confirmed**" in along[3]  # the false positives hold in the moving cell too
    assert all("**confirmed**" in x for x in rows if "along" not in x and "flag fires" not in x)
