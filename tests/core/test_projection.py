"""Sparse random projection: exactness (identity), JL error, determinism, chunking, hash reference,
layouts and their state, the dense-cost limit."""

import math

import pytest
import torch

from openrlhf_cropi.core import projection
from openrlhf_cropi.core.projection import SparseProjector, check_dense_cost, coordinate_hash
from openrlhf_cropi.core.scoring import cosine

M32 = 2**32 - 1


def ref_mix32(x: int) -> int:
    """Independent reference: Python big ints, plain multiplication mod 2^32."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def ref_hash(index: int, seed: int, stream: int) -> int:
    k_lo = ref_mix32(ref_mix32((seed & M32) ^ ref_mix32(stream)) ^ (seed >> 32))
    k_hi = ref_mix32(k_lo ^ 0x5BD1E995)
    return ref_mix32(ref_mix32((index & M32) ^ k_lo) ^ ref_mix32((index >> 32) ^ k_hi))


def test_hash_matches_big_int_reference_including_high_words():
    idx = [0, 1, 2, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 7, 3 * 2**40 + 5, 2**62 + 11]
    seed = 2**40 + 3  # a seed with a high word too
    got = coordinate_hash(torch.tensor(idx), seed, 5).tolist()
    assert got == [ref_hash(i, seed, 5) for i in idx]
    assert all(0 <= h <= M32 for h in got)


def test_hash_is_uniform_enough():
    h = coordinate_hash(torch.arange(200_000), 0, 1).double() / 2**32
    counts = torch.histc(h, bins=20, min=0, max=1)
    assert (counts - 10_000).abs().max() < 5 * math.sqrt(10_000)  # 5 sigma per bin
    bits = coordinate_hash(torch.arange(200_000), 0, 2) & 1
    assert abs(bits.double().mean().item() - 0.5) < 0.01


def test_kept_set_fraction_and_chunk_independence():
    n, keep = 100_003, 0.1
    p = SparseProjector(n, keep, 64, seed=3)
    full = p.kept_local_indices(0, n)
    assert abs(len(full) / n - keep) < 4 * math.sqrt(keep * (1 - keep) / n)
    cuts = [0, 1, 777, 40_000, 40_001, 99_999, n]
    pieces = [p.kept_local_indices(a, b - a) + a for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), full)
    other = SparseProjector(n, keep, 64, seed=4).kept_local_indices(0, n)
    assert not torch.equal(other[:100], full[:100])
    assert len(SparseProjector(n, 1.0, 64).kept_local_indices(0, n)) == n


def test_identity_projection_reproduces_exact_cosines():
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (11,), (3, 2, 4)]
    n = sum(math.prod(s) for s in shapes)
    p = SparseProjector(n, 1.0, n, kind="identity")
    a = [torch.randn(s, generator=g) for s in shapes]
    b = [x + 0.7 * torch.randn(x.shape, generator=g) for x in a]
    flat_a = torch.cat([x.flatten() for x in a])
    flat_b = torch.cat([x.flatten() for x in b])
    assert torch.equal(p.project(a), flat_a)
    exact = torch.dot(flat_a.double(), flat_b.double()) / (flat_a.double().norm() * flat_b.double().norm())
    assert cosine(p.project(a), p.project(b)).item() == pytest.approx(exact.item(), abs=1e-12)
    with pytest.raises(ValueError):
        SparseProjector(n, 0.5, n, kind="identity")


@pytest.mark.parametrize("kind", ["sjlt", "gaussian", "rademacher"])
@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_jl_inner_products_within_expected_error(kind, keep):
    """z = (<Px,Py> - <x,y>_kept) / sigma over independent seeds: mean ~ 0, mean square ~ 1."""
    n, d, trials = 2000, 128, 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=g)
    y = 0.6 * x + 0.8 * torch.randn(n, generator=g)
    z = []
    for seed in range(trials):
        p = SparseProjector(n, keep, d, kind=kind, seed=seed)
        kept = p.kept_local_indices(0, n)
        xk, yk = x[kept].double(), y[kept].double()
        sigma = math.sqrt((xk.dot(xk) * yk.dot(yk) + xk.dot(yk) ** 2).item() / d)
        px, py = p.project_chunk(torch.stack([x, y]), 0).double()  # batch of two slices
        z.append((px.dot(py) - xk.dot(yk)).item() / sigma)
    z = torch.tensor(z)
    assert abs(z.mean().item()) < 4 / math.sqrt(trials)  # unbiased
    assert 0.4 < z.pow(2).mean().item() < 1.8  # the JL variance, not more
    assert z.abs().max() > 0.05  # and it is a random projection (not exact)


@pytest.mark.parametrize("kind", ["sjlt", "gaussian", "rademacher", "identity"])
def test_chunked_projection_sums_to_whole(kind):
    n = 10_007  # prime: chunk boundaries fall inside generation tiles and parameters
    keep, d = (1.0, n) if kind == "identity" else (0.3, 96)
    p = SparseProjector(n, keep, d, kind=kind, seed=11, sjlt_nnz=3 if kind == "sjlt" else 1)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2))
    whole = p.project_chunk(v, 0)
    cuts = [0, 1, 513, 514, 4099, 8191, 10_000, n]
    shards = [(a, v[a:b]) for a, b in zip(cuts, cuts[1:])]
    summed = sum(p.project_chunk(s, a) for a, s in reversed(shards))  # any order
    torch.testing.assert_close(summed, whole, rtol=1e-5, atol=1e-5)
    # Parameter-by-parameter walk agrees too, and a fresh projector (no cache) gives the same bits.
    params = [v[:3000].reshape(30, 100), v[3000:3007], v[3007:].reshape(-1, 7)]
    torch.testing.assert_close(p.project(params), whole, rtol=1e-5, atol=1e-5)
    fresh = SparseProjector(n, keep, d, kind=kind, seed=11, sjlt_nnz=p.sjlt_nnz, cache=False)
    assert torch.equal(fresh.project_chunk(v, 0), whole)


@pytest.mark.parametrize("kind", ["sjlt", "gaussian", "rademacher"])
def test_same_seed_same_vectors_other_seed_other_vectors(kind):
    n = 3001
    v = torch.randn(n, generator=torch.Generator().manual_seed(5))
    a = SparseProjector(n, 0.2, 64, kind=kind, seed=9).project([v])
    b = SparseProjector(n, 0.2, 64, kind=kind, seed=9).project([v])
    c = SparseProjector(n, 0.2, 64, kind=kind, seed=10).project([v])
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_projector_columns():
    """Project unit vectors to read off matrix columns: sjlt sparse +-1/sqrt(s), dense entries N(0,1) / +-1."""
    n, d = 600, 64
    sj = SparseProjector(n, 1.0, d, kind="sjlt", seed=1, sjlt_nnz=4)
    for i in (0, 17, 599):
        col = sj.project_chunk(torch.ones(1), i)
        assert torch.count_nonzero(col) == 4
        assert torch.allclose(col.abs()[col != 0], torch.full((4,), 0.5))
        assert [torch.count_nonzero(blk).item() for blk in col.split(d // 4)] == [1, 1, 1, 1]
    rad = SparseProjector(n, 1.0, d, kind="rademacher", seed=1)
    assert set((rad.project_chunk(torch.ones(1), 3) * math.sqrt(d)).round().tolist()) == {-1.0, 1.0}
    gau = SparseProjector(n, 1.0, d, kind="gaussian", seed=1)
    entries = torch.cat([gau.project_chunk(torch.ones(1), i) * math.sqrt(d) for i in range(200)])
    assert abs(entries.mean().item()) < 0.05
    assert abs(entries.std().item() - 1.0) < 0.05
    assert 0.03 < (entries.abs() > 1.96).double().mean().item() < 0.07
    dropped = SparseProjector(n, 0.1, d, seed=1)
    out = set(range(n)) - set(dropped.kept_local_indices(0, n).tolist())
    assert torch.count_nonzero(dropped.project_chunk(torch.ones(1), min(out))) == 0


def test_bf16_input_and_validation():
    p = SparseProjector(100, 0.5, 16)
    out = p.project([torch.ones(100, dtype=torch.bfloat16)])
    assert out.dtype == torch.float32 and out.shape == (16,)
    with pytest.raises(ValueError, match="coordinates"):
        p.project([torch.ones(99)])
    with pytest.raises(ValueError, match="outside"):
        p.project_chunk(torch.ones(10), 95)
    for bad in [dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(kind="sparse"), dict(proj_dim=0),
                dict(sjlt_nnz=3), dict(seed=-1), dict(total_params=0), dict(layout="sparse")]:
        with pytest.raises(ValueError):
            SparseProjector(**{**dict(total_params=100, keep_ratio=0.5, proj_dim=16), **bad})


@pytest.mark.parametrize("kind,nnz,d", [("sjlt", 1, 96), ("sjlt", 3, 96), ("sjlt", 1, 32768), ("gaussian", 1, 96),
                                        ("rademacher", 1, 96)])
@pytest.mark.parametrize("keep", [0.3, 1.0])
def test_bitmask_layout_gives_the_index_layouts_bits_across_blocks(monkeypatch, kind, nnz, d, keep):
    """The accelerator layout (1 bit per coordinate, int16 sjlt codes up to d = 32768) selects
    the same coordinates with the same codes as the CPU layout, block after block."""
    n = 5003
    v = torch.randn(2, n, generator=torch.Generator().manual_seed(7))  # a batch of two slices
    one_block = SparseProjector(n, keep, d, kind, seed=2, sjlt_nnz=nnz, layout="index").project_chunk(v, 0)
    monkeypatch.setattr(projection, "_BLOCK", 1000)  # several blocks, the last one partial
    by_layout = {
        layout: SparseProjector(n, keep, d, kind, seed=2, sjlt_nnz=nnz, layout=layout).project_chunk(v, 0)
        for layout in ("index", "bitmask")
    }
    assert torch.equal(by_layout["index"], by_layout["bitmask"])
    bitmask = SparseProjector(n, keep, d, kind, seed=2, sjlt_nnz=nnz, layout="bitmask")
    split = bitmask.project_chunk(v[:, 11:], 11) + bitmask.project_chunk(v[:, :11], 0)  # blocks not at multiples of 8
    torch.testing.assert_close(split, one_block, rtol=1e-5, atol=1e-5)
    if kind == "sjlt":
        assert torch.equal(by_layout["index"], one_block)  # same additions in the same order
    else:  # tiles restart at block boundaries: the same sum, rounded differently
        torch.testing.assert_close(by_layout["index"], one_block, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,kind,d,nnz,want", [
    ("index", "sjlt", 32768, 1, 0.8),  # int32 index + int32 code per kept coordinate, keep 0.1
    ("bitmask", "sjlt", 32768, 1, 0.325),  # 1/8 + 2 bytes (int16 code) x keep
    ("bitmask", "sjlt", 65536, 2, 0.925),  # codes past int16: 1/8 + 2 x 4 bytes x keep
    ("bitmask", "rademacher", 64, 1, 0.525),  # 1/8 + a 4-byte column key x keep
])  # fmt: skip
def test_state_bytes_per_parameter(layout, kind, d, nnz, want):
    n = 400_000
    p = SparseProjector(n, 0.1, d, kind, seed=1, sjlt_nnz=nnz, layout=layout)
    assert p.state_bytes_per_parameter("cpu") == pytest.approx(want)
    assert p.state_bytes() == 0
    p.project_chunk(torch.ones(n), 0)
    # The kept set is random: its size within 1%.
    rows = 4 * (d // 32) if kind == "rademacher" else 0  # plus the dense row keys, O(d)
    assert (p.state_bytes() - 8 * rows) / n == pytest.approx(want, rel=0.01)
    p.project_chunk(torch.ones(n), 0)
    assert (p.state_bytes() - 8 * rows) / n == pytest.approx(want, rel=0.01)  # built once
    assert SparseProjector(n, 1.0, 64, layout=layout).state_bytes_per_parameter("cpu") == (4 if layout == "index" else 2)


def test_auto_layout_is_index_on_cpu_bitmask_elsewhere():
    p = SparseProjector(1000, 0.1, 32768)
    assert p.state_bytes_per_parameter("cpu") == pytest.approx(0.8)
    assert p.state_bytes_per_parameter("cuda") == pytest.approx(0.325)


def test_dense_cost_limit_names_the_cost():
    check_dense_cost("gaussian", 10_000_000, 0.1, 4096)  # 4e9 entries: allowed
    check_dense_cost("sjlt", 10**11, 1.0, 32768)  # one pass over the gradient: no limit
    with pytest.raises(ValueError, match=r"32768 x 150,000,000 = 4\.9e\+12 matrix entries .* about 17,203 s each"):
        check_dense_cost("rademacher", 1_500_000_000, 0.1, 32768)
