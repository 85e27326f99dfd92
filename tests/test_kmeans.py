"""1-D k-means: same answer as a textbook Lloyd, near the DP optimum, exact on few distinct values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcomp.compressors.kmeans import inertia_of, init_centroids, kmeans1d, optimal_kmeans1d
from dcomp.errors import UsageError


def lloyd_reference(x: np.ndarray, c: np.ndarray, iters: int) -> np.ndarray:
    """Textbook Lloyd over the points (O(n k) per iteration), for comparison."""
    c = c.astype(np.float64).copy()
    for _ in range(iters):
        lab = np.abs(x[:, None] - c[None, :]).argmin(1)
        for j in range(len(c)):
            if (lab == j).any():
                c[j] = x[lab == j].mean()
    return np.sort(c)


def test_matches_textbook_lloyd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, generator=g)
    r = kmeans1d(x, 8, max_iter=500, relocate_empty=False)
    assert r.converged
    init = init_centroids(torch.sort(x).values, 8, "linear").numpy()
    ref = lloyd_reference(x.double().numpy(), init, 500)
    np.testing.assert_allclose(r.codebook.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_labels_are_nearest_centroid_and_inertia_consistent():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2)) ** 3
    r = kmeans1d(x, 16)
    assert r.codebook.dtype == torch.float32 and r.labels.shape == x.shape
    assert torch.all(r.codebook[1:] >= r.codebook[:-1])
    dist = (x[:, None].double() - r.codebook[None, :].double()).abs()
    chosen = dist.gather(1, r.labels[:, None]).squeeze(1)
    assert torch.all(chosen <= dist.min(1).values + 1e-12)
    assert r.inertia == pytest.approx(inertia_of(x, r.codebook), rel=1e-9)
    assert r.inertia == pytest.approx(float(((x.double() - r.codebook.double()[r.labels]) ** 2).sum()), rel=1e-9)


def test_close_to_optimal_dp():
    # Lloyd finds a local optimum; linear init can leave an outlier a cluster of its own
    x = torch.randn(800, generator=torch.Generator().manual_seed(3))
    opt = optimal_kmeans1d(x, 8)
    for init, bound in (("linear", 1.3), ("density", 1.05), ("random", 1.05)):
        r = kmeans1d(x, 8, init=init, seed=5)
        assert opt.inertia <= r.inertia + 1e-9
        assert r.inertia <= bound * opt.inertia, init


def test_fewer_distinct_values_than_k_is_exact():
    x = torch.tensor([0.5, -1.0, 0.5, 2.0, -1.0, 2.0, 2.0])
    r = kmeans1d(x, 32)
    assert r.codebook.tolist() == [-1.0, 0.5, 2.0]
    assert torch.equal(r.codebook[r.labels], x)
    assert r.inertia == 0.0 and r.distinct == 3
    d = optimal_kmeans1d(x, 32)
    assert torch.equal(d.codebook[d.labels], x)


def test_empty_clusters_are_relocated_across_a_pruning_gap():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(4))
    x = x[x.abs() > 1.0]  # what magnitude pruning leaves: nothing near zero
    kept = kmeans1d(x, 32, relocate_empty=False)
    moved = kmeans1d(x, 32)
    assert kept.codebook.numel() < 32 and moved.codebook.numel() == 32
    assert moved.inertia < kept.inertia


def test_edge_cases():
    assert kmeans1d(torch.zeros(0), 4).codebook.numel() == 0
    r = kmeans1d(torch.tensor([3.0]), 4)
    assert r.codebook.tolist() == [3.0] and r.labels.tolist() == [0]
    with pytest.raises(UsageError, match="NaN"):
        kmeans1d(torch.tensor([1.0, float("nan"), 2.0]), 2)
    with pytest.raises(UsageError, match="init"):
        kmeans1d(torch.randn(100), 4, init="kmeans++")
    with pytest.raises(UsageError, match="at least one cluster"):
        kmeans1d(torch.randn(10), 0)


def test_random_init_is_seeded():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(6))
    a, b = kmeans1d(x, 8, init="random", seed=1, max_iter=2), kmeans1d(x, 8, init="random", seed=1, max_iter=2)
    assert torch.equal(a.codebook, b.codebook)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=200),
       st.integers(1, 6))
def test_property_at_most_k_values_and_nearest(values, bits):
    x = torch.tensor(values, dtype=torch.float32)
    k = 2 ** bits
    r = kmeans1d(x, k, max_iter=50)
    assert 1 <= r.codebook.numel() <= k
    assert int(r.labels.min()) >= 0 and int(r.labels.max()) < r.codebook.numel()
    assert torch.unique(r.codebook[r.labels]).numel() <= k
    # every value sits at its nearest codebook entry
    dist = (x[:, None].double() - r.codebook[None, :].double()).abs()
    assert torch.all(dist.gather(1, r.labels[:, None]).squeeze(1) <= dist.min(1).values + 1e-9)


@pytest.mark.parametrize("k, gap", [(2, False), (7, False), (32, False), (32, True)])
def test_compiled_kernels_give_identical_results(monkeypatch, k, gap):
    import dcomp.compressors.kmeans as km

    if km._kernels() is None:
        pytest.skip("numba not available")
    x = torch.randn(20000, generator=torch.Generator().manual_seed(7)) ** 3
    if gap:  # empty clusters: the relocation path (prefix of squares) runs
        x = x[x.abs() > 0.5]
    monkeypatch.setattr(km, "NUMBA_MIN", 0)
    fast = km.kmeans1d(x, k)
    monkeypatch.setattr(km, "NUMBA_MIN", 1 << 62)
    plain = km.kmeans1d(x, k)
    assert torch.equal(fast.codebook, plain.codebook) and torch.equal(fast.labels, plain.labels)
    assert fast.iterations == plain.iterations and fast.distinct == plain.distinct
