"""Compiled sparse-codebook kernels (numba): ``y = x W^T + b`` and sparse convolution, straight
from a compressed layout, for batch 1 to 64, multithreaded over output rows.

Layout (built once at load from the pruned, weight-shared tensor; see ``compress``):

    rowptr    int32 (rows + 1,)   where each output row's non-zeros start (CSR)
    cols      uint16 when the row length (in_features, or in_channels*kh*kw) fits, else int32:
              the column of each non-zero (for a convolution: its offset in the padded input)
    codes     uint8 codebook index of each non-zero, when the layer has at most 256 distinct
              non-zero values (what ``dcomp quantize`` leaves: 5-bit fc, 8-bit conv); else the
              float32 values themselves
    codebook  float32 (<= 256,), a few hundred bytes that stay in L1

At 95% zeros with a codebook that is 3 bytes per non-zero against 4 bytes per weight dense: 27x
fewer bytes to stream for a 4096x4096 layer (2.5 MiB instead of 64 MiB, which fits the L2/L3
caches where the dense matrix never does).

Threads: ``ChunkPool`` (below) runs row chunks, balanced by non-zeros, on the calling thread and
``threads - 1`` helper threads that *sleep* on a condition variable between calls and take chunks
from a shared counter. Chosen deliberately over numba's ``prange`` (workqueue/omp/tbb layers) and
torch's OpenMP: those split the rows statically into one piece per thread, so when another process
holds a core, the call waits a whole scheduler tick (10-20 ms measured) for the descheduled piece.
Here a helper that is not running takes no chunk and the caller does the work; nothing spins. The
kernels release the GIL (``nogil``).

No per-call allocation: each layer keeps its output (and, for batches > 1 or padded convolutions,
input staging) buffers per batch size, made on the first call with that batch size. The array a
layer returns is that buffer: it is overwritten by the layer's next call with the same batch size.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from dcomp.errors import UsageError


# Below this many multiply-adds a layer runs on the calling thread only: waking a helper costs
# ~20-50 us, more than the work.
PARALLEL_MIN_WORK = 1 << 17

try:
    from numba import njit
    from numba.core import types as _nbtypes
    from numba.extending import overload
except ImportError:  # numba is a dependency; without it only the torch kernel of the hybrid path works
    njit = None

_OPTS = dict(nogil=True, fastmath=True, cache=True, boundscheck=False)


def numba_kernels() -> dict[str, Any]:
    if njit is None:
        raise UsageError("the compiled sparse kernel needs the numba package (pip install numba)")
    return {"lin_mv": _lin_mv, "lin_mm": _lin_mm, "conv": _conv, "conv_wide": _conv_wide, "maxpool": _maxpool}


def _value(codes, codebook, k):
    """The k-th non-zero's value: ``codebook[codes[k]]`` for uint8 codes, else ``codes[k]`` (raw
    float32 values passed as ``codes``). Chosen by type when a kernel compiles."""
    raise NotImplementedError  # only called from compiled code


if njit is not None:
    @overload(_value, inline="always")
    def _value_impl(codes, codebook, k):
        if codes.dtype == _nbtypes.uint8:
            return lambda codes, codebook, k: codebook[codes[k]]
        return lambda codes, codebook, k: codes[k]

    @njit(**_OPTS)
    def _lin_mv(rowptr, cols, codes, codebook, bias, x2, y2, r0, r1, relu):
        # y[i] = bias[i] + sum_k value(k) * x[cols[k]];  x2: (1, in), y2: (1, out)
        x = x2[0]
        y = y2[0]
        for i in range(r0, r1):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            k = rowptr[i]
            end = rowptr[i + 1]
            while k + 4 <= end:  # four accumulators: one chain of adds would be latency-bound
                a0 += _value(codes, codebook, k) * x[cols[k]]
                a1 += _value(codes, codebook, k + 1) * x[cols[k + 1]]
                a2 += _value(codes, codebook, k + 2) * x[cols[k + 2]]
                a3 += _value(codes, codebook, k + 3) * x[cols[k + 3]]
                k += 4
            while k < end:
                a0 += _value(codes, codebook, k) * x[cols[k]]
                k += 1
            v = bias[i] + ((a0 + a1) + (a2 + a3))
            y[i] = max(v, np.float32(0.0)) if relu else v
    
    @njit(**_OPTS)
    def _lin_mm(rowptr, cols, codes, codebook, bias, xt, acc, y, r0, r1, relu):
        # xt: (in, B) the input transposed, so the inner loop runs over the batch contiguously
        # (vectorised); acc: (out, B) scratch; y: (B, out). Four non-zeros per pass over the
        # batch (eight from batch 32), so the accumulator row is loaded and stored 4-8x less.
        nb = xt.shape[1]
        for i in range(r0, r1):
            a = acc[i]
            bi = bias[i]
            for b in range(nb):
                a[b] = bi
            k = rowptr[i]
            end = rowptr[i + 1]
            if nb >= 32:
                while k + 8 <= end:
                    v0 = _value(codes, codebook, k)
                    v1 = _value(codes, codebook, k + 1)
                    v2 = _value(codes, codebook, k + 2)
                    v3 = _value(codes, codebook, k + 3)
                    v4 = _value(codes, codebook, k + 4)
                    v5 = _value(codes, codebook, k + 5)
                    v6 = _value(codes, codebook, k + 6)
                    v7 = _value(codes, codebook, k + 7)
                    x0 = xt[cols[k]]
                    x1 = xt[cols[k + 1]]
                    x2 = xt[cols[k + 2]]
                    x3 = xt[cols[k + 3]]
                    x4 = xt[cols[k + 4]]
                    x5 = xt[cols[k + 5]]
                    x6 = xt[cols[k + 6]]
                    x7 = xt[cols[k + 7]]
                    for b in range(nb):
                        a[b] += (((v0 * x0[b] + v1 * x1[b]) + (v2 * x2[b] + v3 * x3[b]))
                                 + ((v4 * x4[b] + v5 * x5[b]) + (v6 * x6[b] + v7 * x7[b])))
                    k += 8
            while k + 4 <= end:
                v0 = _value(codes, codebook, k)
                v1 = _value(codes, codebook, k + 1)
                v2 = _value(codes, codebook, k + 2)
                v3 = _value(codes, codebook, k + 3)
                x0 = xt[cols[k]]
                x1 = xt[cols[k + 1]]
                x2 = xt[cols[k + 2]]
                x3 = xt[cols[k + 3]]
                for b in range(nb):
                    a[b] += (v0 * x0[b] + v1 * x1[b]) + (v2 * x2[b] + v3 * x3[b])
                k += 4
            while k < end:
                v = _value(codes, codebook, k)
                xr = xt[cols[k]]
                for b in range(nb):
                    a[b] += v * xr[b]
                k += 1
            for b in range(nb):
                y[b, i] = max(a[b], np.float32(0.0)) if relu else a[b]
    
    
    @njit(**_OPTS)
    def _conv(rowptr, offs, codes, codebook, bias, xp, y, oh, ow, wp, stride, r0, r1, relu):
        # Implicit im2col: output channel co at pixel (oy, ox) is
        #   bias + sum_k codebook[codes[k]] * xp[b, base(oy, ox) + offs[k]]
        # with base = oy*stride*wp + ox*stride and offs[k] = ci*hp*wp + ky*dil*wp + kx*dil (the
        # non-zero's place in the padded input). xp: (B, C*hp*wp), y: (B, Cout, oh*ow).
        nbatch = xp.shape[0]
        for b in range(nbatch):
            xb = xp[b]
            for co in range(r0, r1):
                out = y[b, co]
                bi = bias[co]
                for p in range(oh * ow):
                    out[p] = bi
                for k in range(rowptr[co], rowptr[co + 1]):
                    v = _value(codes, codebook, k)
                    o = offs[k]
                    for oy in range(oh):
                        src = o + oy * stride * wp
                        dst = oy * ow
                        if stride == 1:
                            for ox in range(ow):
                                out[dst + ox] += v * xb[src + ox]
                        else:
                            for ox in range(ow):
                                out[dst + ox] += v * xb[src + ox * stride]
                if relu:
                    for p in range(oh * ow):
                        out[p] = max(out[p], np.float32(0.0))
    
    @njit(**_OPTS)
    def _conv_wide(rowptr, offs, codes, codebook, bias, xp, wide, y, oh, ow, wp, pool, r0, r1, relu):
        # Stride 1: output row oy, column ox reads the padded input at base + oy*wp + ox, so over
        # a "wide" output of oh rows of wp columns (the last wp - ow columns are discarded) each
        # non-zero adds v * xp[o : o + oh*wp] to one contiguous run: a single long vectorised
        # loop instead of oh short ones, four non-zeros per pass. xp: (B, C*hp*wp + wp) (the tail
        # keeps the discarded columns' reads inside the buffer); wide: (B, Cout, oh*wp) scratch.
        # pool > 1: max-pooling (kernel = stride = pool) fused into the write-out; y then holds
        # (B, Cout, (oh // pool) * (ow // pool)).
        n = oh * wp
        nbatch = xp.shape[0]
        z = np.float32(0.0)
        for b in range(nbatch):
            xb = xp[b]
            for co in range(r0, r1):
                acc = wide[b, co]
                bi = bias[co]
                for q in range(n):
                    acc[q] = bi
                k = rowptr[co]
                end = rowptr[co + 1]
                while k + 4 <= end:
                    v0 = _value(codes, codebook, k)
                    v1 = _value(codes, codebook, k + 1)
                    v2 = _value(codes, codebook, k + 2)
                    v3 = _value(codes, codebook, k + 3)
                    x0 = xb[offs[k]:offs[k] + n]
                    x1 = xb[offs[k + 1]:offs[k + 1] + n]
                    x2 = xb[offs[k + 2]:offs[k + 2] + n]
                    x3 = xb[offs[k + 3]:offs[k + 3] + n]
                    for q in range(n):
                        acc[q] += (v0 * x0[q] + v1 * x1[q]) + (v2 * x2[q] + v3 * x3[q])
                    k += 4
                while k < end:
                    v = _value(codes, codebook, k)
                    xr = xb[offs[k]:offs[k] + n]
                    for q in range(n):
                        acc[q] += v * xr[q]
                    k += 1
                out = y[b, co]
                if pool == 1:
                    for oy in range(oh):
                        for ox in range(ow):
                            v = acc[oy * wp + ox]
                            out[oy * ow + ox] = max(v, z) if relu else v
                else:
                    pw_ = ow // pool
                    for py in range(oh // pool):
                        for px in range(pw_):
                            base = py * pool * wp + px * pool
                            m = acc[base]
                            for dy in range(pool):
                                for dx in range(pool):
                                    m = max(m, acc[base + dy * wp + dx])
                            out[py * pw_ + px] = max(m, z) if relu else m

    @njit(**_OPTS)
    def _maxpool(x, y, k, relu):
        # x: (B, C, H, W) -> y: (B, C, H//k, W//k), kernel = stride = k, no padding
        nb, nc, oh, ow = y.shape
        for b in range(nb):
            for c in range(nc):
                for oy in range(oh):
                    for ox in range(ow):
                        m = x[b, c, oy * k, ox * k]
                        for dy in range(k):
                            for dx in range(k):
                                m = max(m, x[b, c, oy * k + dy, ox * k + dx])
                        y[b, c, oy, ox] = max(m, np.float32(0.0)) if relu else m


# ---- the compressed layout ---------------------------------------------------------------------------

class Compressed:
    """A (rows, row_len) weight matrix in the layout above. ``cols`` holds column numbers; a
    convolution replaces them by input offsets (``SparseConv2d``)."""

    def __init__(self, w2d: np.ndarray, max_codebook: int = 256):
        w2d = np.ascontiguousarray(w2d, dtype=np.float32)
        self.rows, self.row_len = int(w2d.shape[0]), int(w2d.shape[1])
        nz = w2d != 0
        counts = nz.sum(axis=1)
        self.rowptr = np.zeros(self.rows + 1, np.int32)
        np.cumsum(counts, out=self.rowptr[1:])
        r, c = np.nonzero(w2d)  # row-major order: rows ascending, columns ascending within a row
        self.nnz = int(c.size)
        self.cols = c.astype(np.uint16 if self.row_len <= 65536 else np.int32)
        vals = w2d[r, c]
        uniq, inv = np.unique(vals, return_inverse=True)
        if 0 < uniq.size <= max_codebook:
            self.codebook = uniq.astype(np.float32)
            self.codes = inv.astype(np.uint8)
            self.vals = None
        else:
            self.codebook = None
            self.codes = None
            self.vals = vals.astype(np.float32)
        self.sparsity = 1.0 - self.nnz / max(w2d.size, 1)

    @property
    def nbytes(self) -> int:
        per = self.cols.itemsize + (1 if self.codes is not None else 4)
        return self.nnz * per + self.rowptr.nbytes + (self.codebook.nbytes if self.codebook is not None else 0)

    def to_dense(self) -> np.ndarray:
        w = np.zeros((self.rows, self.row_len), np.float32)
        r = np.repeat(np.arange(self.rows), np.diff(self.rowptr))
        w[r, self.cols.astype(np.int64)] = self.codebook[self.codes] if self.codes is not None else self.vals
        return w


def row_chunks(rowptr: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Split rows into at most ``n`` ranges holding about equal numbers of non-zeros."""
    rows = rowptr.shape[0] - 1
    if rows <= 0:
        return []
    cuts = np.searchsorted(rowptr, np.linspace(0, rowptr[-1], n + 1)[1:-1]).tolist()
    bounds = sorted(set([0, *[min(max(c, 0), rows) for c in cuts], rows]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class ChunkPool:
    """Run ``fn(r0, r1)`` over a list of row chunks with ``threads`` threads: the caller and
    ``threads - 1`` helpers sleeping on a condition variable take chunks from a shared counter
    until none is left. A helper that is descheduled simply takes no chunk (see the module doc)."""

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))
        self._cv = threading.Condition()
        self._gen = 0
        self._job: dict | None = None
        for _ in range(self.threads - 1):
            threading.Thread(target=self._helper, daemon=True, name="dcomp-sparse").start()

    def _helper(self):
        seen = 0
        while True:
            with self._cv:
                while self._gen == seen:
                    self._cv.wait()
                seen, job = self._gen, self._job
            self._work(job)

    def _work(self, job):
        chunks, fn, lock = job["chunks"], job["fn"], job["lock"]
        while True:
            with lock:
                i = job["next"]
                if i >= len(chunks):
                    return
                job["next"] = i + 1
            try:
                fn(*chunks[i])
            except BaseException as e:  # noqa: BLE001 - handed to the caller, never lost in a helper
                job["error"] = e
            finally:
                with lock:
                    job["done"] += 1
                    last = job["done"] == len(chunks)
                if last:
                    job["finished"].set()

    def run(self, fn, chunks: list[tuple[int, int]]) -> None:
        if self.threads == 1 or len(chunks) <= 1:
            for c in chunks:
                fn(*c)
            return
        job = {"fn": fn, "chunks": chunks, "next": 0, "done": 0, "lock": threading.Lock(),
               "finished": threading.Event()}
        with self._cv:
            self._job = job
            self._gen += 1
            self._cv.notify_all()
        self._work(job)
        job["finished"].wait()
        if job.get("error") is not None:
            raise job["error"]


