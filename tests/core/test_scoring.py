"""Ranking, reciprocal rank fusion, top-alpha selection and baselines on hand-built inputs."""

import pytest
import torch

from openrlhf_cropi.core.scoring import (
    choose_validation,
    cosine,
    num_to_select,
    pass_rates,
    pool_cosines,
    projected_cosines,
    ranks,
    reciprocal_rank_fusion,
    select_prompts,
    select_top,
    tie_break_permutation,
    validation_vector,
)

T = torch.tensor
ALL = lambda n: torch.ones(n, dtype=torch.bool)  # noqa: E731


def test_ranks_are_one_based_with_index_tie_break():
    s = T([0.5, 0.9, 0.5, -1.0, 0.9])
    assert ranks(s, ALL(5)).tolist() == [3, 1, 4, 5, 2]
    eligible = T([True, False, True, True, False])
    assert ranks(s, eligible).tolist() == [1, 0, 2, 3, 0]


def test_rrf_by_hand():
    a = T([0.9, 0.8, 0.1, 0.5, 0.0])  # ranks 1 2 4 3 5
    b = T([0.0, 0.7, 0.9, 0.8, 0.1])  # ranks 5 3 1 2 4
    fused = reciprocal_rank_fusion([a, b], ALL(5), k=60)
    want = [1 / 61 + 1 / 65, 1 / 62 + 1 / 63, 1 / 64 + 1 / 61, 1 / 63 + 1 / 62, 1 / 65 + 1 / 64]
    torch.testing.assert_close(fused, T(want, dtype=torch.float64))
    # k = 0 and depth 2: only ranks 1-2 of each list count.
    fused0 = reciprocal_rank_fusion([a, b], ALL(5), k=0, depth=2)
    assert fused0.tolist() == [1.0, 0.5, 1.0, 0.5, 0.0]
    # Ineligible prompts get nothing and do not take a rank.
    elig = T([False, True, True, True, True])
    assert reciprocal_rank_fusion([a], elig, k=0).tolist() == [0.0, 1.0, 1 / 3, 1 / 2, 1 / 4]


def test_select_top_ties_and_shortfall():
    s = T([1.0, 3.0, 3.0, 2.0, 3.0])
    assert select_top(s, 3, ALL(5)) == [1, 2, 4]
    assert select_top(s, 2, T([True, False, True, True, True])) == [2, 4]
    with pytest.warns(UserWarning, match="only 2 eligible"):
        assert select_top(s, 4, T([True, False, False, True, False])) == [3, 0]


def test_num_to_select():
    assert num_to_select(0.1, 100) == 10
    assert num_to_select(0.29, 100) == 29  # 0.29 * 100 = 28.999... in floats
    assert num_to_select(0.1, 5) == 1
    with pytest.raises(ValueError):
        num_to_select(0.0, 10)


def test_influence_selection_skips_unscored_and_fuses():
    has_var = T([True, True, True, False, True, True, True, True, True, True])
    scored = has_var & T([True] * 9 + [False])  # prompt 9: non-finite gradient
    v1 = T([0.1, 0.9, 0.2, 0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.99], dtype=torch.float64)
    v2 = T([0.8, 0.1, 0.7, 0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.99], dtype=torch.float64)
    v1[3] = v2[3] = 5.0  # a zero-variance prompt with a (bogus) high score must still be skipped
    rate = torch.full((10,), 0.5, dtype=torch.float64)
    chosen, fused = select_prompts("influence", 0.2, has_var, rate, [v1], scored)
    assert chosen == [1, 8]  # top-2 by cosine among scored
    chosen, fused = select_prompts("influence", 0.2, has_var, rate, [v1, v2], scored)
    assert sorted(chosen) == [0, 1]  # rank 1 of each set (k = 0, depth 2), tied
    assert fused[0] == fused[1] == 1.0 and fused[3] == fused[9] == 0.0
    chosen, fused = select_prompts("influence", 0.3, has_var, rate, [v1, v2], scored)
    # depth 3: v1 ranks 1, 8, 7; v2 ranks 0, 2, 8. Prompt 8 (1/2 + 1/3) beats 2 (1/2) and 7 (1/3).
    assert sorted(chosen[:2]) == [0, 1] and chosen[2] == 8
    assert fused[8] == pytest.approx(1 / 2 + 1 / 3) and fused[2] == 0.5 and fused[7] == pytest.approx(1 / 3)


