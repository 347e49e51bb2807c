"""Estimators and critics: hand-computed weights, equalities between estimators, and
statistical checks of (un)biasedness and variance against exact gradients.

Statistical tolerances come from standard errors: the mean of M independent batch
estimates is compared with the exact gradient coordinate by coordinate in units of its
standard error (|z| <= 4.5 for "unbiased"; P <= 12 coordinates, so a false alarm has
probability below 1e-4), and variance orderings use the paired per-batch differences of
squared deviations with their own standard error. Seeds are fixed, so every run gives
the same numbers; the margins are what make them trustworthy rather than lucky.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pgvar.batch import Batch
from pgvar.critics import (
    ExactTabularCritic,
    MLPCritic,
    QuadraticCritic,
    TabularCritic,
    make_critic,
    mc_targets,
)
from pgvar.envs.registry import make_env, make_policy
from pgvar.estimators import (
    ESTIMATORS,
    EstimatorConfig,
    estimate_gradients,
    estimator_weights,
    get_estimator,
)
from pgvar.gradients import score_gradients_loop
from pgvar.policies import TabularSoftmaxPolicy, flatten_params
from pgvar.rollout import rollout

Z_UNBIASED = 4.5   # max |z| per coordinate for "not distinguishable from the exact gradient"
Z_SEPARATED = 6.0  # min z for "clearly different" (bias present, variance ordered)


# ----------------------------------------------------------------------------- helpers

def exact_gradient(env, policy) -> torch.Tensor:
    """grad J(theta) by autograd of the exact objective, flat in parameters() order."""
    J = env.exact_objective(policy)
    grads = torch.autograd.grad(J, list(policy.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).double()


def z_scores(G: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-coordinate (mean(G) - target) / SE; coordinates with no spread give 0."""
    G = G.double()
    se = G.std(0) / G.shape[0] ** 0.5
    diff = G.mean(0) - target
    return torch.where(se > 0, diff / se.clamp(min=1e-300), torch.zeros_like(diff))


def bias_gap_z(G_lo: torch.Tensor, G_hi: torch.Tensor, target: torch.Tensor) -> float:
    """z of ||bias_lo|| - ||bias_hi|| (same batches for both estimators).

    To first order ||mean(G) - target|| moves by u . noise, u the unit bias direction, so
    the paired per-batch values u_lo . g_lo - u_hi . g_hi give the standard error.
    """
    G_lo, G_hi = G_lo.double(), G_hi.double()
    b_lo, b_hi = G_lo.mean(0) - target, G_hi.mean(0) - target
    s = G_lo @ (b_lo / b_lo.norm()) - G_hi @ (b_hi / b_hi.norm())
    return float((b_lo.norm() - b_hi.norm()) / (s.std() / s.numel() ** 0.5))


def paired_variance_z(G_high: torch.Tensor, G_low: torch.Tensor) -> float:
    """z of tr Var(high) - tr Var(low) from paired per-batch squared deviations."""
    dev_h = ((G_high.double() - G_high.double().mean(0)) ** 2).sum(1)
    dev_l = ((G_low.double() - G_low.double().mean(0)) ** 2).sum(1)
    d = dev_h - dev_l
    return float(d.mean() / (d.std() / d.shape[0] ** 0.5))


def tr_var(G: torch.Tensor) -> float:
    return float(G.double().var(0).sum())


# --------------------------------------------------------------- a tiny hand-made batch

GAMMA = 0.5


def hand_batch() -> Batch:
    """Two episodes, T=3. Episode 0: rewards 1, 2, 4, truncated at t=2. Episode 1:
    rewards 3, 1, terminated at t=1. With gamma=0.5:
    G(ep0) = [3, 4, 4], G(ep1) = [3.5, 1, -]; R = 3 and 3.5."""
    f = torch.tensor
    return Batch(
        obs=f([[0, 1, 2], [1, 0, 0]]),
        actions=f([[0, 1, 1], [1, 0, 0]]),
        rewards=f([[1.0, 2.0, 4.0], [3.0, 1.0, 0.0]]),
        next_obs=f([[1, 2, 0], [0, 2, 0]]),
        terminated=f([[False, False, False], [False, True, False]]),
        truncated=f([[False, False, True], [False, False, False]]),
        mask=f([[True, True, True], [True, True, False]]),
        logp=torch.zeros(2, 3),
    )


HAND_ENV = SimpleNamespace(gamma=GAMMA, objective="finite", horizon=3)

