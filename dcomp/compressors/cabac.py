"""Context-adaptive binary arithmetic coding for .dcz symbol streams (format 1.4, coding "cabac").

DeepCABAC-style: every symbol is cut into binary decisions ("bins"), each bin is coded with an
adaptive probability chosen by its context, by a binary range coder. Nothing is stored but the
payload: the probabilities start at 1/2 and learn as the stream goes, identically in the encoder
and the decoder (integer arithmetic only, so the bytes are deterministic on every platform).

Models (the record's "model" field; docs/FORMAT.md, "cabac"):

* ``TREE`` (0): a symbol of a 2^b alphabet is its b bits, MSB first; the context of a bit is its
  node in the binary tree (the bits above it): an adaptive order-0 coder with no table.
* ``TREE_PREV`` (1): the same, with the node's probabilities kept separately for each of 9
  classes of the previous symbol (none, or its top-3-bit octile of the alphabet). Codebook
  indices are sorted centroids, so this catches neurons whose weights are all large or small.
* ``SIGNIFICANCE`` (2), gap streams only: the nonzero flag of every element of the tensor viewed
  as a matrix (rows = shape[0]), in row-major order, with context (left flag, above flag, the
  column's density in the rows so far in 8 classes, the row's density so far in 8 classes):
  256 contexts. The decoder turns the flags back into the gap stream.

Probability estimator per context: two estimates of P(bit = 1) in 1/2^15 with adaptation rates
max(1/(n+2), 2^-5) and max(1/(n+2), 2^-8) (n = bins seen in that context so far, saturating at
255); (p_fast + 3 p_slow) / 4, clamped to [16, 2^15 - 16], is used. Range coder: 32-bit range, carry
propagation through a cache byte (the coder of LZMA), 5 flush bytes.

    data, rec = encode_stream(symbols, alphabet, model=TREE)            # rec: count, alphabet, coding, model, bytes
    data, rec = encode_significance(positions, numel, cols, gap_count, alphabet)
    symbols = decode_tree(data, count, alphabet, model)                  # raises CabacError on any defect
    positions = decode_significance(data, numel, cols, max_nnz)

Decoding does exactly one bin step per element (significance) or per symbol bit (tree), reads no
byte outside the payload and allocates only its output and the context tables (at most
9 * 2^16 entries). Compiled with numba when available (DCOMP_NO_NUMBA=1: the same functions run as
Python, same bytes, slow: for tests and small files). This coder is dcomp's own; the spec is
docs/FORMAT.md.
"""

from __future__ import annotations

import numpy as np

from dcomp.compressors import numba_disabled

TREE, TREE_PREV, SIGNIFICANCE = 0, 1, 2
MODELS = (TREE, TREE_PREV, SIGNIFICANCE)
MODEL_NAMES = {TREE: "tree", TREE_PREV: "tree-prev", SIGNIFICANCE: "significance"}
PROB_BITS = 15
ONE = 1 << PROB_BITS
TOP = 1 << 24
FAST, SLOW = 5, 8            # rate floors 2^-5 and 2^-8 (measured: docs/bench/size.md)
PMIN = 16                    # mixed probability kept in [PMIN, ONE - PMIN]
FLUSH = 5                    # bytes the encoder flushes (and the decoder reads first)
SIG_CONTEXTS = 256
PREV_CLASSES = 9


class CabacError(ValueError):
    pass


def _rates() -> tuple[np.ndarray, np.ndarray]:
    n = np.arange(256, dtype=np.int64)
    warm = 65536 // (n + 2)
    return np.maximum(warm, 65536 >> FAST), np.maximum(warm, 65536 >> SLOW)


RATE_FAST, RATE_SLOW = _rates()


# ---- kernels (plain Python in numba's subset; compiled by _kernels()) --------------------------------
# The bin step is written out in each loop (numba inlines nothing across a Python call here, and
# the reference must stay the same source). Probability state per context c: p1[c], p2[c] (P(1) in
# 1/2^15) and n[c] (bins seen, saturating at 255).