_pools: dict[int, ChunkPool] = {}


def chunk_pool(threads: int) -> ChunkPool:
    threads = max(1, int(threads))
    if threads not in _pools:
        _pools[threads] = ChunkPool(threads)
    return _pools[threads]


def _compiled(disp, args):
    """The compiled entry point of numba dispatcher ``disp`` for these argument types (compiling
    it if needed): calling it skips the dispatcher's type matching, about 2 us per call, which is
    a third of a small layer's time. Falls back to the dispatcher."""
    from numba import typeof

    disp(*args)  # the callers pass an empty row range: compiles, computes nothing
    cres = disp.overloads.get(tuple(typeof(a) for a in args))
    return cres.entry_point if cres is not None else disp


class _Layer:
    """What the layer kinds share: row chunks for the pool, and one prepared call per batch size
    and ReLU flag holding its buffers (made on first use, reused after)."""

    def _setup_threads(self, threads: int) -> None:
        self.pool = chunk_pool(threads)
        # about 3 chunks per thread, none under ~32k multiply-adds (each chunk is a Python call)
        n = int(max(1, min(3 * self.pool.threads, self.work_per_sample // 32768)))
        self.chunks = row_chunks(self.w.rowptr, n)
        self._prepared: dict[tuple, Any] = {}
        self.codes, self.cb = (self.w.codes, self.w.codebook) if self.w.codes is not None else (self.w.vals, _NO_CODEBOOK)

    @property
    def sparsity(self) -> float:
        return self.w.sparsity

    @property
    def nnz(self) -> int:
        return self.w.nnz

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.bias.nbytes

    def _runner(self, ep, args_before, args_after, batch: int):
        """fn() running ``ep(*args_before, r0, r1, *args_after)`` over all rows: serially when
        the work is small or threads == 1, else in chunks on the pool."""
        rows = self.w.rows
        if self.pool.threads == 1 or self.work_per_sample * batch < PARALLEL_MIN_WORK or len(self.chunks) < 2:
            return lambda: ep(*args_before, 0, rows, *args_after)
        pool, chunks = self.pool, self.chunks
        return lambda: pool.run(lambda r0, r1: ep(*args_before, r0, r1, *args_after), chunks)

    def __call__(self, x: np.ndarray, relu: bool | None = None, pool: int = 1) -> np.ndarray:
        relu = self.relu if relu is None else bool(relu)
        batch = x.shape[0]
        fn = self._prepared.get((batch, relu, pool))
        if x.size != batch * self.in_features:
            raise ValueError(f"{self.name or 'layer'}: expected {self.in_features} input values per sample, "
                             f"got {x.size // max(batch, 1)}")
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if fn is None:
            fn = self._prepared[(batch, relu, pool)] = self._prepare(batch, relu, pool)
        return fn(x)


class SparseLinear(_Layer):
    """``y = x @ W.T + b`` (then ReLU if ``relu``) for x float32 (B, in)."""

    kind = "linear"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, threads: int = 1, relu: bool = False,
                 name: str = ""):
        self.name = name
        self.w = Compressed(np.asarray(weight, np.float32).reshape(weight.shape[0], -1))
        self.out_features, self.in_features = self.w.rows, self.w.row_len
        self.bias = np.zeros(self.out_features, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        self.relu = bool(relu)
        self.work_per_sample = max(self.w.nnz, 1)
        self._setup_threads(threads)

    def out_shape(self, in_shape) -> tuple:
        return (self.out_features,)

    def _prepare(self, batch: int, relu: bool, pool: int = 1):
        if pool != 1:
            raise ValueError("a Linear layer has no pooling to fuse")
        k = numba_kernels()
        w, head = self.w, (self.w.rowptr, self.w.cols, self.codes, self.cb, self.bias)
        y = np.empty((batch, self.out_features), np.float32)
        if batch == 1:  # the input changes per call, so the call passes it on
            ep = _compiled(k["lin_mv"], (*head, np.zeros((1, self.in_features), np.float32), y, 0, 0, relu))
            rows, pool, chunks = w.rows, self.pool, self.chunks
            if self.pool.threads == 1 or self.work_per_sample < PARALLEL_MIN_WORK or len(chunks) < 2:
                def call(x):
                    ep(*head, x.reshape(1, -1), y, 0, rows, relu)
                    return y
            else:
                def call(x):
                    x2 = x.reshape(1, -1)
                    pool.run(lambda r0, r1: ep(*head, x2, y, r0, r1, relu), chunks)
                    return y
            return call
        xt = np.empty((self.in_features, batch), np.float32)
        acc = np.empty((self.out_features, batch), np.float32)
        ep = _compiled(k["lin_mm"], (*head, xt, acc, y, 0, 0, relu))
        run = self._runner(ep, (*head, xt, acc, y), (relu,), batch)

        def call(x):
            np.copyto(xt, x.reshape(batch, -1).T)
            run()
            return y
        return call


class SparseConv2d(_Layer):
    """A Conv2d (groups 1, any kernel size, stride, padding, dilation; zero padding) from the
    compressed layout, by implicit im2col: each non-zero weight adds its value times a shifted
    window of the padded input to its output channel. A 1x1 convolution is thus a sparse product
    over channels. Input (B, C, H, W) float32; output (B, Cout, OH, OW), ReLU fused if ``relu``."""

    kind = "conv"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, in_hw: tuple[int, int], stride=1, padding=0,
                 dilation=1, threads: int = 1, relu: bool = False, name: str = ""):
        weight = np.asarray(weight, np.float32)
        self.name = name
        cout, cin, kh, kw = (int(s) for s in weight.shape)
        sh, sw = _pair(stride)
        ph, pw = _pair(padding)
        dh, dw = _pair(dilation)
        if sh != sw:
            raise ValueError("sparse convolution: only equal strides are supported")
        self.cin, self.cout, self.stride, self.pad = cin, cout, sh, (ph, pw)
        self.h, self.w_in = int(in_hw[0]), int(in_hw[1])
        self.hp, self.wp = self.h + 2 * ph, self.w_in + 2 * pw
        self.oh = (self.hp - dh * (kh - 1) - 1) // sh + 1
        self.ow = (self.wp - dw * (kw - 1) - 1) // sw + 1
        if self.oh < 1 or self.ow < 1:
            raise ValueError("sparse convolution: the kernel is larger than the padded input")
        self.w = Compressed(weight.reshape(cout, -1))
        # column (ci, ky, kx) of the flattened weight -> offset in the padded input plane stack
        col = np.arange(cin * kh * kw)
        ci, ky, kx = col // (kh * kw), (col // kw) % kh, col % kw
        table = (ci * self.hp * self.wp + ky * dh * self.wp + kx * dw).astype(np.int64)
        offs = table[self.w.cols.astype(np.int64)]
        self.w.cols = offs.astype(np.int32)
        self.bias = np.zeros(cout, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        self.relu = bool(relu)
        self.work_per_sample = max(self.w.nnz * self.oh * self.ow, 1)
        self._setup_threads(threads)

    @property
    def out_features(self) -> int:
        return self.cout

    @property
    def in_features(self) -> int:
        return self.cin * self.h * self.w_in

    def out_shape(self, in_shape) -> tuple:
        return (self.cout, self.oh, self.ow)

    def _prepare(self, batch: int, relu: bool, pool: int = 1):
        if pool != 1 and self.stride != 1:
            raise ValueError("max-pooling is fused only into stride-1 convolutions")
        y = np.empty((batch, self.cout, self.oh // pool, self.ow // pool), np.float32)
        yf = y.reshape(batch, self.cout, -1)
        head = (self.w.rowptr, self.w.cols, self.codes, self.cb, self.bias)
        tail = (self.oh, self.ow, self.wp, self.stride)
        f = numba_kernels()["conv"]
        shape = (batch, self.cin, self.h, self.w_in)
        if self.stride == 1:  # the wide kernel: always through the staging buffer (with its tail)
            plane = self.cin * self.hp * self.wp
            xp = np.zeros((batch, plane + self.wp), np.float32)
            ph, pw = self.pad
            inner = xp[:, :plane].reshape(batch, self.cin, self.hp, self.wp)[:, :, ph:ph + self.h, pw:pw + self.w_in]
            wide = np.empty((batch, self.cout, self.oh * self.wp), np.float32)
            args = (*head, xp, wide, yf, self.oh, self.ow, self.wp, int(pool))
            ep = _compiled(numba_kernels()["conv_wide"], (*args, 0, 0, relu))
            run = self._runner(ep, args, (relu,), batch)

            def call(x):
                inner[...] = x.reshape(shape)
                run()
                return y
            return call
        if any(self.pad):
            xp = np.zeros((batch, self.cin, self.hp, self.wp), np.float32)
            inner = xp[:, :, self.pad[0]:self.pad[0] + self.h, self.pad[1]:self.pad[1] + self.w_in]
            ep = _compiled(f, (*head, xp.reshape(batch, -1), yf, *tail, 0, 0, relu))
            run = self._runner(ep, (*head, xp.reshape(batch, -1), yf, *tail), (relu,), batch)

            def call(x):
                inner[...] = x.reshape(shape)
                run()
                return y
            return call
        ep = _compiled(f, (*head, np.zeros((batch, self.in_features), np.float32), yf, *tail, 0, 0, relu))
        rows, pool, chunks = self.w.rows, self.pool, self.chunks
        if self.pool.threads == 1 or self.work_per_sample * batch < PARALLEL_MIN_WORK or len(chunks) < 2:
            def call(x):
                ep(*head, x.reshape(batch, -1), yf, *tail, 0, rows, relu)
                return y
        else:
            def call(x):
                xf = x.reshape(batch, -1)
                pool.run(lambda r0, r1: ep(*head, xf, yf, *tail, r0, r1, relu), chunks)
                return y
        return call


_NO_CODEBOOK = np.zeros(1, np.float32)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class MaxPool:
    """Max-pooling with kernel = stride = k, no padding (LeNet's pooling), ReLU fused if asked."""

    kind = "maxpool"

    def __init__(self, k: int, in_shape, relu: bool = False):
        self.k = int(k)
        self.c, self.h, self.w = (int(s) for s in in_shape)
        self.relu = relu
        self._f = numba_kernels()["maxpool"]
        self._buffers: dict[int, np.ndarray] = {}

    def out_shape(self, in_shape) -> tuple:
        return (self.c, self.h // self.k, self.w // self.k)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self._buffers.get(x.shape[0])
        if y is None:
            y = self._buffers[x.shape[0]] = np.empty((x.shape[0], *self.out_shape(None)), np.float32)
        self._f(x, y, self.k, self.relu)
        return y
