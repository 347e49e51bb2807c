"""``pgvar-run``: the Hydra app that trains with one estimator and measures its gradients.

One run (one Hydra job), for iterations i = 0..N-1 at policy parameters theta_i:

1. sample B training episodes (seed derived from the run seed and i);
2. on measured iterations (i = 0, every k-th, and the last): draw M fresh batches of B
   episodes, estimate M gradients, compare them with the reference gradient at theta_i
   (exact where the environment allows it, else Monte Carlo with its standard error);
   every estimator of ``training.measure.estimators`` is scored on the same episodes
   against the same reference (``pgvar.measured_step``: rows to paired.csv), and the
   policy and critic are saved to ``checkpoints/`` (``pgvar.checkpoints``);
3. estimate the training gradient from the step-1 batch, with the critic fitted on
   EARLIER batches only (so a value baseline stays unbiased), and take an Adam ascent
   step of size ``lr``;
4. fit the critic on the step-1 batch (for the next iteration);
5. append the iteration's row to metrics.csv (``pgvar.runlog`` documents the columns),
   and with ``logger=tensorboard`` to a TensorBoard event file in the job directory.

NaN or infinite gradients (or returns) end the run with status ``diverged``; any other
exception ends it with status ``failed``. The job then still returns to Hydra's launcher,
so the rest of a sweep runs. Exit status of the process: 0 when every job ended
``complete``, ``diverged`` or was skipped; 1 when any job ``failed`` (its exception is
re-raised to Hydra after run.json is written, and Hydra reports it once every job of the
sweep has run); 2 when the command line is refused before any job starts.

Bad overrides are refused before any job starts: ``pgvar.cli.main`` (the console
entry) validates every job of the command, and only then hands over to ``hydra_main``.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pgvar import joblock, runlog
from pgvar.config import (
    ConfigError,
    RunConfig,
    build_critic,
    build_env,
    build_policy,
    register_configs,
    register_resolvers,
    run_has_critic,
    validate_config,
)
from pgvar.policies import flatten_params
from pgvar.progress import rate_and_remaining
from pgvar.seeding import derive_seed
from pgvar.sweep import expand_sweep

log = logging.getLogger("pgvar.run")

register_configs()
register_resolvers()


def find_conf_dir() -> Path:
    """The ``conf/`` folder: ``$PGVAR_CONF_DIR``, else the one next to the package."""
    env_dir = os.environ.get("PGVAR_CONF_DIR")
    if env_dir:
        return Path(env_dir).resolve()
    return (Path(__file__).resolve().parent.parent / "conf").resolve()


CONF_DIR = find_conf_dir()
CONFIG_NAME = "config"


class Diverged(RuntimeError):
    """A non-finite gradient, return or parameter: the run ends with status diverged."""


class RunFailed(RuntimeError):
    """Re-raised to Hydra after a failed run's run.json is written (exit status 1)."""


# ---------------------------------------------------------------------------- device


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda when present; ``cuda`` without a GPU is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but torch sees no CUDA device; valid here: cpu, auto")
    return torch.device(name)


# ---------------------------------------------------------------------- the run loop


@dataclass
class RunState:
    """Counters and the last measurement, for rows and progress lines."""

    env_steps: int = 0
    episodes: int = 0
    steps_completed: int = 0
    last_measured: dict[str, Any] = field(default_factory=dict)
    last_measured_step: int | None = None
    spread_moments: list[tuple[float, float]] = field(default_factory=list)  # per measured step (run flag)


def is_measured_step(step: int, n_iterations: int, every: int) -> bool:
    """Measure at the first iteration, every ``every``-th one, and the last."""
    return step % every == 0 or step == n_iterations - 1


def progress_interval(log_every: int, n_iterations: int) -> int:
    """Iterations between progress lines: ``log_every``, or about ten lines per run if 0."""
    return log_every if log_every > 0 else max(1, n_iterations // 10)


def setup_torch(run_cfg: RunConfig) -> None:
    """Thread count and global generator, for reproducible CPU numbers."""
    if run_cfg.threads > 0:
        torch.set_num_threads(run_cfg.threads)
    torch.manual_seed(derive_seed(run_cfg.seed, "torch"))


def learning_curve_row(step: int, batch, gamma: float, state: RunState) -> dict[str, Any]:
    """The columns every row has: counters and the returns of the training batch."""
    returns = batch.episode_returns(gamma).double()
    undiscounted = batch.episode_returns(1.0).double()
    state.env_steps += batch.n_steps
    state.episodes += batch.n_episodes
    check_finite(returns, step, "training returns")
    return {
        "step": step,
        "env_steps": state.env_steps,
        "episodes": state.episodes,
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()) if returns.numel() > 1 else 0.0,
        "return_undiscounted_mean": float(undiscounted.mean()),
        "episode_length_mean": float(batch.lengths.double().mean()),
    }


