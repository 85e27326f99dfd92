"""Static rANS (range asymmetric numeral systems) for .dcz symbol streams (docs/FORMAT.md, "ans").

A stream is coded with one static model: integer frequencies ``f[s]`` summing to ``2^p`` stored
in the section, a 32-bit state renormalised a byte at a time (L = 2^23). Unlike Huffman no
symbol costs a whole number of bits, so skewed streams (a few very common gaps) come within
~0.01 bit/symbol of their entropy; the price is the 2-byte-per-symbol frequency table.

    sec, rec = encode_stream(symbols, alphabet)      # rec: {"coding": "ans", "precision", "bytes", ...}
    symbols = decode(sec, count, alphabet, precision, nbytes)   # raises StreamError on any defect

Encoding and decoding run compiled with numba when it is available (DCOMP_NO_NUMBA=1: the
pure-Python reference loop, same bytes, far slower). This coder is dcomp's own; the format
is defined by the spec, not by this code.
"""

from __future__ import annotations


import numpy as np

from dcomp.compressors import numba_disabled

PRECISION = 15            # writer's choice of p: frequencies sum to 2^15
MAX_PRECISION = 15        # a frequency of 2^p must fit the u16 table entry
RANS_L = 1 << 23          # lower bound of the normalised state; the state lives in [L, 2^32)


class RansError(ValueError):
    pass


def quantize_freqs(counts: np.ndarray, precision: int = PRECISION) -> np.ndarray | None:
    """Integer frequencies summing to 2^precision, >= 1 for every symbol that occurs (None if the
    used symbols outnumber 2^precision). Deterministic integer arithmetic."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    total = 1 << precision
    used = counts > 0
    if n == 0 or int(used.sum()) > total:
        return None
    f = np.where(used, np.maximum(1, counts * total // n), 0).astype(np.int64)
    r = total - int(f.sum())
    if r > 0:
        # give the rest to the symbols that lost most to rounding down (largest fractional parts)
        frac = np.where(used, counts * total - f * n, -1)
        order = np.argsort(-frac, kind="stable")
        k = int(used.sum())
        for j in range(r):
            f[order[j % k]] += 1
    while r < 0:   # the floor of 1 overshot: take from the largest
        i = int(np.argmax(f))
        d = min(-r, int(f[i]) - 1)
        f[i] -= d
        r += d
    return f


def cost_bits(counts: np.ndarray, freqs: np.ndarray, precision: int) -> float:
    used = counts > 0
    return float((counts[used] * (precision - np.log2(freqs[used]))).sum())


# ---- reference (pure Python) ----------------------------------------------------------------------

def _encode_py(symbols, freqs, cum, precision):
    x = RANS_L
    out = bytearray()
    for s in symbols[::-1]:
        f = int(freqs[s])
        x_max = ((RANS_L >> precision) << 8) * f
        while x >= x_max:
            out.append(x & 0xFF)
            x >>= 8
        x = ((x // f) << precision) + (x % f) + int(cum[s])
    out.reverse()
    return x.to_bytes(4, "little") + bytes(out)


def _decode_py(buf, count, freqs, cum, slot2sym, precision, out):
    n = len(buf)
    if n < 4:
        return 1
    x = int.from_bytes(bytes(buf[:4]), "little")
    if x < RANS_L:
        return 2
    pos = 4
    mask = (1 << precision) - 1
    for i in range(count):
        slot = x & mask
        s = int(slot2sym[slot])
        out[i] = s
        x = int(freqs[s]) * (x >> precision) + slot - int(cum[s])
        while x < RANS_L:
            if pos >= n:
                return 3
            x = (x << 8) | int(buf[pos])
            pos += 1
    if x != RANS_L:
        return 4
    if pos != n:
        return 5
    return 0


_KERNELS: object = False


def _kernels():
    global _KERNELS
    if _KERNELS is False:
        _KERNELS = None
        if not numba_disabled():
            try:
                _KERNELS = _build()
            except Exception:  # noqa: BLE001 - numba missing or broken: the Python loop
                _KERNELS = None
    return _KERNELS


def _build():
    import numba

    @numba.njit(cache=True, nogil=True)
    def enc(symbols, freqs, cum, precision, out):  # pragma: no cover - compiled
        x = np.uint64(RANS_L)
        j = out.shape[0]
        for i in range(symbols.shape[0] - 1, -1, -1):
            s = symbols[i]
            f = np.uint64(freqs[s])
            x_max = np.uint64((RANS_L >> precision) << 8) * f
            while x >= x_max:
                j -= 1
                out[j] = np.uint8(x & np.uint64(0xFF))
                x >>= np.uint64(8)
            x = ((x // f) << np.uint64(precision)) + (x % f) + np.uint64(cum[s])
        return x, j

    @numba.njit(cache=True, nogil=True)
    def dec(buf, count, freqs, cum, slot2sym, precision, out):  # pragma: no cover - compiled
        n = buf.shape[0]
        if n < 4:
            return 1
        x = np.uint64(buf[0]) | (np.uint64(buf[1]) << np.uint64(8)) | (np.uint64(buf[2]) << np.uint64(16)) \
            | (np.uint64(buf[3]) << np.uint64(24))
        L = np.uint64(RANS_L)
        if x < L:
            return 2
        pos = 4
        mask = np.uint64((1 << precision) - 1)
        p = np.uint64(precision)
        for i in range(count):
            slot = x & mask
            s = slot2sym[slot]
            out[i] = s
            x = np.uint64(freqs[s]) * (x >> p) + slot - np.uint64(cum[s])
            while x < L:
                if pos >= n:
                    return 3
                x = (x << np.uint64(8)) | np.uint64(buf[pos])
                pos += 1
        if x != L:
            return 4
        if pos != n:
            return 5
        return 0

    return enc, dec


# ---- streams ---------------------------------------------------------------------------------------

def encode_payload(symbols: np.ndarray, freqs: np.ndarray, precision: int) -> bytes:
    symbols = np.ascontiguousarray(symbols, dtype=np.int64)
    freqs = np.asarray(freqs, dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.int64)
    k = _kernels()
    if k is None:
        return _encode_py(symbols, freqs, cum, precision)
    # each symbol emits at most precision/8 + 1 bytes (2 for p <= 15)
    out = np.empty(2 * len(symbols) + 8, dtype=np.uint8)
    try:
        x, j = k[0](symbols, freqs, cum, precision, out)
    except Exception:  # noqa: BLE001 - compiling failed here (e.g. instrumented code): the Python loop from now on
        _disable()
        return _encode_py(symbols, freqs, cum, precision)
    return int(x).to_bytes(4, "little") + out[j:].tobytes()


def _disable() -> None:
    global _KERNELS
    _KERNELS = None


def table(freqs: np.ndarray) -> bytes:
    return np.asarray(freqs, dtype="<u2").tobytes()


def encode_stream(symbols: np.ndarray, alphabet: int, counts: np.ndarray | None = None,
                  precision: int = PRECISION) -> tuple[bytes, dict] | None:
    """Section bytes and the stream record (without "section"), or None if rANS cannot code it."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if counts is None:
        counts = np.bincount(symbols, minlength=alphabet)
    freqs = quantize_freqs(counts, precision)
    if freqs is None:
        return None
    payload = encode_payload(symbols, freqs, precision)
    from dcomp.compressors.huffman import entropy
    rec = {"count": int(len(symbols)), "alphabet": int(alphabet), "coding": "ans", "precision": precision,
           "bytes": len(payload), "entropy": round(entropy(counts), 6)}
    return table(freqs) + payload, rec


