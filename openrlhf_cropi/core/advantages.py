"""Group-normalised advantages of one prompt's K rewards; prompts whose gradient is always zero.

A_k = (r_k - mean(r)) / (std(r) + eps), exactly as OpenRLHF 0.11.2 computes them for
``--algo.advantage.estimator group_norm`` (trainer/ppo_utils/experience_maker.py,
``compute_advantages_and_returns``): rewards promoted to at least float32, ``torch.std``
with its default Bessel correction (the unbiased, K-1 denominator) and eps = 1e-9.

One deliberate difference: a group whose rewards are all equal gets advantages of exactly 0
here. OpenRLHF divides a float-rounding residue of r - mean(r) by 1e-9 in that case; the true
value is 0, the gradient is 0, and CROPI must skip such prompts before any forward pass.
``zero_gradient`` finds the other prompts whose gradient is 0 at every theta, from the stored
responses and rewards alone. ``first_copies`` finds identical responses, whose log-probs and
gradients are identical: each distinct response needs one row of a forward pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

GROUP_NORM_EPS = 1e-9


def _as_rewards(rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    r = torch.as_tensor(rewards)
    return r.to(torch.promote_types(r.dtype, torch.float32))


def zero_variance(rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """True where a group's rewards are all equal (or it has fewer than 2), over the last dim.

    Decided from the rewards alone, with exact comparisons (no tolerance): such a group has
    A = 0 and therefore a zero gradient in every phase, so it costs no forward pass.
    """
    r = _as_rewards(rewards)
    if r.shape[-1] < 2:
        return torch.ones(r.shape[:-1], dtype=torch.bool)
    return r.amax(dim=-1) == r.amin(dim=-1)


def group_advantages(rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Group-normalised advantages over the last dim (K >= 2 rewards per group), float32 or wider."""
    r = _as_rewards(rewards)
    if r.shape[-1] < 2:
        raise ValueError(f"group advantages need at least 2 rewards per group, got {r.shape[-1]}")
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite")
    adv = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + GROUP_NORM_EPS)
    return torch.where(zero_variance(r).unsqueeze(-1), torch.zeros_like(adv), adv)


def first_copies(responses: Sequence[torch.Tensor]) -> list[int]:
    """For each response, the index of the first response with the same tokens (its own if none
    comes earlier). Short sampled answers repeat often (half of the demo's responses are copies)."""
    first: dict[bytes, int] = {}
    return [first.setdefault(torch.as_tensor(r, dtype=torch.int64).numpy().tobytes(), k) for k, r in enumerate(responses)]


def zero_gradient(responses: Sequence[torch.Tensor], rewards: torch.Tensor | Sequence[float]) -> bool:
    """True when the rewards vary, yet the prompt's gradient is 0 at every theta.

    g_s = (1/K) sum_k A_k grad mean_t rho_k, and identical responses have identical gradients,
    so g_s sums, over the distinct responses, (the advantages of its copies) x (its gradient).
    When every such sum is 0 (identical responses with different rewards, so that their
    advantages cancel: the reward is not deterministic), g_s is 0 and any score it got would
    be round-off noise. The reference code drops such prompts by a threshold on sum |g|; here they
    are recognised exactly, before any forward pass. Advantages in float64: a true cancellation
    leaves about 1e-16, a real gradient sums to at least about 1/K.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if len(responses) != r.shape[-1]:
        raise ValueError(f"{len(responses)} responses but {r.shape[-1]} rewards")
    first = first_copies(responses)
    if first == list(range(len(first))) or bool(zero_variance(r)):
        return False  # all responses distinct; or the zero-variance case, counted on its own
    sums = torch.zeros(len(first), dtype=torch.float64).index_add_(0, torch.tensor(first), group_advantages(r))
    return bool((sums.abs() < 1e-6).all())