def check_finite(x: torch.Tensor, step: int, what: str) -> None:
    """Raise ``Diverged`` when ``x`` holds a NaN or an infinity."""
    if not bool(torch.isfinite(x).all()):
        raise Diverged(f"non-finite {what} at step {step}")


@contextmanager
def overflow_means_divergence(step: int) -> Iterator[None]:
    """Turn a numerical overflow inside the block (torch reports some as RuntimeError,
    e.g. ``lr=1e300`` in Adam's step) into ``Diverged``, like a non-finite gradient."""
    try:
        yield
    except (OverflowError, FloatingPointError) as err:
        raise Diverged(f"numerical overflow at step {step}: {err}") from err
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        raise Diverged(f"numerical overflow at step {step}: {err}") from err


def metrics_cells(row, step: int) -> dict[str, Any]:
    """metrics.csv's measured cells from the training estimator's paired row; a
    non-finite variance or MSE ends the run as diverged."""
    stats = row.stats
    for key in ("grad_variance", "grad_mse"):
        if not math.isfinite(float(stats[key])):
            raise Diverged(f"non-finite measured {key} at step {step}")
    cells = runlog.measured_cells(stats)
    cells["ref_exact"] = bool(row.reference.exact)
    cells["ref_episodes"] = int(row.reference.n_episodes) if not row.reference.exact else 0
    return cells


def measure_and_record(run_cfg: RunConfig, env, policy, critic, specs, configs, step: int,
                       job_dir: Path, paired: runlog.MetricsWriter, started: float,
                       config: dict[str, Any]) -> dict[str, Any]:
    """The paired measurement of a measured step (``pgvar.measured_step``): every row to
    paired.csv, the policy and critic to a checkpoint, and the training estimator's
    cells (its row with the run's own critic) returned for metrics.csv."""
    from pgvar.checkpoints import save_checkpoint
    from pgvar.measured_step import measure_step, paired_cells, step_references

    references = step_references(run_cfg, env, policy, critic, step)
    rows = measure_step(run_cfg, env, policy, critic, specs, configs, step, references=references)
    training_row = next(r for r in rows if r.spec is specs[0]
                        and (r.critic is None or r.critic.label == "train"))
    for row in rows:
        paired.write(paired_cells(row, run_cfg, step, references, "run", started))
    if run_cfg.training.measure.checkpoints:
        save_checkpoint(job_dir, step, policy, critic, config)
    return metrics_cells(training_row, step)


def warn_if_unreliable(cells: dict[str, Any], step: int, state: RunState) -> None:
    """A log warning when the training estimator's per-measurement intervals cannot be
    trusted: this step's ``ci_reliable`` is False (M < 16 or heavy tails), or the
    kurtosis of the run's measured steps so far is too heavy for M
    (``pgvar.stats.run_intervals_reliable``: single steps that missed the tail look
    light-tailed). metrics.csv keeps the step's flag; the analysis adds the whole run's
    (``ci_reliable_run``)."""
    from pgvar.stats import RUN_HEAVY_TAILS, pooled_spread_kurtosis, run_intervals_reliable

    state.spread_moments.append((float(cells["spread_z_mean"]), float(cells["spread_z_sq_mean"])))
    kappa = pooled_spread_kurtosis(*zip(*state.spread_moments))
    M = int(cells["n_estimates"])
    if cells.get("ci_reliable", True) and run_intervals_reliable(kappa, M):
        return
    log.warning("step %d: per-measurement intervals flagged unreliable (M=%d, tail_index %.2f, "
                "kurtosis over the %d measured steps so far %.2f; they under-cover with "
                "M < 16, a step's tail_index > 3 or (kurtosis - 1) / M > %.2f): raise "
                "training.n_batches, and read bias verdicts from the pooled table", step, M,
                cells["tail_index"], len(state.spread_moments), kappa, RUN_HEAVY_TAILS)


