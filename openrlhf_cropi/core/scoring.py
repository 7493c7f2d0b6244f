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

Ties are broken by a seeded random permutation of the pool (``tie_break_permutation``), the
same in every phase for a given seed: learnability and pass rates take a handful of distinct
values at K = 8, and an index tie-break would make their top alpha "the first prompts in file
order". Without a permutation (the low-level functions' default) the lower index wins.

The cheap targeting baselines (bm25, embedding: ``core.similarity``) give per-validation-set
scores of their own and are fused and selected exactly like the cosines.

Eligibility: the informed selectors (influence, bm25, embedding, learnability, pass_rate) only pick usable
prompts, with reward variance and a gradient (the others have a zero gradient in every phase);
influence also drops prompts whose gradient was not finite. If fewer eligible prompts than
n_select exist, all eligible ones are selected and a warning says so. ``random`` draws from the
whole pool.

Cosines are computed chunk by chunk (``pool_cosines``): only one chunk of projected gradients
exists at a time, and none for prompts that are not scored. Exact cosines (no projection) come
from ``core.exact`` through the same function.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
from tqdm import tqdm

METHODS = ("influence", "random", "variance", "bm25", "embedding", "learnability", "pass_rate")
SIMILARITY_METHODS = ("influence", "bm25", "embedding")  # one score per prompt and validation set, fused by RRF


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


def _unit_rows_(rows: torch.Tensor) -> torch.Tensor:
    """Rows of a float32 [M, d] scaled to unit length in place (a zero row stays zero: cosines 0)."""
    return rows.div_(rows.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))


def projected_cosines(
    project: Callable[[list[int]], list[torch.Tensor | None]], targets: Sequence[torch.Tensor]
) -> Callable[[list[int]], list[torch.Tensor | None]]:
    """``pool_cosines``'s ``cosines_of`` from projected gradients: ``project(positions)`` returns
    the [d] vectors of those pool positions (None where not finite), ``targets`` the V projected
    validation means. Float32 on unit-normalised rows; peak memory: a chunk of vectors twice (as
    ``project`` returns them, and stacked), chunk x d floats each."""
    unit_targets = _unit_rows_(torch.stack([t.float() for t in targets]))  # [V, d]

    def cosines_of(positions: list[int]) -> list[torch.Tensor | None]:
        vectors = project(positions)
        if len(vectors) != len(positions):
            raise RuntimeError(f"{len(vectors)} projected gradients for {len(positions)} prompts")
        finite = [n for n, v in enumerate(vectors) if v is not None]
        out: list[torch.Tensor | None] = [None] * len(positions)
        if finite:
            block = _unit_rows_(torch.stack([vectors[n] for n in finite]).float())  # [C, d]
            del vectors  # before the cosines: one stacked copy at a time
            for n, row in zip(finite, (block @ unit_targets.T).unbind(0)):
                out[n] = row
        return out

    return cosines_of


