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

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dcomp.compressors import numba_disabled
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
def kmeans1d(values: torch.Tensor, k: int, init: str = "linear", max_iter: int = 1000, seed: int = 0,
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
    xn = x.numpy()
    n = xn.size
    if n == 0:
        return KMeansResult(torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.0, 0, True, 0)
    xs = np.sort(xn)  # numpy's SIMD sort: several times faster than torch.sort on CPU
    if not (np.isfinite(xs[0]) and np.isfinite(xs[-1])):  # NaN sorts last, infinities to the ends
        raise UsageError("k-means: the weights contain NaN or infinity; fix the model before quantizing")
    kernels = _kernels() if n >= NUMBA_MIN else None
    prefix = np.empty(n + 1)
    if kernels is not None:
        distinct = int(kernels[0](xs, prefix))
    else:
        distinct = 1 + int(np.count_nonzero(xs[1:] != xs[:-1]))

    if distinct <= k:  # the codebook is the distinct values themselves: exact
        codebook = np.unique(xs)
        labels = np.searchsorted(codebook, xn)
        return KMeansResult(torch.from_numpy(codebook), torch.from_numpy(labels).long(), 0.0, 0, True, distinct)

    xs_t = torch.from_numpy(xs)
    if kernels is None:
        prefix[0] = 0.0
        prefix[1:] = torch.cumsum(xs_t, 0, dtype=torch.float64).numpy()
    if centroids is not None:
        c = np.sort(centroids.detach().reshape(-1).double().numpy())
        if c.size != k:
            raise UsageError(f"k-means: {c.size} initial centroids given for k={k}")
    else:
        c = init_centroids(xs_t, k, init, seed).numpy()

    # The loop works on k-sized numpy arrays: microseconds per iteration, no thread-pool overhead.
    splits: np.ndarray | None = None
    squares: np.ndarray | None = None
    iterations, converged = 0, False
    for _ in range(max_iter):
        # assignment step: a value belongs right of a boundary (a centroid midpoint) when it is >= it
        new_splits = np.searchsorted(xs, _f32_ceil((c[:-1] + c[1:]) * 0.5))
        if splits is not None and np.array_equal(new_splits, splits):
            converged = True
            break
        splits = new_splits
        iterations += 1
        # update step: the mean of each contiguous range, from the prefix sums
        edges = np.concatenate(([0], splits, [n]))
        counts = np.diff(edges)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        # means of ordered ranges are ordered, and an empty range's kept centroid lies between its
        # neighbours' new means, so c stays ascending and c[j] stays the centroid of range j
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        if relocate_empty and not counts.all():
            if squares is None:
                squares = np.empty(n + 1)
                if kernels is not None:
                    kernels[2](xs, squares)
                else:
                    squares[0] = 0.0
                    squares[1:] = torch.cumsum(xs_t.double() ** 2, 0).numpy()
            c = _relocate(c, edges, counts, sums, prefix, squares, xs)

    # final assignment: every value to its nearest centroid (as float32, the codebook that is stored)
    return _assign(x, xs, c.astype(np.float32), iterations, converged, distinct, with_inertia)


def _relocate(c, edges, counts, sums, prefix, squares, xs) -> np.ndarray:
    """Move empty clusters into the ranges with the largest squared error, splitting each at its mean."""
    empty = np.flatnonzero(counts == 0)
    lo, hi = edges[:-1], edges[1:]
    sse = np.maximum((squares[hi] - squares[lo]) - sums * sums / np.maximum(counts, 1), 0.0)
    splittable = (counts >= 2) & (xs[np.maximum(hi - 1, 0)] > xs[np.minimum(lo, xs.size - 1)])
    sse = np.where(splittable, sse, -1.0)
    m = min(empty.size, int(np.count_nonzero(splittable)))
    if m == 0:
        return c
    donors = np.argsort(-sse, kind="stable")[:m]
    dlo, dhi = lo[donors], hi[donors]
    cut = np.clip(np.searchsorted(xs, _f32_ceil(c[donors])), dlo + 1, dhi - 1)
    left = (prefix[cut] - prefix[dlo]) / (cut - dlo)
    right = (prefix[dhi] - prefix[cut]) / (dhi - cut)
    c = c.copy()
    c[donors] = left
    c[empty[:m]] = right
    return np.sort(c)


def _assign(x: torch.Tensor, xs: np.ndarray, codebook: np.ndarray, iterations: int, converged: bool,
            distinct: int, with_inertia: bool) -> KMeansResult:
    """Nearest-entry labels of ``x`` for an ascending float32 ``codebook``; unused entries are dropped."""
    n = xs.size
    mids = _f32_ceil((codebook[:-1].astype(np.float64) + codebook[1:]) * 0.5)
    counts = np.diff(np.concatenate(([0], np.searchsorted(xs, mids), [n])))
    used = counts > 0
    kernels = _kernels() if n >= NUMBA_MIN and mids.size else None
    if kernels is not None:
        labels = torch.empty(n, dtype=torch.long)
        kernels[1](x.numpy(), mids.astype(np.float32), labels.numpy())
    else:
        labels = torch.searchsorted(torch.from_numpy(mids), x, right=True)
    if not used.all():
        labels = torch.from_numpy(np.cumsum(used) - 1)[labels]
        codebook = codebook[used]
    inertia = float("nan")
    if with_inertia:
        labels_sorted = torch.repeat_interleave(torch.arange(codebook.size), torch.from_numpy(counts[used]))
        err = torch.from_numpy(xs).double() - torch.from_numpy(codebook).double()[labels_sorted]
        inertia = float((err * err).sum())
    return KMeansResult(torch.from_numpy(codebook.copy()), labels, inertia, iterations, converged, distinct)


# ---- optional compiled kernels (numba) for large inputs --------------------------------------------
# Below NUMBA_MIN values (or with DCOMP_NO_NUMBA=1, or without numba) the numpy/torch code above is
# used; both give identical results (tests compare them). The kernels are compiled once and cached.

NUMBA_MIN = 1 << 23  # numba costs ~1-3 s once per process (import, LLVM, cache load): pays off on big layers
_KERNELS: object = False


def _kernels():
    global _KERNELS
    if _KERNELS is False:
        _KERNELS = None
        if not numba_disabled():
            try:
                _KERNELS = _build_kernels()
            except Exception:  # noqa: BLE001 - numba missing or broken: use numpy/torch
                _KERNELS = None
    return _KERNELS


def warm_up() -> bool:
    """Compile (or load from numba's cache) the kernels now, so a timing run does not include it."""
    kernels = _kernels()
    if kernels is None:
        return False
    xs = np.array([-1.0, 0.0, 2.0], dtype=np.float32)
    out = np.empty(4)
    kernels[0](xs, out)
    kernels[2](xs, out)
    kernels[1](xs, np.array([0.5], dtype=np.float32), np.empty(3, dtype=np.int64))
    return True


def _build_kernels():
    import numba

    @numba.njit(cache=True, nogil=True)
    def prefix_distinct(xs, prefix):  # pragma: no cover - compiled
        # prefix[i] = sum of xs[:i] in float64, and the number of distinct values of sorted xs
        s = 0.0
        d = 1
        prefix[0] = 0.0
        for i in range(xs.size):
            s += xs[i]
            prefix[i + 1] = s
            if i > 0 and xs[i] != xs[i - 1]:
                d += 1
        return d

    @numba.njit(cache=True, nogil=True, parallel=True)
    def labels_right(x, mids, out):  # pragma: no cover - compiled
        # out[i] = number of mids <= x[i] (searchsorted side="right"), mids ascending, non-empty;
        # a branch-free binary search (the comparison picks the half, no unpredictable jumps)
        m = mids.size
        for i in numba.prange(x.size):
            v = x[i]
            base = 0
            n = m
            while n > 1:
                half = n >> 1
                base = base + half if mids[base + half - 1] <= v else base
                n -= half
            out[i] = base + (mids[base] <= v)

    @numba.njit(cache=True, nogil=True)
    def prefix_squares(xs, out):  # pragma: no cover - compiled
        s = 0.0
        out[0] = 0.0
        for i in range(xs.size):
            v = np.float64(xs[i])
            s += v * v
            out[i + 1] = s
        return 0

    return prefix_distinct, labels_right, prefix_squares


def _f32_ceil(b: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each float64 value: for float32 x, x >= b exactly when x >= _f32_ceil(b)."""
    f = b.astype(np.float32)
    return np.where(f.astype(np.float64) < b, np.nextafter(f, np.float32(np.inf)), f)


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


# ---- rate-distortion (entropy-constrained) rounding ----------------------------------------------

RD_CHUNK = 1 << 16  # values per block of the (values x levels) cost table


@dataclass
class RDResult:
    codebook: torch.Tensor   # float32 (k_used,), ascending, every entry used
    labels: torch.Tensor     # int64 (n,), input order
    bits: float              # empirical entropy of the labels, bits per value (order-0 code length)
    mse: float               # mean squared error against the float32 codebook
    iterations: int
    converged: bool


@torch.no_grad()
def rd_quantize1d(values: torch.Tensor, codebook: torch.Tensor, lam: float, update_centroids: bool = True,
                  max_iter: int = 100) -> RDResult:
    """Entropy-constrained quantization (Chou, Lookabaugh & Gray 1989) of 1-D ``values``.

    Each value goes to the level minimising ``(x - c_j)^2 / var(x) + lam * L_j``, where
    ``L_j = -log2 p_j`` is the code length of level j under the current label frequencies: a value
    near the boundary of two levels goes to the more frequent one, which costs a little distortion
    and saves bits once the labels are entropy-coded (Huffman / rANS in the .dcz). The frequencies
    (and, with ``update_centroids``, the levels as the means of their values, i.e. entropy-
    constrained k-means; without it a fixed grid such as a uniform one) are re-estimated until the
    labels stop changing. ``lam = 0`` is plain nearest-level rounding (one Lloyd step). Levels
    that lose every value are dropped (their code length is infinite). Vectorised over blocks of
    ``RD_CHUNK`` values, no loop over values."""
    x = values.detach().reshape(-1).to("cpu", torch.float64)
    c = torch.sort(codebook.detach().reshape(-1).double()).values
    n = x.numel()
    if n == 0 or c.numel() == 0:
        return RDResult(codebook.float().reshape(-1)[:0], torch.zeros(n, dtype=torch.long), 0.0, 0.0, 0, True)
    if not bool(torch.isfinite(x).all()):
        raise UsageError("rate-distortion rounding: the weights contain NaN or infinity; fix the model first")
    var = float(x.var()) if n > 1 else 0.0
    var = var if var > 0 else 1.0
    lengths = torch.full_like(c, math.log2(c.numel()))
    labels = None
    iterations, converged = 0, False
    for _ in range(max_iter):
        c32 = c.float().double()  # judge against the float32 levels that are stored
        new = torch.empty(n, dtype=torch.long)
        for i in range(0, n, RD_CHUNK):
            xb = x[i:i + RD_CHUNK]
            cost = (xb[:, None] - c32[None, :]) ** 2 / var + lam * lengths[None, :]
            new[i:i + RD_CHUNK] = cost.argmin(1)
        iterations += 1
        if labels is not None and torch.equal(new, labels):
            converged = True
            break
        labels = new
        counts = torch.bincount(labels, minlength=c.numel()).double()
        used = counts > 0
        if update_centroids:
            sums = torch.zeros_like(c).scatter_add_(0, labels, x)
            c = torch.where(used, sums / counts.clamp(min=1), c)
        p = counts / n
        lengths = torch.where(used, -torch.log2(p.clamp(min=1e-300)), torch.full_like(p, float("inf")))
        if lam == 0 and not update_centroids:
            converged = True
            break
    # keep the used levels, ascending, and relabel
    counts = torch.bincount(labels, minlength=c.numel())
    used = counts > 0
    remap = torch.cumsum(used.long(), 0) - 1
    cb = c[used].float()
    order = torch.argsort(cb)  # means of a converged ECVQ stay ordered; sort anyway
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    labels = inv[remap[labels]]
    cb = cb[order]
    p = counts[used].double() / n
    bits = float(-(p * torch.log2(p)).sum())
    mse = float(((x - cb.double()[labels]) ** 2).mean())
    return RDResult(cb.contiguous(), labels, bits, mse, iterations, converged)


def uniform_levels(values: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` equally spaced levels from the smallest to the largest value (float64, ascending)."""
    v = values.detach().reshape(-1).double()
    if v.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)


def label_entropy(labels: torch.Tensor) -> float:
    """Empirical order-0 entropy of integer labels, bits per label."""
    if labels.numel() == 0:
        return 0.0
    p = torch.bincount(labels.reshape(-1).long()).double()
    p = p[p > 0] / labels.numel()
    return float(-(p * torch.log2(p)).sum())
