"""Off-policy per-prompt gradients against an explicit, one-response-at-a-time autograd oracle."""

import statistics

import pytest
import torch

from openrlhf_cropi.core.advantages import GROUP_NORM_EPS, group_advantages, zero_variance
from openrlhf_cropi.core.gradients import (
    behavior_log_probs,
    causal_lm_log_prob_fn,
    pack_micro_batch,
    plan_micro_batches,
    prompt_gradient,
)

PROMPT = torch.tensor([5, 17, 3, 99, 42])
RESPONSES = [torch.tensor(r) for r in ([7, 8, 9], [1, 2, 3, 4, 5, 6, 7], [11], [20, 30, 40, 50, 60])]
REWARDS = [1.0, 0.0, 0.0, 1.0]


def oracle_token_log_probs(model, prompt, response, temperature=1.0):
    """log pi(y_t | prompt, y_<t) for each t, from one unpadded row, read off position by position."""
    ids = torch.cat([prompt, response]).unsqueeze(0)
    logits = model(input_ids=ids).logits[0].float() / temperature
    out = []
    for t in range(len(response)):
        row = logits[len(prompt) - 1 + t]  # the logits at position i predict token i + 1
        out.append(torch.log_softmax(row, dim=-1)[response[t]])
    return out


def oracle_advantages(rewards):
    mean, std = statistics.mean(rewards), statistics.stdev(rewards)  # stdev: n - 1 denominator
    return [(r - mean) / (std + GROUP_NORM_EPS) for r in rewards]


def oracle_gradient(model, prompt, responses, rewards, behavior, temperature=1.0):
    """grad of (1/K) sum_k A_k (1/|y_k|) sum_t exp(logp - logb), one response at a time."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    adv = oracle_advantages(rewards)
    for k, response in enumerate(responses):
        lps = oracle_token_log_probs(model, prompt, response, temperature)
        j_k = 0.0
        for t, lp in enumerate(lps):
            j_k = j_k + torch.exp(lp - behavior[k][t])
        j_k = adv[k] * j_k / len(response) / len(responses)
        for acc, g in zip(total, torch.autograd.grad(j_k, params, allow_unused=True)):
            if g is not None:
                acc += g
    return total


def perturb(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def assert_grads_close(got, want):
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_advantages_match_openrlhf_group_norm():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.3, 0.3, 0.3]])
    adv = group_advantages(r)
    want = oracle_advantages(r[0].tolist())
    torch.testing.assert_close(adv[0], torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert torch.equal(adv[1], torch.zeros(5))  # all equal: exactly zero
    assert zero_variance(r).tolist() == [False, True]
    assert zero_variance([1.0]).item()  # a single response has no group
    with pytest.raises(ValueError):
        group_advantages([1.0])


def test_plan_micro_batches_respects_budget():
    lengths = [3, 7, 1, 5, 7, 2]
    batches = plan_micro_batches(lengths, prompt_length=4, max_tokens=24)
    assert sorted(k for b in batches for k in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * (4 + max(lengths[k] for k in b)) <= 24
    assert batches == plan_micro_batches(lengths, 4, 24)  # deterministic
    assert batches[0] == [1, 4]  # longest first, index tie-break
    assert plan_micro_batches(lengths, 4, 1) == [[1], [4], [3], [0], [5], [2]]  # over budget: alone


def test_log_prob_fn_matches_oracle_with_padding(tiny_lm):
    fn = causal_lm_log_prob_fn(tiny_lm, temperature=0.7)
    ids, attn, act = pack_micro_batch(PROMPT, RESPONSES, "cpu")
    with torch.no_grad():
        got = fn(ids, attn, act)
        for k, r in enumerate(RESPONSES):
            want = torch.stack(oracle_token_log_probs(tiny_lm, PROMPT, r, temperature=0.7))
            torch.testing.assert_close(got[k, : len(r)], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_tokens", [10_000, 14])  # one micro-batch; several (budget 14 < 2 rows)
def test_gradient_on_policy_and_off_policy(tiny_lm, max_tokens):
    fn = causal_lm_log_prob_fn(tiny_lm)
    behavior = behavior_log_probs(fn, PROMPT, RESPONSES, max_tokens, "cpu")
    if max_tokens == 14:
        assert len(plan_micro_batches([len(r) for r in RESPONSES], len(PROMPT), 14)) >= 3
    params = list(tiny_lm.parameters())

    # theta == beta: rho == 1, the plain GRPO gradient.
    got = prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior, max_tokens, "cpu")
    assert_grads_close(got, oracle_gradient(tiny_lm, PROMPT, RESPONSES, REWARDS, behavior))

    # theta != beta: ratios differ from 1 (checked), the oracle still agrees.
    perturb(tiny_lm)
    with torch.no_grad():
        now = torch.stack(oracle_token_log_probs(tiny_lm, PROMPT, RESPONSES[1]))
    assert (now - behavior[1]).abs().max() > 1e-2
    got = prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior, max_tokens, "cpu")
    want = oracle_gradient(tiny_lm, PROMPT, RESPONSES, REWARDS, behavior)
    assert_grads_close(got, want)
    assert sum(float(g.norm()) for g in want) > 1e-3  # not trivially zero
    assert all(p.grad is None for p in params)  # training state untouched


def test_micro_batching_does_not_change_the_gradient(tiny_lm):
    fn = causal_lm_log_prob_fn(tiny_lm)
    behavior = behavior_log_probs(fn, PROMPT, RESPONSES, 10_000, "cpu")
    perturb(tiny_lm)
    params = list(tiny_lm.parameters())
    one = prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior, 10_000, "cpu")
    many = prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior, 1, "cpu")
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_behavior_log_probs_are_bitwise_what_the_gradient_pass_sees(tiny_lm):
    fn = causal_lm_log_prob_fn(tiny_lm)
    behavior = behavior_log_probs(fn, PROMPT, RESPONSES, 14, "cpu")
    for batch in plan_micro_batches([len(r) for r in RESPONSES], len(PROMPT), 14):
        ids, attn, act = pack_micro_batch(PROMPT, [RESPONSES[k] for k in batch], "cpu")
        with torch.enable_grad():
            lp = fn(ids, attn, act)
        assert lp.requires_grad
        for row, k in enumerate(batch):
            assert torch.equal(lp[row, : len(RESPONSES[k])].detach(), behavior[k])  # rho == 1 exactly


def test_zero_variance_prompt_runs_no_forward(tiny_lm):
    calls = []

    def counting(*args):
        calls.append(1)
        return causal_lm_log_prob_fn(tiny_lm)(*args)

    behavior = [torch.zeros(len(r)) for r in RESPONSES]
    grads = prompt_gradient(counting, list(tiny_lm.parameters()), PROMPT, RESPONSES, [1.0] * 4, behavior, 100, "cpu")
    assert not calls
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_gradient_input_errors(tiny_lm):
    fn, params = causal_lm_log_prob_fn(tiny_lm), list(tiny_lm.parameters())
    behavior = [torch.zeros(len(r)) for r in RESPONSES]
    with pytest.raises(ValueError, match="rewards"):
        prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS[:3], behavior, 100, "cpu")
    with pytest.raises(ValueError, match="response 2"):
        prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior[:2] + [torch.zeros(4)] + behavior[3:], 100, "cpu")
    with pytest.raises(ValueError, match="empty response"):
        prompt_gradient(fn, params, PROMPT, RESPONSES[:3] + [torch.tensor([], dtype=torch.long)], REWARDS, behavior, 100, "cpu")
