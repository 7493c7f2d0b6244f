"""The cheap targeting baselines' similarities of pool prompts to validation sets.

bm25: lexical (bm25s's BM25, its default Lucene variant, English stopwords). embedding: the
cosine of mean-pooled last hidden states, computed on the policy ranks (ray/policy_actor.py) and
compared here like projected gradients (`scoring.projected_cosines`). Both give one [N] score
tensor per validation set, fused by `scoring.select_prompts` exactly as CROPI's cosines are.
"""

from __future__ import annotations

from typing import Sequence

import torch


def bm25_scores(pool_texts: Sequence[str], validation_sets: Sequence[Sequence[str]]) -> list[torch.Tensor]:
    """Per validation set, each pool text's BM25 score with every validation text as the query,
    averaged over the set's texts (float32 [N]; a validation text sharing no word with the pool
    adds 0)."""
    try:
        import bm25s
    except ImportError:
        raise ImportError("--cropi.selector bm25 needs bm25s: pip install 'openrlhf-cropi[bm25]'") from None
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(pool_texts), stopwords="en", show_progress=False), show_progress=False)
    out = []
    for texts in validation_sets:
        total = torch.zeros(len(pool_texts), dtype=torch.float64)
        for words in bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False):
            ids = retriever.get_tokens_ids(words)  # words the pool never uses score nothing
            if ids:
                total += torch.from_numpy(retriever.get_scores_from_ids(ids)).double()
        out.append((total / max(len(texts), 1)).float())
    return out


def mean_pooled(hidden: torch.Tensor) -> torch.Tensor:
    """[T, H] last hidden states of one prompt's tokens -> their float32 mean [H]."""
    return hidden.float().mean(0)