def test_baselines_on_hand_built_pass_rates():
    rate = T([0.0, 0.5, 0.25, 1.0, 0.75, 0.125, 0.5, 0.0], dtype=torch.float64)
    has_var = (rate > 0) & (rate < 1)
    chosen, scores = select_prompts("learnability", 0.25, has_var, rate)
    assert sorted(chosen) == [1, 6]  # p(1-p) = 0.25 at p = 0.5
    torch.testing.assert_close(scores, rate * (1 - rate))
    chosen, _ = select_prompts("pass_rate", 0.375, has_var, rate)
    assert chosen[:2] == [5, 2] and chosen[2] in (1, 6)  # lowest pass rate first, but 0.0 (no variance) never
    r1, _ = select_prompts("random", 0.5, has_var, rate, seed=1)
    assert r1 == select_prompts("random", 0.5, has_var, rate, seed=1)[0]
    assert r1 != select_prompts("random", 0.5, has_var, rate, seed=2)[0]
    assert len(r1) == 4 and len(set(r1)) == 4
    # random draws from the whole pool: over seeds, zero-variance prompts do get picked.
    assert any(0 in select_prompts("random", 0.5, has_var, rate, seed=s)[0] for s in range(20))
    with pytest.raises(ValueError):
        select_prompts("influence", 0.5, has_var, rate)  # no cosines


