"""Throughput benchmark: ``python -m pgvar.bench [--quick] [--device cpu|cuda]``.

In one process, at one fixed CartPole-v1 policy (the default 64x64 tanh MLP at its
seeded initialisation), it times

(a) the seed-style loop: one Gymnasium env, one policy call per step, a
    ``torch.distributions.Categorical`` per step and one ``backward()`` per episode, as
    in the seed text's snippet; the gradient of each batch of B episodes is read from
    ``.grad`` (no optimiser step: the policy stays fixed);
(b) pgvar's measurement of M=32 batches x B=32 episodes: one ``rollout`` of M B episodes
    and ``estimate_gradients("reinforce_rtg", ...)`` -> ``[M, P]``;
(c) a Monte Carlo reference gradient of 10^6 (``--quick``) or 10^7 state-action pairs,
    streamed in chunks by ``pgvar.reference.monte_carlo_reference``;

and prints episodes/s and pairs/s for each (medians over repeats), their peak resident
memory (``VmHWM`` of ``/proc/self/status``, reset before each part; on CUDA also
``torch.cuda.max_memory_allocated``), ``speedup_vs_seed_loop`` (pgvar's measurement over
the seed loop, in pairs/s, both on the same number of episodes per timed block), and the
fraction of the machine's float32 matmul rate (timed here on a large square matmul)
that the policy-network work reaches: a pair costs one forward while sampling, one
forward and one backward for its gradient (``policy_flops_per_pair``).

``--env hopper`` times instead, on Hopper-v5 (MuJoCo) at its initial MLP policy, the
Monte Carlo reference (``monte_carlo_reference``, reinforce_rtg) next to Gymnasium's own
vector env stepping the same number of lanes with zero actions in the same process
(repeats interleaved, medians), and prints their ratio: the simulator, not pgvar, should
bound the reference (target >= 0.8). A finite stream wastes about lanes x (longest
episode) / 2 lane-steps at its end, so the default is 128 lanes.

Timings depend on the load of the machine: the header prints the load average, and every
part also reports its process CPU time (``cpu_s``, ``pairs_per_cpu_s``), which other
processes on the machine disturb much less than wall-clock time.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pgvar.preflight import count_argument

SEED = 0
M_BATCHES, B_EPISODES = 32, 32
AUTO_MARGIN = 1.3  # --threads auto keeps torch's default thread count only if this much faster


# --------------------------------------------------------------------------- utilities


def _proc_status(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (Linux only), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak resident memory of a block of code, and CUDA peak allocation on CUDA.

    Linux keeps the process's peak RSS in ``VmHWM``; writing "5" to
    ``/proc/self/clear_refs`` resets it to the current RSS, so the value read after the
    block is the block's own peak (whole-process, absolute). Where the reset is refused
    the value is the process's peak so far (said by ``reset=False``).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset = False
        self.peak_rss = None
        self.start_rss = None
        self.cuda_peak = None

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start_rss = _proc_status("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.peak_rss = _proc_status("VmHWM")
        if self.peak_rss is None:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
            import resource
            scale = 1 if sys.platform == "darwin" else 1024
            self.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)

    def describe(self) -> str:
        mib = 2**20
        s = f"peak_rss_mib={self.peak_rss / mib:.0f}"
        if self.start_rss is not None:
            s += f" (start {self.start_rss / mib:.0f}{'' if self.reset else ', not reset'})"
        if self.cuda_peak is not None:
            s += f" cuda_peak_alloc_mib={self.cuda_peak / mib:.0f}"
        return s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, repeats: int) -> float:
    """Median float32 GFLOP/s of an n x n matmul (n = 2048 on CPU, 8192 on CUDA)."""
    n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def policy_flops_per_pair(policy: nn.Module) -> int:
    """FLOPs of the policy network per state-action pair: sampling forward, re-forward,
    backward (weight gradients of every layer, input gradients of all but the first).

    Matmul work only (2 in out per Linear layer); activations and softmax are extra.
    """
    linears = [m for m in policy.modules() if isinstance(m, nn.Linear)]
    fwd = sum(2 * m.in_features * m.out_features for m in linears)
    bwd = fwd + sum(2 * m.in_features * m.out_features for m in linears[1:])
    return 2 * fwd + bwd


@dataclass
class Rate:
    """Throughput of a timed part: medians over the timed blocks."""

    name: str
    episodes: int  # per block
    pairs: float  # per block (median)
    seconds: float  # per block (median)
    blocks: int
    memory: PeakMemory | None = None
    extra: str = ""
    cpu_seconds: float = math.nan  # process CPU time per block (median): load-independent

    @property
    def pairs_per_cpu_s(self) -> float:
        return self.pairs / self.cpu_seconds

    @property
    def episodes_per_s(self) -> float:
        return self.episodes / self.seconds

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    def line(self) -> str:
        mem = f" {self.memory.describe()}" if self.memory else ""
        return (f"{self.name}: episodes={self.episodes} pairs={self.pairs:.0f} "
                f"time_s={self.seconds:.4f} (median of {self.blocks}) "
                f"episodes_per_s={self.episodes_per_s:.1f} pairs_per_s={self.pairs_per_s:.4g} "
                f"cpu_s={self.cpu_seconds:.4f} pairs_per_cpu_s={self.pairs_per_cpu_s:.4g}"
                f"{mem}{self.extra}")


def _median_block(times: list[float], pairs: list[int]) -> tuple[float, float]:
    return statistics.median(times), statistics.median(pairs)


# ---------------------------------------------------------------------- (a) seed loop


def seed_loop_gradient(env, policy_net: nn.Module, n_episodes: int, gamma: float,
                       seed: int) -> int:
    """The seed text's snippet, episode by episode; returns the pairs it used.

    Gradients accumulate in ``.grad`` over the ``n_episodes`` episodes of one batch
    (the snippet's ``loss.sum().backward()``); no optimiser step, so the policy stays
    fixed. Gymnasium 1.x's reset/step signatures replace the snippet's older ones.
    """
    from torch.distributions import Categorical

    pairs = 0
    for i in range(n_episodes):
        # Collect one episode
        log_probs, rewards = [], []
        state, _ = env.reset(seed=seed + i)
        done = False
        while not done:
            dist = Categorical(policy_net(torch.as_tensor(state)))
            action = dist.sample()
            log_probs.append(dist.log_prob(action))
            state, reward, terminated, truncated, _ = env.step(action.item())
            done = terminated or truncated
            rewards.append(reward)

        # Compute discounted returns (reward-to-go)
        G, returns = 0.0, []
        for r in reversed(rewards):
            G = r + gamma * G
            returns.insert(0, G)
        returns = torch.tensor(returns)

        # Gradient step (without optimiser.step(): the policy stays fixed)
        loss = -torch.stack(log_probs) * returns  # negative: we minimise
        loss.sum().backward()
        pairs += len(rewards)
    return pairs


def bench_seed_loop(policy: nn.Module, gamma: float, episodes: int, blocks: int) -> Rate:
    """(a): ``blocks`` blocks of ``episodes`` episodes, each one batch's gradient."""
    import gymnasium

    env = gymnasium.make("CartPole-v1")
    # the same fixed policy, on the CPU, as the snippet's policy_net (probabilities out)
    net = nn.Sequential(_cpu_copy(policy).net, nn.Softmax(dim=-1))
    times, pairs, cpu = [], [], []
    with PeakMemory(torch.device("cpu")) as mem:
        for k in range(blocks):
            net.zero_grad(set_to_none=True)
            t, c = time.perf_counter(), time.process_time()
            pairs.append(seed_loop_gradient(env, net, episodes, gamma, seed=10_000 * k))
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    env.close()
    s, p = _median_block(times, pairs)
    return Rate("seed_loop", episodes, p, s, blocks, mem, cpu_seconds=statistics.median(cpu))


def _cpu_copy(policy: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(policy).to("cpu")


# -------------------------------------------------------------------- (b) measurement


def pgvar_measurement(env, policy: nn.Module, n_batches: int, batch_size: int, seed: int):
    """One measurement step's estimates ``[M, P]``; returns (estimates, batch, seconds of
    the rollout, seconds of the gradients)."""
    from pgvar.estimators import estimate_gradients
    from pgvar.rollout import rollout

    device = env.device
    t0 = time.perf_counter()
    batch = rollout(env, policy, n_batches * batch_size, seed)
    _sync(device)
    t1 = time.perf_counter()
    est = estimate_gradients("reinforce_rtg", env, policy, batch, n_batches)
    _sync(device)
    return est, batch, t1 - t0, time.perf_counter() - t1


def bench_measurement(env, policy: nn.Module, repeats: int) -> Rate:
    """(b): M x B episodes per block, ``repeats`` blocks (distinct seeds), after a warm-up."""
    pgvar_measurement(env, policy, M_BATCHES, B_EPISODES, seed=999)  # warm-up
    times, pairs, t_roll, t_grad, cpu = [], [], [], [], []
    with PeakMemory(env.device) as mem:
        for k in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            est, batch, tr, tg = pgvar_measurement(env, policy, M_BATCHES, B_EPISODES, seed=k)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            pairs.append(batch.n_steps)
            t_roll.append(tr)
            t_grad.append(tg)
    assert est.shape == (M_BATCHES, sum(p.numel() for p in policy.parameters()))
    s, p = _median_block(times, pairs)
    extra = (f" rollout_s={statistics.median(t_roll):.4f} "
             f"gradients_s={statistics.median(t_grad):.4f}")
    return Rate(f"measurement(M={M_BATCHES},B={B_EPISODES})", M_BATCHES * B_EPISODES, p, s,
                repeats, mem, extra, statistics.median(cpu))


# ---------------------------------------------------------------------- (c) reference

# The benchmark's reference keeps 8192-episode chunks: under the library's default budget
# (pgvar.reference.DEFAULT_MEMORY_MB, 512) CartPole's chunk would be cut to 2032 episodes,
# 1.5x slower here (5.5 s against 3.7 s per 10^6 pairs at a load average of ~5).
BENCH_MEMORY_MB = 4096.0


def bench_reference(env, policy: nn.Module, n_pairs: int, repeats: int, chunk_episodes: int,
                    batch_size: int | None = None, lanes: int | None = None,
                    memory_mb: float | None = None) -> Rate:
    """(c): a Monte Carlo reference of ``n_pairs`` pairs, ``repeats`` times (distinct seeds).
    The chunk and lanes printed are those used (``memory_mb`` may shrink the asked ones)."""
    from pgvar.reference import DEFAULT_LANES, monte_carlo_reference

    lanes = DEFAULT_LANES if lanes is None else lanes
    kw = {} if batch_size is None else {"batch_size": batch_size}
    if memory_mb is not None:
        kw["memory_mb"] = memory_mb
    times, pairs, eps, rel, cpu = [], [], [], [], []
    with PeakMemory(env.device) as mem:
        for k in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            ref = monte_carlo_reference(env, policy, n_pairs=n_pairs, seed=100 + k,
                                        chunk_episodes=chunk_episodes, lanes=lanes or None, **kw)
            _sync(env.device)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            pairs.append(ref.n_pairs)
            eps.append(ref.n_episodes)
            rel.append(ref.rel_se)
    extra = (f" rel_se={statistics.median(rel):.4f} chunk_episodes={ref.info['chunk_episodes']}"
             f" batch_size={ref.info['batch_size']} lanes={ref.info['lanes'] or 'off'}"
             " via=pgvar.reference.monte_carlo_reference")
    return Rate(f"reference(n_pairs={n_pairs:.0e})", int(statistics.median(eps)),
                statistics.median(pairs), statistics.median(times), repeats, mem, extra,
                statistics.median(cpu))


# ------------------------------------------------------------------- Hopper (--env hopper)

HOPPER_ID = "Hopper-v5"
# Lanes of both Hopper parts. A finite stream steps every lane until the longest of its
# last episodes ends, about lanes x (longest episode) / 2 lane-steps that yield no pair:
# 512 lanes cost 30% at 10^5 pairs, 128 lanes about 2% at 2 x 10^5.
HOPPER_LANES = 128


def raw_stepping_rate(lanes: int, n_pairs: int, seed: int, actions: str = "zero") -> tuple[float, float]:
    """(wall s, CPU s) per pair of Gymnasium's own vector env stepping ``lanes`` Hopper
    copies with zero (or uniformly random) actions for about ``n_pairs`` steps: the
    simulator's rate with nothing of pgvar around it (its autoreset starts new episodes)."""
    import gymnasium

    from pgvar.envs.gym import gym_spec, vectorization_mode_for

    vec = gymnasium.make_vec(HOPPER_ID, num_envs=lanes,
                             vectorization_mode=vectorization_mode_for(gym_spec(HOPPER_ID)))
    vec.reset(seed=seed)
    rng = np.random.default_rng(seed)
    low, high = vec.single_action_space.low, vec.single_action_space.high
    zero = np.zeros((lanes, *vec.single_action_space.shape), dtype=np.float32)
    steps = max(1, n_pairs // lanes)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        a = zero if actions == "zero" else rng.uniform(low, high, size=zero.shape).astype(np.float32)
        vec.step(a)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    vec.close()
    return wall / (steps * lanes), cpu / (steps * lanes)


def stream_rate(env, policy: nn.Module, lanes: int, n_pairs: int, seed: int,
                chunk_episodes: int) -> tuple[float, float]:
    """(wall s, CPU s) per pair of ``pgvar.refill.rollout_stream`` alone: the simulator,
    the policy's sampling forward and the stream's bookkeeping, no gradients."""
    from pgvar.refill import rollout_stream

    sizes = iter(lambda: chunk_episodes, None)
    t, c, pairs = time.perf_counter(), time.process_time(), 0
    for batch in rollout_stream(env, policy, sizes, seed, lanes=lanes, max_pairs=n_pairs):
        pairs += batch.n_steps
        if pairs >= n_pairs:
            break
    return (time.perf_counter() - t) / pairs, (time.process_time() - c) / pairs


def gradient_rate(env, policy: nn.Module, lanes: int, seed: int, chunk_episodes: int,
                  batch_size: int) -> tuple[float, float]:
    """(wall s, CPU s) per pair of the reference's gradient work on one chunk (the
    reinforce_rtg sub-batch gradients, reduced as ``monte_carlo_reference`` does)."""
    from pgvar.estimators import estimate_gradient_blocks
    from pgvar.reference import RunningMoments
    from pgvar.refill import rollout_stream

    batch = next(rollout_stream(env, policy, iter(lambda: chunk_episodes, None), seed, lanes=lanes))
    n_sub = batch.n_episodes // batch_size
    batch = batch.select(slice(0, n_sub * batch_size))
    moments = RunningMoments()
    t, c = time.perf_counter(), time.process_time()
    for _, rows in estimate_gradient_blocks("reinforce_rtg", env, policy, batch, n_sub):
        moments.update(rows)
    return (time.perf_counter() - t) / batch.n_steps, (time.process_time() - c) / batch.n_steps


def hopper_main(args: argparse.Namespace) -> int:
    """``--env hopper``: the Monte Carlo reference's pairs/s on Hopper-v5 next to
    Gymnasium's raw stepping rate with the same lanes, in one process, and their ratio;
    then where the reference's time goes (stream without gradients, gradients alone)."""
    from pgvar.envs.registry import make_env, make_policy
    from pgvar.reference import monte_carlo_reference

    torch.set_num_threads(1 if args.threads == "auto" else int(args.threads))
    env = make_env("gym", env_id=HOPPER_ID)
    torch.manual_seed(SEED)
    policy = make_policy(env)
    lanes = args.lanes if args.lanes else HOPPER_LANES
    n_pairs = args.pairs or (2 * 10**5 if args.quick else 10**6)
    repeats = args.repeats or (3 if args.quick else 5)
    chunk = min(args.chunk_episodes, 1024)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"pgvar.bench --env hopper: {HOPPER_ID}, initial MLP policy, lanes={lanes}, "
          f"torch threads={torch.get_num_threads()}, pairs per repeat={n_pairs:.0e}, "
          f"repeats={repeats}, loadavg={load[0]:.2f},{load[1]:.2f},{load[2]:.2f}")
    raw_wall, raw_cpu, rnd_cpu, ref_wall, ref_cpu = [], [], [], [], []
    for k in range(repeats):  # interleaved, so a change of the machine's load hits both
        w, c = raw_stepping_rate(lanes, n_pairs, seed=k)
        raw_wall.append(w)
        raw_cpu.append(c)
        rnd_cpu.append(raw_stepping_rate(lanes, n_pairs // 4, seed=k, actions="random")[1])
        t, c0 = time.perf_counter(), time.process_time()
        ref = monte_carlo_reference(env, policy, n_pairs=n_pairs, seed=100 + k, lanes=lanes,
                                    chunk_episodes=chunk, memory_mb=args.memory_mb)
        ref_wall.append((time.perf_counter() - t) / ref.n_pairs)
        ref_cpu.append((time.process_time() - c0) / ref.n_pairs)
    med = statistics.median
    raw_rate, ref_rate = 1 / med(raw_wall), 1 / med(ref_wall)
    print(f"raw_gymnasium_stepping: pairs_per_s={raw_rate:.0f} pairs_per_cpu_s={1 / med(raw_cpu):.0f} "
          f"(zero actions, {lanes} lanes, one process, median of {repeats}); uniformly random "
          f"actions: pairs_per_cpu_s={1 / med(rnd_cpu):.0f} (a quarter of the pairs)")
    print(f"monte_carlo_reference: pairs_per_s={ref_rate:.0f} pairs_per_cpu_s={1 / med(ref_cpu):.0f} "
          f"(reinforce_rtg, batch_size 4, lanes {ref.info['lanes']}, chunk "
          f"{ref.info['chunk_episodes']} episodes, median of {repeats})")
    print(f"reference_over_raw_stepping: {ref_rate / raw_rate:.2f} (wall) "
          f"{med(raw_cpu) / med(ref_cpu):.2f} (CPU); target >= 0.8")
    _, s_cpu = stream_rate(env, policy, lanes, n_pairs, 7, chunk)
    _, g_cpu = gradient_rate(env, policy, lanes, 8, chunk, 4)
    print(f"where_the_time_goes (CPU us per pair, one run each, noisy under load): reference "
          f"{1e6 * med(ref_cpu):.0f}; Gymnasium stepping alone {1e6 * med(raw_cpu):.0f}; the "
          f"refill stream without gradients (simulator, policy sampling, bookkeeping, idle "
          f"lanes at the stream's end) {1e6 * s_cpu:.0f}; the gradients {1e6 * g_cpu:.1f}")
    env.close()
    return 0


# ------------------------------------------------------------------------------- main


def threads_argument(text: str) -> str:
    """``--threads``: 'auto' or an integer >= 1 (argparse refuses anything else, exit 2)."""
    return text if text == "auto" else str(count_argument(1)(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgvar.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="10^6-pair reference and fewer repeats (under a minute)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="device of pgvar's parts (the seed loop always runs on the CPU)")
    parser.add_argument("--threads", default="auto", type=threads_argument,
                        help="torch intra-op threads: a number, or 'auto' (default): time one "
                             "measurement step with 1 thread and with torch's default, keep the "
                             "faster (on a loaded machine more threads can be far slower)")
    parser.add_argument("--repeats", type=count_argument(1), default=None,
                        help="timed blocks per part (default 3 quick, 5 full; reference 3)")
    parser.add_argument("--chunk-episodes", type=count_argument(1), default=8192,
                        help="episodes per reference chunk (memory vs per-step overhead)")
    parser.add_argument("--ref-batch-size", type=count_argument(1), default=None,
                        help="episodes per sub-batch of the reference (default: "
                             "monte_carlo_reference's own); fewer, larger sub-batches mean "
                             "fewer [P]-vectors to write and reduce per pair")
    parser.add_argument("--lanes", type=count_argument(0), default=None,
                        help="reference lanes that refill as episodes end (default: "
                             "pgvar.reference.DEFAULT_LANES; 0: one episode per lane, as "
                             "pgvar.rollout.rollout samples)")
    parser.add_argument("--memory-mb", type=float, default=BENCH_MEMORY_MB,
                        help="memory budget of one reference chunk; the chunk and lanes shrink "
                             "to fit it, and the line prints those used (default "
                             f"{BENCH_MEMORY_MB:g}: room for --chunk-episodes 8192 on CartPole)")
    parser.add_argument("--env", default="cartpole", choices=["cartpole", "hopper"],
                        help="cartpole (default): the parts above; hopper: the Monte Carlo "
                             "reference on Hopper-v5 against Gymnasium's raw stepping rate")
    parser.add_argument("--pairs", type=count_argument(1000), default=None,
                        help="--env hopper: pairs per timed repeat of each part (default "
                             "10^6; 2 x 10^5 with --quick)")
    args = parser.parse_args(argv)
    if args.pairs is not None and args.env != "hopper":
        parser.error("--pairs: only with --env hopper")
    if args.env == "hopper":
        return hopper_main(args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    repeats = args.repeats or (3 if args.quick else 5)
    ref_repeats = args.repeats or 3
    n_ref_pairs = 10**6 if args.quick else 10**7
    seed_episodes = 128 if args.quick else M_BATCHES * B_EPISODES
    seed_blocks = 3

    from pgvar.envs.registry import make_env, make_policy

    env = make_env("cartpole", device=device)
    torch.manual_seed(SEED)
    policy = make_policy(env)
    flops = policy_flops_per_pair(policy)
    P = sum(p.numel() for p in policy.parameters())
    t_start = time.perf_counter()
    threads_note = choose_threads(args.threads, env, policy)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"pgvar.bench: device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} "
          f"loadavg={load[0]:.2f},{load[1]:.2f},{load[2]:.2f} quick={args.quick}")
    print(f"threads: {threads_note}")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")
    print(f"policy: CartPole-v1 MLP {_layer_sizes(policy)} tanh, params={P}, "
          f"policy_flops_per_pair={flops} (sample forward + re-forward + backward)")
    gflops = matmul_gflops(device, 5)
    print(f"matmul_gflops: {gflops:.1f} (float32 square matmul, median of 5)")

    a = bench_seed_loop(policy, float(env.gamma), seed_episodes, seed_blocks)
    print(a.line())
    b = bench_measurement(env, policy, repeats)
    print(b.line())
    c = bench_reference(env, policy, n_ref_pairs, ref_repeats, args.chunk_episodes,
                        args.ref_batch_size, args.lanes, args.memory_mb)
    print(c.line())

    def frac(rate: Rate) -> float:
        return rate.pairs_per_s * flops / (gflops * 1e9)

    print(f"flop_fraction: seed_loop={frac(a):.4f} measurement={frac(b):.4f} "
          f"reference={frac(c):.4f} (policy-network FLOP/s over matmul FLOP/s)")
    print(f"reference_10M_pairs_s: {1e7 / c.pairs_per_s:.2f} (extrapolated from its pairs/s)")
    print(f"speedup_vs_seed_loop: {b.pairs_per_s / a.pairs_per_s:.1f}")
    print(f"reference_speedup_vs_seed_loop: {c.pairs_per_s / a.pairs_per_s:.1f}")
    print(f"cpu_time_speedup_vs_seed_loop: measurement={b.pairs_per_cpu_s / a.pairs_per_cpu_s:.1f} "
          f"reference={c.pairs_per_cpu_s / a.pairs_per_cpu_s:.1f} (pairs per CPU-second: less "
          "sensitive to other processes on the machine)")
    print(f"total_bench_s: {time.perf_counter() - t_start:.1f}")
    return 0


def choose_threads(choice: str, env, policy: nn.Module) -> str:
    """Set torch's intra-op threads from ``choice`` ("auto" or a number); say what was done.

    "auto" times a measurement step (best of 3) with 1 thread and with torch's default
    and keeps the default only if it is at least ``AUTO_MARGIN`` times faster: with other
    processes on the cores, a many-thread run waits at every OpenMP barrier for a thread
    that is not running, and was seen 10x slower than one thread on a loaded 2-core
    machine (the load can rise after the probe, hence the margin).
    """
    default = torch.get_num_threads()
    if choice != "auto":
        torch.set_num_threads(int(choice))
        return f"{torch.get_num_threads()} (asked)"
    if default == 1:
        return "1 (torch's default)"
    best = {}
    for n in (1, default):
        torch.set_num_threads(n)
        pgvar_measurement(env, policy, M_BATCHES, B_EPISODES, seed=998)  # warm-up
        runs = []
        for k in range(3):
            t = time.perf_counter()
            pgvar_measurement(env, policy, M_BATCHES, B_EPISODES, seed=990 + k)
            runs.append(time.perf_counter() - t)
            if n != 1 and runs[-1] > 2 * best[1]:
                break  # hopeless: do not spend more time on a stalled many-thread run
        best[n] = min(runs)
    n = default if best[1] >= AUTO_MARGIN * best[default] else 1
    torch.set_num_threads(n)
    probe = ", ".join(f"{k} thread(s): {v * 1e3:.0f} ms" for k, v in best.items())
    return f"{n} (auto: one measurement step, best of up to 3: {probe})"


def _layer_sizes(policy: nn.Module) -> str:
    linears = [m for m in policy.modules() if isinstance(m, nn.Linear)]
    return "-".join(str(d) for d in [linears[0].in_features] + [m.out_features for m in linears])


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
