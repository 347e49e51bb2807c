"""Synthetic sweeps with known bias and variance, in the exact format ``pgvar-run`` writes.

Used by the tests (the table must recover the true numbers within its intervals) and
handy for trying the analysis without training anything. At every measured step of a
run, M estimates ``g_m = g_ref + b + noise`` are drawn in P dimensions with
``||b|| = bias`` and ``E||noise||^2 = variance``, and the statistics are computed from
them by ``pgvar.stats.gradient_stats``, as ``pgvar-run`` does.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pgvar.runlog import METRICS_FILE, RUN_FILE, STATUS_COMPLETE, measured_cells
from pgvar.stats import gradient_stats


@dataclass(frozen=True)
class TrueEstimator:
    """The ground truth of one synthetic estimator: its bias norm and trace variance."""

    name: str
    bias: float
    variance: float
    lam: float | None = None


def gradient_statistics(G: np.ndarray, g_ref: np.ndarray) -> dict[str, float]:
    """The logged statistics of M estimates ``G [M, P]`` against an exact ``g_ref``:
    ``pgvar.stats.gradient_stats``, in the columns ``pgvar-run`` writes them to."""
    return measured_cells(gradient_stats(G, g_ref).as_dict())


def write_run(job_dir: Path, config: dict, metrics: pd.DataFrame, status: str = STATUS_COMPLETE,
              error: str | None = None) -> None:
    """One Hydra-style job directory: ``.hydra/``, ``metrics.csv`` and ``run.json``."""
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    metrics.to_csv(job_dir / METRICS_FILE, index=False)
    info = {"status": status, "error": error, "config": config, "seed": config.get("seed"),
            "versions": {"python": "synthetic"}, "elapsed_s": 1.0,
            "steps_completed": len(metrics)}
    (job_dir / RUN_FILE).write_text(json.dumps(info))


def synthetic_metrics(truth: TrueEstimator, seed: int, n_iters: int = 6, measure_every: int = 2,
                      M: int = 32, P: int = 8, ref_norm: float = 1.0,
                      ref_exact: bool = True) -> pd.DataFrame:
    """metrics.csv of one run: a rising learning curve and measured steps every few.
    ``ref_exact`` only sets the flag column (the reference is always exact here)."""
    rng = np.random.default_rng([seed, zlib.crc32(truth.name.encode())])
    rows = []
    for step in range(n_iters):
        row = {"step": step, "env_steps": 100 * (step + 1), "episodes": 10 * (step + 1),
               "return_mean": step + rng.normal(0, 0.1), "return_std": 1.0, "wall_s": 0.1 * step}
        if step % measure_every == 0:
            g_ref = rng.normal(size=P)
            g_ref *= ref_norm / np.linalg.norm(g_ref)
            b = rng.normal(size=P)
            b *= truth.bias / np.linalg.norm(b)
            noise = rng.normal(size=(M, P)) * math.sqrt(truth.variance / P)
            row.update(gradient_statistics(g_ref + b + noise, g_ref))
            row["ref_exact"] = ref_exact
        rows.append(row)
    return pd.DataFrame(rows)


def write_sweep(sweep_dir: Path, truths: list[TrueEstimator], seeds: range | list[int],
                env: str = "tabular", start: int = 0, **metric_kwargs) -> list[Path]:
    """A multirun directory with one numbered job per (estimator, seed); returns the jobs."""
    jobs = []
    job = start
    for truth in truths:
        for seed in seeds:
            config = {"env": {"name": env, "gamma": 0.99},
                      "estimator": {"name": truth.name, "lam": truth.lam},
                      "seed": seed, "preset": {"name": "synthetic"}}
            job_dir = sweep_dir / str(job)
            write_run(job_dir, config, synthetic_metrics(truth, seed, **metric_kwargs))
            jobs.append(job_dir)
            job += 1
    return jobs