HAND_WEIGHTS = {
    "reinforce": [[3, 3, 3], [3.5, 3.5, 0]],
    "reinforce_rtg": [[3, 2, 1], [3.5, 0.5, 0]],                 # gamma^t G_t
    "rloo": [[-0.5, 1.5, 1.0], [0.5, -1.5, 0]],                  # gamma^t (G_t - G_t(other))
    "mean_baseline": [[-0.25, 0.75, 0.5], [0.25, -0.75, 0]],     # b = [3.25, 2.5, 2]
    "mean_baseline_episode": [[-0.25] * 3, [0.25, 0.25, 0]],     # R - 3.25
}


@pytest.mark.parametrize("name", sorted(HAND_WEIGHTS))
def test_weights_on_hand_batch(name):
    w = estimator_weights(name, HAND_ENV, hand_batch(), n_batches=1)
    assert torch.allclose(w, torch.tensor(HAND_WEIGHTS[name]))


def test_discount_weighting_off_drops_gamma_t():
    cfg = EstimatorConfig(discount_weighting=False)
    w = estimator_weights("reinforce_rtg", HAND_ENV, hand_batch(), 1, cfg=cfg)
    assert torch.allclose(w, torch.tensor([[3.0, 4.0, 4.0], [3.5, 1.0, 0.0]]))
    w = estimator_weights("reinforce", HAND_ENV, hand_batch(), 1, cfg=cfg)  # never had gamma^t
    assert torch.allclose(w, torch.tensor(HAND_WEIGHTS["reinforce"]))


def test_critic_estimators_on_hand_batch():
    """V(s, t) = s + t: value_baseline = gamma^t (G - V); actor_critic = gamma^t delta."""
    class Linear(torch.nn.Module):
        def values(self, batch):
            t = batch.time_index
            return (batch.obs + t).float(), (batch.next_obs + t + 1).float()

    b = hand_batch()
    V = torch.tensor([[0.0, 2, 4], [1, 1, 2]])
    disc = torch.tensor([1.0, 0.5, 0.25])
    G = torch.tensor([[3.0, 4, 4], [3.5, 1, 0]])
    m = b.mask.float()
    w = estimator_weights("value_baseline", HAND_ENV, b, 1, critic=Linear())
    assert torch.allclose(w, disc * (G - V) * m)
    # bootstrap: V(next) = next_obs + t + 1 inside episodes, 0 after the cut ("finite") and
    # after the termination
    boot = torch.tensor([[2.0, 4, 0], [1, 0, 0]])
    delta = (b.rewards + GAMMA * boot - V) * m
    w = estimator_weights("actor_critic", HAND_ENV, b, 1, critic=Linear())
    assert torch.allclose(w, disc * delta)
    # under "discounted" the cut at t=2 of episode 0 bootstraps with V(next_obs=0, t=3) = 3
    env_d = SimpleNamespace(gamma=GAMMA, objective="discounted", horizon=3)
    w = estimator_weights("reinforce_rtg", env_d, b, 1, critic=Linear())
    G_d = torch.tensor([[3.0 + 0.375, 4 + 0.75, 4 + 1.5], [3.5, 1, 0]])
    assert torch.allclose(w, disc * G_d)
    cfg = EstimatorConfig(truncation_as_termination=True)
    w = estimator_weights("reinforce_rtg", env_d, b, 1, critic=Linear(), cfg=cfg)
    assert torch.allclose(w, disc * G)


def test_normalized_advantages_have_zero_mean_unit_std_per_batch():
    b = Batch.concat([hand_batch(), hand_batch().map(lambda x: x.flip(0))])
    b.rewards[2:] *= 10
    cfg = EstimatorConfig(normalize_advantages=True, discount_weighting=False)
    w = estimator_weights("reinforce_rtg", HAND_ENV, b, 2, cfg=cfg)
    for g in range(2):
        valid = w[2 * g:2 * g + 2][b.mask[2 * g:2 * g + 2]]
        assert abs(float(valid.mean())) < 1e-6
        assert abs(float(valid.std(unbiased=False)) - 1.0) < 1e-5


