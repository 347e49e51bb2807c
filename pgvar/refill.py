"""A stream of episodes from a fixed set of lanes that are refilled as episodes end.

``pgvar.rollout.rollout`` gives each lane one episode and steps until the longest one
ends: with CartPole's long-tailed lengths most lane-steps of the environment are spent
on lanes whose episode is over (about 5 per real pair at 8192 lanes). For a large
reference gradient this module keeps every lane busy instead: when a lane's episode
ends, the environment's own autoreset starts a new one there, and the stream hands out
chunks of complete episodes.

Why the chunks are unbiased samples. Episodes are numbered in the order they start
(lanes in ascending order within a step). Chunk c holds exactly the episodes numbered
``[lo_c, hi_c)`` and is handed out once all of them have ended; episodes still running
when the consumer stops are dropped. Which episodes a chunk holds is fixed when they
start, never by how long they run, so a chunk is not tilted towards short episodes (as
"the first K episodes to finish" would be). Each episode uses its own fresh draws (the
environment's reset noise, one action uniform per step), so the episodes are i.i.d.
draws of the episode distribution, as in ``rollout``.

The environment must implement ``RefillEnv``: ``refill_reset(n, seed)`` and
``refill_step(actions)``, with Gymnasium's next-step autoreset (a lane whose episode
ended at one call returns the first observation of its next episode at the following
call, whose action it ignores) and the objective's horizon as its own time limit.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from pgvar.batch import Batch
from pgvar.checks import require_int
from pgvar.envs.base import StepResult
from pgvar.prefetch import background
from pgvar.rollout import Sampler, make_sampler, pad_steps, rollout_generator

FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated", "truncated", "logp", "episode", "t")


@runtime_checkable
class RefillEnv(Protocol):
    """An environment whose lanes start a new episode by themselves (next-step autoreset)."""

    horizon: int

    def refill_reset(self, n: int, seed: int) -> torch.Tensor:
        """Start ``n`` lanes seeded by ``seed``; their first observations."""
        ...

    def refill_step(self, actions: torch.Tensor) -> StepResult:
        """Step every lane. A lane that ended at the previous call ignores its action and
        returns its next episode's first observation (reward and flags meaningless)."""
        ...


def supports_refill(env: object) -> bool:
    """True when ``env`` can run a lane's episodes back to back (``RefillEnv``)."""
    check = getattr(env, "supports_refill", None)
    if callable(check):
        return bool(check())
    return isinstance(env, RefillEnv)


class ChunkBook:
    """Episode numbering and chunk boundaries: chunk c holds the episodes numbered
    ``[bounds[c], bounds[c + 1])``; sizes are pulled lazily from the caller's iterable."""

    def __init__(self, sizes: Iterable[int]):
        self._sizes = iter(sizes)
        self.bounds: list[int] = [0]
        self.next_chunk = 0
        self.exhausted = False

    def capacity(self, wanted: int, open_more: Callable[[], bool] = lambda: True) -> int:
        """Pull chunk sizes until ``wanted`` episode numbers exist, none are left, or
        ``open_more()`` says no further chunk is needed."""
        while self.bounds[-1] < wanted and not self.exhausted:
            if len(self.bounds) > 1 and not open_more():
                self.exhausted = True
                break
            size = next(self._sizes, None)
            if size is None:
                self.exhausted = True
                break
            self.bounds.append(self.bounds[-1] + require_int("chunk sizes", size))
        return self.bounds[-1]

    def has_started_next_chunk(self, next_episode: int) -> bool:
        """Every episode of the next chunk to hand out has started (numbers below
        ``next_episode``), so it may be complete."""
        c = self.next_chunk
        return c + 1 < len(self.bounds) and self.bounds[c + 1] <= next_episode

    def complete_chunks(self, lowest_open: int) -> list[tuple[int, int]]:
        """``(lo, hi)`` of the chunks not yet handed out whose episodes have all ended,
        given the lowest number of an episode still running (or not yet started)."""
        out = []
        while self.next_chunk + 1 < len(self.bounds) and self.bounds[self.next_chunk + 1] <= lowest_open:
            out.append((self.bounds[self.next_chunk], self.bounds[self.next_chunk + 1]))
            self.next_chunk += 1
        return out


