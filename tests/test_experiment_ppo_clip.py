"""experiments/ppo_clip: its analysis recovers known directions, and its smoke preset runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.reproduce import load_experiment_module

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "ppo_clip"


def load_analysis():
    module = load_experiment_module(EXPERIMENT)
    return module


def synthetic_rows(env: str, estimator: str, K: int, clip: float, angle: float, scale: float,
                   cos_ref: float, seed: int, rng: np.random.Generator, M: int = 32,
                   P: int = 6, sigma2: float = 0.05) -> list[dict]:
    """Measured rows of one run whose expected direction is scale * (cos a, sin a, 0, ...)
    against g = (1, 0, ...): the logged statistics are their expectations plus a little
    seed-to-seed noise."""
    g_norm = 1.0
    ed = scale * np.array([math.cos(angle), math.sin(angle)])
    var = P * sigma2
    bias_sq = float(((ed - np.array([g_norm, 0.0])) ** 2).sum())
    rows = []
    for step in (0, 5, 10):
        noise = rng.normal(0, 0.002, size=3)
        rows.append({
            "env": env, "estimator": estimator, "seed": seed, "run_id": f"{env}/{estimator}/{K}/{clip}/{seed}",
            "step": step, "estimator.ppo_epochs": K, "estimator.ppo_clip": clip,
            "estimator.ppo_lr": 0.05, "grad_variance": var, "n_estimates": M,
            "grad_bias_sq": bias_sq + noise[0], "snr": (scale ** 2 + var / M) / var + noise[1],
            "ref_norm": g_norm, "ref_se": 0.0, "cos_ref": cos_ref + noise[2],
            "grad_rel_variance": var / g_norm ** 2, "grad_rel_bias_sq": (bias_sq + noise[0]) / g_norm ** 2,
            "grad_norm_mean": scale, "return_mean": 0.0,
        })
    return rows


def synthetic_frame(drift: bool, seeds: int = 8) -> tuple[pd.DataFrame, dict]:
    """GAE, PPO K=1 and PPO K in {2, 4, 16} x clip in {0.1, 0.4}. With ``drift`` the
    expected direction turns by 0.1 rad per doubling of K beyond 1 at clip 0.1 (not at
    0.4), and shrinks like K^-0.5; cos_ref falls with the angle."""
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    for seed in range(seeds):
        rows += synthetic_rows("tabular", "gae", 1, 0.2, 0.0, 1.0, 0.8, seed, rng)
        rows += synthetic_rows("tabular", "ppo", 1, 0.2, 0.0, 1.0, 0.8, seed, rng)
        for clip in (0.1, 0.4):
            for K in (2, 4, 16):
                angle = 0.1 * math.log2(K) if (drift and clip == 0.1) else 0.0
                scale = K ** -0.5
                rows += synthetic_rows("tabular", "ppo", K, clip, angle, scale,
                                       0.8 * math.cos(3 * angle), seed, rng)
                truth[(K, clip)] = {"cos_mean": math.cos(angle),
                                    "reuse_gain": K * scale * math.cos(angle)}
    return pd.DataFrame(rows), truth


def test_analysis_recovers_known_directions_and_gains(tmp_path: Path) -> None:
    mod = load_analysis()
    frame, truth = synthetic_frame(drift=True)
    text = mod.analyze(frame, tmp_path, "synthetic")
    table = pd.read_csv(tmp_path / "result.csv")
    for (K, clip), want in truth.items():
        row = table[(table["K"] == K) & (table["clip"] == clip)].iloc[0]
        for metric, value in want.items():
            lo, hi = row[f"{metric}_lo"], row[f"{metric}_hi"]
            assert lo - 1e-3 <= value <= hi + 1e-3, (K, clip, metric, value, lo, hi)
    assert "Verdict: qualified" in text  # re-use gain > 1, but clip 0.1 drifts from K = 2
    assert (tmp_path / "figures" / "ppo_clip_cosine.png").exists()
    assert (tmp_path / "figures" / "ppo_clip_reuse.pdf").exists()
    gae = table[table["label"] == "GAE"].iloc[0]
    assert abs(gae["reuse_gain"] - 1.0) < 0.02


def test_verdict_confirms_without_drift() -> None:
    mod = load_analysis()
    frame, _ = synthetic_frame(drift=False)
    runs = mod.per_run(frame)
    assert mod.verdict((mod.summarise(runs), runs)).word == "confirmed"


def test_k1_duplicates_over_clip_count_once() -> None:
    mod = load_analysis()
    frame, _ = synthetic_frame(drift=False, seeds=3)
    extra = frame[(frame["estimator"] == "ppo") & (frame["estimator.ppo_epochs"] == 1)].copy()
    extra["estimator.ppo_clip"] = 0.05
    extra["run_id"] = extra["run_id"] + "-dup"
    runs = mod.per_run(pd.concat([frame, extra]))
    assert (runs[runs["label"] == "PPO K=1"].groupby("seed").size() == 1).all()
