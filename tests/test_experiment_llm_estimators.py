"""experiments/llm_estimators: its tested verdicts flip on synthetic measurements (the
sampled means agreeing with the exact ones or not; GRPO's exact length bias excluding 0
or not), and its by-construction ones stay out of the headline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.reproduce import load_experiment_module

FOLDER = Path(__file__).resolve().parent.parent / "experiments" / "llm_estimators"
M, TRACE = 64, 1.0  # batch estimates per measurement and tr Cov, with ||grad J|| = 1


def measured_row(estimator: str, seed: int, scale: float, cos: float, rng, logged_gap: float,
                 length_bias: float) -> dict:
    """The logged statistics of a first measurement whose mean is ``scale`` times a unit
    vector at ``cos`` to grad J: U = ||E g - grad J||^2 + ``logged_gap`` (+ noise of its SE)."""
    exact_b2 = scale ** 2 - 2 * scale * cos + 1
    se = 0.004
    return {"run_id": f"at_init_table/{estimator}-{seed}", "run_dir": f"{estimator}-{seed}",
            "step": 0, "estimator": estimator, "seed": seed, "env.policy": "table",
            "estimator.group_size": 4, "training.batch_size": 16, "exact_J": 0.25,
            "exact_length": 3.0, "n_estimates": M, "grad_variance": TRACE, "ref_norm": 1.0,
            "ref_se": 0.0, "snr": (scale ** 2 + TRACE / M) / TRACE,
            "grad_bias_sq": exact_b2 + logged_gap + rng.normal(0, se), "grad_bias_sq_se": se,
            "grad_mse": exact_b2 + TRACE, "grad_rel_variance": TRACE, "bias_distinguishable": 0.0,
            "exact_mean_cos": cos, "exact_rel_bias": np.sqrt(exact_b2),
            "exact_length_bias": length_bias + rng.normal(0, 0.002), "len_slope_est": 0.1,
            "len_slope_ref": 0.1}


def frame(rloo_gap: float, grpo_length_bias: float) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    laws = {"reinforce": (1.0, 1.0, 0.0, 0.0), "rloo": (1.0, 1.0, rloo_gap, 0.0),
            "grpo": (1.0, 0.93, 0.0, grpo_length_bias), "dr_grpo": (0.15, 1.0, 0.0, 0.0)}
    return pd.DataFrame([measured_row(est, seed, scale, cos, rng, gap, length)
                         for est, (scale, cos, gap, length) in laws.items() for seed in range(6)])


def part(text: str, claim: str) -> str:
    """``class | **word**`` of one part in result.md's verdict table."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {claim} |"))
    return " | ".join(cell.strip() for cell in line.split("|")[2:4])


@pytest.mark.parametrize(("rloo_gap", "length", "agree", "length_word"),
                         [(0.0, 0.03, "confirmed", "confirmed"), (0.3, 0.0, "refuted", "refuted")])
def test_tested_verdicts_flip_and_identities_stay_out_of_the_headline(
        tmp_path, rloo_gap, length, agree, length_word):
    text = load_experiment_module(FOLDER).analyze(frame(rloo_gap, length), tmp_path, "synthetic")
    assert part(text, "(1) the sampled means agree with the exact ones") == f"tested | **{agree}**"
    assert part(text, "(3) per-completion length normalisation biases the expected length") \
        == f"tested | **{length_word}**"
    assert part(text, "(1) exact means of RLOO and Dr. GRPO along ∇J") == \
        "by construction | **confirmed**"
    headline = text.strip().splitlines()[-1]
    assert "exact means of RLOO" not in headline and f"agree with the exact ones: {agree}" in headline
    assert headline.startswith("Verdict: qualified" if agree == "confirmed" else "Verdict: ")
