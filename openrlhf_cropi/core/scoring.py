"""Influence scores, reciprocal rank fusion, top-alpha selection and the baseline selectors.

Influence of training prompt s on validation set v (method doc, section 1):

    U_v(s) = cos(P g_s, mean_{q in V_v} P g_q)

Several validation sets are fused by reciprocal rank fusion, RRF(s) = sum_v 1 / (k + rank_v(s)),
ranks 1-based among the scored prompts, counting only ranks within each list's top n_select
(n_select = floor(alpha * N)). Default k = 0 with that truncation, as in the reference
implementation whose runs the paper reports: the fused top-n is then essentially the
interleaving of the per-set top lists, so every validation set gets its most influential
prompts. Classical RRF (k = 60) weighs agreement across sets more than per-set leaders; pass
``rrf_k=60`` for it. With one validation set both give the plain top-n by cosine.

Ties are broken by prompt index (lower first) everywhere, so selections are deterministic.

Eligibility: the informed selectors (influence, learnability, pass_rate) only pick prompts
with reward variance (the others have a zero gradient in every phase); influence also drops
prompts whose gradient was not finite. If fewer eligible prompts than n_select exist, all
eligible ones are selected and a warning says so. ``random`` draws from the whole pool.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

METHODS = ("influence", "random", "learnability", "pass_rate")


def num_to_select(alpha: float, pool_size: int) -> int:
    """floor(alpha * pool_size), at least 1 (alpha in (0, 1])."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return max(1, math.floor(alpha * pool_size + 1e-9))


def choose_validation(candidates: Sequence[int], cap: int, seed: int) -> list[int]:
    """A seeded choice of at most ``cap`` of ``candidates`` (ascending); cap <= 0 keeps all.

    Candidates are the validation prompts with reward variance: the reference code caps the
    validation set at 100 random prompts with a non-zero gradient.
    """
    chosen = sorted(candidates)
    if cap <= 0 or len(chosen) <= cap:
        return chosen
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))[:cap]
    return sorted(chosen[i] for i in order.tolist())


def validation_vector(projected: torch.Tensor) -> torch.Tensor:
    """Mean of the projected validation gradients [M, d] -> [d] (the projection of the mean gradient)."""
    if projected.dim() != 2 or projected.shape[0] == 0:
        raise ValueError(f"need a non-empty [M, d] stack of validation vectors, got shape {tuple(projected.shape)}")
    return projected.double().mean(0)


def cosine(vectors: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of ``vectors`` ([d] or [N, d]) with ``target`` [d], in float64 (0 for zero vectors)."""
    return torch.nn.functional.cosine_similarity(vectors.double(), target.double().expand_as(vectors), dim=-1)


def ranks(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """1-based ranks by (score descending, index ascending) among eligible prompts; 0 for the others."""
    order = _order(scores, eligible)
    out = torch.zeros(len(scores), dtype=torch.long)
    out[order] = torch.arange(1, len(order) + 1)
    return out


def _order(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Eligible indices, best first; stable sort of ascending indices gives the index tie-break."""
    idx = torch.nonzero(eligible.cpu(), as_tuple=False).flatten()
    s = scores.cpu().double()[idx]
    if torch.isnan(s).any():
        raise ValueError("scores of eligible prompts contain NaN")
    return idx[torch.sort(-s, stable=True).indices]


def reciprocal_rank_fusion(
    score_lists: Sequence[torch.Tensor], eligible: torch.Tensor, k: float = 0.0, depth: int | None = None
) -> torch.Tensor:
    """RRF(s) = sum_v 1 / (k + rank_v(s)) over lists where s is eligible and rank_v(s) <= depth."""
    if not score_lists:
        raise ValueError("need at least one score list")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    fused = torch.zeros(len(eligible), dtype=torch.float64)
    for scores in score_lists:
        r = ranks(scores, eligible).double()
        counted = (r > 0) & (r <= (depth if depth is not None else len(r)))
        fused += torch.where(counted, 1.0 / (k + r.clamp(min=1)), torch.zeros_like(r))
    return fused


def select_top(scores: torch.Tensor, n_select: int, eligible: torch.Tensor) -> list[int]:
    """The best ``n_select`` eligible prompts, best first; fewer (with a warning) if not enough are eligible."""
    order = _order(scores, eligible)
    if len(order) < n_select:
        warnings.warn(f"only {len(order)} eligible prompts for {n_select} requested: selecting all of them")
    return order[:n_select].tolist()


def pass_rates(rewards: Sequence[Sequence[float]]) -> torch.Tensor:
    """Mean reward per prompt (the behavior pass rate for 0/1 rewards), float64."""
    return torch.tensor([sum(r) / len(r) for r in rewards], dtype=torch.float64)


def select_prompts(
    method: str,
    alpha: float,
    has_variance: torch.Tensor,
    pass_rate: torch.Tensor,
    cosines: Sequence[torch.Tensor] = (),
    scored: torch.Tensor | None = None,
    rrf_k: float = 0.0,
    seed: int = 0,
) -> tuple[list[int], torch.Tensor]:
    """Select floor(alpha * N) prompts of a pool of N; returns (indices best first, per-prompt scores).

    method:
      influence     RRF of ``cosines`` (one [N] tensor per validation set) over ``scored`` prompts
      random        seeded uniform scores, whole pool
      learnability  p (1 - p) of the behavior pass rate p, highest first
      pass_rate     lowest behavior pass rate first (hardest prompts that still have variance)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n_pool = len(has_variance)
    if len(pass_rate) != n_pool:
        raise ValueError(f"{len(pass_rate)} pass rates for a pool of {n_pool}")
    n = num_to_select(alpha, n_pool)
    if method == "influence":
        if scored is None or not cosines:
            raise ValueError("influence selection needs cosines and the scored mask")
        if any(len(c) != n_pool for c in cosines) or len(scored) != n_pool:
            raise ValueError("cosines and scored must have one entry per pool prompt")
        eligible = scored & has_variance
        scores = reciprocal_rank_fusion(cosines, eligible, k=rrf_k, depth=n)
    elif method == "random":
        eligible = torch.ones(n_pool, dtype=torch.bool)
        scores = torch.rand(n_pool, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    elif method == "learnability":
        eligible = has_variance
        scores = pass_rate.double() * (1.0 - pass_rate.double())
    else:
        eligible = has_variance
        scores = -pass_rate.double()
    return select_top(scores, n, eligible), scores
