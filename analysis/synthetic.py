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
import torch

from pgvar.runlog import METRICS_FILE, RUN_FILE, STATUS_COMPLETE, measured_cells
from pgvar.stats import cross_spread_moment, gradient_stats


@dataclass(frozen=True)
class TrueEstimator:
    """The ground truth of one synthetic estimator: its bias norm and trace variance."""

    name: str
    bias: float
    variance: float
    lam: float | None = None


def gradient_statistics(G: np.ndarray, g_ref: np.ndarray, ref_se: float = 0.0) -> dict[str, float]:
    """The logged statistics of M estimates ``G [M, P]`` against ``g_ref``, a reference
    with standard error ``ref_se`` (0: exact): ``pgvar.stats.gradient_stats``, in the
    columns ``pgvar-run`` writes them to."""
    return measured_cells(gradient_stats(G, g_ref, se_ref2=ref_se ** 2).as_dict())


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
                      ref_exact: bool = True, ref_decay: float = 0.0,
                      ref_se: float = 0.0) -> pd.DataFrame:
    """metrics.csv of one run: a rising learning curve and measured steps every few.

    ``||grad J||`` is ``ref_norm * exp(-ref_decay * step)`` (training drives the true
    gradient towards 0); the bias keeps its norm ``truth.bias``. With ``ref_se > 0`` the
    logged reference is ``grad J`` plus isotropic noise of that standard error (a Monte
    Carlo reference, ``ref_exact`` then False); ``ref_exact`` alone only sets the flag."""
    rng = np.random.default_rng([seed, zlib.crc32(truth.name.encode())])
    rows = []
    for step in range(n_iters):
        row = {"step": step, "env_steps": 100 * (step + 1), "episodes": 10 * (step + 1),
               "return_mean": step + rng.normal(0, 0.1), "return_std": 1.0, "wall_s": 0.1 * step}
        if step % measure_every == 0:
            g_true = rng.normal(size=P)
            g_true *= ref_norm * math.exp(-ref_decay * step) / np.linalg.norm(g_true)
            b = rng.normal(size=P)
            b *= truth.bias / np.linalg.norm(b)
            noise = rng.normal(size=(M, P)) * math.sqrt(truth.variance / P)
            g_ref = g_true + rng.normal(size=P) * ref_se / math.sqrt(P) if ref_se > 0 else g_true
            row.update(gradient_statistics(g_true + b + noise, g_ref, ref_se))
            row["ref_exact"] = ref_exact and ref_se == 0
        rows.append(row)
    return pd.DataFrame(rows)


def heavy_tailed_measurements(rng: np.random.Generator, n_runs: int, n_steps: int, M: int,
                              P: int, rel_bias: float,
                              heavy: bool = True) -> tuple[pd.DataFrame, float]:
    """Measurement rows (``run_dir``, ``seed``, ``grad_bias_sq``, ``grad_bias_sq_se``,
    ``ref_norm``, ``ref_se``) of ``n_runs`` runs with ``n_steps`` measurements each,
    computed by ``pgvar.stats.gradient_stats`` from M draws per measurement, and the true
    pooled relative squared bias ``sum ||b_k||^2 / sum ||grad J_k||^2``.

    ``||grad J_k||`` shrinks over the steps (3 e^{-0.4 k}) and the bias is ``rel_bias``
    times it; with ``heavy`` each draw's unit noise is scaled by a lognormal factor
    (sd 1), a skewed, heavy-tailed estimate like LQR's. For calibration tests of the
    table's pooled bias interval.
    """
    rows, bias_sq, grad_sq = [], 0.0, 0.0
    for run in range(n_runs):
        for k in range(n_steps):
            norm = 3.0 * math.exp(-0.4 * k)
            g = rng.normal(size=P)
            g *= norm / np.linalg.norm(g)
            b = rng.normal(size=P)
            b *= rel_bias * norm / np.linalg.norm(b)
            z = rng.normal(size=(M, P))
            if heavy:
                z *= np.exp(rng.normal(0.0, 1.0, size=(M, 1))) / math.e
            s = gradient_stats(g + b + z, g)
            rows.append({"run_dir": f"run{run}", "seed": run, "step": k,
                         "grad_bias_sq": s.grad_bias_sq, "grad_bias_sq_se": s.grad_bias_sq_se,
                         "ref_norm": s.ref_norm, "ref_se": s.ref_se, "n_estimates": M})
            bias_sq += float(b @ b)
            grad_sq += norm ** 2
    return pd.DataFrame(rows), bias_sq / grad_sq


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


# ----------------------------------------------------------------------------- paired runs


@dataclass(frozen=True)
class PairedTruth:
    """The ground truth of one measured (estimator spec, critic) of a paired run: its bias
    norm and trace variance (``first_bias``: the bias at the run's first measured step,
    e.g. a training critic that was not fitted yet; None: ``bias`` there too)."""

    spec: str
    bias: float
    variance: float
    critic: str = ""
    critic_error: float = math.nan
    first_bias: float | None = None
    circular: bool = False

    @property
    def name(self) -> str:
        return self.spec.split("(")[0]

    @property
    def critic_episodes(self) -> int:
        return int(self.critic[4:]) if self.critic.startswith("fit:") else 0