class StepLog:
    """Every lane's step, valid or not, as recorded; cut into chunks as they complete.

    Recording whole ``[lanes]`` columns keeps the per-step work free of index
    operations. The steps since the last cut are joined into a segment of valid rows; a
    chunk gathers its rows from the segments, and a segment is dropped once every
    episode in it has been handed out. Rows of later chunks stay where they are, so the
    work per chunk does not grow with how far the lanes have run ahead.
    """

    def __init__(self):
        self.steps: dict[str, list[torch.Tensor]] = {k: [] for k in (*FIELDS, "valid")}
        self.segments: list[tuple[dict[str, torch.Tensor], int, int]] = []  # columns, episode range
        self._sealed_rows = 0

    def add(self, **columns: torch.Tensor) -> None:
        for k, v in columns.items():
            self.steps[k].append(v)

    def n_recorded(self) -> int:
        """Valid steps recorded so far (taken or not)."""
        self._seal()
        return self._sealed_rows

    def _seal(self) -> None:
        """Join the steps recorded since the last cut into a segment of valid rows."""
        if not self.steps["t"]:
            return
        parts = {k: torch.cat(v) for k, v in self.steps.items()}
        self.steps = {k: [] for k in self.steps}
        keep = parts.pop("valid").nonzero().squeeze(1)
        self._sealed_rows += int(keep.numel())
        if keep.numel() == 0:
            return
        if keep.numel() < parts["t"].numel():
            parts = {k: v.index_select(0, keep) for k, v in parts.items()}
        self.segments.append((parts, int(parts["episode"].min()), int(parts["episode"].max())))

    def take(self, lo: int, hi: int) -> Batch:
        """The steps of episodes ``[lo, hi)`` (all earlier ones were taken) as a Batch."""
        self._seal()
        pieces, kept = [], []
        for parts, first, last in self.segments:
            if first >= lo and last < hi:  # every row of this segment is in this chunk
                pieces.append(parts)
                continue
            ep = parts["episode"]
            inside = ((ep >= lo) & (ep < hi)).nonzero().squeeze(1)
            if inside.numel():
                pieces.append({k: v.index_select(0, inside) for k, v in parts.items()})
            if last >= hi:
                kept.append((parts, first, last))
        self.segments = kept
        columns = {k: torch.cat([p[k] for p in pieces]) for k in FIELDS}
        episode, t = columns.pop("episode") - lo, columns.pop("t")
        return pad_steps(columns, episode, t, hi - lo)


DENSE_FRACTION = 0.75  # run the policy on every lane while at least this fraction is running


