"""Exact scores (core.exact) against an explicit reference: each response's objective written out
token by token on an unpadded row, its whole gradient by one autograd.grad, concatenated, and
cosines by torch's float64 cosine_similarity."""

import pytest
import torch

from openrlhf_cropi.core.advantages import Objective
from openrlhf_cropi.core.exact import cosines_from_dots, flat_zeros, gradient_dots, gradient_into, squared_norm, state_bytes
from openrlhf_cropi.core.gradients import behavior_log_probs, causal_lm_log_prob_fn, plan_micro_batches

OBJECTIVE = Objective(loss_agg_mode="token-mean")


def _prompt(n: int):
    gen = torch.Generator().manual_seed(n)
    prompt = torch.randint(3, 190, (3 + n % 3,), generator=gen)
    responses = [torch.randint(3, 190, (2 + (3 * k + n) % 6,), generator=gen) for k in range(4)]
    if n == 2:
        responses[3] = responses[0].clone()  # a copy: one row fewer
    rewards = [1.0, 0.0, float(n % 2), 0.5]
    return prompt, responses, rewards


def reference_gradient(model, prompt, responses, rewards, behavior) -> torch.Tensor:
    """The whole gradient, flat float64: J = sum_k w_k (1/|y_k|) sum_t rho_{k,t}, one unpadded row per response."""
    params = list(model.parameters())
    weights = OBJECTIVE.weights(rewards, [len(r) for r in responses])
    total = 0.0
    for k, response in enumerate(responses):
        logits = model(input_ids=torch.cat([prompt, response]).unsqueeze(0)).logits[0].float()
        rho = [torch.exp(torch.log_softmax(logits[len(prompt) - 1 + t], -1)[response[t]] - behavior[k][t])
               for t in range(len(response))]  # fmt: skip
        total = total + weights[k] * sum(rho) / len(response)
    return torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(total, params)])


def _perturbed(model, scale=0.05, seed=1):
    """theta != beta: every importance ratio differs from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.mark.parametrize("max_tokens", [10_000, 16])  # one micro-batch (streamed); several (through the buffer)
@pytest.mark.parametrize("tied", [False, True])
def test_exact_cosines_match_the_reference(tiny_lm, tiny_tied_lm, max_tokens, tied):
    model = tiny_tied_lm if tied else tiny_lm
    fn = causal_lm_log_prob_fn(model)
    items = []
    for n in range(5):
        prompt, responses, rewards = _prompt(n)
        items.append((prompt, responses, rewards, behavior_log_probs(fn, prompt, responses, max_tokens, "cpu")))
    if max_tokens == 16:
        assert all(len(plan_micro_batches([len(r) for r in it[1]], len(it[0]), 16)) > 1 for it in items)
    _perturbed(model)
    params = list(model.parameters())
    numels = [p.numel() for p in params]
    val, pool = items[:2], items[2:]

    # Two targets: the mean of the validation prompts' gradients, and one prompt's alone.
    buffer = flat_zeros(numels, "cpu")
    targets = [flat_zeros(numels, "cpu"), flat_zeros(numels, "cpu")]
    for n, it in enumerate(val):
        assert gradient_into(buffer, fn, params, *it, max_tokens, "cpu", objective=OBJECTIVE)
        for t, g in zip(targets[0], buffer):
            t.add_(g / len(val))
        if n == 1:
            for t, g in zip(targets[1], buffer):
                t.copy_(g)
    tt = [squared_norm(t) for t in targets]
    dots = torch.stack([gradient_dots(targets, buffer, fn, params, *it, max_tokens, "cpu", objective=OBJECTIVE)
                        for it in pool])  # fmt: skip
    got = cosines_from_dots(dots, tt)

    ref_val = [reference_gradient(model, *it) for it in val]
    ref_targets = [sum(ref_val) / len(ref_val), ref_val[1]]
    want = torch.tensor([[float(torch.nn.functional.cosine_similarity(reference_gradient(model, *it), t, dim=0))
                          for t in ref_targets] for it in pool], dtype=torch.float64)  # fmt: skip
    print(f"max |cosine error| {(got - want).abs().max():.2e}; cosines {want.flatten().tolist()}")
    assert want.abs().min() > 1e-3  # not trivially zero or orthogonal
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for t, r in zip(tt, ref_targets):
        assert t == pytest.approx(float(r.square().sum()), rel=1e-5)
    assert all(p.grad is None for p in params)  # training state untouched


def test_non_finite_gradients_are_reported(tiny_lm):
    fn = causal_lm_log_prob_fn(tiny_lm)
    prompt, responses, rewards = _prompt(0)
    behavior = behavior_log_probs(fn, prompt, responses, 10_000, "cpu")
    with torch.no_grad():
        tiny_lm.model.norm.weight[0] = float("inf")
    params = list(tiny_lm.parameters())
    buffer = flat_zeros([p.numel() for p in params], "cpu")
    assert not gradient_into(buffer, fn, params, prompt, responses, rewards, behavior, 10_000, "cpu")
    for max_tokens in (10_000, 8):
        dots = gradient_dots([buffer], buffer, fn, params, prompt, responses, rewards, behavior, max_tokens, "cpu")
        assert not torch.isfinite(dots[-1])


def test_state_bytes_and_zero_norms():
    assert state_bytes(2, 1000) == 12_000  # two targets and the buffer, float32
    dots = torch.tensor([[0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)  # |g|^2 = 0: cosine 0, not NaN
    assert cosines_from_dots(dots, [4.0]).tolist() == [[0.0], [0.0]]
    assert cosines_from_dots(torch.tensor([[1.0, 4.0]]), [1.0]).tolist() == [[0.5]]