PAIRED_SHARED_NOISE = 0.8  # fraction of each estimate's noise variance common to all specs


def paired_measurements(truths: list[PairedTruth], seed: int, steps: list[int], trained_with: str,
                        M: int = 32, P: int = 8, ref_norm: float = 1.0,
                        ref_se: float = 0.0) -> pd.DataFrame:
    """paired.csv of one run: at every step, M estimates per truth drawn from the SAME
    episodes (a noise part shared by all truths, ``PAIRED_SHARED_NOISE`` of the variance,
    plus an own part), statistics by ``pgvar.stats.gradient_stats`` against one reference
    (exact, or with isotropic noise of standard error ``ref_se``)."""
    rng = np.random.default_rng([seed, 7])
    directions = {t: _unit(np.random.default_rng([seed, zlib.crc32(f"{t.spec}|{t.critic}".encode())]), P)
                  for t in truths}
    rows = []
    for k, step in enumerate(steps):
        g_true = _unit(rng, P) * ref_norm
        g_ref = g_true + rng.normal(size=P) * ref_se / math.sqrt(P) if ref_se > 0 else g_true
        common = rng.normal(size=(M, P))
        estimates = {}
        for t in truths:
            bias = t.first_bias if (k == 0 and t.first_bias is not None) else t.bias
            own = rng.normal(size=(M, P))
            noise = (math.sqrt(PAIRED_SHARED_NOISE) * common
                     + math.sqrt(1 - PAIRED_SHARED_NOISE) * own) * math.sqrt(t.variance / P)
            estimates[t] = g_true + bias * directions[t] + noise
        first = next((G for t, G in estimates.items() if _is_training(t, trained_with)),
                     next(iter(estimates.values())))
        for t, G in estimates.items():
            stats = gradient_statistics(G, g_ref, ref_se)
            stats["spread_z_cross"] = cross_spread_moment(torch.as_tensor(G), torch.as_tensor(first))
            rows.append({
                "step": step, "estimator": t.spec, "estimator_name": t.name, "critic": t.critic,
                "critic_episodes": t.critic_episodes,
                "critic_error": t.critic_error if t.critic else None,
                "critic_error_kind": "exact_v_rmse" if t.critic else "",
                "trained_with": trained_with,
                "is_training": _is_training(t, trained_with),
                **stats, "ref_exact": ref_se == 0, "ref_episodes": 0 if ref_se == 0 else 1000,
                "ref_method": "exact" if ref_se == 0 else "monte_carlo:reinforce_rtg",
                "ref_rel_se": ref_se / ref_norm, "ref_circular": t.circular,
                "ref_disagreement": None if ref_se == 0 else 1.0, "source": "run", "wall_s": 0.1})
    return pd.DataFrame(rows)


def _is_training(truth: PairedTruth, trained_with: str) -> bool:
    return truth.spec == trained_with and truth.critic in ("train", "")


def _unit(rng: np.random.Generator, P: int) -> np.ndarray:
    v = rng.normal(size=P)
    return v / np.linalg.norm(v)


def write_paired_sweep(sweep_dir: Path, truths: list[PairedTruth], seeds: range | list[int],
                       env: str = "tabular", trained_with: str = "value_baseline",
                       n_iters: int = 5, measure_every: int = 2, start: int = 0,
                       **kwargs) -> list[Path]:
    """A multirun directory of paired runs, one per seed, all trained with
    ``trained_with`` and measuring every truth: run.json, metrics.csv (the training
    estimator's rows, as pgvar-run writes them) and paired.csv. Returns the job dirs."""
    steps = [s for s in range(n_iters) if s % measure_every == 0 or s == n_iters - 1]
    if not any(t.spec == trained_with and t.critic in ("train", "") for t in truths):
        raise ValueError(f"no truth is the training estimator {trained_with!r} (critic 'train' or "
                         "none): metrics.csv repeats its row")
    jobs = []
    for job, seed in enumerate(seeds, start=start):
        config = {"env": {"name": env, "gamma": 0.99},
                  "estimator": {"name": trained_with, "lam": 0.95, "ppo_lr": 0.05,
                                "discount_weighting": True},
                  "training": {"iterations": n_iters, "measure_every": measure_every},
                  "seed": seed, "preset": {"name": "synthetic"}}
        paired = paired_measurements(truths, seed, steps, trained_with, **kwargs)
        training = paired[paired["is_training"]].set_index("step")
        rows = []
        for step in range(n_iters):
            row = {"step": step, "env_steps": 100 * (step + 1), "episodes": 10 * (step + 1),
                   "return_mean": float(step), "return_std": 1.0, "wall_s": 0.1 * step}
            if step in training.index:
                row.update({c: training.at[step, c] for c in training.columns
                            if c.startswith(("grad_", "cos_", "snr", "ref_norm", "ref_se",
                                             "n_estimates", "tail_index", "ci_reliable"))})
                row["ref_exact"] = training.at[step, "ref_exact"]
            rows.append(row)
        job_dir = sweep_dir / str(job)
        write_run(job_dir, config, pd.DataFrame(rows))
        paired.to_csv(job_dir / "paired.csv", index=False)
        jobs.append(job_dir)
    return jobs