def test_estimate_gradients_groups_batches_in_order():
    """Row m uses episodes [mB, (m+1)B) and equals a plain per-batch backward pass."""
    policy = TabularSoftmaxPolicy(3, 2, init_scale=0.7, seed=2)
    b = Batch.concat([hand_batch(), hand_batch().map(lambda x: x.flip(0)), hand_batch()])
    b.rewards[2:4] += 1.0
    for name in ("reinforce", "reinforce_rtg", "rloo", "mean_baseline"):
        got = estimate_gradients(name, HAND_ENV, policy, b, n_batches=3)
        w = estimator_weights(name, HAND_ENV, b, 3)
        g = b.groups(3)
        want = score_gradients_loop(policy, g.obs, g.actions, w.reshape(3, 2, 3), g.mask)
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------- errors

def test_registry_and_config_errors():
    assert set(ESTIMATORS) >= {"reinforce", "reinforce_rtg", "mean_baseline", "rloo",
                               "value_baseline", "actor_critic", "gae", "ppo",
                               "optimal_baseline", "mean_baseline_episode"}
    with pytest.raises(ValueError, match="valid names.*reinforce"):
        get_estimator("reinfroce")
    for name, est in ESTIMATORS.items():
        assert est.name == name and est.variant and est.baseline and est.description
    for bad, field in [({"lam": 1.5}, "lam"), ({"lam": -0.1}, "lam"),
                       ({"ppo_clip": 0.0}, "ppo_clip"),
                       ({"ppo_epochs": 0}, "ppo_epochs"), ({"ppo_lr": -1.0}, "ppo_lr")]:
        with pytest.raises(ValueError, match=field):
            EstimatorConfig(**bad)
    policy = TabularSoftmaxPolicy(3, 2)
    for name in ("value_baseline", "actor_critic", "gae", "ppo"):
        assert ESTIMATORS[name].needs_critic
        with pytest.raises(ValueError, match="needs a critic"):
            estimate_gradients(name, HAND_ENV, policy, hand_batch(), 1)
    with pytest.raises(ValueError, match="at least 2 episodes"):
        estimate_gradients("rloo", HAND_ENV, policy, hand_batch(), 2)
    with pytest.raises(ValueError, match="at least 2 episodes"):
        estimate_gradients("optimal_baseline", HAND_ENV, policy, hand_batch(), 2)
    with pytest.raises(ValueError, match="split"):
        estimate_gradients("reinforce", HAND_ENV, policy, hand_batch(), 3)


# ----------------------------------------------------------------- exact environments

M, B = 2000, 8  # independent batches, episodes per batch


@pytest.fixture(scope="module")
def tabular():
    """A small random MDP, a non-uniform policy, one big sample and the exact gradient."""
    env = make_env("tabular", n_states=4, n_actions=3, horizon=6, gamma=0.9, seed=3)
    policy = make_policy(env, init_scale=0.5, seed=1)
    batch = rollout(env, policy, M * B, seed=11)
    imperfect = ExactTabularCritic(env, policy, perturb_scale=1.0, seed=5)
    cache: dict = {}

    def grads(name, critic=None, **cfg):
        key = (name, id(critic), tuple(sorted(cfg.items())))
        if key not in cache:
            cache[key] = estimate_gradients(name, env, policy, batch, M, critic=critic,
                                            cfg=EstimatorConfig(**cfg), chunk=500)
        return cache[key]

    return SimpleNamespace(env=env, policy=policy, batch=batch, g_ref=exact_gradient(env, policy),
                           exact=ExactTabularCritic(env, policy), imperfect=imperfect, grads=grads)


@pytest.fixture(scope="module")
def lqr():
    """Linear-quadratic control with a stabilising non-zero gain and an independent critic."""
    env = make_env("lqr", state_dim=2, action_dim=1, horizon=8, gamma=0.95, seed=2)
    policy = make_policy(env, init_gain_scale=0.3, init_log_std=-0.5, seed=4)
    batch = rollout(env, policy, M * B, seed=21)
    critic = make_critic(env)
    assert isinstance(critic, QuadraticCritic)
    critic.fit(rollout(env, policy, 4000, seed=22), env.gamma, env.objective)  # other data
    imperfect = make_critic(env)
    imperfect.load_state_dict(critic.state_dict())
    g = torch.Generator().manual_seed(7)
    imperfect.p.data += 1.0 * torch.randn(imperfect.p.shape, generator=g)  # wrong linear term
    cache: dict = {}

    def grads(name, critic=None, **cfg):
        key = (name, id(critic), tuple(sorted(cfg.items())))
        if key not in cache:
            cache[key] = estimate_gradients(name, env, policy, batch, M, critic=critic,
                                            cfg=EstimatorConfig(**cfg), chunk=500)
        return cache[key]

    return SimpleNamespace(env=env, policy=policy, batch=batch, g_ref=exact_gradient(env, policy),
                           critic=critic, imperfect=imperfect, grads=grads)