def _tree_encode(symbols, b, prev_ctx, rf, rs, out):  # pragma: no cover - compiled
    nodes = 1 << b
    nctx = nodes * (PREV_CLASSES if prev_ctx else 1)
    p1 = np.full(nctx, ONE >> 1, np.int64)
    p2 = np.full(nctx, ONE >> 1, np.int64)
    cnt = np.zeros(nctx, np.int64)
    low = 0
    rng = 0xFFFFFFFF
    cache = 0
    csize = 1
    j = 0
    prev = -1
    for i in range(symbols.shape[0]):
        s = int(symbols[i])
        base = 0
        if prev_ctx:
            base = 0 if prev < 0 else (1 + ((prev << 3) >> b)) * nodes
        node = 1
        for lvl in range(b - 1, -1, -1):
            bit = (s >> lvl) & 1
            c = base + node
            p = (p1[c] + 3 * p2[c]) >> 2
            if p < PMIN:
                p = PMIN
            elif p > ONE - PMIN:
                p = ONE - PMIN
            bound = (rng >> PROB_BITS) * (ONE - p)
            k = cnt[c]
            if bit:
                low += bound
                rng -= bound
                p1[c] += ((ONE - p1[c]) * rf[k]) >> 16
                p2[c] += ((ONE - p2[c]) * rs[k]) >> 16
            else:
                rng = bound
                p1[c] -= (p1[c] * rf[k]) >> 16
                p2[c] -= (p2[c] * rs[k]) >> 16
            if k < 255:
                cnt[c] = k + 1
            while rng < TOP:
                rng <<= 8
                # shift low (LZMA): emit the cached byte once the carry is known
                if low < 0xFF000000 or low >= 0x100000000:
                    carry = low >> 32
                    t = cache
                    while csize > 0:
                        out[j] = (t + carry) & 0xFF
                        j += 1
                        t = 0xFF
                        csize -= 1
                    cache = (low >> 24) & 0xFF
                csize += 1
                low = (low & 0x00FFFFFF) << 8
            node = 2 * node + bit
        prev = s
    for _ in range(FLUSH):
        if low < 0xFF000000 or low >= 0x100000000:
            carry = low >> 32
            t = cache
            while csize > 0:
                out[j] = (t + carry) & 0xFF
                j += 1
                t = 0xFF
                csize -= 1
            cache = (low >> 24) & 0xFF
        csize += 1
        low = (low & 0x00FFFFFF) << 8
    return j


def _tree_decode(buf, count, b, prev_ctx, rf, rs, out):  # pragma: no cover - compiled
    n = buf.shape[0]
    if n < FLUSH:
        return 1
    if int(buf[0]) != 0:
        return 2
    nodes = 1 << b
    nctx = nodes * (PREV_CLASSES if prev_ctx else 1)
    p1 = np.full(nctx, ONE >> 1, np.int64)
    p2 = np.full(nctx, ONE >> 1, np.int64)
    cnt = np.zeros(nctx, np.int64)
    rng = 0xFFFFFFFF
    code = 0
    for q in range(1, FLUSH):
        code = (code << 8) | int(buf[q])
    if code >= rng:
        return 2
    pos = FLUSH
    prev = -1
    for i in range(count):
        base = 0
        if prev_ctx:
            base = 0 if prev < 0 else (1 + ((prev << 3) >> b)) * nodes
        node = 1
        for _ in range(b):
            c = base + node
            p = (p1[c] + 3 * p2[c]) >> 2
            if p < PMIN:
                p = PMIN
            elif p > ONE - PMIN:
                p = ONE - PMIN
            bound = (rng >> PROB_BITS) * (ONE - p)
            k = cnt[c]
            if code < bound:
                rng = bound
                bit = 0
                p1[c] -= (p1[c] * rf[k]) >> 16
                p2[c] -= (p2[c] * rs[k]) >> 16
            else:
                code -= bound
                rng -= bound
                bit = 1
                p1[c] += ((ONE - p1[c]) * rf[k]) >> 16
                p2[c] += ((ONE - p2[c]) * rs[k]) >> 16
            if k < 255:
                cnt[c] = k + 1
            while rng < TOP:
                rng <<= 8
                byte = int(buf[pos]) if pos < n else 0
                code = (code << 8) | byte
                pos += 1
            node = 2 * node + bit
        s = node - nodes
        out[i] = s
        prev = s
    if pos > n:
        return 3
    if pos < n:
        return 4
    return 0


