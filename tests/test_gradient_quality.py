"""experiments/gradient_quality: the verdict flips with the cosines, a noisy reference makes
it inconclusive, the table shows the right columns, and the smoke preset runs end to end
(the sample-size engine it rests on: ``tests/test_sample_size.py``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.reproduce import load_experiment_module
from pgvar.sample_size import BLOCK_ESTIMATORS, WEIGHTINGS, Blocks, Totals

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "experiments" / "gradient_quality"
gq = load_experiment_module(FOLDER)


def known_blocks(cos_target: float, n_blocks: int, P: int = 400, seed: int = 0):
    """Blocks at n = 2048 whose estimates have cosine ~cos_target to the true gradient
    g (unit vector): each block sum is g + noise with ||noise||^2 = tan^2 ||g||^2, and a
    long remainder of the stream makes the leave-one-out reference nearly exact."""
    rng = np.random.default_rng(seed)
    g = torch.zeros(P, dtype=torch.float64)
    g[0] = 1.0
    tan = math.tan(math.acos(cos_target))
    b = Blocks.empty(2048, n_blocks, P)
    noise = torch.from_numpy(rng.normal(size=(n_blocks, len(WEIGHTINGS), P))) * tan / math.sqrt(P)
    b.sums[:] = g + noise
    b.episodes[:] = 1.0
    b.pairs[:] = 2048.0
    b.adv[:] = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    W = len(WEIGHTINGS)
    big = 10**6  # the rest of the stream: 10^6 episodes averaging to g
    sums = b.sums.sum(0) + big * g
    sq = b.sums.square().sum((0, 2)) + big * (1.0 + tan ** 2)
    totals = Totals(sums, sq.to(torch.float64).reshape(W), episodes=n_blocks + big,
                       pairs=2048 * (n_blocks + big))
    return b, totals


@pytest.mark.parametrize("cos_target, word", [(0.3, "confirmed"), (0.85, "refuted"),
                                              (0.5, "qualified")])
def test_verdict_flips_with_the_cosines(cos_target, word):
    """Estimates built from known vectors: cosine 0.3 confirms the paper's finding, 0.85
    refutes it, and 0.5 (the threshold) straddles it (qualified, not confirmed)."""
    b, totals = known_blocks(cos_target, 64)
    records = gq.summarise_blocks([b], totals, "ck", 0)
    table = pd.DataFrame(records)
    prim = table[table["primary"]]
    assert np.allclose(prim["cos"], cos_target, atol=0.05)
    assert np.allclose(prim["cos_true"], cos_target, atol=0.05)
    verdict = gq.decide(table)
    if word == "qualified":
        assert verdict.word in ("qualified", "inconclusive")
    else:
        assert verdict.word == word, verdict.reason


def test_verdict_is_inconclusive_against_a_noisy_reference():
    b, totals = known_blocks(0.3, 16)
    table = pd.DataFrame(gq.summarise_blocks([b], totals, "ck", 0))
    table["ceiling"] = 0.3
    assert gq.decide(table).word == "inconclusive"


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
    """The smoke preset on Hopper-v5 (MuJoCo) writes result.md, result.csv and the figure."""
    pytest.importorskip("mujoco")
    from analysis.reproduce import load_spec

    spec = load_spec("gradient_quality", "smoke")
    text = gq.simulate(tmp_path, "smoke", spec.simulation)
    assert text.startswith("# Gradient quality")
    assert "Verdict" in text
    table = pd.read_csv(tmp_path / "result.csv")
    assert set(table["estimator"]) == set(BLOCK_ESTIMATORS)
    assert (tmp_path / "figures" / "gradient_quality_cosine_vs_pairs.png").exists()


def test_render_shows_the_primary_reference_estimator_against_its_own():
    """The "vs own" column is value_baseline against its own estimator's reference (not
    the other same-estimator row, reinforce_rtg against reinforce_rtg)."""
    b, totals = known_blocks(0.6, 16)
    rtg = WEIGHTINGS.index("reinforce_rtg")
    b.sums[:, rtg] = torch.randn(b.sums[:, rtg].shape, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)  # reinforce_rtg vs its own: ~0
    table = pd.DataFrame(gq.summarise_blocks([b], totals, "ck", 0))
    runs = pd.DataFrame([{"checkpoint": "ck", "step": 0, "pairs": 1, "episodes": 1,
                          "mean_length": 1.0, "return": 0.0, "return_se": 0.0, "seconds": 1.0,
                          "pairs_per_s": 1.0}])
    own = table[table["circular"] & (table["estimator"] == gq.PRIMARY_REFERENCE)].iloc[0]
    assert own["cos"] > 0.4
    text = gq.render(table, runs, gq.decide(table), "test", {"max_blocks": 16}, 1)
    row = next(line for line in text.splitlines() if line.startswith("| 2,048"))
    assert row.split(" | ")[-2] == gq.format_columns(own, "cos", 2, style="f")


def test_forked_checkpoints_measure_as_one_process(tmp_path):
    """Two checkpoints measured in two forked workers give the result.csv of one process
    (CartPole's initial policy: seconds, no MuJoCo)."""
    params = {"initial_config": {"env": {"name": "cartpole"}}, "checkpoints": {"a": 0, "b": 0},
              "n_grid": [100, 200], "total_pairs": {"a": 800, "b": 1000}, "max_blocks": 4,
              "lanes": 16, "chunk_episodes": 16}
    gq.simulate(tmp_path / "one", "test", params)
    gq.simulate(tmp_path / "two", "test", {**params, "workers": 2})
    one, two = (pd.read_csv(tmp_path / d / "result.csv") for d in ("one", "two"))
    assert set(one["checkpoint"]) == {"a", "b"} and len(one) > 0
    pd.testing.assert_frame_equal(one, two)