def encode(symbols: np.ndarray, alphabet: int) -> bytes:
    """Just the section (table + payload) of a stream: for measuring."""
    r = encode_stream(symbols, alphabet)
    if r is None:
        raise RansError("too many distinct symbols for rANS")
    return r[0]


def stream_size(rec: dict) -> int:
    return 2 * rec["alphabet"] + rec["bytes"]


def check_record(rec: dict) -> None:
    """The "ans" fields (count and alphabet are checked by the caller)."""
    p, b = rec.get("precision"), rec.get("bytes")
    if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= MAX_PRECISION:
        raise RansError(f"rANS precision must be an integer 1..{MAX_PRECISION}")
    if not isinstance(b, int) or isinstance(b, bool) or b < 4:
        raise RansError("rANS payload size must be an integer >= 4 (the 4-byte state)")
    if rec["count"] == 0 and b != 4:
        raise RansError("an empty rANS stream has a 4-byte payload")


def decode(section, count: int, alphabet: int, precision: int) -> np.ndarray:
    """Decode one stream's section (length already checked = 2 * alphabet + bytes).

    Work is ``count`` symbol steps plus one step per payload byte; no read leaves the section.
    Raises RansError naming the defect."""
    section = np.frombuffer(section, dtype=np.uint8)
    freqs = np.frombuffer(section, dtype="<u2", count=alphabet).astype(np.int64)
    if int(freqs.sum()) != 1 << precision:
        raise RansError(f"rANS frequencies sum to {int(freqs.sum())}, not 2^{precision}")
    payload = section[2 * alphabet:]
    cum = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.int64)
    slot2sym = np.repeat(np.arange(alphabet, dtype=np.int64), freqs)
    out = np.empty(count, dtype=np.int64)
    k = _kernels()
    if k is None:
        status = _decode_py(payload, count, freqs, cum, slot2sym, precision, out)
    else:
        try:
            status = k[1](payload, count, freqs, cum, slot2sym, precision, out)
        except Exception:  # noqa: BLE001 - compiling failed here (e.g. instrumented code): the Python loop from now on
            _disable()
            status = _decode_py(payload, count, freqs, cum, slot2sym, precision, out)
    if status:
        raise RansError({1: "rANS payload shorter than its 4-byte state",
                         2: "rANS initial state below 2^23",
                         3: "rANS payload ends before its symbols do (truncated or corrupt)",
                         4: "rANS final state is not 2^23 (corrupt stream)",
                         5: "rANS payload has bytes left after its last symbol (corrupt stream)"}[status])
    return out
