"""Prompts whose rewards vary but whose gradient is zero at every theta (identical responses with
different rewards), recognised from the rollouts alone, against explicit autograd gradients."""

import statistics

import torch

from openrlhf_cropi.core.advantages import Objective, first_copies, zero_gradient


def explicit_gradient(model, prompt, responses, rewards):
    """Oracle: response by response, full-vocab log_softmax, theta == beta (rho = 1 in value)."""
    params = list(model.parameters())
    adv = [(x - statistics.mean(rewards)) / (statistics.stdev(rewards) + 1e-9) for x in rewards]
    total = torch.zeros(sum(p.numel() for p in params))
    for a, ids in zip(adv, responses):
        full = torch.cat([prompt, ids]).unsqueeze(0)
        logits = model(full).logits[0, len(prompt) - 1 : -1]
        lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        j = a * torch.exp(lp - lp.detach()).mean() / len(rewards)
        total += torch.cat([g.flatten() for g in torch.autograd.grad(j, params)])
    return total


def test_identical_responses_with_cancelling_advantages(tiny_lm):
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 200, (5,), generator=gen)
    a, b, c = (torch.randint(0, 200, (n,), generator=gen) for n in (4, 6, 3))
    cases = {
        # responses, rewards, zero gradient?
        "a a b b, rewards 0 1 0 1 (copies disagree)": ([a, a, b, b], [0.0, 1.0, 0.0, 1.0], True),
        "a a b, rewards 0 1 0.5": ([a, a, b], [0.0, 1.0, 0.5], True),
        "a a b b, rewards 1 1 0 0 (copies agree)": ([a, a, b, b], [1.0, 1.0, 0.0, 0.0], False),
        "a a b c, rewards 0 1 0 1": ([a, a, b, c], [0.0, 1.0, 0.0, 1.0], False),
        "a b c, all rewards equal (zero variance, counted apart)": ([a, b, c], [1.0, 1.0, 1.0], False),
        # rewards that float32 cannot hold exactly: the copies' advantages still cancel
        "a a b b, rewards 0.1 0.3 0.1 0.3": ([a, a, b, b], [0.1, 0.3, 0.1, 0.3], True),
    }
    reference = explicit_gradient(tiny_lm, prompt, [a, b, c], [0.0, 1.0, 0.5]).norm()
    assert reference > 1e-3
    for name, (responses, rewards, want) in cases.items():
        weights = Objective().weights(torch.tensor(rewards, dtype=torch.float64), [len(r) for r in responses])
        assert zero_gradient(first_copies(responses), weights) == want, name
        norm = explicit_gradient(tiny_lm, prompt, responses, rewards).norm()
        if want:  # what the reference code's |g| threshold is for: a gradient of round-off only
            assert norm < 1e-6 * reference, (name, norm)
        elif len(set(rewards)) > 1:
            assert norm > 1e-2 * reference, (name, norm)
