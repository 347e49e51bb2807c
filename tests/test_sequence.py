"""The sequence task and its policies: enumeration, exact quantities against brute force
and finite differences, sampling against the exact probabilities, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from pgvar.envs.registry import make_env, make_policy
from pgvar.envs.sequence import SequenceTask, all_completions
from pgvar.sequence_policies import TablePolicy, TransformerPolicy, prefix_indices

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(policy: str = "table") -> SequenceTask:
    return SequenceTask(n_prompts=3, vocab=3, horizon=3, max_answer_len=2, seed=1, policy=policy,
                        d_model=8, n_layers=1, n_heads=2)


def brute_log_prob(policy, q: int, tokens: list[int]) -> float:
    """log pi(y|q) token by token: one policy call per prefix, no batching."""
    total = 0.0
    for t, tok in enumerate(tokens):
        row = torch.tensor([tokens[:t] + [0] * (len(tokens) - t) + [0]])[:, :policy.max_len]
        logits = policy.token_logits(torch.tensor([q]), row)[0, t]
        total += float(torch.log_softmax(logits.detach().double(), -1)[tok])
    return total


def completion_list(task: SequenceTask) -> list[list[int]]:
    c = task.completions
    return [c.tokens[i, :int(c.lengths[i])].tolist() for i in range(task.n_completions)]


def test_enumeration_counts_every_completion_once():
    c = all_completions(vocab=4, max_len=3)
    assert c.tokens.shape == (1 + 3 + 9 + 27, 3)
    assert len({tuple(r) for r in c.tokens.tolist()}) == c.tokens.shape[0]
    assert int(c.ended.sum()) == 1 + 3 + 9 and int((~c.ended).sum()) == 27
    assert torch.equal(c.mask.sum(1), c.lengths)


def test_reward_follows_the_answer_rule():
    task = tiny()
    for q in range(task.n_prompts):
        for i, toks in enumerate(completion_list(task)):
            ended = toks[-1] == 0
            content = toks[:-1] if ended else toks
            n = task.answer_len[q]
            ok = ended and len(content) >= n and all(content[k] in task.allowed[q][k] for k in range(n))
            assert float(task.rewards[q, i]) == float(ok)
    success_uniform = task.exact(task.default_policy()).success.detach()
    assert len({round(float(s), 6) for s in success_uniform}) > 1  # prompts differ


@pytest.mark.parametrize("kind", ["table", "transformer"])
def test_exact_quantities_match_brute_force(kind):
    task = tiny(kind)
    policy = task.default_policy(init_scale=1.0, seed=3).double()
    ref = task.default_policy(init_scale=1.0, seed=4).double()
    with torch.no_grad():
        ex = task.exact(policy, ref)
    comps = completion_list(task)
    for q in range(task.n_prompts):
        logp = [brute_log_prob(policy, q, y) for y in comps]
        logr = [brute_log_prob(ref, q, y) for y in comps]
        p = [math.exp(v) for v in logp]
        assert sum(p) == pytest.approx(1.0, abs=1e-10)
        assert float(ex.success[q]) == pytest.approx(sum(pi * float(task.rewards[q, i])
                                                         for i, pi in enumerate(p)), abs=1e-10)
        assert float(ex.length[q]) == pytest.approx(sum(pi * len(y) for pi, y in zip(p, comps)),
                                                    abs=1e-10)
        assert float(ex.kl[q]) == pytest.approx(sum(pi * (a - b) for pi, a, b in zip(p, logp, logr)),
                                                abs=1e-10)
    assert float(task.exact(policy, policy).mean_kl.detach()) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["table", "transformer"])
@pytest.mark.parametrize("what", ["objective", "mean_length"])
def test_exact_gradient_matches_finite_differences(kind, what):
    task = tiny(kind)
    policy = task.default_policy(init_scale=1.0, seed=5).double()
    ref = task.default_policy(init_scale=1.0, seed=6).double()
    g = task.exact_gradient(policy, ref, beta=0.3, what=what)
    direction = torch.randn(g.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = torch.nn.utils.parameters_to_vector(policy.parameters()).detach().clone()
    h = 1e-5

    def value(x):
        torch.nn.utils.vector_to_parameters(x, policy.parameters())
        with torch.no_grad():
            return float(getattr(task.exact(policy, ref, beta=0.3), what))

    fd = (value(theta + h * direction) - value(theta - h * direction)) / (2 * h)
    assert float(g @ direction) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_table_prefix_indices_are_unique_per_prefix():
    task = SequenceTask(n_prompts=1, vocab=4, horizon=4, max_answer_len=1)
    c = task.completions
    idx = prefix_indices(c.tokens, task.vocab)
    seen = {}
    for i in range(task.n_completions):
        for t in range(int(c.lengths[i])):
            key = tuple(c.tokens[i, :t].tolist())
            assert seen.setdefault(key, int(idx[i, t])) == int(idx[i, t])
    assert sorted(seen.values()) == list(range(len(seen)))


def test_sampling_follows_the_exact_probabilities():
    task = tiny()
    policy = task.default_policy(init_scale=1.0, seed=2)
    probs = task.completion_log_probs(policy).exp().detach()
    n = 40000
    prompts = torch.full((n,), 1)
    index, rewards = task.sample(policy, prompts, torch.Generator().manual_seed(0))
    counts = torch.bincount(index, minlength=task.n_completions).double()
    expected = n * probs[1].double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = task.n_completions - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof)  # far beyond the 99.99% point of chi2(dof)
    assert torch.equal(rewards, task.rewards[1, index])


def test_policies_start_uniform_and_share_parameters_only_in_the_transformer():
    task = SequenceTask()
    for kind, cls in (("table", TablePolicy), ("transformer", TransformerPolicy)):
        policy = SequenceTask(policy=kind).default_policy()
        assert isinstance(policy, cls)
        logp = task.completion_token_log_probs(policy)
        valid = task.completions.mask[None].expand_as(logp)
        assert torch.allclose(logp[valid], torch.full_like(logp[valid], -math.log(task.vocab)))
    table = TablePolicy(6, 4, 5)
    assert sum(p.numel() for p in table.parameters()) == 6 * (1 + 3 + 9 + 27 + 81) * 4


def test_registry_builds_the_task_and_refuses_bad_sizes():
    task = make_env("sequence", n_prompts=2, vocab=3, horizon=3, max_answer_len=1)
    assert isinstance(make_policy(task, init_scale=0.5, seed=1), TablePolicy)
    for bad in ({"max_answer_len": 5}, {"vocab": 1}, {"policy": "rnn"}, {"gamma": 0.9}):
        with pytest.raises(ValueError, match="sequence task"):
            make_env("sequence", **bad)


def test_default_enumeration_is_small():
    task = SequenceTask()
    assert task.n_completions == sum(3 ** t for t in range(6))
    assert task.n_completions * task.n_prompts < 5000


# ----------------------------------------------------------------------------- pgvar-run


def compose_and_validate(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from pgvar.config import validate_config
    from pgvar.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate_config(compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize("overrides,message", [
    (["estimator=grpo"], "needs env=sequence"),
    (["env=sequence", "estimator=gae"], "valid values"),
    (["env=sequence", "estimator=grpo", "estimator.group_size=3"], "multiple of"),
    (["env=sequence", "estimator=rloo", "estimator.group_size=1", "training.batch_size=4"],
     "group_size >= 2"),
    (["env=sequence", "estimator=grpo", "estimator.kl_mode=k2"], "kl_mode"),
    (["env=sequence", "env.gamma=0.9"], "env.gamma must be 1"),
])
def test_bad_sequence_configs_are_refused_with_the_fix_named(overrides, message):
    from pgvar.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose_and_validate(overrides)


def test_a_sequence_run_logs_exact_length_and_direction_statistics(tmp_path):
    import pandas as pd

    from pgvar.run import RunState, train_and_measure

    cfg = compose_and_validate(["env=sequence", "estimator=grpo", "preset=smoke",
                                "estimator.kl_beta=0.1", "env.n_prompts=3", "env.horizon=4"])
    train_and_measure(cfg, tmp_path, 0.0, RunState())
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert list(rows["step"]) == [0, 1, 2, 3]
    assert rows["exact_length"].between(1, 5).all() and rows["exact_kl"].iloc[0] == 0.0
    measured = rows.dropna(subset=["grad_variance"])
    assert list(measured["step"]) == [0, 2, 3]
    assert measured[["mean_cos_ref", "length_bias", "exact_mean_cos", "prompt_weight_0"]].notna().all().all()
