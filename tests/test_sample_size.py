"""The sample-size engine (``pgvar.sample_size``): block estimates equal pgvar's
estimators, blocks hold the episodes that start in them whatever the chunking, the
leave-block-out references and their standard errors, and the cosine ceiling of a noisy
reference, checked by simulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pgvar import sample_size as ss
from pgvar.estimators import EstimatorConfig


@pytest.fixture(scope="module")
def cartpole_batch():
    """A CartPole batch of 12 episodes with a (fitted) MLP critic: cheap and needs no MuJoCo."""
    from pgvar.critics import make_critic
    from pgvar.envs.registry import make_env, make_policy
    from pgvar.rollout import rollout

    env = make_env("cartpole")
    torch.manual_seed(0)
    policy = make_policy(env)
    critic = make_critic(env)
    critic.fit(rollout(env, policy, 8, seed=1), float(env.gamma), env.objective, steps=20)
    return env, policy, critic, rollout(env, policy, 12, seed=2)


def test_block_estimates_equal_pgvar_estimators(cartpole_batch):
    """One block holding every episode: its estimate of each estimator is B times
    pgvar.estimators' batch estimate (ppo: with PPO's normalised advantages, one epoch,
    times the advantages' std)."""
    from pgvar.estimators import ESTIMATORS, estimate_gradients, prepare_inputs

    env, policy, critic, batch = cartpole_batch
    cfg = EstimatorConfig()
    P = sum(p.numel() for p in policy.parameters())
    blocks = [ss.Blocks.empty(10**9, 1, P)]
    totals = ss.Totals.empty(P)
    ss.add_chunk(blocks, totals, ss.episode_score_sums(env, policy, critic, batch, cfg))
    B = batch.n_episodes
    for name in ("reinforce_rtg", "value_baseline", "gae"):
        want = estimate_gradients(name, env, policy, batch, 1, critic=critic, cfg=cfg)[0] * B
        got = ss.block_estimates(blocks[0], name)[0]
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
    ppo_cfg = EstimatorConfig(normalize_advantages=True, ppo_epochs=1)
    want = estimate_gradients("ppo", env, policy, batch, 1, critic=critic, cfg=ppo_cfg)[0] * B
    a = ESTIMATORS["gae"].advantage(prepare_inputs(env, batch, 1, critic, cfg))[batch.mask]
    std = float((a - a.mean()).square().mean().sqrt())  # normalize_per_batch's std
    got = ss.block_estimates(blocks[0], "ppo")[0] / (std + 1e-8)
    torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-4)


def synthetic_episodes(lengths: list[int], P: int = 3) -> ss.EpisodeSums:
    """Episodes whose score sums are e_i * (i + 1) in every weighting: the blocks'
    contents can be read off the sums."""
    E = len(lengths)
    g = torch.zeros(E, len(ss.WEIGHTINGS), P, dtype=torch.float64)
    g[..., 0] = torch.arange(1, E + 1, dtype=torch.float64)[:, None]
    adv = torch.ones(E, 3, dtype=torch.float64)
    return ss.EpisodeSums(g, torch.tensor(lengths), adv, torch.ones(E, dtype=torch.float64))


def test_blocks_hold_the_episodes_that_start_in_them_whatever_the_chunking():
    """Episode i belongs to block floor(s_i / n), s_i its start pair; chunks cut anywhere."""
    lengths = [3, 5, 2, 7, 1, 4, 6, 2]  # starts 0 3 8 10 17 18 22 28 (30 pairs)
    P = 3

    def run(cuts):
        blocks = [ss.Blocks.empty(10, 3, P)]
        totals = ss.Totals.empty(P)
        ep = synthetic_episodes(lengths, P)
        for lo, hi in itertools.pairwise(cuts):
            part = ss.EpisodeSums(ep.grads[lo:hi], ep.lengths[lo:hi], ep.adv[lo:hi],
                                  ep.returns[lo:hi])
            ss.add_chunk(blocks, totals, part)
        return blocks[0], totals

    b, totals = run([0, 8])
    # block 0: episodes 1, 2, 3 (starts 0, 3, 8); block 1: 4, 5, 6 (10, 17, 18); block 2: 7, 8
    assert b.sums[:, 0, 0].tolist() == [1 + 2 + 3, 4 + 5 + 6, 7 + 8]
    assert b.episodes.tolist() == [3, 3, 2]
    assert b.pairs.tolist() == [10, 12, 8]
    assert totals.pairs == 30 and totals.episodes == 8
    b2, _ = run([0, 2, 3, 7, 8])
    torch.testing.assert_close(b2.sums, b.sums)