def training_gradient(run_cfg: RunConfig, env, policy, critic, est_cfg, batch, step: int) -> torch.Tensor:
    """The estimator's gradient-ascent direction on the training batch, ``[P]``."""
    from pgvar.estimators import estimate_gradients

    g = estimate_gradients(run_cfg.estimator.name, env, policy, batch, 1, critic=critic,
                           cfg=est_cfg)[0]
    if step == run_cfg.debug.nan_at_step:
        g = torch.full_like(g, float("nan"))
    check_finite(g, step, "training gradient")
    return g


def ascent_step(optimizer: torch.optim.Optimizer, policy: torch.nn.Module, g: torch.Tensor) -> None:
    """Give each parameter its slice of ``g`` and let the (maximising) optimizer step."""
    i = 0
    for p in policy.parameters():
        n = p.numel()
        p.grad = g[i:i + n].reshape(p.shape).to(dtype=p.dtype, device=p.device).clone()
        i += n
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fit_critic(run_cfg: RunConfig, env, critic, est_cfg, batch) -> float | None:
    """Fit the critic on this batch, after the batch has served its gradient."""
    if critic is None:
        return None
    c = run_cfg.training.critic
    return float(critic.fit(batch, float(env.gamma), env.objective, steps=c.fit_steps, lr=c.lr,
                            truncation_as_termination=est_cfg.truncation_as_termination))


def progress_line(run_cfg: RunConfig, step: int, row: dict[str, Any], state: RunState,
                  elapsed: float) -> str:
    """One line of where the run is: iteration, return, last measured variance and bias."""
    tag = f"[{run_cfg.env.name} {run_cfg.estimator.name} seed={run_cfg.seed}]"
    line = (f"{tag} iter {step + 1}/{run_cfg.training.iterations} "
            f"return {row['return_mean']:.4g} env_steps {state.env_steps}")
    if state.last_measured_step is not None:
        m = state.last_measured
        line += (f" | @{state.last_measured_step}: var {m.get('grad_variance', math.nan):.3g}"
                 f" bias {m.get('grad_bias', math.nan):.3g}"
                 f" [{m.get('grad_bias_lo', math.nan):.3g}, {m.get('grad_bias_hi', math.nan):.3g}]"
                 f" cos {m.get('cos_ref', math.nan):.3f}")
    return line + f" | {elapsed:.1f}s"


def initial_policy(env, run_cfg: RunConfig):
    """The run's policy before its first update: ``run_cfg.policy`` seeded by the run seed's
    policy stream (what ``train_and_measure`` trains)."""
    return build_policy(env, run_cfg.policy, derive_seed(run_cfg.seed, "policy"))


def env_schema_of(env_name: str | None) -> type:
    """The config schema of an environment name: its own (tabular, lqr, gym, ...), or the
    named-Gymnasium one for pgvar's short Gymnasium names (cartpole, pendulum)."""
    from pgvar.config import ENV_SCHEMAS, NamedGymEnvConfig
    from pgvar.envs.registry import available_envs

    if env_name in ENV_SCHEMAS:
        return ENV_SCHEMAS[env_name]
    if env_name in available_envs():
        return NamedGymEnvConfig
    raise ConfigError(f"env.name={env_name!r} is not one of {available_envs()}")


def run_config_from(config: Mapping[str, Any]) -> RunConfig:
    """A typed ``RunConfig`` from a run's resolved config (``run.json``'s ``config``, or
    part of it): the given values over the schema defaults of its environment."""
    from pgvar.config import EstimatorSettings, PolicySettings, to_run_config

    env_name = (config.get("env") or {}).get("name")
    schema = env_schema_of(env_name)
    # the estimator does not shape a run's environment or initial policy: a config that
    # names none gets a placeholder, so that a partial config (env, policy, seed) suffices
    base = RunConfig(env=schema(), estimator=EstimatorSettings(name="reinforce"),
                     policy=PolicySettings())
    return to_run_config(OmegaConf.merge(OmegaConf.structured(base), dict(config)))


def initial_env_and_policy(config: Mapping[str, Any], device: str = "cpu"):
    """(environment, initial policy) of the run with this resolved config, built exactly
    as ``pgvar-run`` builds them: for analyses that need a run's starting point."""
    run_cfg = run_config_from(config)
    env = build_env(run_cfg.env, device)
    return env, initial_policy(env, run_cfg)


