"""experiments/ppo_clip: its analysis recovers known directions, its verdict flips with
the data (the exact-J comparison fed synthetic gains), and the exact-J comparison itself
is right on a real tabular MDP."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.reproduce import load_experiment_module

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "ppo_clip"


def load_analysis():
    return load_experiment_module(EXPERIMENT)


def synthetic_rows(estimator: str, K: int, clip: float, angle: float, scale: float,
                   cos_ref: float, seed: int, rng: np.random.Generator, M: int = 32,
                   P: int = 6, sigma2: float = 0.05) -> list[dict]:
    """Measured rows of one run whose expected direction is scale * (cos a, sin a, 0, ...)
    against g = (1, 0, ...): the logged statistics are their expectations plus a little
    seed-to-seed noise; ``grad_norm_mean`` = scale sets the displacement."""
    ed = scale * np.array([math.cos(angle), math.sin(angle)])
    var, bias_sq = P * sigma2, float(((ed - np.array([1.0, 0.0])) ** 2).sum())
    rows = []
    for step in (0, 5, 10):
        noise = rng.normal(0, 0.002, size=3)
        rows.append({
            "env": "tabular", "env.name": "tabular", "estimator": estimator, "seed": seed,
            "run_id": f"{estimator}/{K}/{clip}/{seed}", "step": step,
            "estimator.ppo_epochs": K, "estimator.ppo_clip": clip, "estimator.ppo_lr": 0.05,
            "grad_variance": var, "n_estimates": M, "grad_bias_sq": bias_sq + noise[0],
            "snr": (scale ** 2 + var / M) / var + noise[1], "ref_norm": 1.0, "ref_se": 0.0,
            "cos_ref": cos_ref + noise[2], "grad_rel_variance": var,
            "grad_rel_bias_sq": bias_sq + noise[0], "grad_norm_mean": scale * (1 + noise[0]),
            "return_mean": 0.0})
    return rows


def synthetic_frame(holds: bool, seeds: int = 8) -> tuple[pd.DataFrame, dict]:
    """GAE, PPO K=1 and PPO K in {2, 4, 16} x clip in {0.1, 0.4}. With ``holds`` the
    direction stays put and the small clip moves the parameters less at large K; without,
    the expected direction turns 0.1 rad per doubling of K at clip 0.1 and the small clip
    moves them further."""
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    for seed in range(seeds):
        rows += synthetic_rows("gae", 1, 0.2, 0.0, 1.0, 0.8, seed, rng)
        rows += synthetic_rows("ppo", 1, 0.2, 0.0, 1.0, 0.8, seed, rng)
        for clip in (0.1, 0.4):
            for K in (2, 4, 16):
                angle = 0.0 if holds or clip != 0.1 else 0.1 * math.log2(K)
                scale = K ** -0.5 * ((0.5 if clip == 0.1 else 1.0) if holds else (1.5 if clip == 0.1 else 1.0))
                rows += synthetic_rows("ppo", K, clip, angle, scale, 0.8 * math.cos(3 * angle), seed, rng)
                truth[(K, clip)] = {"cos_mean": math.cos(angle)}
    return pd.DataFrame(rows), truth


def fake_exact_steps(edge: float):
    """An ``exact_steps`` stand-in: PPO gains 0.1 K over one epoch and ``edge`` (plus a
    little noise by seed) over a plain step of its length."""
    def steps(config: dict) -> dict[str, float]:
        K, noise = config["estimator"]["ppo_epochs"], 0.01 * math.sin(config["seed"] + 1)
        gains = {"gain_one": 0.1, "gain_ppo": 0.1 * K, "gain_exact": 0.1 * K + 0.05}
        return {**gains, "gain_plain": gains["gain_ppo"] - edge - noise,
                "reuse_edge": edge + noise, "over_one": 0.1 * (K - 1)}
    return steps


def test_analysis_recovers_directions_and_confirms_when_the_claims_hold(tmp_path, monkeypatch):
    mod = load_analysis()
    monkeypatch.setattr(mod, "exact_steps", fake_exact_steps(0.05))
    frame, truth = synthetic_frame(holds=True)
    text = mod.analyze(frame, tmp_path, "synthetic")
    table = pd.read_csv(tmp_path / "result.csv")
    for (K, clip), want in truth.items():
        row = table[(table["K"] == K) & (table["clip"] == clip)].iloc[0]
        assert row["cos_mean_lo"] - 1e-3 <= want["cos_mean"] <= row["cos_mean_hi"] + 1e-3
        assert row["reuse_edge_lo"] > 0
    # the synthetic K = 1 and GAE runs differ by noise: the check fails, and being a check
    # by construction it does not move the verdict
    assert "| K = 1 is GAE | by construction | no | refuted |" in text
    for claim in ("the clip bounds the update", "direction holds for K ≤ 4",
                  "re-use beats a plain step of equal length"):
        assert f"| {claim} | tested | yes | confirmed |" in text, claim
    assert "Verdict: confirmed" in text
    assert (tmp_path / "figures" / "ppo_clip_reuse.png").exists()


def test_the_verdict_flips_when_the_claims_fail(tmp_path, monkeypatch):
    mod = load_analysis()
    monkeypatch.setattr(mod, "exact_steps", fake_exact_steps(-0.05))  # a longer step does better
    frame, _ = synthetic_frame(holds=False)
    text = mod.analyze(frame, tmp_path, "synthetic")
    assert "| the clip bounds the update | tested | yes | refuted |" in text
    assert "| direction holds for K ≤ 4 | tested | yes | qualified |" in text  # clip 0.4 holds
    assert "| re-use beats a plain step of equal length | tested | yes | refuted |" in text
    assert "Verdict: qualified" in text and "Verdict: confirmed" not in text


def test_k1_duplicates_over_clip_count_once(monkeypatch):
    mod = load_analysis()
    monkeypatch.setattr(mod, "exact_steps", fake_exact_steps(0.0))
    frame, _ = synthetic_frame(holds=True, seeds=3)
    extra = frame[(frame["estimator"] == "ppo") & (frame["estimator.ppo_epochs"] == 1)].copy()
    extra["estimator.ppo_clip"] = 0.05
    extra["run_id"] = extra["run_id"] + "-dup"
    runs = mod.per_run(pd.concat([frame, extra]))
    assert (runs[runs["label"] == "PPO K=1"].groupby("seed").size() == 1).all()


def test_exact_steps_on_a_real_mdp():
    """On the tabular MDP: K = 1 is one plain step (every gain equal, no edge), and for
    K > 1 the equal-length steps are as long as PPO's (the plain and exact steps differ
    from PPO's only in direction, so the exact step, along ∇J, gains at least roughly as
    much as the plain one for these short steps)."""
    mod = load_analysis()
    config = {"env": {"name": "tabular"}, "estimator": {"name": "ppo", "ppo_lr": 0.05},
              "training": {"batch_size": 8}, "seed": 3}
    one = mod.exact_steps({**config, "estimator": {**config["estimator"], "ppo_epochs": 1}})
    assert one["gain_ppo"] == pytest.approx(one["gain_one"], abs=1e-9)
    assert one["gain_plain"] == pytest.approx(one["gain_one"], abs=1e-9)
    assert abs(one["reuse_edge"]) < 1e-9 and one["gain_one"] > 0
    four = mod.exact_steps({**config, "estimator": {**config["estimator"], "ppo_epochs": 4}})
    assert four["gain_ppo"] > one["gain_ppo"] > 0
    assert four["gain_exact"] >= four["gain_plain"] - 1e-3
