"""experiments/practice_biases: verdicts on synthetic sweeps (the exact expectations it
predicts with are tested in tests/test_exact_mean.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.reproduce import load_experiment_module

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "practice_biases"


def load_analysis():
    module = load_experiment_module(EXPERIMENT)
    return module


# ----------------------------------------------------------------------------- synthetic sweeps


# habit -> (a, b): its expected estimate is (1 + a, b) against g = (1, 0)
TRUTH = {"drop gamma^t": (0.3, 0.2), "normalise advantages": (-0.5, 0.0),
         "truncation as termination": (0.0, 0.0)}
# every tested finding holds: dropping gamma^t and truncation add bias, normalising turns E g
HOLDS = {"drop gamma^t": (0.3, 0.2), "normalise advantages": (-0.5, 0.4),
         "truncation as termination": (0.2, 0.1)}
# none holds: no added bias, and normalising only rescales (a bias by construction)
FAILS = {"drop gamma^t": (0.0, 0.0), "normalise advantages": (-0.5, 0.0),
         "truncation as termination": (0.0, 0.0)}


def synthetic_frame(truth: dict = TRUTH, seeds: int = 8) -> tuple[pd.DataFrame, dict]:
    """Runs on a non-tabular env (no exact prediction): each habit's run has expected
    estimate (1 + a, b) against g = (1, 0) (``truth``); its control is unbiased."""
    rng = np.random.default_rng(1)
    M, var = 64, 0.2
    flags = {"drop gamma^t": ("estimator.discount_weighting", False),
             "normalise advantages": ("estimator.normalize_advantages", True),
             "truncation as termination": ("estimator.truncation_as_termination", True)}
    rows = []
    for habit, (a, b) in truth.items():
        for arm in ("control", "habit"):
            for seed in range(seeds):
                mean = np.array([1 + a, b]) if arm == "habit" else np.array([1.0, 0.0])
                bias_sq = float(((mean - np.array([1.0, 0.0])) ** 2).sum()) + rng.normal(0, 0.003)
                row = {"env": "synth", "env.name": "synth", "env.gamma": 0.9, "env.objective": habit[:4],
                       "estimator": "rloo", "seed": seed, "step": 0,
                       "run_id": f"{habit}/{arm}/{seed}", "grad_variance": var, "n_estimates": M,
                       "grad_bias_sq": bias_sq, "snr": (mean @ mean + var / M) / var,
                       "ref_norm": 1.0, "ref_se": 0.0, "cos_ref": 0.7, "grad_rel_variance": var,
                       "grad_rel_bias_sq": bias_sq, "return_mean": 0.0,
                       "estimator.discount_weighting": True,
                       "estimator.normalize_advantages": False,
                       "estimator.truncation_as_termination": False}
                if arm == "habit":
                    col, value = flags[habit]
                    row[col] = value
                rows.append(row)
    return pd.DataFrame(rows), truth


def test_analysis_recovers_known_biases_and_classes_its_findings(tmp_path: Path) -> None:
    mod = load_analysis()
    frame, truth = synthetic_frame()
    text = mod.analyze(frame, tmp_path, "synthetic")
    table = pd.read_csv(tmp_path / "result.csv")
    for habit, (a, b) in truth.items():
        row = table[(table["habit"] == habit) & (table["arm"] == "habit")].iloc[0]
        want_bias = math.hypot(a, b)
        assert row["rel_bias_lo"] - 1e-3 <= want_bias <= row["rel_bias_hi"] + 1e-3, (habit, row)
        want_cos = (1 + a) / math.hypot(1 + a, b)
        assert row["cos_mean_lo"] - 1e-3 <= want_cos <= row["cos_mean_hi"] + 1e-3, (habit, row)
        assert abs(row["scale"] - (1 + a)) < 0.02
    assert "| drop gamma^t: adds bias | tested | yes | confirmed |" in text
    assert "| drop gamma^t: turns E ĝ | extra | no | confirmed |" in text
    assert "| normalise advantages: adds bias | by construction | no | confirmed |" in text
    assert "| normalise advantages: turns E ĝ | tested | yes | refuted |" in text
    assert "| truncation as termination: adds bias | tested | yes | refuted |" in text
    assert "\nVerdict: qualified" in text
    assert (tmp_path / "figures" / "practice_biases_bias.png").exists()


def test_the_verdict_flips_with_the_data(tmp_path: Path) -> None:
    mod = load_analysis()
    holds = mod.analyze(synthetic_frame(HOLDS)[0], tmp_path / "holds", "synthetic")
    assert "| normalise advantages: turns E ĝ | tested | yes | confirmed |" in holds
    assert "\nVerdict: confirmed" in holds
    fails = mod.analyze(synthetic_frame(FAILS)[0], tmp_path / "fails", "synthetic")
    assert "| normalise advantages: adds bias | by construction | no | confirmed |" in fails
    assert "\nVerdict: refuted" in fails  # the rescaling, by construction, does not count


def test_a_configuration_run_twice_counts_once() -> None:
    mod = load_analysis()
    frame, _ = synthetic_frame(seeds=3)
    twice = pd.concat([frame, frame.assign(run_id=frame["run_id"] + "-again")])
    once, dup = mod.per_run(frame), mod.per_run(twice)
    assert len(dup) == len(once)