def resolved_config(run_cfg: RunConfig, job_dir: Path) -> dict[str, Any]:
    """The run's resolved config as run.json holds it (what checkpoints are fingerprinted
    against), or the typed config's when there is no run.json (a direct call)."""
    record = runlog.read_run_record(job_dir) or {}
    config = record.get("config")
    return config if isinstance(config, dict) else OmegaConf.to_container(
        OmegaConf.structured(run_cfg), resolve=True)


def log_expected_duration(run_cfg: RunConfig, env) -> None:
    """One log line with the job's estimated environment steps and duration class."""
    from pgvar.preflight import check_job_duration

    steps, word = check_job_duration(run_cfg, env)
    log.info("estimated work: about %.2g environment steps (%s on a 2-core machine)", steps, word)


def train_and_measure(run_cfg: RunConfig, job_dir: Path, started: float, state: RunState) -> None:
    """The loop of the module docstring; rows go to ``job_dir/metrics.csv``."""
    from pgvar.estimators import EstimatorConfig
    from pgvar.measured_step import run_specs
    from pgvar.rollout import rollout

    setup_torch(run_cfg)
    device = resolve_device(run_cfg.device)
    training = run_cfg.training
    env = build_env(run_cfg.env, device)
    log_expected_duration(run_cfg, env)
    if getattr(env, "is_sequence_task", False):
        from pgvar.sequence_run import train_and_measure_sequence

        train_and_measure_sequence(run_cfg, env, job_dir, started, state)
        return
    try:
        policy = initial_policy(env, run_cfg)
        est_cfg = EstimatorConfig(**run_cfg.estimator.core_kwargs())
        specs, configs = run_specs(run_cfg, est_cfg)
        critic = (build_critic(env, policy, training.critic, derive_seed(run_cfg.seed, "critic"))
                  if run_has_critic(run_cfg) else None)
        config = resolved_config(run_cfg, job_dir)
        optimizer = torch.optim.Adam(policy.parameters(), lr=run_cfg.lr, maximize=True)
        every = progress_interval(training.log_every, training.iterations)
        with runlog.RunLog(job_dir, run_cfg.logger) as writer, \
                runlog.MetricsWriter(job_dir / runlog.PAIRED_FILE, runlog.PAIRED_COLUMNS) as paired:
            for step in range(training.iterations):
                if step == run_cfg.debug.raise_at_step:
                    raise RuntimeError(f"debug.raise_at_step={step}: a deliberate failure")
                batch = rollout(env, policy, training.batch_size,
                                derive_seed(run_cfg.seed, "train", step))
                row = learning_curve_row(step, batch, float(env.gamma), state)
                if is_measured_step(step, training.iterations, training.measure_every):
                    measured = measure_and_record(run_cfg, env, policy, critic, specs, configs,
                                                  step, job_dir, paired, started, config)
                    row.update(measured)
                    state.last_measured, state.last_measured_step = measured, step
                    warn_if_unreliable(measured, step, state)
                g = training_gradient(run_cfg, env, policy, critic, est_cfg, batch, step)
                with overflow_means_divergence(step):
                    ascent_step(optimizer, policy, g)
                check_finite(flatten_params(policy), step, "policy parameters after the update")
                row["grad_norm"] = float(g.double().norm())
                row["critic_loss"] = fit_critic(run_cfg, env, critic, est_cfg, batch)
                elapsed = time.perf_counter() - started
                row["wall_s"] = round(elapsed, 3)
                writer.write(row)
                state.steps_completed = step + 1
                if step % every == 0 or step == training.iterations - 1:
                    log.info(progress_line(run_cfg, step, row, state, elapsed))
                if run_cfg.debug.sleep_s > 0:
                    time.sleep(run_cfg.debug.sleep_s)
    finally:
        close = getattr(env, "close", None)
        if callable(close):
            close()


# --------------------------------------------------------------------- the Hydra job


def job_dir_of_current_job() -> Path:
    """The Hydra job's output directory (run dir, or sweep dir / subdir)."""
    return Path(HydraConfig.get().runtime.output_dir)