def _sig_encode(flags, rows, cols, rf, rs, out):  # pragma: no cover - compiled
    p1 = np.full(SIG_CONTEXTS, ONE >> 1, np.int64)
    p2 = np.full(SIG_CONTEXTS, ONE >> 1, np.int64)
    cnt = np.zeros(SIG_CONTEXTS, np.int64)
    colcnt = np.zeros(cols, np.int64)
    low = 0
    rng = 0xFFFFFFFF
    cache = 0
    csize = 1
    j = 0
    i = 0
    for r in range(rows):
        rowcnt = 0
        left = 0
        for col in range(cols):
            bit = int(flags[i])
            above = int(flags[i - cols]) if r > 0 else 0
            # column density so far (r rows seen) and row density so far (col elements seen)
            x = colcnt[col] * 32
            if r == 0:
                cb = 0
            elif x == 0:
                cb = 1
            elif x < r:
                cb = 2
            elif x < 2 * r:
                cb = 3
            elif x < 4 * r:
                cb = 4
            elif x < 8 * r:
                cb = 5
            elif x < 16 * r:
                cb = 6
            else:
                cb = 7
            x = rowcnt * 32
            if col == 0:
                rb = 0
            elif x == 0:
                rb = 1
            elif x < col:
                rb = 2
            elif x < 2 * col:
                rb = 3
            elif x < 4 * col:
                rb = 4
            elif x < 8 * col:
                rb = 5
            elif x < 16 * col:
                rb = 6
            else:
                rb = 7
            c = (((left << 1) | above) << 6) | (cb << 3) | rb
            p = (p1[c] + 3 * p2[c]) >> 2
            if p < PMIN:
                p = PMIN
            elif p > ONE - PMIN:
                p = ONE - PMIN
            bound = (rng >> PROB_BITS) * (ONE - p)
            k = cnt[c]
            if bit:
                low += bound
                rng -= bound
                p1[c] += ((ONE - p1[c]) * rf[k]) >> 16
                p2[c] += ((ONE - p2[c]) * rs[k]) >> 16
                colcnt[col] += 1
                rowcnt += 1
            else:
                rng = bound
                p1[c] -= (p1[c] * rf[k]) >> 16
                p2[c] -= (p2[c] * rs[k]) >> 16
            if k < 255:
                cnt[c] = k + 1
            while rng < TOP:
                rng <<= 8
                if low < 0xFF000000 or low >= 0x100000000:
                    carry = low >> 32
                    t = cache
                    while csize > 0:
                        out[j] = (t + carry) & 0xFF
                        j += 1
                        t = 0xFF
                        csize -= 1
                    cache = (low >> 24) & 0xFF
                csize += 1
                low = (low & 0x00FFFFFF) << 8
            left = bit
            i += 1
    for _ in range(FLUSH):
        if low < 0xFF000000 or low >= 0x100000000:
            carry = low >> 32
            t = cache
            while csize > 0:
                out[j] = (t + carry) & 0xFF
                j += 1
                t = 0xFF
                csize -= 1
            cache = (low >> 24) & 0xFF
        csize += 1
        low = (low & 0x00FFFFFF) << 8
    return j


