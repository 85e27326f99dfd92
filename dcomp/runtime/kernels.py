"""Compiled sparse-codebook kernels (numba): ``y = x W^T + b`` and sparse convolution, straight
from a compressed layout, for batch 1 to 64 and more, multithreaded over output rows.

Layout (built once at load from the pruned, weight-shared tensor; see ``Compressed``):

    rowptr    int32 (rows + 1,)   where each output row's non-zeros start (CSR)
    cols      uint16 when the row length (in_features, or in_channels*kh*kw) fits, else int32:
              the column of each non-zero (for a convolution: its offset in the padded input)
    codes     uint8 codebook index of each non-zero, when the layer has at most 256 distinct
              non-zero values (what ``dcomp quantize`` leaves: 5-bit fc, 8-bit conv); else the
              float32 values themselves
    codebook  float32 (<= 256,), a few hundred bytes that stay in L1

Linear layers repack this (``Packed``) into one uint32 per non-zero, ``column | code << 24``, rows
padded to a multiple of 8 with value-0 entries: 4 bytes per non-zero (3.3 MiB for a 4096x4096
layer at 95% zeros, against 64 MiB dense), read with one load. Measured on this machine (AMD EPYC,
AVX-512) the kernels are bound by loads per non-zero, not by bytes, once a layer sits in L2/L3:
the split uint16 + uint8 arrays (3 bytes) cost a fourth load per non-zero and were slower.

Threads: every call big enough to share (``row_bounds``) is one compiled *job* that the calling
thread and ``threads - 1`` helpers (``ChunkPool``) run at once: row chunks, balanced by
non-zeros, are taken from an atomic counter, and a chain of Linear layers meets at a barrier
between layers, all inside the compiled code (``_atomics``: LLVM atomics as numba intrinsics), so
no thread goes back to Python (or waits for the GIL) between chunks or layers. Chosen deliberately
over numba's ``prange`` (workqueue/omp/tbb layers) and torch's OpenMP: those split the rows
statically into one piece per thread, so when another process holds a core, the call waits a whole
scheduler tick (10-20 ms measured) for the descheduled piece. Here a helper that is not running
takes no chunk and the caller does the work. Between jobs a helper watches for the next one for
~0.5 ms (pausing, yielding its core every ~10 us), then sleeps on a condition variable. Waiting
always yields: nothing spins a core away from another process. The kernels release the GIL.

No per-call allocation: each layer keeps its output (and, for batches > 1 or convolutions, input
staging) buffers per batch size, made on the first call with that batch size. The array a
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

    from dcomp.runtime._atomics import atomic_add, enter_job, leave_job, wait_at_least
except ImportError:  # numba is a dependency; without it only the torch kernel of the hybrid path works
    njit = None

_OPTS = dict(nogil=True, fastmath=True, cache=True, boundscheck=False)
# The Linear kernels: no reassociation, so LLVM keeps the sums over a row's entries scalar instead of
# vectorising them with AVX-512 gathers, which measured 1.7x slower here (0.62 vs 0.36 ms for a
# 4096x4096 layer at 95% zeros, one thread). The batch kernels vectorise over the batch instead.
_SCALAR = dict(nogil=True, fastmath={"contract", "nsz", "arcp"}, cache=True, boundscheck=False)


def numba_kernels() -> dict[str, Any]:
    if njit is None:
        raise UsageError("the compiled sparse kernel needs the numba package (pip install numba)")
    from dcomp.runtime import _mm_kernels

    return {"lin_mv": _lin_mv, **{f"mm_w{w}u{u}": getattr(_mm_kernels, f"mm_w{w}u{u}") for w, u in MM_SHAPES},
            **{f"chain_{k}": getattr(_mm_kernels, f"chain_{k}") for k in ("lin_mv", *(f"mm_w{w}u{u}" for w, u in MM_SHAPES))},
            "conv": _conv, "conv_wide": _conv_wide, "conv_job": _conv_job, "conv_wide_job": _conv_wide_job,
            "maxpool": _maxpool, "transpose": _transpose}


def _pval(pk, cb, k, p):
    """The value of packed entry ``k`` (``p = pk[k]``): ``cb[p >> 24]`` in the codebook layout
    (uint32 entries), else ``cb[k]`` (int32 entries, ``cb`` one float32 per entry)."""
    raise NotImplementedError  # only called from compiled code


def _pcol(pk, p):
    """The column of packed entry ``p``, unsigned (so indexing needs no negative-index check)."""
    raise NotImplementedError  # only called from compiled code


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

    @overload(_pval, inline="always")
    def _pval_impl(pk, cb, k, p):
        if pk.dtype == _nbtypes.uint32:  # codebook layout: the index sits in the top 8 bits
            return lambda pk, cb, k, p: cb[p >> np.uint32(24)]
        return lambda pk, cb, k, p: cb[k]  # raw values: cb holds one float per entry

    @overload(_pcol, inline="always")
    def _pcol_impl(pk, p):
        if pk.dtype == _nbtypes.uint32:
            return lambda pk, p: p & np.uint32(0xFFFFFF)
        return lambda pk, p: np.uint32(p)

    @njit(**_SCALAR)
    def _lin_mv(prow, pk, cb, bias, x, y, r0, r1, relu):
        # y[i] = bias[i] + sum over row i's entries of value * x[column]; x: (in,), y: (out,).
        # Rows are padded to a multiple of 8 entries (value 0), so no remainder loop. Scalar on
        # purpose (see the module doc): eight accumulators, three loads per entry.
        z = np.float32(0.0)
        for i in range(r0, r1):
            a0 = z
            a1 = z
            a2 = z
            a3 = z
            a4 = z
            a5 = z
            a6 = z
            a7 = z
            k = prow[i]
            end = prow[i + 1]
            while k < end:
                p0 = pk[k]
                p1 = pk[k + np.uint32(1)]
                p2 = pk[k + np.uint32(2)]
                p3 = pk[k + np.uint32(3)]
                p4 = pk[k + np.uint32(4)]
                p5 = pk[k + np.uint32(5)]
                p6 = pk[k + np.uint32(6)]
                p7 = pk[k + np.uint32(7)]
                a0 += _pval(pk, cb, k, p0) * x[_pcol(pk, p0)]
                a1 += _pval(pk, cb, k + np.uint32(1), p1) * x[_pcol(pk, p1)]
                a2 += _pval(pk, cb, k + np.uint32(2), p2) * x[_pcol(pk, p2)]
                a3 += _pval(pk, cb, k + np.uint32(3), p3) * x[_pcol(pk, p3)]
                a4 += _pval(pk, cb, k + np.uint32(4), p4) * x[_pcol(pk, p4)]
                a5 += _pval(pk, cb, k + np.uint32(5), p5) * x[_pcol(pk, p5)]
                a6 += _pval(pk, cb, k + np.uint32(6), p6) * x[_pcol(pk, p6)]
                a7 += _pval(pk, cb, k + np.uint32(7), p7) * x[_pcol(pk, p7)]
                k += np.uint32(8)
            v = bias[i] + (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)))
            y[i] = max(v, z) if relu else v

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
    def _conv_job(rowptr, offs, codes, codebook, bias, xp, y, oh, ow, wp, stride, relu, bounds, ctl, signal):
        # _conv on every thread of a pool at once (ChunkPool.run_compiled): the output channels'
        # chunks (bounds) are taken from counter ctl[2]
        if not enter_job(ctl, signal):
            return
        while True:
            i = atomic_add(ctl, 2, 1)
            if i >= bounds.shape[0] - 1:
                break
            _conv(rowptr, offs, codes, codebook, bias, xp, y, oh, ow, wp, stride, bounds[i], bounds[i + 1], relu)
        leave_job(ctl)

    @njit(**_OPTS)
    def _conv_wide_job(rowptr, offs, codes, codebook, bias, xp, wide, y, oh, ow, wp, pool, relu, bounds, ctl, signal):
        # _conv_wide on every thread of a pool at once, as _conv_job
        if not enter_job(ctl, signal):
            return
        while True:
            i = atomic_add(ctl, 2, 1)
            if i >= bounds.shape[0] - 1:
                break
            _conv_wide(rowptr, offs, codes, codebook, bias, xp, wide, y, oh, ow, wp, pool, bounds[i], bounds[i + 1], relu)
        leave_job(ctl)

    @njit(**_OPTS)
    def _transpose(a, b, rows, cols):
        # b[j, i] = a[i, j] for i < rows, j < cols, in 8x16 tiles (the batch kernels' layout in
        # and out; numpy's strided copy took 0.8 ms for 64 x 4096, this 0.27 ms)
        for i0 in range(0, rows, 8):
            i1 = min(i0 + 8, rows)
            for j0 in range(0, cols, 16):
                j1 = min(j0 + 16, cols)
                for j in range(j0, j1):
                    for i in range(i0, i1):
                        b[j, i] = a[i, j]

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


# ---- the batch kernels (generated) ------------------------------------------------------------------

# (lanes, entries in flight): lanes = batch columns per block, held in registers across a row's
# entries (SLP-vectorised: one vector register per 8/16 lanes); entries in flight = independent
# accumulator sets, so the FMA latency is hidden. Measured on a 4096x4096 layer at 95% zeros, one
# thread, loaded machine (ratios within one run): batch 8 0.79 ms (w8u4) against 1.92 ms for the
# earlier loop over a runtime batch length; batch 64 4.8 ms (w64u1: each entry's 64 inputs in one
# pass, four cache lines side by side) against 9.2 ms (w16u2) and 5.7-6.8 ms before.
MM_SHAPES = ((8, 4), (16, 2), (32, 2), (64, 1))


def mm_source() -> str:
    """The source of ``dcomp/runtime/_mm_kernels.py``: one kernel per ``MM_SHAPES`` entry,
    written out (numba caches only functions that live in a file) with scalar accumulators that
    LLVM's SLP vectoriser packs into vector registers (compiled with SLP on, see ``_slp``)."""
    out = ['"""Generated by dcomp.runtime.kernels.mm_source(); do not edit by hand (a test checks that it',
           'is current). Batch kernels of the sparse Linear layer, in the transposed activation layout:',
           '',
           '    xf  (in * nb,)  the input transposed and flattened: feature c of sample b at c * nb + b',
           '    yf  (out * nb,) the output in the same layout (the next layer\'s input)',
           '',
           'nb is the batch padded to a multiple of the lanes; rows of the packed layout (kernels.py) are',
           'padded to a multiple of 8 entries, so no remainder loop.',
           '',
           'Then one chain driver per kernel (chain_lin_mv, chain_mm_*): consecutive layers in one call, on',
           'the calling thread alone (an empty signal), or as one job run by every thread of a ChunkPool at',
           'once (ChunkPool.run_compiled). Layer l\'s row chunks (bounds[l]) are taken from counter',
           'ctl[2 + 2l]; ctl[3 + 2l] counts the chunks done, and nobody starts layer l + 1 before all of',
           'layer l, its input, is written."""',
           '', 'import numpy as np', '',
           'from dcomp.runtime._atomics import atomic_add, enter_job, leave_job, wait_at_least',
           'from dcomp.runtime.kernels import _SCALAR, _lin_mv, _pcol, _pval, njit', '']
    for w, u in MM_SHAPES:
        L = ['', '@njit(**_SCALAR)', f'def mm_w{w}u{u}(prow, pk, cb, bias, xf, nb, yf, r0, r1, relu):',
             '    NB = np.uint32(nb)', '    z = np.float32(0.0)', '    for i in range(r0, r1):',
             '        k0 = prow[i]', '        end = prow[i + 1]', '        bi = bias[i]',
             '        row = np.uint32(i) * NB',
             f'        for bb in range(0, nb, {w}):', '            BB = np.uint32(bb)']
        for a in range(u):
            L += [f'            s{a}_{j} = z' for j in range(w)]
        L += ['            k = k0', '            while k < end:']
        for a in range(u):
            L += [f'                p{a} = pk[k + np.uint32({a})]',
                  f'                v{a} = _pval(pk, cb, k + np.uint32({a}), p{a})',
                  f'                q{a} = _pcol(pk, p{a}) * NB + BB',
                  f'                x{a} = xf[q{a}:q{a} + np.uint32({w})]']
        for a in range(u):
            L += [f'                s{a}_{j} += v{a} * x{a}[np.uint32({j})]' for j in range(w)]
        L += [f'                k += np.uint32({u})', '            o = row + BB']
        for j in range(w):
            L += [f'            t{j} = bi + (' + ' + '.join(f's{a}_{j}' for a in range(u)) + ')',
                  f'            yf[o + np.uint32({j})] = max(t{j}, z) if relu else t{j}']
        out += L
    for name, nb in [("lin_mv", ""), *((f"mm_w{w}u{u}", "nb, ") for w, u in MM_SHAPES)]:
        kern = "_lin_mv" if name == "lin_mv" else name
        call = (f"{kern}(prows[l], pks[l], cbs[l], biases[l], bufs[l], {nb}bufs[l + 1], b[i], b[i + 1], "
                "relus[l] != 0)")
        out += ['', '', '@njit(**_SCALAR)', f'def chain_{name}(prows, pks, cbs, biases, bufs, {nb}relus, bounds, ctl, signal):',
                '    if signal.shape[0] == 0:  # the caller alone: every chunk in order, no job to enter',
                '        for l in range(len(pks)):', '            b = bounds[l]', '            for i in range(b.shape[0] - 1):',
                f'                {call}', '        return',
                '    if not enter_job(ctl, signal):', '        return', '    for l in range(len(pks)):', '        b = bounds[l]',
                '        n = b.shape[0] - 1', '        while True:', '            i = atomic_add(ctl, 2 + 2 * l, 1)',
                '            if i >= n:', '                break', f'            {call}',
                '            atomic_add(ctl, 3 + 2 * l, 1)', '        wait_at_least(ctl, 3 + 2 * l, n)',
                '    leave_job(ctl)']
    return "\n".join(out) + "\n"