def task_overrides() -> list[str] | None:
    """The overrides that made this job (for run.json), when Hydra is running it."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return None


def group_choices() -> dict[str, str] | None:
    """Which option of each pgvar config group the job used (env, estimator, policy, preset)."""
    try:
        choices = HydraConfig.get().runtime.choices
    except ValueError:
        return None
    return {k: str(v) for k, v in choices.items() if not k.startswith("hydra/") and v is not None}


SWEEP_RECORD = "multirun.yaml"  # Hydra writes it into a sweep's folder when the sweep starts


def sweep_progress(job_dir: Path) -> str | None:
    """Where the sweep of ``job_dir`` stands: jobs ended of all, their rate and the time
    left (None outside a sweep). Read from the files, so it is right with any launcher:
    the jobs come from the sweep's overrides in Hydra's ``multirun.yaml``, the ended ones
    are the job folders whose run.json holds a final status (earlier complete runs that
    were skipped count as ended), the clock starts at ``multirun.yaml``'s writing."""
    record = Path(job_dir).parent / SWEEP_RECORD
    try:
        overrides = list(OmegaConf.load(record).hydra.overrides.task)
        started = record.stat().st_mtime
    except Exception:  # noqa: BLE001 - no sweep, or a record this version cannot read
        return None
    total = len(expand_sweep(overrides))
    ended = sum(1 for run_file in record.parent.glob(f"*/{runlog.RUN_FILE}")
                if (runlog.read_run_record(run_file.parent) or {}).get("status")
                in runlog.FINAL_STATUSES)
    pace = rate_and_remaining(ended, total, time.time() - started, "jobs")
    return f"sweep {record.parent.name}: {ended}/{total} jobs ended, {pace}"


def log_sweep_progress(job_dir: Path) -> None:
    """Log ``sweep_progress`` after a job of a sweep (nothing for a single run)."""
    line = sweep_progress(job_dir)
    if line:
        log.info(line)


def run_job(cfg: DictConfig, job_dir: Path) -> str:
    """One run in ``job_dir``, which this process claims first (``pgvar.joblock``): a
    folder another process holds is left alone (``skipped``)."""
    with joblock.claim_job(job_dir) as claim:
        if not claim.held:
            log.info("skipping %s: another process is running this job (%s)", job_dir, claim.holder)
            return "skipped"
        return run_claimed_job(cfg, job_dir)


def run_claimed_job(cfg: DictConfig, job_dir: Path) -> str:
    """One run in a claimed ``job_dir``: skip it if complete, else run it and write run.json.

    Returns the final status. A failed run raises ``RunFailed`` after its run.json is
    written, so Hydra marks the job failed (and exits 1 once the sweep is done) while
    the launcher goes on with the other jobs.
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    rerun = bool(cfg.get("rerun_complete", False))
    decision = runlog.prepare_job_dir(job_dir, config, rerun_complete=rerun)
    if decision.action == "skip":
        log.info("skipping %s: %s", job_dir, decision.reason)
        return "skipped"
    log.info("running in %s (%s)", job_dir, decision.reason)
    record = runlog.RunRecord(status=runlog.STATUS_RUNNING, config=config,
                              seed=int(cfg.get("seed", 0)),
                              started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              device=str(cfg.get("device")), job_dir=str(job_dir),
                              overrides=task_overrides(), choices=group_choices())
    record.write(job_dir)
    started = time.perf_counter()
    state = RunState()
    try:
        run_cfg = validate_config(cfg)
        record.device = str(resolve_device(run_cfg.device))
        train_and_measure(run_cfg, job_dir, started, state)
        record.status = runlog.STATUS_COMPLETE
    except Diverged as err:
        record.status, record.error = runlog.STATUS_DIVERGED, str(err)
        record.diverged_at_step = state.steps_completed
        log.warning("run diverged: %s (%s)", err, job_dir)
    except Exception as err:  # noqa: BLE001 - every failure is recorded, then re-raised
        record.status, record.error = runlog.STATUS_FAILED, f"{type(err).__name__}: {err}"
        record.traceback = traceback.format_exc()
        log.error("run failed: %s (%s)\n%s", record.error, job_dir, record.traceback)
    record.elapsed_s = round(time.perf_counter() - started, 3)
    record.steps_completed = state.steps_completed
    record.write(job_dir)
    log_sweep_progress(job_dir)
    if record.status == runlog.STATUS_FAILED:
        raise RunFailed(f"{record.error} (details: {job_dir / runlog.RUN_FILE})")
    return record.status


def task(cfg: DictConfig) -> str:
    """Hydra's task function: one run in the current job directory."""
    return run_job(cfg, job_dir_of_current_job())


hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")(task)