def _sig_decode(buf, rows, cols, rf, rs, flags, pos_out):  # pragma: no cover - compiled
    """flags: uint8 scratch of rows*cols (written); pos_out: room for the nonzero positions.
    Returns (status, nnz); status 5: more nonzeros than pos_out holds."""
    n = buf.shape[0]
    if n < FLUSH:
        return 1, 0
    if int(buf[0]) != 0:
        return 2, 0
    p1 = np.full(SIG_CONTEXTS, ONE >> 1, np.int64)
    p2 = np.full(SIG_CONTEXTS, ONE >> 1, np.int64)
    cnt = np.zeros(SIG_CONTEXTS, np.int64)
    colcnt = np.zeros(cols, np.int64)
    rng = 0xFFFFFFFF
    code = 0
    for q in range(1, FLUSH):
        code = (code << 8) | int(buf[q])
    if code >= rng:
        return 2, 0
    pos = FLUSH
    cap = pos_out.shape[0]
    nnz = 0
    i = 0
    for r in range(rows):
        rowcnt = 0
        left = 0
        for col in range(cols):
            above = int(flags[i - cols]) if r > 0 else 0
            x = colcnt[col] * 32
            if r == 0:
                cb = 0
            elif x == 0:
                cb = 1
            elif x < r:
                cb = 2
            elif x < 2 * r:
                cb = 3
            elif x < 4 * r:
                cb = 4
            elif x < 8 * r:
                cb = 5
            elif x < 16 * r:
                cb = 6
            else:
                cb = 7
            x = rowcnt * 32
            if col == 0:
                rb = 0
            elif x == 0:
                rb = 1
            elif x < col:
                rb = 2
            elif x < 2 * col:
                rb = 3
            elif x < 4 * col:
                rb = 4
            elif x < 8 * col:
                rb = 5
            elif x < 16 * col:
                rb = 6
            else:
                rb = 7
            c = (((left << 1) | above) << 6) | (cb << 3) | rb
            p = (p1[c] + 3 * p2[c]) >> 2
            if p < PMIN:
                p = PMIN
            elif p > ONE - PMIN:
                p = ONE - PMIN
            bound = (rng >> PROB_BITS) * (ONE - p)
            k = cnt[c]
            if code < bound:
                rng = bound
                bit = 0
                p1[c] -= (p1[c] * rf[k]) >> 16
                p2[c] -= (p2[c] * rs[k]) >> 16
            else:
                code -= bound
                rng -= bound
                bit = 1
                p1[c] += ((ONE - p1[c]) * rf[k]) >> 16
                p2[c] += ((ONE - p2[c]) * rs[k]) >> 16
                colcnt[col] += 1
                rowcnt += 1
                if nnz >= cap:
                    return 5, nnz
                pos_out[nnz] = i
                nnz += 1
            if k < 255:
                cnt[c] = k + 1
            while rng < TOP:
                rng <<= 8
                byte = int(buf[pos]) if pos < n else 0
                code = (code << 8) | byte
                pos += 1
            flags[i] = bit
            left = bit
            i += 1
    if pos > n:
        return 3, nnz
    if pos < n:
        return 4, nnz
    return 0, nnz


_KERNELS: object = False


def _kernels():
    """(tree_encode, tree_decode, sig_encode, sig_decode): compiled, or the Python functions."""
    global _KERNELS
    if _KERNELS is False:
        py = (_tree_encode, _tree_decode, _sig_encode, _sig_decode)
        _KERNELS = py
        if not numba_disabled():
            try:
                import numba

                jit = numba.njit(cache=True, nogil=True)
                compiled = tuple(jit(f) for f in py)
                _warm_up(compiled)     # compile now (or load the cache), so a failure falls back here
                _KERNELS = compiled
            except Exception:  # noqa: BLE001 - numba missing or broken (or instrumented code): the Python loops
                _KERNELS = py
    return _KERNELS


def _warm_up(k) -> None:
    syms = np.array([1, 0, 1], dtype=np.int64)
    out = np.empty(64, dtype=np.uint8)
    for prev in (False, True):
        j = k[0](syms, 1, prev, RATE_FAST, RATE_SLOW, out)
        if k[1](np.frombuffer(out[:j].tobytes(), dtype=np.uint8), 3, 1, prev, RATE_FAST, RATE_SLOW, np.empty(3, dtype=np.int64)) != 0:
            raise RuntimeError("cabac kernels do not round-trip")
    flags = np.array([0, 1, 1, 0], dtype=np.uint8)
    j = k[2](flags, 2, 2, RATE_FAST, RATE_SLOW, out)
    st, nnz = k[3](np.frombuffer(out[:j].tobytes(), dtype=np.uint8), 2, 2, RATE_FAST, RATE_SLOW, np.empty(4, dtype=np.uint8), np.empty(4, dtype=np.int64))
    if st != 0 or nnz != 2:
        raise RuntimeError("cabac kernels do not round-trip")