def test_variance_draws_uniformly_among_prompts_with_variance_only():
    """The DAPO-style baseline: never a prompt without reward variance, every one with it equally
    often over seeds (phases), and the pool's alpha share as long as enough have variance."""
    n = 40
    rate = torch.tensor([0.0, 1.0, 0.5, 0.25] * (n // 4), dtype=torch.float64)
    has_var = (rate > 0) & (rate < 1)  # 20 of 40
    counts = torch.zeros(n)
    for seed in range(400):
        chosen, _ = select_prompts("variance", 0.25, has_var, rate, seed=seed)
        assert len(chosen) == 10 and all(has_var[i] for i in chosen)
        counts[chosen] += 1
    assert counts[~has_var].sum() == 0
    # each of the 20 is drawn with probability 10/20: 200 of 400 expected, binomial s.d. 10
    assert counts[has_var].min() > 160 and counts[has_var].max() < 240, counts
    assert select_prompts("variance", 0.25, has_var, rate, seed=1)[0] != select_prompts("variance", 0.25, has_var, rate, seed=2)[0]


def test_baseline_ties_follow_a_seeded_permutation_not_file_order():
    """Learnability and pass rates take few distinct values at K = 8: most of the pool ties. The
    tie-break must not pick "the first prompts in file order" (those of the first source file),
    and must be the same in every phase for one seed."""
    n = 1000
    rate = torch.full((n,), 0.5, dtype=torch.float64)  # all tied at the best learnability
    rate[::10] = 0.125
    usable = torch.ones(n, dtype=torch.bool)
    for method in ("learnability", "pass_rate"):
        chosen, _ = select_prompts(method, 0.1, usable, rate, seed=7)
        again, _ = select_prompts(method, 0.1, usable, rate, seed=7)  # the next phase, same seed
        assert chosen == again and len(chosen) == 100
        tied = [i for i in chosen if rate[i] == 0.5] if method == "learnability" else chosen
        # A uniform choice among the ties spreads over the pool, not over its first tenth.
        assert max(tied) > n // 2 and sum(i < n // 10 for i in tied) < 30, sorted(tied)[:20]
        assert chosen != select_prompts(method, 0.1, usable, rate, seed=8)[0]
    # The order is the recorded permutation: earlier in it wins a tie.
    perm = tie_break_permutation(n, 7)
    assert sorted(perm.tolist()) == list(range(n)) and perm.tolist() == tie_break_permutation(n, 7).tolist()
    chosen, _ = select_prompts("learnability", 0.1, usable, rate, seed=7)
    assert chosen == [i for i in perm.tolist() if rate[i] == 0.5][:100]
    assert select_top(rate, 3, usable, tie_break=perm) == [i for i in perm.tolist() if rate[i] == 0.5][:3]


def test_pool_cosines_chunk_by_chunk_against_float64():
    gen = torch.Generator().manual_seed(0)
    d, n = 64, 23
    bank = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    targets = [torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(2)]
    candidates = [p for p in range(n) if p % 5 != 1]  # the others are not scored
    calls = []

    def project(positions):
        calls.append(positions)
        return [None if p == 7 else bank[p].float() for p in positions]  # 7: non-finite

    cosines, nonfinite = pool_cosines(candidates, n, 2, projected_cosines(project, targets), chunk=4)
    assert [len(c) for c in calls] == [4, 4, 4, 4, 2] and sum(calls, []) == candidates  # only candidates run
    assert nonfinite.tolist() == [p == 7 for p in range(n)]
    for c, t in zip(cosines, targets):
        assert c.dtype == torch.float32 and len(c) == n
        for p in range(n):
            if p in candidates and p != 7:
                want = torch.dot(bank[p], t) / (bank[p].norm() * t.norm())
                assert c[p].item() == pytest.approx(want.item(), abs=1e-6)
            else:
                assert torch.isnan(c[p])
    zero, _ = pool_cosines([0], 1, 2, projected_cosines(lambda positions: [torch.zeros(d)], targets), chunk=4)
    assert [c.tolist() for c in zero] == [[0.0], [0.0]]  # a zero vector has cosine 0, not NaN


def test_pass_rates_and_validation_choice():
    assert pass_rates([[1, 0, 0, 1], [0.5, 0.5]]).tolist() == [0.5, 0.5]
    cands = list(range(0, 300, 2))
    a = choose_validation(cands, 100, seed=0)
    assert len(a) == 100 and a == sorted(a) and set(a) <= set(cands)
    assert a == choose_validation(list(reversed(cands)), 100, seed=0)  # order of candidates irrelevant
    assert a != choose_validation(cands, 100, seed=1)
    assert choose_validation(cands, 0, seed=0) == cands
    assert choose_validation([3, 1], 100, seed=0) == [1, 3]


def test_validation_vector_and_cosine():
    vecs = T([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(validation_vector(vecs), T([2 / 3, 2 / 3], dtype=torch.float64))
    assert cosine(T([1.0, 1.0]), validation_vector(vecs)).item() == pytest.approx(1.0)
    assert cosine(T([[1.0, -1.0], [0.0, 0.0]]), T([1.0, 1.0])).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        validation_vector(torch.zeros(0, 2))


def test_an_empty_selection_is_an_error_with_the_counts():
    """Every pool gradient non-finite (say): no subset to train on is an error now, with the
    counts, not an empty sampler that fails hours later."""
    usable = torch.tensor([True, True, False, True])
    rate = torch.tensor([0.5, 0.25, 1.0, 0.75], dtype=torch.float64)
    nan = torch.full((4,), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="influence: no prompt can be selected: of 4 pool prompts 3 have reward "
                                         "variance and a gradient, 0 of them were scored with a finite score"):
        select_prompts("influence", 0.5, usable, rate, [nan], torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="learnability: .* of 4 pool prompts 0 have reward variance"):
        select_prompts("learnability", 0.5, torch.zeros(4, dtype=torch.bool), rate)
    assert select_prompts("learnability", 0.5, usable, rate)[0][0] == 0  # p = 0.5 first
