"""experiments/gradient_quality: block estimates equal pgvar's estimators, the blocks and
leave-one-out references are what the design says, the reference-noise ceiling holds by
simulation, the verdict flips with the cosines, and the smoke preset runs end to end."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.reproduce import load_experiment_module

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "experiments" / "gradient_quality"
gq = load_experiment_module(FOLDER)


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
    from pgvar.estimators import ESTIMATORS, EstimatorConfig, estimate_gradients, prepare_inputs

    env, policy, critic, batch = cartpole_batch
    cfg = gq.EstimatorConfig()
    P = sum(p.numel() for p in policy.parameters())
    blocks = [gq.Blocks.empty(10**9, 1, P)]
    totals = gq.Totals(torch.zeros(len(gq.WEIGHTINGS), P, dtype=torch.float64),
                       torch.zeros(len(gq.WEIGHTINGS), dtype=torch.float64))
    gq.add_chunk(blocks, totals, gq.episode_score_sums(env, policy, critic, batch, cfg))
    B = batch.n_episodes
    for name in ("reinforce_rtg", "value_baseline", "gae"):
        want = estimate_gradients(name, env, policy, batch, 1, critic=critic, cfg=cfg)[0] * B
        got = gq.block_estimates(blocks[0], name)[0]
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
    ppo_cfg = EstimatorConfig(normalize_advantages=True, ppo_epochs=1)
    want = estimate_gradients("ppo", env, policy, batch, 1, critic=critic, cfg=ppo_cfg)[0] * B
    a = ESTIMATORS["gae"].advantage(prepare_inputs(env, batch, 1, critic, cfg))[batch.mask]
    std = float((a - a.mean()).square().mean().sqrt())  # normalize_per_batch's std
    got = gq.block_estimates(blocks[0], "ppo")[0] / (std + 1e-8)
    torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-4)


def synthetic_episodes(lengths: list[int], P: int = 3) -> gq.EpisodeSums:
    """Episodes whose score sums are e_i * (i + 1) in every weighting: the blocks'
    contents can be read off the sums."""
    E = len(lengths)
    g = torch.zeros(E, len(gq.WEIGHTINGS), P, dtype=torch.float64)
    g[..., 0] = torch.arange(1, E + 1, dtype=torch.float64)[:, None]
    adv = torch.ones(E, 3, dtype=torch.float64)
    return gq.EpisodeSums(g, torch.tensor(lengths), adv, torch.ones(E, dtype=torch.float64))


def test_blocks_hold_the_episodes_that_start_in_them_whatever_the_chunking():
    """Episode i belongs to block floor(s_i / n), s_i its start pair; chunks cut anywhere."""
    lengths = [3, 5, 2, 7, 1, 4, 6, 2]  # starts 0 3 8 10 17 18 22 28 (30 pairs)
    P = 3

    def run(cuts):
        blocks = [gq.Blocks.empty(10, 3, P)]
        totals = gq.Totals(torch.zeros(len(gq.WEIGHTINGS), P, dtype=torch.float64),
                           torch.zeros(len(gq.WEIGHTINGS), dtype=torch.float64))
        ep = synthetic_episodes(lengths, P)
        for lo, hi in itertools.pairwise(cuts):
            part = gq.EpisodeSums(ep.grads[lo:hi], ep.lengths[lo:hi], ep.adv[lo:hi],
                                  ep.returns[lo:hi])
            gq.add_chunk(blocks, totals, part)
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
    ep = gq.EpisodeSums(vectors[:, None].expand(E, len(gq.WEIGHTINGS), P).clone(),
                        torch.full((E,), 5), torch.ones(E, 3, dtype=torch.float64),
                        torch.ones(E, dtype=torch.float64))
    blocks = [gq.Blocks.empty(50, 4, P)]  # 10 episodes of 5 pairs per block
    totals = gq.Totals(torch.zeros(len(gq.WEIGHTINGS), P, dtype=torch.float64),
                       torch.zeros(len(gq.WEIGHTINGS), dtype=torch.float64))
    gq.add_chunk(blocks, totals, ep)
    loo = gq.leave_one_out(blocks[0], totals, "reinforce_rtg")
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
    want = gq.reference_ceiling(rel_se ** 2)
    assert abs(cos.mean() - want) <= 4 * se + 5.0 / P, (cos.mean(), want, se)
    # and the formula is not vacuous: a ceiling that ignored the noise would fail
    assert abs(cos.mean() - 1.0) > 4 * se + 5.0 / P


def known_blocks(cos_target: float, n_blocks: int, P: int = 400, seed: int = 0):
    """Blocks at n = 2048 whose estimates have cosine ~cos_target to the true gradient
    g (unit vector): each block sum is g + noise with ||noise||^2 = tan^2 ||g||^2, and a
    long remainder of the stream makes the leave-one-out reference nearly exact."""
    rng = np.random.default_rng(seed)
    g = torch.zeros(P, dtype=torch.float64)
    g[0] = 1.0
    tan = math.tan(math.acos(cos_target))
    b = gq.Blocks.empty(2048, n_blocks, P)
    noise = torch.from_numpy(rng.normal(size=(n_blocks, len(gq.WEIGHTINGS), P))) * tan / math.sqrt(P)
    b.sums[:] = g + noise
    b.episodes[:] = 1.0
    b.pairs[:] = 2048.0
    b.adv[:] = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    W = len(gq.WEIGHTINGS)
    big = 10**6  # the rest of the stream: 10^6 episodes averaging to g
    sums = b.sums.sum(0) + big * g
    sq = b.sums.square().sum((0, 2)) + big * (1.0 + tan ** 2)
    totals = gq.Totals(sums, sq.to(torch.float64).reshape(W), episodes=n_blocks + big,
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
    ceiling = gq.reference_ceiling(1.0)
    se = cos.std(ddof=1) / math.sqrt(k)
    assert abs(cos.mean() - 0.4) > 4 * se  # the raw cosine is pulled down
    assert abs(gq.corrected_cosine(cos.mean(), ceiling) - 0.4) < 4 * se / ceiling + 5.0 / P


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
    assert set(table["estimator"]) == set(gq.ESTIMATORS_MEASURED)
    assert (tmp_path / "figures" / "gradient_quality_cosine_vs_pairs.png").exists()


def test_render_shows_the_primary_reference_estimator_against_its_own():
    """The "vs own" column is value_baseline against its own estimator's reference (not
    the other same-estimator row, reinforce_rtg against reinforce_rtg)."""
    b, totals = known_blocks(0.6, 16)
    rtg = gq.WEIGHTINGS.index("reinforce_rtg")
    b.sums[:, rtg] = torch.randn(b.sums[:, rtg].shape, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)  # reinforce_rtg vs its own: ~0
    table = pd.DataFrame(gq.summarise_blocks([b], totals, "ck", 0))
    runs = pd.DataFrame([{"checkpoint": "ck", "step": 0, "pairs": 1, "episodes": 1,
                          "mean_length": 1.0, "return": 0.0, "return_se": 0.0, "seconds": 1.0,
                          "pairs_per_s": 1.0}])
    own = table[table["circular"] & (table["estimator"] == gq.PRIMARY_REFERENCE)].iloc[0]
    assert own["cos"] > 0.4
    text = gq.render(table, runs, gq.decide(table), "test", {"max_blocks": 16})
    row = next(line for line in text.splitlines() if line.startswith("| 2,048"))
    assert row.split(" | ")[-2] == gq.format_columns(own, "cos", 2, style="f")
