"""Sequence estimators: their formulas against plain loops, their exact means against
enumeration, and every "unbiased for" statement of their docstrings against Monte Carlo
over many batches (fixed seeds; tolerances from the standard error of the de-noised
squared bias U of ``pgvar.stats``: unbiased means |U| < 4 SE, biased means U > 6 SE)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pgvar.envs.sequence import SequenceTask
from pgvar.estimators import EstimatorConfig
from pgvar.sequence_estimators import (
    SEQUENCE_ESTIMATORS,
    advantages,
    estimate_directions,
    exact_mean,
    has_exact_mean,
    mean_advantage,
    sample_batches,
    standardised_advantage,
)
from pgvar.sequence_measure import measure_sequence
from pgvar.sequence_policies import flat_grad
from pgvar.stats import gradient_stats

pytestmark = pytest.mark.usefixtures("one_thread")

UNBIASED_Z = 4.0
BIASED_Z = 6.0


def setting(kind: str = "table"):
    task = SequenceTask(n_prompts=4, vocab=3, horizon=4, max_answer_len=2, seed=0, policy=kind,
                        d_model=8, n_layers=1, n_heads=2)
    policy = task.default_policy(init_scale=0.7, seed=1)
    reference = task.default_policy(init_scale=0.7, seed=2)
    return task, policy, reference


def z_score(D: torch.Tensor, target: torch.Tensor) -> float:
    s = gradient_stats(D, target)
    return s.grad_bias_sq / s.grad_bias_sq_se


def mc(task, policy, name, cfg, reference=None, n_batches=3000, prompts=2, seed=0):
    batch = sample_batches(task, policy, n_batches, prompts, cfg.group_size, seed)
    return estimate_directions(name, task, policy, batch, cfg, reference).double()


# ----------------------------------------------------------------------------- formulas


def loop_loss(name, task, policy, prompts, tokens, mask, rewards, G):
    """TRL-style loss of one batch written with loops: the surrogate whose gradient is g."""
    N, L = tokens.shape
    lp = policy.token_log_probs(prompts, tokens, mask)
    R = rewards.reshape(-1, G)
    total = 0.0
    lengths = mask.sum(1)
    for i in range(N):
        grp, j = divmod(i, G)
        r = R[grp]
        if name == "reinforce":
            a = r[j]
        elif name == "rloo":
            a = r[j] - (r.sum() - r[j]) / (G - 1)
        elif name == "dr_grpo":
            a = r[j] - r.mean()
        else:
            a = (r[j] - r.mean()) / (r.std() + 1e-4)
        ratio = torch.exp(lp[i] - lp[i].detach())
        tok = (ratio * a * mask[i]).sum()
        if name in ("reinforce", "rloo"):
            total = total + tok / N
        elif name == "grpo":
            total = total + tok / lengths[i] / N
        elif name == "dr_grpo":
            total = total + tok / (N * L)
        elif name == "dapo":
            total = total + tok / lengths.sum()
        elif name == "bnpo":
            P = N // G
            total = total + tok / (P * lengths[grp * G:(grp + 1) * G].sum())
    return total


@pytest.mark.parametrize("name", sorted(SEQUENCE_ESTIMATORS))
@pytest.mark.parametrize("kind", ["table", "transformer"])
def test_directions_equal_the_loss_written_with_loops(name, kind):
    task, policy, _ = setting(kind)
    cfg = EstimatorConfig(group_size=3)
    batch = sample_batches(task, policy, 3, 2, 3, seed=4)
    D = estimate_directions(name, task, policy, batch, cfg)
    for m in range(3):
        loss = loop_loss(name, task, policy, batch.flat(batch.prompts)[m], batch.tokens[m],
                         batch.mask[m], batch.rewards[m].reshape(-1), 3)
        assert torch.allclose(D[m], flat_grad(loss, policy), atol=1e-6)


def test_grpo_advantage_uses_the_sample_std_and_trl_epsilon():
    R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    A = standardised_advantage(R)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)
    assert A[0, 0].item() == pytest.approx(0.5 / (std + 1e-4))
    assert torch.equal(A[1], torch.zeros(4))


@pytest.mark.parametrize("name", ["reinforce", "rloo", "grpo", "dr_grpo"])
def test_mean_advantage_equals_enumeration_of_the_other_rewards(name):
    est = SEQUENCE_ESTIMATORS[name]
    G, p = 4, torch.tensor([0.3], dtype=torch.float64)
    abar = mean_advantage(est, p, G)[0]
    for r in (0, 1):
        total = 0.0
        for others in itertools.product((0.0, 1.0), repeat=G - 1):
            prob = math.prod(0.3 if o else 0.7 for o in others)
            R = torch.tensor([[float(r), *others]], dtype=torch.float64)
            A = advantages(est, R, est.scaled)[0, 0]
            total += prob * float(A)
        assert float(abar[r]) == pytest.approx(total, abs=1e-12)


def test_epochs_one_is_the_plain_estimator_and_more_epochs_move_it():
    task, policy, _ = setting()
    batch = sample_batches(task, policy, 4, 2, 3, seed=0)
    one = estimate_directions("grpo", task, policy, batch, EstimatorConfig(group_size=3))
    three = estimate_directions("grpo", task, policy, batch,
                                EstimatorConfig(group_size=3, epochs=3, ppo_lr=1.0))
    assert not torch.allclose(one, three)
    cfg = EstimatorConfig(group_size=3, epochs=3, ppo_lr=1e-7)
    assert torch.allclose(estimate_directions("grpo", task, policy, batch, cfg), one, atol=1e-5)


def test_bad_configs_are_refused():
    task, policy, _ = setting()
    batch = sample_batches(task, policy, 2, 2, 1, seed=0)
    with pytest.raises(ValueError, match="group_size >= 2"):
        estimate_directions("rloo", task, policy, batch, EstimatorConfig(group_size=1))
    with pytest.raises(ValueError, match="unknown sequence estimator"):
        estimate_directions("ppo", task, policy, batch, EstimatorConfig(group_size=1))
    with pytest.raises(ValueError, match="kl_mode"):
        EstimatorConfig(kl_mode="k2")
    with pytest.raises(ValueError, match="group_size"):
        EstimatorConfig(group_size=0)
    with pytest.raises(ValueError, match="scale_rewards"):
        EstimatorConfig(scale_rewards="batch")
    with pytest.raises(ValueError, match="reference"):
        estimate_directions("reinforce", task, policy, batch,
                            EstimatorConfig(group_size=1, kl_beta=0.1))


# ----------------------------------------------------------------------------- exact means


def test_exact_means_of_the_unbiased_ones_are_their_targets():
    task, policy, reference = setting()
    gJ = task.exact_gradient(policy, what="J")
    for name, G in (("reinforce", 1), ("rloo", 3), ("dr_grpo", 3)):
        cfg = EstimatorConfig(group_size=G)
        scale = SEQUENCE_ESTIMATORS[name].scale(G, task.max_len)
        assert torch.allclose(exact_mean(name, task, policy, cfg), scale * gJ, atol=1e-6)
    g_beta = task.exact_gradient(policy, reference, beta=0.2)
    for name in ("reinforce", "rloo"):
        cfg = EstimatorConfig(group_size=3, kl_beta=0.2, kl_mode="k1_reward")
        assert torch.allclose(exact_mean(name, task, policy, cfg, reference), g_beta, atol=1e-6)


def test_exact_grpo_mean_weighs_prompts_by_mean_advantage_gap_and_is_not_along_grad_j():
    task, policy, _ = setting()
    cfg = EstimatorConfig(group_size=4)
    gJ = task.exact_gradient(policy, what="J")
    mean = exact_mean("grpo", task, policy, cfg)
    cos = float(mean @ gJ / (mean.norm() * gJ.norm()))
    assert cos < 0.99
    m = measure_sequence(task, policy, "grpo", 8, 2, 0, cfg)
    weights = [m.extras[f"prompt_weight_{q}"] for q in range(task.n_prompts)]
    assert max(weights) / min(weights) > 1.2  # prompts of different difficulty weighed unequally
    assert m.extras["exact_mean_cos"] == pytest.approx(cos, abs=1e-6)
    for name, scale in (("rloo", 1.0), ("dr_grpo", (1 - 1 / 4) / task.max_len)):
        m = measure_sequence(task, policy, name, 8, 2, 0, cfg)
        for q in range(task.n_prompts):
            assert m.extras[f"prompt_weight_{q}"] == pytest.approx(scale, rel=1e-4)


def test_k3_in_the_loss_is_not_the_gradient_of_the_kl_penalty():
    task, policy, reference = setting()
    cfg = EstimatorConfig(group_size=1, kl_beta=0.5, kl_mode="k3_loss")
    target = task.exact_gradient(policy, reference, beta=0.5)
    mean = exact_mean("reinforce", task, policy, cfg, reference)
    assert (mean - target).norm() > 0.05 * target.norm()
    # at pi = pi_ref both KL gradients vanish: k3 is then harmless
    at_ref = exact_mean("reinforce", task, reference, cfg, reference)
    assert torch.allclose(at_ref, task.exact_gradient(reference, what="J"), atol=1e-6)


# ----------------------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize("name,G", [("reinforce", 1), ("rloo", 3), ("dr_grpo", 3), ("grpo", 3)])
def test_monte_carlo_mean_matches_the_exact_mean(name, G):
    """unbiased for grad J (reinforce, rloo), (1-1/G)/L grad J (dr_grpo), and for grpo its
    exact mean, which is not along grad J (the next test)."""
    task, policy, _ = setting()
    cfg = EstimatorConfig(group_size=G)
    D = mc(task, policy, name, cfg)
    assert abs(z_score(D, exact_mean(name, task, policy, cfg))) < UNBIASED_Z


def test_grpo_is_biased_for_every_multiple_of_grad_j():
    task, policy, _ = setting()
    cfg = EstimatorConfig(group_size=3)
    gJ = task.exact_gradient(policy, what="J").double()
    mean = exact_mean("grpo", task, policy, cfg).double()
    best = float(mean @ gJ / (gJ @ gJ)) * gJ  # the closest multiple of grad J
    assert z_score(mc(task, policy, "grpo", cfg), best) > BIASED_Z


def test_k1_in_the_reward_is_unbiased_and_k3_in_the_loss_is_biased_for_the_penalised_gradient():
    task, policy, reference = setting()
    target = task.exact_gradient(policy, reference, beta=0.5).double()
    k1 = EstimatorConfig(group_size=3, kl_beta=0.5, kl_mode="k1_reward")
    k3 = EstimatorConfig(group_size=3, kl_beta=0.5, kl_mode="k3_loss")
    assert abs(z_score(mc(task, policy, "rloo", k1, reference), target)) < UNBIASED_Z
    assert z_score(mc(task, policy, "rloo", k3, reference), target) > BIASED_Z
    assert abs(z_score(mc(task, policy, "rloo", k3, reference),
                       exact_mean("rloo", task, policy, k3, reference))) < UNBIASED_Z


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dapo", "bnpo"])
def test_token_mean_estimators_are_biased_for_every_multiple_of_grad_j(name):
    task, policy, _ = setting()
    cfg = EstimatorConfig(group_size=4)
    gJ = task.exact_gradient(policy, what="J").double()
    pilot = mc(task, policy, name, cfg, n_batches=12000, seed=1).mean(0)  # independent scale
    best = float(pilot @ gJ / (gJ @ gJ)) * gJ
    assert z_score(mc(task, policy, name, cfg, n_batches=24000, seed=2), best) > BIASED_Z


def test_dapo_and_bnpo_differ_only_with_several_groups_per_batch():
    task, policy, _ = setting()
    cfg = EstimatorConfig(group_size=3)
    one = sample_batches(task, policy, 4, 1, 3, seed=0)
    assert torch.allclose(estimate_directions("dapo", task, policy, one, cfg),
                          estimate_directions("bnpo", task, policy, one, cfg))
    two = sample_batches(task, policy, 4, 2, 3, seed=0)
    assert not torch.allclose(estimate_directions("dapo", task, policy, two, cfg),
                              estimate_directions("bnpo", task, policy, two, cfg))


def test_has_exact_mean_only_where_the_formula_holds():
    assert has_exact_mean("grpo", EstimatorConfig())
    assert not has_exact_mean("dapo", EstimatorConfig())
    assert not has_exact_mean("grpo", EstimatorConfig(epochs=2))
    assert not has_exact_mean("grpo", EstimatorConfig(kl_beta=0.1, kl_mode="k1_reward"))
    assert has_exact_mean("rloo", EstimatorConfig(kl_beta=0.1, kl_mode="k1_reward"))


@pytest.mark.slow
@pytest.mark.parametrize("name,G", [("reinforce", 1), ("rloo", 4), ("dr_grpo", 4), ("grpo", 4)])
def test_transformer_monte_carlo_mean_matches_the_exact_mean(name, G):
    task, policy, _ = setting("transformer")
    cfg = EstimatorConfig(group_size=G)
    D = mc(task, policy, name, cfg, n_batches=4000)
    assert abs(z_score(D, exact_mean(name, task, policy, cfg))) < UNBIASED_Z


@pytest.mark.slow
def test_transformer_grpo_and_k3_are_biased():
    task, policy, reference = setting("transformer")
    gJ = task.exact_gradient(policy, what="J").double()
    cfg = EstimatorConfig(group_size=4)
    mean = exact_mean("grpo", task, policy, cfg).double()
    best = float(mean @ gJ / (gJ @ gJ)) * gJ
    assert z_score(mc(task, policy, "grpo", cfg, n_batches=4000), best) > BIASED_Z
    target = task.exact_gradient(policy, reference, beta=0.5).double()
    k1 = EstimatorConfig(group_size=4, kl_beta=0.5, kl_mode="k1_reward")
    assert abs(z_score(mc(task, policy, "reinforce", k1, reference, n_batches=4000), target)) < UNBIASED_Z


def test_std_scaling_alone_weighs_prompts_by_the_exact_advantage_gap():
    """dr_grpo's constant normaliser with TRL's scale_rewards=group: no length effect, so
    the implied weight of prompt q is (abar_q(1) - abar_q(0)) / L exactly, and the Monte
    Carlo mean agrees with the exact one."""
    task, policy, _ = setting()
    cfg = EstimatorConfig(group_size=4, scale_rewards="group")
    m = measure_sequence(task, policy, "dr_grpo", 8, 2, 0, cfg)
    p = task.exact(policy).success.detach().double()
    gap = mean_advantage(SEQUENCE_ESTIMATORS["dr_grpo"], p, 4, scaled=True)
    for q in range(task.n_prompts):
        expected = float(gap[q, 1] - gap[q, 0]) / task.max_len
        assert m.extras[f"prompt_weight_{q}"] == pytest.approx(expected, rel=1e-4)
    D = mc(task, policy, "dr_grpo", cfg)
    assert abs(z_score(D, exact_mean("dr_grpo", task, policy, cfg))) < UNBIASED_Z


def test_dr_grpo_is_rloo_times_a_constant_on_every_batch():
    """r_i - mean = (G-1)/G (r_i - mean of the others), and dr_grpo's normaliser is 1/(N L):
    the two estimators differ by the factor (G-1)/(G L) batch by batch, not only in mean."""
    task, policy, _ = setting()
    cfg = EstimatorConfig(group_size=4)
    batch = sample_batches(task, policy, 6, 2, 4, seed=3)
    dr = estimate_directions("dr_grpo", task, policy, batch, cfg)
    rloo = estimate_directions("rloo", task, policy, batch, cfg)
    assert torch.allclose(dr, rloo * 3 / (4 * task.max_len), atol=1e-7)


def test_k3_in_the_loss_follows_the_gradient_of_the_reverse_kl_per_prefix():
    """The docstring's statement: with k3 in the loss, E g = grad J - beta grad sum_prefix
    d_pi(prefix) KL(pi_ref || pi)(prefix), the prefix distribution held fixed."""
    task, policy, reference = setting()
    beta = 0.5
    cfg = EstimatorConfig(group_size=1, kl_beta=beta, kl_mode="k3_loss")
    c = task.completions
    Q, C = task.n_prompts, task.n_completions
    prompts = torch.arange(Q).repeat_interleave(C)
    tokens, mask = c.tokens.repeat(Q, 1), c.mask.repeat(Q, 1)
    logp = torch.log_softmax(policy.token_logits(prompts, tokens), -1)       # [QC, L, V]
    with torch.no_grad():
        logr = torch.log_softmax(reference.token_logits(prompts, tokens), -1)
        seq_p = task.completion_log_probs(policy).exp().reshape(-1)          # [QC]
    reverse_kl = (logr.exp() * (logr - logp)).sum(-1) * mask                 # [QC, L]
    penalty = (seq_p[:, None] * reverse_kl).sum() / Q
    expected = task.exact_gradient(policy, what="J") - beta * flat_grad(penalty, policy)
    assert torch.allclose(exact_mean("reinforce", task, policy, cfg, reference), expected, atol=1e-6)


def test_the_sequence_knobs_are_declared_once():
    """group_size, kl_beta, kl_mode, epochs, scale_rewards live on pgvar.estimators'
    EstimatorConfig only: the sequence estimators read that class, and a run's
    ``estimator`` section converts into it unchanged (no second declaration to drift)."""
    import dataclasses

    import pgvar.sequence_estimators as seq
    from pgvar.config import EstimatorSettings
    from pgvar.sequence_estimators import sequence_config

    assert not [name for name, obj in vars(seq).items()
                if dataclasses.is_dataclass(obj) and isinstance(obj, type)
                and {"group_size", "kl_mode"} <= {f.name for f in dataclasses.fields(obj)}
                and obj is not EstimatorConfig]
    settings = EstimatorSettings(name="grpo", group_size=8, kl_beta=0.3, kl_mode="k1_reward",
                                 epochs=2, scale_rewards="none", ppo_lr=0.5)
    cfg = sequence_config(settings)
    assert (cfg.group_size, cfg.kl_beta, cfg.kl_mode, cfg.epochs, cfg.scale_rewards,
            cfg.ppo_lr) == (8, 0.3, "k1_reward", 2, "none", 0.5)