def pool_cosines(
    candidates: Sequence[int],
    pool_size: int,
    num_targets: int,
    cosines_of: Callable[[list[int]], list[torch.Tensor | None]],
    chunk: int,
    progress: str | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Cosine of each candidate's gradient with each of ``num_targets`` validation targets, chunk by chunk.

    ``cosines_of(positions)`` returns the [V] cosines of those pool positions (None where the
    gradient was not finite): ``projected_cosines``, or the exact scores of ``core.exact``.
    Returns one float32 [pool_size] tensor per target (NaN where not scored) and the bool
    [pool_size] mask of candidates whose gradient was not finite.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    cosines = torch.full((num_targets, pool_size), float("nan"))
    nonfinite = torch.zeros(pool_size, dtype=torch.bool)
    with tqdm(total=len(candidates), desc=progress, unit="prompt", disable=progress is None) as bar:
        for start in range(0, len(candidates), chunk):
            positions = list(candidates[start : start + chunk])
            rows = cosines_of(positions)
            if len(rows) != len(positions):
                raise RuntimeError(f"{len(rows)} scores for {len(positions)} prompts")
            for p, row in zip(positions, rows):
                if row is None:
                    nonfinite[p] = True
                else:
                    cosines[:, p] = row.float().cpu()
            bar.update(len(positions))
    return list(cosines), nonfinite


def tie_break_permutation(n: int, seed: int) -> torch.Tensor:
    """A seeded random order of n prompts: among equal scores, the earlier prompt in it wins."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def ranks(scores: torch.Tensor, eligible: torch.Tensor, tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """1-based ranks by score, descending, among eligible prompts (0 for the others); ties by
    ``tie_break`` (a permutation of the pool: earlier wins) or, without one, by lower index."""
    order = _order(scores, eligible, tie_break)
    out = torch.zeros(len(scores), dtype=torch.long)
    out[order] = torch.arange(1, len(order) + 1)
    return out


def _order(scores: torch.Tensor, eligible: torch.Tensor, tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """Eligible indices, best first; a stable sort of the tie-break order breaks ties by it."""
    candidates = tie_break.cpu() if tie_break is not None else torch.arange(len(eligible))
    if len(candidates) != len(eligible):
        raise ValueError(f"tie-break order of {len(candidates)} prompts for a pool of {len(eligible)}")
    idx = candidates[eligible.cpu()[candidates]]
    s = scores.cpu().double()[idx]
    if torch.isnan(s).any():
        raise ValueError("scores of eligible prompts contain NaN")
    return idx[torch.sort(-s, stable=True).indices]


def reciprocal_rank_fusion(
    score_lists: Sequence[torch.Tensor],
    eligible: torch.Tensor,
    k: float = 0.0,
    depth: int | None = None,
    tie_break: torch.Tensor | None = None,
) -> torch.Tensor:
    """RRF(s) = sum_v 1 / (k + rank_v(s)) over lists where s is eligible and rank_v(s) <= depth."""
    if not score_lists:
        raise ValueError("need at least one score list")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    fused = torch.zeros(len(eligible), dtype=torch.float64)
    for scores in score_lists:
        r = ranks(scores, eligible, tie_break).double()
        counted = (r > 0) & (r <= (depth if depth is not None else len(r)))
        fused += torch.where(counted, 1.0 / (k + r.clamp(min=1)), torch.zeros_like(r))
    return fused


def select_top(
    scores: torch.Tensor, n_select: int, eligible: torch.Tensor, tie_break: torch.Tensor | None = None
) -> list[int]:
    """The best ``n_select`` eligible prompts, best first; fewer (with a warning) if not enough are eligible."""
    order = _order(scores, eligible, tie_break)
    if len(order) < n_select:
        warnings.warn(f"only {len(order)} eligible prompts for {n_select} requested: selecting all of them")
    return order[:n_select].tolist()


def pass_rates(rewards: Sequence[Sequence[float]]) -> torch.Tensor:
    """Mean reward per prompt (the behavior pass rate for 0/1 rewards), float64."""
    return torch.tensor([sum(r) / len(r) for r in rewards], dtype=torch.float64)


def select_prompts(
    method: str,
    alpha: float,
    usable: torch.Tensor,
    pass_rate: torch.Tensor,
    cosines: Sequence[torch.Tensor] = (),
    scored: torch.Tensor | None = None,
    rrf_k: float = 0.0,
    seed: int = 0,
) -> tuple[list[int], torch.Tensor]:
    """Select floor(alpha * N) prompts of a pool of N; returns (indices best first, per-prompt scores).

    ``usable``: prompts with reward variance and a non-zero gradient. ``seed``: of the random
    scores (random) or of the tie-break permutation (the others; pass the same seed in every
    phase so that ties are broken the same way).

    method:
      influence     RRF of ``cosines`` (one [N] tensor per validation set) over ``scored`` prompts
      bm25, embedding   the same, with their similarities (``core.similarity``) as ``cosines``
      random        seeded uniform scores, whole pool
      variance      seeded uniform scores among ``usable`` prompts (reward variance and a gradient:
                    the DAPO-style filter, the strong cheap baseline)
      learnability  p (1 - p) of the behavior pass rate p, highest first
      pass_rate     lowest behavior pass rate first (hardest prompts that still have variance)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n_pool = len(usable)
    if len(pass_rate) != n_pool:
        raise ValueError(f"{len(pass_rate)} pass rates for a pool of {n_pool}")
    n = num_to_select(alpha, n_pool)
    if method in ("random", "variance"):
        scores = torch.rand(n_pool, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        eligible = torch.ones(n_pool, dtype=torch.bool) if method == "random" else usable
        return select_top(scores, n, eligible), scores
    tie_break = tie_break_permutation(n_pool, seed)
    if method in SIMILARITY_METHODS:
        if scored is None or not cosines:
            raise ValueError(f"{method} selection needs cosines and the scored mask")
        if any(len(c) != n_pool for c in cosines) or len(scored) != n_pool:
            raise ValueError("cosines and scored must have one entry per pool prompt")
        eligible = scored & usable
        scores = reciprocal_rank_fusion(cosines, eligible, k=rrf_k, depth=n, tie_break=tie_break)
    elif method == "learnability":
        eligible = usable
        scores = pass_rate.double() * (1.0 - pass_rate.double())
    else:
        eligible = usable
        scores = -pass_rate.double()
    selected = select_top(scores, n, eligible, tie_break)
    if not selected:  # never an empty subset: a sampler with nothing to draw would fail hours later
        raise ValueError(
            f"{method}: no prompt can be selected: of {n_pool} pool prompts {int(usable.sum())} have reward "
            f"variance and a gradient, {int(eligible.sum())} of them "
            + ("were scored with a finite score" if method in SIMILARITY_METHODS else "are eligible")
        )
    return selected, scores