class _slp:
    """Compile with LLVM's SLP vectoriser on (numba turns it off by default); the batch kernels
    need it to put their per-lane accumulators in vector registers."""

    def __enter__(self):
        import numba

        self.old = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1

    def __exit__(self, *exc):
        import numba

        numba.config.SLP_VECTORIZE = self.old
        return False


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


PAD = 8  # entries per row are padded to a multiple of this (the unrolling of the kernels)


class Packed:
    """The Linear kernels' layout of a ``Compressed`` matrix: one uint32 per entry, ``column |
    codebook index << 24`` (a 2-3x narrower alternative, uint16 columns and uint8 codes in two
    arrays, costs a fourth load per entry and measured slower: the kernel is bound by loads per
    entry, not by bytes, once the layer sits in L2/L3), rows padded with value-0 entries to a
    multiple of ``PAD``. The codebook gets one extra entry, 0.0, for the padding. Without a
    codebook of at most 255 values (or for rows longer than 2^24): int32 columns and one float32
    value per entry in ``cb``."""

    def __init__(self, c: Compressed):
        self.rows, self.row_len, self.nnz, self.sparsity = c.rows, c.row_len, c.nnz, c.sparsity
        self.codebook = c.codebook
        counts = np.diff(c.rowptr).astype(np.int64)
        self.rowptr = np.zeros(self.rows + 1, np.uint32)
        np.cumsum((counts + PAD - 1) // PAD * PAD, out=self.rowptr[1:])
        total = int(self.rowptr[-1])
        r = np.repeat(np.arange(self.rows), counts)
        pos = self.rowptr[r].astype(np.int64) + (np.arange(c.nnz) - c.rowptr[r].astype(np.int64))
        if c.codes is not None and c.codebook.size < 256 and self.row_len <= (1 << 24):
            self.cb = np.append(c.codebook, np.float32(0.0)).astype(np.float32)
            self.pk = np.full(total, np.uint32(c.codebook.size << 24), np.uint32)
            self.pk[pos] = c.cols.astype(np.uint32) | (c.codes.astype(np.uint32) << np.uint32(24))
        else:
            self.pk = np.zeros(total, np.int32)
            self.pk[pos] = c.cols
            self.cb = np.zeros(total, np.float32)
            self.cb[pos] = c.codebook[c.codes] if c.codes is not None else c.vals

    @property
    def nbytes(self) -> int:
        return self.pk.nbytes + self.rowptr.nbytes + self.cb.nbytes

    def to_dense(self) -> np.ndarray:
        w = np.zeros((self.rows, self.row_len), np.float32)
        r = np.repeat(np.arange(self.rows), np.diff(self.rowptr.astype(np.int64)))
        if self.pk.dtype == np.uint32:
            cols, vals = (self.pk & 0xFFFFFF).astype(np.int64), self.cb[self.pk >> 24]
        else:
            cols, vals = self.pk.astype(np.int64), self.cb
        np.add.at(w, (r, cols), vals)  # padding entries add 0.0
        return w


def row_chunks(rowptr: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Split rows into at most ``n`` ranges holding about equal numbers of non-zeros."""
    rows = rowptr.shape[0] - 1
    if rows <= 0:
        return []
    cuts = np.searchsorted(rowptr, np.linspace(0, rowptr[-1], n + 1)[1:-1]).tolist()
    bounds = sorted(set([0, *[min(max(c, 0), rows) for c in cuts], rows]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def row_bounds(rowptr: np.ndarray, work: int, threads: int) -> np.ndarray:
    """Row-chunk boundaries (int64, ``[0, ..., rows]``) of one call of a layer doing ``work``
    multiply-adds: one chunk when the call is too small to share (or ``threads`` is 1), else up
    to 16 per thread of >= 16k multiply-adds each. Taking a chunk is one atomic add, so many
    small chunks cost nothing and keep the share of a thread that is descheduled mid-chunk small."""
    n = 1 if threads <= 1 or work < PARALLEL_MIN_WORK else int(max(1, min(16 * threads, work // 16384)))
    chunks = row_chunks(rowptr, n)
    return np.array([0] + [b for _, b in chunks] if chunks else [0, 0], np.int64)


class ChunkPool:
    """Runs compiled jobs on the calling thread and ``threads - 1`` helper threads:
    ``run_compiled(ep, args, ctl)`` calls the compiled entry point ``ep(*args)`` on every thread
    at once, and the threads share out its row chunks (and meet between layers) inside the
    compiled code through the atomic counters of ``ctl`` (``_atomics``). A helper that is not
    running takes no chunk, so nobody waits for a thread that has not taken work.

    An idle helper first watches for the next job for ``SPIN_TURNS`` pauses (about 0.5 ms,
    yielding its core every ~10 us), then sleeps on a condition variable: calls that come back to
    back (a model's layers, a serving loop) find it awake instead of paying a 50-100 us wake-up."""

    SPIN_TURNS = 1 << 14

    def __init__(self, threads: int):
        from dcomp.runtime._atomics import bump, close_job

        self.threads = max(1, int(threads))
        self._cv = threading.Condition()
        self._signal = np.zeros(8, np.int64)  # [0]: jobs posted so far (compiled code reads it)
        self._bump = _compiled(bump, (np.zeros(2, np.int64), 0))
        self._close = _compiled(close_job, (np.zeros(2, np.int64),))
        self._job = None
        self._sleepers = 0
        for _ in range(self.threads - 1):
            threading.Thread(target=self._helper, daemon=True, name="dcomp-sparse").start()

    def _helper(self):
        from dcomp.runtime._atomics import wait_change

        seen = 0
        while True:
            posted = wait_change(self._signal, 0, seen, self.SPIN_TURNS)  # nogil: spins, then gives up
            if posted == seen:
                with self._cv:
                    self._sleepers += 1
                    while self._signal[0] == seen:
                        self._cv.wait()
                    self._sleepers -= 1
                continue
            seen = posted
            job = self._job
            if job is not None:
                job()

    def signal_for(self, shared: bool) -> np.ndarray:
        """The ``signal`` argument of a job: the pool's, or an empty one for a job the caller runs alone."""
        return self._signal if shared and self.threads > 1 else _NO_SIGNAL

    def run_compiled(self, ep, args: tuple, ctl: np.ndarray, job=None) -> None:
        """``ep(*args)`` on the calling thread and, with ``job`` (the helpers' call of it,
        ``lambda: ep(*args)``, made once), on the helpers too. ``args`` end with ``ctl`` (int64:
        [0] state, 0 closed / 1 open / 2 announced, [1] threads inside, then two counters per
        phase) and ``signal`` (``signal_for``). ``ep`` starts with ``enter_job(ctl, signal)``,
        which announces the job to the helpers, and ends with ``leave_job(ctl)``; this returns
        once every thread that entered has left and the counters are zero again (``close_job``)."""
        ctl[0] = 1
        if job is not None and self.threads > 1:
            self._job = job  # read by a helper once the caller, inside ep, bumps the signal
            if self._sleepers:  # asleep: woken here (holding the GIL; the slow path, after ~0.5 ms idle)
                self._bump(self._signal, 0)
                with self._cv:
                    self._cv.notify_all()
        ep(*args)
        self._close(ctl)


_NO_SIGNAL = np.zeros(0, np.int64)
_pools: dict[int, ChunkPool] = {}


def chunk_pool(threads: int) -> ChunkPool:
    threads = max(1, int(threads))
    if threads not in _pools:
        _pools[threads] = ChunkPool(threads)
    return _pools[threads]


def _compiled(disp, args, slp: bool = False):
    """The compiled entry point of numba dispatcher ``disp`` for these argument types (compiling
    it if needed): calling it skips the dispatcher's type matching, about 2 us per call, which is
    a third of a small layer's time. Falls back to the dispatcher."""
    from numba import typeof

    if slp:
        with _slp():
            disp(*args)  # the callers pass an empty row range: compiles, computes nothing
    else:
        disp(*args)
    cres = disp.overloads.get(tuple(typeof(a) for a in args))
    return cres.entry_point if cres is not None else disp


class _Layer:
    """What the layer kinds share: the thread pool, and one prepared call per batch size and
    ReLU flag holding its buffers (made on first use, reused after)."""

    def _setup_threads(self, threads: int) -> None:
        self.pool = chunk_pool(threads)
        self._prepared: dict[tuple, Any] = {}

    @property
    def sparsity(self) -> float:
        return self.w.sparsity

    @property
    def nnz(self) -> int:
        return self.w.nnz

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.bias.nbytes

    def _dispatch(self, kernel: str, before: tuple, after: tuple, batch: int):
        """fn() computing every row: ``kernel(*before, 0, rows, *after)`` on the calling thread
        when the call is small, else the kernel's job ``kernel_job(*before, *after, bounds, ctl)``
        shared by the pool's threads."""
        bounds = row_bounds(self.w.rowptr, self.work_per_sample * batch, self.pool.threads)
        if bounds.size <= 2:
            ep = _compiled(numba_kernels()[kernel], (*before, 0, 0, *after))
            rows = self.w.rows
            return lambda: ep(*before, 0, rows, *after)
        args = (*before, *after, bounds, np.zeros(4, np.int64), self.pool.signal_for(True))
        ep = _compiled(numba_kernels()[f"{kernel}_job"], args)
        pool, ctl = self.pool, args[-2]

        def job():
            ep(*args)
        return lambda: pool.run_compiled(ep, args, ctl, job)

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
    """``y = x @ W.T + b`` (then ReLU if ``relu``) for x float32 (B, in), from the packed layout
    (``Packed``). Batch 1: the scalar row kernel; larger batches: the generated batch kernels on
    the input transposed into a staging buffer (``LinearChain`` skips the transposes between
    consecutive layers)."""

    kind = "linear"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, threads: int = 1, relu: bool = False,
                 name: str = ""):
        self.name = name
        self.w = Packed(Compressed(np.asarray(weight, np.float32).reshape(weight.shape[0], -1)))
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
        return LinearChain([self], [relu])._prepare(batch)


def lanes_for(batch: int) -> int:
    """The padded batch (lanes) the batch kernels run at: 8, 16 or 32 up to those sizes, else a
    multiple of 64."""
    for lanes in (8, 16, 32):
        if batch <= lanes:
            return lanes
    return -(-batch // 64) * 64


def nb_lanes(nb: int) -> str:
    """The batch kernel for ``nb`` padded lanes (a key of ``numba_kernels()`` after ``mm``)."""
    w, u = max((w, u) for w, u in MM_SHAPES if nb % w == 0)
    return f"_w{w}u{u}"


class LinearChain:
    """Consecutive sparse Linear layers (ReLU flags per layer) run as one step: the activations
    stay in the kernels' layout between the layers (vectors at batch 1, transposed (features,
    lanes) blocks above), so only the chain's input and output are copied. Buffers per batch
    size, made on first use; the returned array is the chain's buffer (overwritten next call)."""

    kind = "chain"

    def __init__(self, layers: list, relus: list[bool]):
        self.layers, self.relus = list(layers), [bool(r) for r in relus]
        for a, b in zip(self.layers, self.layers[1:]):
            if a.out_features != b.in_features:
                raise ValueError(f"{b.name}: expects {b.in_features} inputs, {a.name} gives {a.out_features}")
        self.in_features, self.out_features = self.layers[0].in_features, self.layers[-1].out_features
        self.name = "+".join(layer.name for layer in self.layers)
        self._prepared: dict[int, Any] = {}

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = x.shape[0]
        if x.size != batch * self.in_features:
            raise ValueError(f"{self.layers[0].name or 'layer'}: expected {self.in_features} input values per sample, "
                             f"got {x.size // max(batch, 1)}")
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        fn = self._prepared.get(batch)
        if fn is None:
            fn = self._prepared[batch] = self._prepare(batch)
        return fn(x)

    def _prepare(self, batch: int):
        # batch 1: vectors; above: (features, lanes) blocks, the input transposed into the first
        # (its padding lanes stay 0)
        nb = 1 if batch == 1 else lanes_for(batch)
        kernel = "lin_mv" if batch == 1 else f"mm{nb_lanes(nb)}"
        shape = (lambda f: (f,)) if batch == 1 else (lambda f: (f, nb))
        acts = [np.zeros(shape(f), np.float32) for f in (self.in_features, *(l.out_features for l in self.layers))]
        steps, start = [], 0
        for end in range(1, len(self.layers) + 1):  # runs of like layers: a driver takes tuples of like arrays
            if end == len(self.layers) or self.layers[end].w.pk.dtype != self.layers[start].w.pk.dtype:
                steps.append(self._run(start, end, batch, nb, kernel, acts))
                start = end
        xin, last = acts[0], acts[-1]
        if batch == 1:
            out = last.reshape(1, -1)

            def call(x):
                np.copyto(xin, x.reshape(-1))  # ~1 us for 4096 features
                for s in steps:
                    s()
                return out
            return call
        y = np.empty((batch, self.out_features), np.float32)
        tr, fin, fout = numba_kernels()["transpose"], self.in_features, self.out_features

        def call_batch(x):
            tr(x.reshape(batch, -1), xin, batch, fin)
            for s in steps:
                s()
            tr(last, y, fout, batch)
            return y
        return call_batch

    def _run(self, start: int, end: int, batch: int, nb: int, kernel: str, acts: list):
        """fn() computing layers [start, end) from ``acts[start]`` into ``acts[end]`` with the
        kernel's chain driver (``_mm_kernels``): on every thread of the pool when a layer is big
        enough to share, else on the calling thread alone."""
        layers, pool = self.layers[start:end], self.layers[0].pool
        bounds = tuple(row_bounds(l.w.rowptr, l.work_per_sample * batch, pool.threads) for l in layers)
        args = (tuple(l.w.rowptr for l in layers), tuple(l.w.pk for l in layers), tuple(l.w.cb for l in layers),
                tuple(l.bias for l in layers), tuple(a.reshape(-1) for a in acts[start:end + 1]),
                *(() if batch == 1 else (nb,)), np.array(self.relus[start:end], np.uint8), bounds,
                np.zeros(2 + 2 * len(layers), np.int64), pool.signal_for(shared := any(b.size > 2 for b in bounds)))
        ep = _compiled(numba_kernels()[f"chain_{kernel}"], args, slp=batch > 1)
        if not shared:  # the driver runs every chunk in order on the calling thread: no job, no atomics
            return lambda: ep(*args)
        ctl = args[-2]

        def job():
            ep(*args)
        return lambda: pool.run_compiled(ep, args, ctl, job)


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
        self.codes, self.cb = (self.w.codes, self.w.codebook) if self.w.codes is not None else (self.w.vals, _NO_CODEBOOK)

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
        shape = (batch, self.cin, self.h, self.w_in)
        ph, pw = self.pad
        plane = self.cin * self.hp * self.wp
        # the input goes through a zero-padded staging buffer (with a tail of wp for the wide kernel)
        xp = np.zeros((batch, plane + (self.wp if self.stride == 1 else 0)), np.float32)
        inner = xp[:, :plane].reshape(batch, self.cin, self.hp, self.wp)[:, :, ph:ph + self.h, pw:pw + self.w_in]
        if self.stride == 1:  # the wide kernel, pooling fused
            wide = np.empty((batch, self.cout, self.oh * self.wp), np.float32)
            run = self._dispatch("conv_wide", (*head, xp, wide, yf, self.oh, self.ow, self.wp, int(pool)), (relu,), batch)
        else:
            run = self._dispatch("conv", (*head, xp, yf, self.oh, self.ow, self.wp, self.stride), (relu,), batch)

        def call(x):
            inner[...] = x.reshape(shape)
            run()
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
