"""The cheap targeting baselines' similarities, against slow explicit references."""

import math

import pytest
import torch

from openrlhf_cropi.core.scoring import select_prompts
from openrlhf_cropi.core.similarity import bm25_scores

pytest.importorskip("bm25s")

POOL = ["apple banana cherry", "apple apple grape", "kiwi lemon mango", "banana kiwi", "papaya papaya papaya papaya"]
VALS = [["apple banana", "cherry grape"], ["kiwi mango", "lemon melon"]]  # "melon" occurs in no pool text


def _lucene_bm25(docs, query, k1=1.5, b=0.75):
    """Lucene's BM25 (bm25s's default) written out: idf ln(1 + (N - df + 0.5) / (df + 0.5)), and
    no (k1 + 1) factor in the term weight (Lucene 8 dropped it: it scales every score alike)."""
    docs = [d.split() for d in docs]
    avgdl = sum(map(len, docs)) / len(docs)
    scores = []
    for doc in docs:
        total = 0.0
        for term in query.split():
            df = sum(term in d for d in docs)
            if df == 0:
                continue
            tf = doc.count(term)
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            total += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(total)
    return torch.tensor(scores, dtype=torch.float64)


def test_bm25_scores_are_the_mean_lucene_score_over_each_validation_set():
    got = bm25_scores(POOL, VALS)
    assert len(got) == 2 and all(g.dtype == torch.float32 and g.shape == (5,) for g in got)
    for scores, queries in zip(got, VALS):
        expected = sum(_lucene_bm25(POOL, q) for q in queries) / len(queries)
        torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
    assert got[0].argmax() == 0 and got[1].argmax() == 2  # the lexically closest text leads
    assert got[0][4] == 0 and got[1][4] == 0  # no shared word: nothing


def test_similarity_selectors_pick_only_prompts_with_variance():
    scores = bm25_scores(POOL, VALS[:1])
    usable = torch.tensor([False, True, True, True, True])
    rate = torch.full((5,), 0.5, dtype=torch.float64)
    scored = torch.ones(5, dtype=torch.bool)
    # Prompt 0 is the closest but has no reward variance: the next closest, 1, is picked.
    assert select_prompts("bm25", 0.2, usable, rate, scores, scored)[0] == [1]
    assert select_prompts("bm25", 0.2, torch.ones(5, dtype=torch.bool), rate, scores, scored)[0] == [0]
    with pytest.raises(ValueError, match="embedding selection needs cosines"):
        select_prompts("embedding", 0.4, usable, rate)