_ERRORS = {1: "cabac payload shorter than its 5 flush bytes",
           2: "cabac payload does not start with a valid coder state (first byte 0, state below 2^32 - 1)",
           3: "cabac payload ends before its symbols do (truncated or corrupt)",
           4: "cabac payload has bytes left after its last symbol (corrupt stream)",
           5: "cabac significance map lists more nonzeros than the gap stream allows (corrupt stream)"}


# ---- streams ----------------------------------------------------------------------------------------

def _bits_of(alphabet: int) -> int:
    return alphabet.bit_length() - 1


def encode_tree(symbols: np.ndarray, alphabet: int, model: int = TREE) -> bytes:
    symbols = np.ascontiguousarray(symbols, dtype=np.int64)
    b = _bits_of(alphabet)
    out = np.empty(2 * b * len(symbols) + 16, dtype=np.uint8)   # a bin never emits more than 2 bytes
    j = _kernels()[0](symbols, b, model == TREE_PREV, RATE_FAST, RATE_SLOW, out)
    return out[:j].tobytes()


def decode_tree(payload, count: int, alphabet: int, model: int = TREE) -> np.ndarray:
    buf = np.frombuffer(payload, dtype=np.uint8)
    out = np.empty(count, dtype=np.int64)
    st = _kernels()[1](buf, count, _bits_of(alphabet), model == TREE_PREV, RATE_FAST, RATE_SLOW, out)
    if st:
        raise CabacError(_ERRORS[st])
    return out


def matrix_cols(shape) -> int:
    """Columns of the matrix a tensor is viewed as by the significance model (rows = shape[0])."""
    if len(shape) <= 1:
        n = 1
        for s in shape:
            n *= s
        return max(n, 1)
    n = 1
    for s in shape[1:]:
        n *= s
    return max(n, 1)


def encode_significance(positions: np.ndarray, numel: int, cols: int) -> bytes:
    flags = np.zeros(numel, dtype=np.uint8)
    flags[np.asarray(positions, dtype=np.int64)] = 1
    rows = numel // cols if cols else 0
    out = np.empty(2 * numel + 16, dtype=np.uint8)
    j = _kernels()[2](flags, rows, cols, RATE_FAST, RATE_SLOW, out)
    return out[:j].tobytes()


def decode_significance(payload, numel: int, cols: int, max_nnz: int) -> np.ndarray:
    """Positions of the nonzeros (sorted); at most ``max_nnz`` of them, else CabacError."""
    buf = np.frombuffer(payload, dtype=np.uint8)
    rows = numel // cols if cols else 0
    flags = np.empty(numel, dtype=np.uint8)
    pos = np.empty(min(max_nnz, numel), dtype=np.int64)
    st, nnz = _kernels()[3](buf, rows, cols, RATE_FAST, RATE_SLOW, flags, pos)
    if st:
        raise CabacError(_ERRORS[st])
    return pos[:nnz]


def encode_stream(symbols: np.ndarray, alphabet: int, model: int = TREE) -> tuple[bytes, dict]:
    """Section bytes and stream record (without "section") of a tree-model stream."""
    data = encode_tree(symbols, alphabet, model)
    from dcomp.compressors.huffman import entropy
    rec = {"count": int(len(symbols)), "alphabet": int(alphabet), "coding": "cabac", "model": model,
           "bytes": len(data), "entropy": round(entropy(np.bincount(symbols, minlength=alphabet)), 6)}
    return data, rec


def check_record(rec: dict) -> None:
    """The "cabac" fields (count and alphabet are checked by the caller)."""
    m, b = rec.get("model"), rec.get("bytes")
    if not isinstance(m, int) or isinstance(m, bool) or m not in MODELS:
        raise CabacError(f"cabac model must be one of {', '.join(f'{k} ({v})' for k, v in MODEL_NAMES.items())}")
    if not isinstance(b, int) or isinstance(b, bool) or b < FLUSH:
        raise CabacError(f"cabac payload size must be an integer >= {FLUSH}")