def test_leave_one_out_reference_and_its_standard_error():
    """Block b's reference is the total minus block b, with se2 = trCov(episodes)/(N - N_b)
    relative to ||mean||^2 - se2."""
    rng = np.random.default_rng(0)
    E, P = 40, 5
    vectors = torch.from_numpy(rng.normal(1.0, 2.0, size=(E, P)))
    ep = ss.EpisodeSums(vectors[:, None].expand(E, len(ss.WEIGHTINGS), P).clone(),
                        torch.full((E,), 5), torch.ones(E, 3, dtype=torch.float64),
                        torch.ones(E, dtype=torch.float64))
    blocks = [ss.Blocks.empty(50, 4, P)]  # 10 episodes of 5 pairs per block
    totals = ss.Totals.empty(P)
    ss.add_chunk(blocks, totals, ep)
    loo = ss.leave_one_out(blocks[0], totals, "reinforce_rtg")
    tr_cov = float(torch.var(vectors, dim=0, unbiased=True).sum())
    for b in range(4):
        others = torch.cat([vectors[:10 * b], vectors[10 * (b + 1):]])
        torch.testing.assert_close(loo.grads[b], others.sum(0))
        se2 = tr_cov / 30
        want = se2 / (float(others.mean(0).square().sum()) - se2)
        assert loo.rel_se2[b] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("spectrum", ["isotropic", "decaying"])
@pytest.mark.parametrize("rel_se", [0.3, 1.0])
def test_reference_ceiling_by_simulation(spectrum, rel_se):
    """E cos(g, g + e), E||e||^2 = se2, equals 1/sqrt(1 + se2/||g||^2) within 4 standard
    errors of the simulated mean plus the O(1/P) the formula neglects."""
    P, repeats = 2000, 400
    rng = np.random.default_rng(1)
    g = rng.normal(size=P)
    g /= np.linalg.norm(g)
    var = np.ones(P) if spectrum == "isotropic" else np.exp(-np.arange(P) / 400.0)
    var *= rel_se ** 2 / var.sum()  # tr Cov e = rel_se^2 ||g||^2
    e = rng.normal(size=(repeats, P)) * np.sqrt(var)
    h = g + e
    cos = h @ g / np.linalg.norm(h, axis=1)
    se = cos.std(ddof=1) / math.sqrt(repeats)
    want = ss.reference_ceiling(rel_se ** 2)
    assert abs(cos.mean() - want) <= 4 * se + 5.0 / P, (cos.mean(), want, se)
    # and the formula is not vacuous: a ceiling that ignored the noise would fail
    assert abs(cos.mean() - 1.0) > 4 * se + 5.0 / P


def test_cosine_to_a_noisy_reference_over_its_ceiling_is_the_cosine_to_the_truth():
    """Estimates with cosine 0.4 to g against references g + e with rel. SE 1 (ceiling
    0.71): the raw mean cosine is ~0.28, the corrected one ~0.4 (4 standard errors)."""
    rng = np.random.default_rng(3)
    P, k = 3000, 400
    g = np.zeros(P)
    g[0] = 1.0
    tan = math.tan(math.acos(0.4))
    est = g + rng.normal(size=(k, P)) * tan / math.sqrt(P)
    ref = g + rng.normal(size=(k, P)) / math.sqrt(P)
    cos = (est * ref).sum(1) / np.linalg.norm(est, axis=1) / np.linalg.norm(ref, axis=1)
    ceiling = ss.reference_ceiling(1.0)
    se = cos.std(ddof=1) / math.sqrt(k)
    assert abs(cos.mean() - 0.4) > 4 * se  # the raw cosine is pulled down
    assert abs(ss.corrected_cosine(cos.mean(), ceiling) - 0.4) < 4 * se / ceiling + 5.0 / P
