"""The vectorised return maths equals its per-episode loop twins on random padded batches
that mix terminations, truncations (under both objectives) and length-1 episodes."""

from __future__ import annotations

import pytest
import torch

from pgvar.batch import Batch
from pgvar.returns import (
    bootstrap_values,
    bootstrap_values_loop,
    discount_weights,
    discounted_cumsum,
    gae,
    gae_loop,
    last_step_mask,
    reward_to_go,
    reward_to_go_loop,
    td_errors,
    td_errors_loop,
)

SHAPES = [(1, 1), (3, 1), (1, 5), (5, 2), (7, 7), (16, 33), (4, 64)]


def random_batch(N: int, T: int, seed: int) -> tuple[Batch, torch.Tensor]:
    """A padded batch with random lengths (1 always present when N > 1), random ends, and
    a consistent critic: ``values[:, t]`` = V(s_t, t) for t = 0..T (``[N, T+1]``)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    if N > 1:
        lengths[0] = 1
        lengths[-1] = T
    t = torch.arange(T)
    mask = t[None, :] < lengths[:, None]
    last = t[None, :] == (lengths[:, None] - 1)
    # episodes that run the full horizon are truncated; others end either way at random
    terminate = torch.rand(N, generator=g) < 0.5
    terminate[lengths == T] = torch.rand(int((lengths == T).sum()), generator=g) < 0.3
    terminated = last & terminate[:, None]
    truncated = last & ~terminate[:, None]
    rewards = torch.randn(N, T, generator=g, dtype=torch.float64) * mask
    z = torch.zeros(N, T, dtype=torch.float64)
    batch = Batch(obs=z, actions=z.long(), rewards=rewards, next_obs=z, terminated=terminated,
                  truncated=truncated, mask=mask, logp=z)
    values = torch.randn(N, T + 1, generator=g, dtype=torch.float64)
    return batch, values


def test_random_batches_cover_every_case():
    seen = {"len1": False, "term": False, "trunc_early": False, "trunc_T": False}
    for s, (N, T) in enumerate(SHAPES):
        b, _ = random_batch(N, T, s)
        L = b.lengths
        seen["len1"] |= bool((L == 1).any())
        seen["term"] |= bool(b.terminated.any())
        seen["trunc_early"] |= bool((b.truncated.any(1) & (L < T)).any())
        seen["trunc_T"] |= bool((b.truncated.any(1) & (L == T)).any())
    assert all(seen.values()), seen


def test_discount_weights_and_cumsum_by_hand():
    assert torch.allclose(discount_weights(4, 0.5), torch.tensor([1.0, 0.5, 0.25, 0.125]))
    assert torch.equal(discount_weights(3, 0.0), torch.tensor([1.0, 0.0, 0.0]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(discounted_cumsum(x, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0]]))


def test_hand_computed_returns_with_tail():
    # 2 steps truncated under "discounted": G_1 = r_1 + gamma V, G_0 = r_0 + gamma G_1
    r = torch.tensor([[1.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    tail = torch.tensor([[9.0, 10.0, 0.0]])  # only the last step's entry (10) is used
    G = reward_to_go(r, mask, 0.5, tail)
    assert torch.allclose(G, torch.tensor([[1 + 0.5 * (2 + 5.0), 2 + 5.0, 0.0]]))
    assert torch.equal(last_step_mask(mask), torch.tensor([[False, True, False]]))


@pytest.mark.parametrize("objective", ["finite", "discounted"])
@pytest.mark.parametrize("as_termination", [False, True])
def test_bootstrap_values_equal_loop(objective, as_termination):
    for s, (N, T) in enumerate(SHAPES):
        b, values = random_batch(N, T, 100 + s)
        v_next = values[:, 1:]
        fast = bootstrap_values(b, v_next, objective, as_termination)
        slow = bootstrap_values_loop(b, v_next, objective, as_termination)
        assert torch.equal(fast, slow)
        # the rules themselves: 0 after termination; truncation per objective
        assert bool((fast[b.terminated] == 0).all())
        cut = fast[b.truncated]
        if objective == "finite" or as_termination:
            assert bool((cut == 0).all())
        else:
            assert torch.equal(cut, v_next[b.truncated])


def test_bootstrap_rejects_unknown_objective():
    b, values = random_batch(2, 3, 0)
    with pytest.raises(ValueError, match="objective"):
        bootstrap_values(b, values[:, 1:], "average")


@pytest.mark.parametrize("objective", ["finite", "discounted"])
@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_reward_to_go_equals_loop(objective, gamma):
    if objective == "discounted" and gamma == 1.0:
        gamma = 0.99
    for s, (N, T) in enumerate(SHAPES):
        b, values = random_batch(N, T, 200 + s)
        tail = bootstrap_values(b, values[:, 1:], objective)
        for tv in (None, tail):
            fast = reward_to_go(b.rewards, b.mask, gamma, tv)
            slow = reward_to_go_loop(b.rewards, b.mask, gamma, tv)
            torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
        # without a tail, G_0 is the episode's discounted return
        torch.testing.assert_close(reward_to_go(b.rewards, b.mask, gamma)[:, 0],
                                   b.episode_returns(gamma), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("objective", ["finite", "discounted"])
@pytest.mark.parametrize("gamma,lam",
                         [(0.9, 0.95), (1.0, 0.5), (0.99, 0.0), (0.5, 1.0), (0.0, 0.7)])
def test_td_and_gae_equal_loop(objective, gamma, lam):
    if objective == "discounted" and gamma == 1.0:
        gamma = 0.99
    for s, (N, T) in enumerate(SHAPES):
        b, values = random_batch(N, T, 300 + s)
        v, nxt = values[:, :-1], bootstrap_values(b, values[:, 1:], objective)
        torch.testing.assert_close(td_errors(b.rewards, v, nxt, b.mask, gamma),
                                   td_errors_loop(b.rewards, v, nxt, b.mask, gamma),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gae(b.rewards, v, nxt, b.mask, gamma, lam),
                                   gae_loop(b.rewards, v, nxt, b.mask, gamma, lam),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("objective", ["finite", "discounted"])
def test_gae_limits(objective):
    """lambda=1: reward-to-go (with the bootstrap tail) minus V; lambda=0: the TD error."""
    gamma = 0.9
    for s, (N, T) in enumerate(SHAPES):
        b, values = random_batch(N, T, 400 + s)
        v, nxt = values[:, :-1], bootstrap_values(b, values[:, 1:], objective)
        m = b.mask.double()
        G = reward_to_go(b.rewards, b.mask, gamma, nxt)
        torch.testing.assert_close(gae(b.rewards, v, nxt, b.mask, gamma, 1.0), (G - v) * m,
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gae(b.rewards, v, nxt, b.mask, gamma, 0.0),
                                   td_errors(b.rewards, v, nxt, b.mask, gamma), rtol=0, atol=0)


def test_length_one_episode_by_hand():
    """A single step: G = r (+ gamma V' if bootstrapped), A = delta for every lambda."""
    z = torch.zeros(1, 1, dtype=torch.float64)
    for terminated, objective, expect_tail in [(True, "discounted", 0.0), (False, "finite", 0.0),
                                               (False, "discounted", 4.0)]:
        b = Batch(obs=z, actions=z.long(), rewards=torch.tensor([[2.0]], dtype=torch.float64),
                  next_obs=z, terminated=torch.tensor([[terminated]]),
                  truncated=torch.tensor([[not terminated]]), mask=torch.tensor([[True]]), logp=z)
        nxt = bootstrap_values(b, torch.tensor([[4.0]], dtype=torch.float64), objective)
        assert float(nxt) == expect_tail
        assert float(reward_to_go(b.rewards, b.mask, 0.5, nxt)) == 2.0 + 0.5 * expect_tail
        A = gae(b.rewards, torch.tensor([[1.0]], dtype=torch.float64), nxt, b.mask, 0.5, 0.3)
        assert float(A) == 2.0 + 0.5 * expect_tail - 1.0


def test_discounted_cumsum_reverse_recursion_for_many_sequences_equals_the_scan():
    """Many sequences take the reverse recursion, few the log-depth scan: same sums."""
    from pgvar.returns import SCAN_ROWS
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SCAN_ROWS + 3, 37, generator=g, dtype=torch.float64)
    x[:, 30:] = 0.0  # padding
    many = discounted_cumsum(x, 0.9)
    few = torch.cat([discounted_cumsum(x[i:i + 97], 0.9) for i in range(0, x.shape[0], 97)])
    torch.testing.assert_close(many, few)
    loop = torch.zeros_like(x)
    running = torch.zeros(x.shape[0], dtype=x.dtype)
    for t in reversed(range(x.shape[1])):
        running = x[:, t] + 0.9 * running
        loop[:, t] = running
    torch.testing.assert_close(many, loop)