def sample_lanes(sample: Sampler, obs: torch.Tensor, running: torch.Tensor, n_running: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Actions and log-probabilities for all lanes, sampled on the running ones.

    While most lanes run, every lane is sampled (no gathers; the rest are ignored). Once
    fewer than ``DENSE_FRACTION`` run (the end of a stream, where lanes go idle), only
    the running ones are, and the others get zeros.
    """
    n = obs.shape[0]
    if n_running >= DENSE_FRACTION * n:
        return sample(obs, generator)
    lanes = running.nonzero().squeeze(1)
    a, lp = sample(obs.index_select(0, lanes) if n_running else obs[:1], generator)
    if not n_running:  # only resetting lanes: their actions are ignored
        a, lp, lanes = a[:0], lp[:0], lanes[:0]
    actions = torch.zeros((n, *a.shape[1:]), dtype=a.dtype, device=a.device).index_copy_(0, lanes, a)
    logp = torch.zeros(n, dtype=lp.dtype, device=lp.device).index_copy_(0, lanes, lp)
    return actions, logp


@torch.no_grad()
def rollout_stream(env: RefillEnv, policy: nn.Module, chunk_sizes: Iterable[int], seed: int,
                   lanes: int = 8192, max_pairs: float = math.inf) -> Iterator[Batch]:
    """Batches of ``chunk_sizes[0], chunk_sizes[1], ...`` complete episodes, in order,
    sampled on ``lanes`` lanes that start a new episode as soon as one ends.

    ``chunk_sizes`` may be infinite (a generator): stop iterating when enough is taken.
    With ``max_pairs`` no chunk is started once the steps recorded reach it: those steps
    all belong to earlier chunks, so a consumer that stops at ``max_pairs`` pairs never
    needs a later one, and the lanes do not run episodes that would be dropped.
    Deterministic given ``seed``. A Batch has the layout of ``pgvar.rollout.rollout``'s
    (step t of an episode in column t; the objective's horizon cut marked truncated).
    The policy's parameters must not change while iterating.

    While most lanes run, every step runs the policy on every lane, also those the
    environment is resetting (their action is ignored): about 1/(mean length) of the
    forward work is wasted, and the loop does no per-step gathers or scatters
    (``sample_lanes``).
    """
    if not supports_refill(env):
        raise TypeError(f"{getattr(env, 'name', type(env).__name__)} cannot refill lanes; "
                        "use pgvar.rollout.rollout_chunks")
    require_int("lanes", lanes)
    book, log = ChunkBook(chunk_sizes), StepLog()
    n_lanes = min(int(lanes), book.capacity(int(lanes)))
    if n_lanes == 0:
        return
    obs = env.refill_reset(n_lanes, seed)
    device = obs.device
    gen = rollout_generator(seed, device)
    sample = make_sampler(policy)
    T = int(env.horizon)

    def open_more() -> bool:
        return log.n_recorded() < max_pairs

    episode = torch.arange(n_lanes, device=device)
    t = torch.zeros(n_lanes, dtype=torch.long, device=device)
    running = torch.ones(n_lanes, dtype=torch.bool, device=device)
    resetting = torch.zeros_like(running)
    n_running, n_resetting = n_lanes, 0
    next_episode = n_lanes
    open_ = torch.iinfo(torch.long).max
    while n_running + n_resetting:
        actions, logp = sample_lanes(sample, obs, running, n_running, gen)
        res = env.refill_step(actions)
        term = res.terminated & running
        trunc = (res.truncated | (t == T - 1)) & running & ~term  # the horizon cuts, as in rollout
        done = term | trunc
        log.add(obs=obs, actions=actions, rewards=res.reward, next_obs=res.obs, terminated=term,
                truncated=trunc, logp=logp, episode=episode, t=t, valid=running)
        # lanes done now restart at the next step under new numbers, as long as any are left
        n_done = int(done.sum())
        n_new = max(0, min(n_done, book.capacity(next_episode + n_done, open_more) - next_episode))
        order = done.cumsum(0) - 1  # rank of each done lane among this step's done lanes
        renumbered = done & (order < n_new)
        episode = torch.where(renumbered, next_episode + order, episode)
        next_episode += n_new
        t = torch.where(running & ~done, t + 1, 0)
        running, resetting = (running & ~done) | resetting, renumbered
        n_running, n_resetting = n_running - n_done + n_resetting, n_new
        obs = res.obs
        if book.has_started_next_chunk(next_episode):  # else no chunk can be complete yet
            live = running | resetting
            lowest = int(torch.where(live, episode, open_).min()) if n_running + n_resetting else open_
            for lo, hi in book.complete_chunks(min(lowest, next_episode)):
                yield log.take(lo, hi)
    if book.next_chunk + 1 < len(book.bounds) and book.bounds[book.next_chunk] < next_episode:
        raise RuntimeError("refill stream ended with unfinished episodes; the environment did "
                           "not end an episode at the objective's horizon")


def reference_chunks(env, policy: nn.Module, chunk_sizes: Iterable[int], seed: int,
                     lanes: int, prefetch: bool = True, max_pairs: float = math.inf) -> Iterator[Batch]:
    """``rollout_stream`` chunks, stopping once those handed out hold ``max_pairs`` pairs,
    sampled a chunk ahead in a background thread with ``prefetch``."""
    stream = rollout_stream(env, policy, chunk_sizes, seed, lanes, max_pairs)
    source = background(stream) if prefetch else stream
    pairs = 0
    try:
        for batch in source:
            yield batch
            pairs += batch.n_steps
            if pairs >= max_pairs:
                return
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
