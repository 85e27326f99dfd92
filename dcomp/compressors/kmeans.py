"""Fast 1-D k-means for weight sharing.

In one dimension the clusters of a Lloyd iteration are contiguous ranges of the SORTED values:
the boundary between neighbouring centroids ``c_i < c_(i+1)`` is their midpoint. So the values
are sorted once (O(n log n)); after that one Lloyd iteration is

    boundaries = midpoints of the sorted centroids
    splits     = searchsorted(sorted values, boundaries)          O(k log n)
    centroid_j = (S[split_j+1] - S[split_j]) / (split_j+1 - split_j)   with S the prefix sums, O(k)

and the iteration has converged exactly when the splits stop changing. This gives the same
sequence of centroids as a textbook Lloyd over the points (up to ties exactly on a midpoint),
at O(k log n) per iteration instead of O(n k).

``optimal_kmeans1d`` is the exact globally optimal 1-D k-means by dynamic programming
(O(k n^2) time, O(k n) memory) over the distinct values, for small inputs and for tests.

Empty clusters keep their centroid during the iterations and are dropped at the end: the
result holds only the clusters that are used, sorted ascending. When there are no more
distinct values than ``k``, the codebook is exactly the distinct values (zero error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dcomp.errors import UsageError

Init = Literal["linear", "density", "random"]
INITS = ("linear", "density", "random")


@dataclass
class KMeansResult:
    codebook: torch.Tensor   # float32 (k_used,), ascending, every entry used by at least one value
    labels: torch.Tensor     # int64 (n,): index into codebook for each input value, input order
    inertia: float           # sum of squared errors against the float32 codebook
    iterations: int          # Lloyd iterations run (0 when the values were taken as they are)
    converged: bool          # splits stopped changing (or no iteration was needed)
    distinct: int            # number of distinct input values


def init_centroids(xs: torch.Tensor, k: int, init: str, seed: int = 0) -> torch.Tensor:
    """Initial centroids (float64, ascending) for SORTED values ``xs``.

    linear:  evenly spaced between min and max (Han et al.'s best)
    density: evenly spaced on the empirical CDF (the value at quantile (i + 1/2) / k)
    random:  k values sampled without replacement (seeded)
    """
    n = xs.numel()
    if init == "linear":
        return torch.linspace(float(xs[0]), float(xs[-1]), k, dtype=torch.float64)
    if init == "density":
        idx = ((torch.arange(k, dtype=torch.float64) + 0.5) * (n / k)).long().clamp_(0, n - 1)
        return xs[idx].double()
    if init == "random":
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(n, generator=g)[:k] if n <= (1 << 24) else torch.randint(n, (k,), generator=g)
        return torch.sort(xs[idx].double()).values
    raise UsageError(f"unknown k-means init {init!r}: use one of {', '.join(INITS)}")


@torch.no_grad()
def kmeans1d(values: torch.Tensor, k: int, init: str = "linear", max_iter: int = 300, seed: int = 0,
             centroids: torch.Tensor | None = None, with_inertia: bool = True,
             relocate_empty: bool = True) -> KMeansResult:
    """Lloyd's k-means on 1-D ``values`` with sorted boundaries; see the module docstring.

    ``centroids`` (optional) gives the initial centroids directly and overrides ``init``.
    The returned labels are the nearest-centroid assignment to the final float32 codebook.
    ``with_inertia=False`` skips the O(n) error sum (``inertia`` is then NaN).
    ``relocate_empty``: a cluster left empty takes over half of the range with the largest squared
    error (split at its mean), so no codebook entry is wasted (pruned layers leave a gap around
    zero where linearly spaced centroids find no weights).
    """
    if k < 1:
        raise UsageError(f"k-means needs at least one cluster, got k={k}")
    if max_iter < 1:
        raise UsageError(f"k-means max_iter must be >= 1, got {max_iter}")
    x = values.detach().reshape(-1).to("cpu", torch.float32).contiguous()
    n = x.numel()
    if n == 0:
        return KMeansResult(torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.0, 0, True, 0)
    if not torch.isfinite(x).all():
        raise UsageError("k-means: the weights contain NaN or infinity; fix the model before quantizing")
    xs = torch.from_numpy(np.sort(x.numpy()))  # numpy's SIMD sort: ~10x faster than torch.sort here
    new_value = xs[1:] != xs[:-1]
    distinct = 1 + int(new_value.sum())

    if distinct <= k:  # the codebook is the distinct values themselves: exact
        codebook = xs[torch.cat([torch.ones(1, dtype=torch.bool), new_value])].clone()
        labels = torch.searchsorted(codebook, x)
        return KMeansResult(codebook, labels, 0.0, 0, True, distinct)

    prefix = torch.zeros(n + 1, dtype=torch.float64)
    torch.cumsum(xs, 0, dtype=torch.float64, out=prefix[1:])
    if centroids is not None:
        c = torch.sort(centroids.detach().reshape(-1).double()).values
        if c.numel() != k:
            raise UsageError(f"k-means: {c.numel()} initial centroids given for k={k}")
    else:
        c = init_centroids(xs, k, init, seed)

    ends = torch.tensor([n], dtype=torch.long)
    zero = torch.zeros(1, dtype=torch.long)
    splits: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    iterations, converged = 0, False
    for _ in range(max_iter):
        # assignment step: a value belongs right of a boundary (a centroid midpoint) when it is >= it
        new_splits = torch.searchsorted(xs, _f32_ceil((c[:-1] + c[1:]) * 0.5))
        if splits is not None and torch.equal(new_splits, splits):
            converged = True
            break
        splits = new_splits
        iterations += 1
        # update step: the mean of each contiguous range, from the prefix sums
        edges = torch.cat([zero, splits, ends])
        counts = edges[1:] - edges[:-1]
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        # means of ordered ranges are ordered, and an empty range's kept centroid lies between its
        # neighbours' new means, so c stays ascending and c[j] stays the centroid of range j
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        if relocate_empty and bool((counts == 0).any()):
            if squares is None:
                squares = torch.zeros(n + 1, dtype=torch.float64)
                torch.cumsum(xs.double() ** 2, 0, out=squares[1:])
            c = _relocate(c, edges, counts, sums, prefix, squares, xs)

    # final assignment: every value to its nearest centroid (as float32, the codebook that is stored)
    codebook = c.float()
    return _assign(x, xs, codebook, iterations, converged, distinct, with_inertia)


def _relocate(c, edges, counts, sums, prefix, squares, xs) -> torch.Tensor:
    """Move empty clusters into the ranges with the largest squared error, splitting each at its mean."""
    empty = torch.nonzero(counts == 0).squeeze(1)
    lo, hi = edges[:-1], edges[1:]
    cnt = counts.double().clamp(min=1)
    sse = ((squares[hi] - squares[lo]) - sums * sums / cnt).clamp(min=0)
    sse = torch.where((counts >= 2) & (xs[(hi - 1).clamp(min=0)] > xs[lo.clamp(max=xs.numel() - 1)]), sse,
                      torch.full_like(sse, -1.0))
    m = min(empty.numel(), int((sse >= 0).sum()))
    if m == 0:
        return c
    donors = torch.topk(sse, m).indices
    dlo, dhi = lo[donors], hi[donors]
    cut = torch.searchsorted(xs, _f32_ceil(c[donors])).clamp(min=dlo + 1, max=dhi - 1)
    left = (prefix[cut] - prefix[dlo]) / (cut - dlo).double()
    right = (prefix[dhi] - prefix[cut]) / (dhi - cut).double()
    c = c.clone()
    c[donors] = left
    c[empty[:m]] = right
    return torch.sort(c).values


def _assign(x: torch.Tensor, xs: torch.Tensor, codebook: torch.Tensor, iterations: int, converged: bool,
            distinct: int, with_inertia: bool) -> KMeansResult:
    """Nearest-entry labels of ``x`` for an ascending ``codebook``; unused entries are dropped."""
    n = x.numel()
    mids = _f32_ceil((codebook[:-1].double() + codebook[1:].double()) * 0.5)
    splits = torch.searchsorted(xs, mids)
    counts = torch.diff(torch.cat([torch.zeros(1, dtype=torch.long), splits, torch.tensor([n])]))
    used = counts > 0
    labels = torch.searchsorted(mids, x, right=True)
    if not bool(used.all()):
        labels = (torch.cumsum(used.long(), 0) - 1)[labels]
        codebook = codebook[used]
    inertia = float("nan")
    if with_inertia:
        labels_sorted = torch.repeat_interleave(torch.arange(codebook.numel()), counts[used])
        inertia = float(((xs.double() - codebook.double()[labels_sorted]) ** 2).sum())
    return KMeansResult(codebook, labels, inertia, iterations, converged, distinct)


def _f32_ceil(b: torch.Tensor) -> torch.Tensor:
    """The smallest float32 >= each float64 value: for float32 x, x >= b exactly when x >= _f32_ceil(b)."""
    f = b.float()
    low = f.double() < b
    return torch.where(low, torch.nextafter(f, torch.full_like(f, float("inf"))), f)


@torch.no_grad()
def optimal_kmeans1d(values: torch.Tensor, k: int, max_distinct: int = 4096) -> KMeansResult:
    """Globally optimal 1-D k-means (dynamic programming over the sorted distinct values).

    D[j][i] = min over m of D[j-1][m] + cost(m..i-1); vectorised over i and m per cluster count,
    so memory is O(d^2) for d distinct values: refused above ``max_distinct``.
    """
    x = values.detach().reshape(-1).to("cpu", torch.float32)
    n = x.numel()
    if n == 0:
        return KMeansResult(torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.0, 0, True, 0)
    uniq, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    d = uniq.numel()
    if d <= k:
        return KMeansResult(uniq.clone(), inverse, 0.0, 0, True, d)
    if d > max_distinct:
        raise UsageError(f"optimal k-means is O(d^2) in memory: {d} distinct values is more than "
                         f"{max_distinct}; use the Lloyd k-means instead")
    u = uniq.double()
    w = counts.double()
    cw = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w, 0)])
    cs = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w * u, 0)])
    cq = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w * u * u, 0)])
    # cost[m, i] = SSE of the distinct values m..i-1 (m < i), +inf elsewhere
    m_idx = torch.arange(d + 1).unsqueeze(1)
    i_idx = torch.arange(d + 1).unsqueeze(0)
    sw = cw[i_idx] - cw[m_idx]
    ss = cs[i_idx] - cs[m_idx]
    sq = cq[i_idx] - cq[m_idx]
    cost = (sq - ss * ss / sw.clamp(min=1e-300)).clamp(min=0.0)
    cost = torch.where(m_idx < i_idx, cost, torch.full_like(cost, float("inf")))
    D = cost[0].clone()  # one cluster: values 0..i-1
    back = []
    for _ in range(1, k):
        cand = D.unsqueeze(1) + cost  # cand[m, i]
        best, arg = cand.min(dim=0)
        back.append(arg)
        D = best
    # walk back from i = d with k clusters
    bounds = [d]
    i = d
    for arg in reversed(back):
        i = int(arg[i])
        bounds.append(i)
    bounds.append(0)
    bounds = torch.tensor(bounds[::-1])
    seg_counts = bounds[1:] - bounds[:-1]
    keep = seg_counts > 0
    lo, hi = bounds[:-1][keep], bounds[1:][keep]
    codebook = ((cs[hi] - cs[lo]) / (cw[hi] - cw[lo])).float()
    label_of_distinct = torch.repeat_interleave(torch.arange(int(keep.sum())), seg_counts[keep])
    labels = label_of_distinct[inverse]
    inertia = float(((x.double() - codebook.double()[labels]) ** 2).sum())
    return KMeansResult(codebook, labels, inertia, 0, True, d)


def inertia_of(values: torch.Tensor, codebook: torch.Tensor) -> float:
    """Sum of squared distances of ``values`` to their nearest entry of ``codebook`` (float64)."""
    x = values.detach().reshape(-1).double()
    cb = torch.sort(codebook.detach().reshape(-1).double()).values
    if cb.numel() == 1:
        return float(((x - cb[0]) ** 2).sum())
    idx = torch.searchsorted((cb[:-1] + cb[1:]) * 0.5, x)
    return float(((x - cb[idx]) ** 2).sum())