@pytest.mark.parametrize("problem", ["tabular", "lqr"])
def test_unbiased_estimators_match_exact_gradient(problem, request):
    p = request.getfixturevalue(problem)
    critic = p.imperfect  # a wrong but fixed critic is still a valid baseline
    for name in ("reinforce", "reinforce_rtg", "rloo", "value_baseline", "optimal_baseline"):
        G = p.grads(name, critic if ESTIMATORS[name].needs_critic else None)
        z = z_scores(G, p.g_ref)
        assert float(z.abs().max()) < Z_UNBIASED, (problem, name, z)
    # gae with lambda = 1 is value_baseline, so unbiased too
    torch.testing.assert_close(p.grads("gae", critic, lam=1.0), p.grads("value_baseline", critic),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("problem", ["tabular", "lqr"])
def test_mean_baseline_is_shrunk_by_one_over_b(problem, request):
    """E[g] = (1 - 1/B) grad J for both batch-mean baselines (own episode in the mean):
    consistent with that, and on the tabular MDP (large gradient against the noise) the
    per-step version is clearly distinguishable from grad J itself."""
    p = request.getfixturevalue(problem)
    for name in ("mean_baseline", "mean_baseline_episode"):
        G = p.grads(name)
        assert float(z_scores(G, (1 - 1 / B) * p.g_ref).abs().max()) < Z_UNBIASED, name
    if problem == "tabular":
        assert float(z_scores(p.grads("mean_baseline"), p.g_ref).abs().max()) > Z_SEPARATED


@pytest.mark.parametrize("problem", ["tabular", "lqr"])
def test_bootstrapped_estimators_are_biased_with_imperfect_critic(problem, request):
    """actor_critic and gae(lambda<1) with a wrong critic: bias many SEs from zero, and
    larger the smaller lambda (0.9 < 0.5 < 0 = actor_critic)."""
    p = request.getfixturevalue(problem)
    crit = p.imperfect
    torch.testing.assert_close(p.grads("gae", crit, lam=0.0), p.grads("actor_critic", crit),
                               rtol=1e-4, atol=1e-5)
    for lam in (0.0, 0.5):
        z = z_scores(p.grads("gae", crit, lam=lam), p.g_ref)
        assert float(z.abs().max()) > Z_SEPARATED, (problem, lam, z)
    for lo, hi in ((0.0, 0.5), (0.5, 0.9)):
        z = bias_gap_z(p.grads("gae", crit, lam=lo), p.grads("gae", crit, lam=hi), p.g_ref)
        assert z > Z_SEPARATED, (problem, lo, hi, z)


@pytest.mark.parametrize("problem", ["tabular", "lqr"])
def test_variance_orderings(problem, request):
    """reward-to-go < full return; value baseline < no baseline (reward-to-go).

    (rloo is not in the list: on the random MDP the mean return is near 0, so a noisy
    leave-one-out mean adds variance there; no ordering is claimed for it.)"""
    p = request.getfixturevalue(problem)
    critic = p.exact if problem == "tabular" else p.critic
    pairs = [("reinforce", None, "reinforce_rtg", None),
             ("reinforce_rtg", None, "value_baseline", critic)]
    for high, c_high, low, c_low in pairs:
        z = paired_variance_z(p.grads(high, c_high), p.grads(low, c_low))
        assert z > Z_SEPARATED, (problem, high, low, z,
                                 tr_var(p.grads(high, c_high)), tr_var(p.grads(low, c_low)))


@pytest.mark.parametrize("problem", ["tabular", "lqr"])
def test_ppo_one_epoch_equals_gae(problem, request):
    p = request.getfixturevalue(problem)
    crit = p.imperfect
    n = 50
    sub = p.batch.select(slice(0, n * B))
    for cfg in (EstimatorConfig(ppo_epochs=1, lam=0.9),
                EstimatorConfig(ppo_epochs=1, normalize_advantages=True)):
        ppo = estimate_gradients("ppo", p.env, p.policy, sub, n, critic=crit, cfg=cfg)
        g = estimate_gradients("gae", p.env, p.policy, sub, n, critic=crit, cfg=cfg)
        torch.testing.assert_close(ppo, g, rtol=1e-5, atol=1e-6)


def ppo_direction_loop(policy, batch: Batch, adv: torch.Tensor, clip: float, epochs: int,
                       lr: float) -> torch.Tensor:
    """PPO's direction for one batch by plain autograd on a copy of the policy."""
    import copy
    pol = copy.deepcopy(policy)
    theta0 = flatten_params(pol)
    opt = torch.optim.SGD(pol.parameters(), lr=lr)
    m = batch.mask
    for _ in range(epochs):
        opt.zero_grad()
        logp = pol.log_prob(batch.obs, batch.actions)
        ratio = torch.exp(torch.where(m, logp - batch.logp, torch.zeros_like(logp)))
        obj = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
        (-(obj * m).sum() / m.shape[0]).backward()
        opt.step()
    return (flatten_params(pol) - theta0) / (lr * epochs)


@pytest.mark.parametrize("problem", ["tabular", "lqr"])
def test_ppo_many_epochs_equals_plain_loop(problem, request):
    """The vmapped functional inner loop equals SGD on a copy of the policy, batch by batch;
    with several epochs and a large step the clip becomes active and PPO differs from gae."""
    p = request.getfixturevalue(problem)
    n = 6
    sub = p.batch.select(slice(0, n * B))
    cfg = EstimatorConfig(ppo_epochs=5, ppo_lr=0.5 if problem == "tabular" else 0.02, ppo_clip=0.1)
    got = estimate_gradients("ppo", p.env, p.policy, sub, n, critic=p.imperfect, cfg=cfg)
    adv = estimator_weights("gae", p.env, sub, n, critic=p.imperfect, cfg=cfg)
    want = torch.stack([ppo_direction_loop(p.policy, sub.select(slice(m * B, (m + 1) * B)),
                                           adv[m * B:(m + 1) * B], cfg.ppo_clip, cfg.ppo_epochs,
                                           cfg.ppo_lr) for m in range(n)])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    gae_g = estimate_gradients("gae", p.env, p.policy, sub, n, critic=p.imperfect, cfg=cfg)
    assert float((got - gae_g).norm()) > 1e-2 * float(gae_g.norm())


def test_optimal_baseline_equals_loop(tabular):
    """Leave-one-out Greensmith baseline per coordinate, by a plain loop over episodes."""
    p = tabular
    n_b, b = 3, 5
    sub = p.batch.select(slice(0, n_b * b))
    got = estimate_gradients("optimal_baseline", p.env, p.policy, sub, n_b)
    ones = sub.mask.float()
    d = score_gradients_loop(p.policy, sub.obs[:, None], sub.actions[:, None], ones[:, None],
                             sub.mask[:, None]).double()
    R = sub.episode_returns(p.env.gamma).double()
    rows = []
    for m in range(n_b):
        g = torch.zeros(d.shape[1], dtype=torch.float64)
        for i in range(m * b, (m + 1) * b):
            others = [j for j in range(m * b, (m + 1) * b) if j != i]
            for k in range(d.shape[1]):
                den = sum(float(d[j, k]) ** 2 for j in others)
                num = sum(float(d[j, k]) ** 2 * float(R[j]) for j in others)
                base = num / den if den > 0 else 0.0
                g[k] += d[i, k] * (R[i] - base) / b
        rows.append(g)
    torch.testing.assert_close(got.double(), torch.stack(rows), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- critics

def test_exact_tabular_critic(tabular):
    p = tabular
    exact = p.env.exact_values(p.policy).detach()
    t = torch.arange(p.env.horizon + 1)[:, None].expand(-1, p.env.n_states)
    s = torch.arange(p.env.n_states)[None, :].expand(p.env.horizon + 1, -1)
    torch.testing.assert_close(p.exact(s, t).float(), exact)
    noisy = p.exact.perturb(0.5, seed=1)
    diff = noisy(s, t) - p.exact(s, t)
    assert float(diff[:-1].std()) > 0.3 and bool((diff[-1] == 0).all())  # V_T stays 0
    assert noisy.fit(p.batch, p.env.gamma, p.env.objective) == 0.0
    assert len(list(p.exact.parameters())) == 0  # the policy is not a critic parameter


def test_tabular_critic_fits_exact_values(tabular):
    """Per-(t, s) mean of Monte Carlo targets: within 5 SE of the exact V_t(s)."""
    p = tabular
    critic = make_critic(p.env)
    assert isinstance(critic, TabularCritic) and critic.time_aware
    critic.fit(p.batch, p.env.gamma, p.env.objective)
    y = mc_targets(critic, p.batch, p.env.gamma, p.env.objective)
    exact = p.env.exact_values(p.policy).detach().double()
    for t in range(p.env.horizon):
        for s in range(p.env.n_states):
            sel = p.batch.mask[:, t] & (p.batch.obs[:, t] == s)
            if int(sel.sum()) < 100:
                continue
            vals = y[:, t][sel].double()
            se = float(vals.std() / vals.numel() ** 0.5)
            fitted = float(critic(torch.tensor(s), torch.tensor(t)))
            assert abs(fitted - float(vals.mean())) < 1e-4
            assert abs(fitted - float(exact[t, s])) < 5 * se + 1e-6, (t, s)
    assert float(critic(torch.tensor(0), torch.tensor(p.env.horizon))) == 0.0  # V_T = 0


def test_quadratic_critic_recovers_a_quadratic():
    torch.manual_seed(0)
    d, T, N = 3, 4, 200
    critic = QuadraticCritic(d, T)
    P = torch.randn(T, d, d).double()
    P = P + P.transpose(1, 2)
    p_, c = torch.randn(T, d).double(), torch.randn(T).double()
    x = torch.randn(N, T, d).double()
    t = torch.arange(T).expand(N, -1)
    y = torch.einsum("ntI,tIJ,ntJ->nt", x, P, x) + (p_[None] * x).sum(-1) + c
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[:10, 2:] = False
    loss = critic.regress(x, t, y, mask, steps=0, lr=0.0)
    assert loss < 1e-6
    torch.testing.assert_close(critic.P.data.double(), P, rtol=1e-3, atol=1e-3)
    assert float(critic(x[0, 0], torch.tensor(T))) == 0.0


def test_quadratic_critic_on_lqr_beats_constant(lqr):
    """A fitted quadratic critic explains most of the return-to-go variance on fresh data."""
    p = lqr
    fresh = p.batch.select(slice(0, 2000))
    y = mc_targets(p.critic, fresh, p.env.gamma, p.env.objective)
    v, _ = p.critic.values(fresh)
    m = fresh.mask
    resid = float(((y - v)[m]).var())
    assert resid < 0.5 * float(y[m].var())


def test_mlp_critic_learns_and_is_time_aware():
    env = make_env("lqr", state_dim=2, action_dim=1, horizon=5, gamma=0.9, seed=1)
    policy = make_policy(env, seed=0)
    batch = rollout(env, policy, 256, seed=3)
    torch.manual_seed(0)
    critic = make_critic(env, kind="mlp", hidden=(32,))
    assert isinstance(critic, MLPCritic)
    y = mc_targets(critic, batch, env.gamma, env.objective)
    loss = critic.fit(batch, env.gamma, env.objective, steps=300, lr=1e-2)
    assert loss < 0.5 * float(y[batch.mask].var())
    with torch.no_grad():
        assert float(critic(batch.obs[0, 0], torch.tensor(env.horizon))) == 0.0


def test_discounted_critics_are_stationary_and_bootstrap():
    env = make_env("tabular", n_states=3, n_actions=2, horizon=4, gamma=0.8,
                   objective="discounted", seed=0)
    policy = make_policy(env, init_scale=0.3)
    critic = make_critic(env)
    assert isinstance(critic, TabularCritic) and not critic.time_aware
    exact = ExactTabularCritic(env, policy)
    batch = rollout(env, policy, 64, seed=0)
    y = mc_targets(exact, batch, env.gamma, env.objective)
    V = env.exact_values(policy).detach()[0]
    # every episode is cut at T; its target includes gamma^(T-t) V(s_T)
    t = torch.arange(env.horizon)
    tail = env.gamma ** (env.horizon - t) * V[batch.next_obs[:, -1]][:, None]
    disc = env.gamma ** (t[None, :] - t[:, None]).clamp(min=0)
    G = (batch.rewards[:, None, :] * disc.triu()[None]).sum(-1)
    torch.testing.assert_close(y, G + tail, rtol=1e-5, atol=1e-5)
    # with exact V, the expected TD error is 0 and the fitted tabular critic is close to V
    critic.fit(rollout(env, policy, 4000, seed=1), env.gamma, env.objective)
    assert float((critic(torch.arange(3), torch.zeros(3, dtype=torch.long)) - V).abs().max()) < 0.3
