"""Canonical Huffman and fixed-width symbol streams, vectorised with numpy.

The byte layout is specified in docs/FORMAT.md ("Stream S"). Encoding builds the bit string with
``np.repeat`` (no loop over symbols); decoding of fixed-width streams is one vectorised gather, and
Huffman streams are cut into blocks of ``B`` symbols whose bit lengths are stored, so that all
blocks of all streams are decoded in lockstep: ``B`` numpy steps, each advancing every block's
cursor by one symbol through a lookup table on the next ``L`` bits.

Only loops over the alphabet (at most 2^16 symbols, building the code) or over block positions
(``B`` <= 4096) exist; nothing loops over symbols in Python.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from dcomp.compressors import numba_disabled

MAX_CODE_LEN = 15          # fits a 4-bit nibble
MAX_BLOCK = 4096
DEFAULT_BLOCK = 1024


class StreamError(ValueError):
    """A stream's bytes contradict its record (the dcz reader adds the tensor name)."""

    def __init__(self, msg: str, index: int | None = None):
        super().__init__(msg)
        self.index = index


# ---- building codes ---------------------------------------------------------------------------

def entropy(counts: np.ndarray) -> float:
    """Empirical entropy in bits per symbol of a histogram."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    if n <= 0:
        return 0.0
    p = counts[counts > 0] / n
    return abs(float(-(p * np.log2(p)).sum()))


def _huffman_lengths(weights: list[int]) -> np.ndarray:
    n = len(weights)
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = np.full(2 * n - 1, -1, dtype=np.int64)
    nxt = n
    while len(heap) > 1:
        wa, a = heapq.heappop(heap)
        wb, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (wa + wb, nxt))
        nxt += 1
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for node in range(2 * n - 3, -1, -1):  # parents have larger ids than children: loop over the tree
        depth[node] = depth[parent[node]] + 1
    return depth[:n]


def code_lengths(counts: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray | None:
    """Huffman code lengths (0 = unused) limited to ``max_len`` bits; None if impossible."""
    counts = np.asarray(counts, dtype=np.int64)
    lens = np.zeros(len(counts), dtype=np.uint8)
    used = np.flatnonzero(counts)
    if len(used) == 0:
        return lens
    if len(used) == 1:
        lens[used] = 1
        return lens
    if len(used) > (1 << max_len):
        return None
    w = counts[used]
    while True:
        got = _huffman_lengths(list(w))
        if got.max() <= max_len:
            break
        w = (w >> 1) | 1  # flatten the distribution until the tree is shallow enough
    lens[used] = got
    return lens


def canonical_codes(lens: np.ndarray) -> np.ndarray:
    """Canonical codes (MSB-first values) for code lengths; 0 where unused."""
    lens = np.asarray(lens, dtype=np.int64)
    codes = np.zeros(len(lens), dtype=np.int64)
    used = np.flatnonzero(lens)
    if len(used) == 0:
        return codes
    order = used[np.lexsort((used, lens[used]))]
    ls = lens[order]
    span = np.int64(1) << (MAX_CODE_LEN - ls)
    start = np.concatenate([[0], np.cumsum(span)[:-1]])
    codes[order] = start >> (MAX_CODE_LEN - ls)
    return codes


def check_lengths(lens: np.ndarray) -> None:
    if lens.size and int(lens.max()) > MAX_CODE_LEN:
        raise StreamError(f"code length {int(lens.max())} exceeds {MAX_CODE_LEN}")
    used = lens[lens > 0].astype(np.int64)
    if used.size == 0:
        raise StreamError("Huffman table has no symbols")
    if int((np.int64(1) << (MAX_CODE_LEN - used)).sum()) > (1 << MAX_CODE_LEN):
        raise StreamError("Huffman code lengths violate the Kraft inequality")


# ---- bits -------------------------------------------------------------------------------------

def write_bits(codes: np.ndarray, lens: np.ndarray, chunk: int = 1 << 20) -> tuple[bytes, int]:
    """Concatenate ``lens[i]``-bit values ``codes[i]`` MSB-first; returns (bytes, bit count)."""
    lens = np.asarray(lens, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    total = int(lens.sum())
    bits = np.empty(total, dtype=np.uint8)
    pos = 0
    for s in range(0, len(lens), chunk):  # chunks bound memory; each chunk is vectorised
        l = lens[s:s + chunk]
        c = codes[s:s + chunk]
        ends = np.cumsum(l)
        t = int(ends[-1]) if len(ends) else 0
        if t == 0:
            continue
        rep_l = np.repeat(l, l)
        off = np.arange(t, dtype=np.int64) - np.repeat(ends - l, l)
        bits[pos:pos + t] = (np.repeat(c, l) >> (rep_l - 1 - off)) & 1
        pos += t
    return np.packbits(bits).tobytes(), total


def _windows(buf: bytes | memoryview, pad: int) -> np.ndarray:
    """Big-endian 32-bit window starting at every byte of ``buf`` (zero padded)."""
    a = np.zeros(len(buf) + pad + 4, dtype=np.uint32)
    a[:len(buf)] = np.frombuffer(buf, dtype=np.uint8)
    return (a[:-3] << 24) | (a[1:-2] << 16) | (a[2:-1] << 8) | a[3:]


def pack_fixed(symbols: np.ndarray, width: int) -> bytes:
    codes = np.asarray(symbols, dtype=np.int64)
    return write_bits(codes, np.full(len(codes), width, dtype=np.int64))[0]


def unpack_fixed(buf: bytes | memoryview, count: int, width: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    win = _windows(buf, 0)
    p = np.arange(count, dtype=np.int64) * width
    r = (32 - width) - (p & 7)
    return ((win[p >> 3].astype(np.int64) >> r) & ((1 << width) - 1))


# ---- streams ----------------------------------------------------------------------------------

@dataclass
class StreamPlan:
    coding: str             # "fixed" or "huffman"
    nbytes: int             # section size
    count: int
    alphabet: int
    width: int
    lens: np.ndarray | None = None
    block: int = 0
    bits: int = 0
    entropy: float = 0.0


def plan_stream(counts: np.ndarray, alphabet: int, block: int = DEFAULT_BLOCK, huffman: bool = True) -> StreamPlan:
    """Choose fixed width or Huffman for a symbol histogram, whichever section is smaller."""
    width = alphabet.bit_length() - 1
    n = int(counts.sum())
    fixed = StreamPlan("fixed", (n * width + 7) // 8, n, alphabet, width, entropy=entropy(counts))
    if not huffman or n == 0:
        return fixed
    lens = code_lengths(counts)
    if lens is None:
        return fixed
    maxlen = int(lens.max())
    b = max(1, min(block, MAX_BLOCK, 65535 // maxlen))
    nb = -(-n // b)
    bits = int((counts.astype(np.int64) * lens).sum())
    size = (alphabet + 1) // 2 + 2 * nb + (bits + 7) // 8
    if size >= fixed.nbytes:
        return fixed
    return StreamPlan("huffman", size, n, alphabet, width, lens, b, bits, fixed.entropy)


def encode_stream(symbols: np.ndarray, plan: StreamPlan) -> tuple[bytes, dict]:
    """Section bytes and the header record (without "section") of a planned stream."""
    symbols = np.asarray(symbols, dtype=np.int64)
    rec = {"count": plan.count, "alphabet": plan.alphabet, "coding": plan.coding}
    if plan.coding == "fixed":
        rec["width"] = plan.width
        return pack_fixed(symbols, plan.width), rec
    lens = plan.lens.astype(np.int64)
    codes = canonical_codes(lens)
    sl = lens[symbols]
    payload, bits = write_bits(codes[symbols], sl)
    block_bits = np.add.reduceat(sl, np.arange(0, len(sl), plan.block)).astype("<u2")
    nib = np.zeros(plan.alphabet + (plan.alphabet & 1), dtype=np.uint8)
    nib[:plan.alphabet] = plan.lens
    table = ((nib[0::2] << 4) | nib[1::2]).astype(np.uint8)
    rec.update(block=plan.block, bits=bits, entropy=round(plan.entropy, 6))
    return table.tobytes() + block_bits.tobytes() + payload, rec


def stream_size(rec: dict) -> int:
    """The section length a valid stream record implies."""
    n, a = rec["count"], rec["alphabet"]
    if rec["coding"] == "fixed":
        return (n * rec["width"] + 7) // 8
    if rec["coding"] == "ans":
        return 2 * a + rec["bytes"]
    if rec["coding"] == "cabac":
        return rec["bytes"]
    nb = -(-n // rec["block"]) if n else 0
    return (a + 1) // 2 + 2 * nb + (rec["bits"] + 7) // 8


def table_bytes(rec: dict) -> int:
    if rec["coding"] == "cabac":
        return 0
    if rec["coding"] == "ans":
        return 2 * rec["alphabet"]
    if rec["coding"] != "huffman":
        return 0
    nb = -(-rec["count"] // rec["block"]) if rec["count"] else 0
    return (rec["alphabet"] + 1) // 2 + 2 * nb


def check_record(rec: dict) -> None:
    """Structural checks of a stream record (the reader calls this before touching bytes)."""
    for k in ("count", "alphabet"):
        if not isinstance(rec.get(k), int) or isinstance(rec.get(k), bool) or rec[k] < 0:
            raise StreamError(f"stream field {k!r} must be a non-negative integer")
    a = rec["alphabet"]
    if a < 2 or a > (1 << 16) or a & (a - 1):
        raise StreamError(f"stream alphabet {a} is not a power of two in 2..65536")
    coding = rec.get("coding")
    if coding == "fixed":
        if rec.get("width") != a.bit_length() - 1:
            raise StreamError("fixed stream width does not match its alphabet")
    elif coding == "ans":   # rANS (format 1.3): dcomp.compressors.rans
        from dcomp.compressors import rans
        try:
            rans.check_record(rec)
        except rans.RansError as e:
            raise StreamError(str(e)) from None
    elif coding == "cabac":   # context-adaptive binary arithmetic coding (format 1.4): dcomp.compressors.cabac
        from dcomp.compressors import cabac
        try:
            cabac.check_record(rec)
        except cabac.CabacError as e:
            raise StreamError(str(e)) from None
    elif coding == "huffman":
        b, bits = rec.get("block"), rec.get("bits")
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= MAX_BLOCK:
            raise StreamError(f"Huffman block size must be 1..{MAX_BLOCK}")
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 0:
            raise StreamError("Huffman bit count must be a non-negative integer")
        if rec["count"] > bits:
            raise StreamError(f"stream claims {rec['count']} symbols in only {bits} bits")
        if bits > rec["count"] * MAX_CODE_LEN:
            raise StreamError(f"stream claims {bits} bits for {rec['count']} symbols")
    else:
        raise StreamError(f"unknown stream coding {coding!r}")


def _parse_huffman(rec: dict, section) -> tuple[np.ndarray, np.ndarray, memoryview]:
    a, n, b = rec["alphabet"], rec["count"], rec["block"]
    tb = (a + 1) // 2
    nb = -(-n // b) if n else 0
    raw = np.frombuffer(section, dtype=np.uint8, count=tb)
    lens = np.empty(tb * 2, dtype=np.uint8)
    lens[0::2] = raw >> 4
    lens[1::2] = raw & 15
    if a & 1 and lens[a]:
        raise StreamError("unused code-length nibble is not zero")
    lens = lens[:a]
    check_lengths(lens)
    if b * int(lens.max()) > 65535:
        raise StreamError("Huffman block too long for its 16-bit block table")
    block_bits = np.frombuffer(section, dtype="<u2", count=nb, offset=tb).astype(np.int64)
    if int(block_bits.sum()) != rec["bits"]:
        raise StreamError("Huffman block lengths do not add up to the stream's bit count")
    return lens, block_bits, memoryview(section)[tb + 2 * nb:]


def decode_streams(items: list[tuple]) -> list[np.ndarray]:
    """Decode several streams (record, section bytes[, (numel, cols, index_bits)]); Huffman ones
    together in lockstep. A gap stream coded with the cabac significance model needs the third
    element: the tensor's size, its matrix width and the gap width.

    The records must have passed ``check_record`` and the sections have length ``stream_size``.
    Raises StreamError (with ``.index`` = the item) on any inconsistency.
    """
    out: list[np.ndarray | None] = [None] * len(items)
    huff = []
    for i, item in enumerate(items):
        rec, sec = item[0], item[1]
        try:
            if rec["coding"] == "cabac":
                out[i] = _decode_cabac(rec, sec, item[2] if len(item) > 2 else None)
            elif rec["coding"] == "fixed":
                out[i] = unpack_fixed(sec, rec["count"], rec["width"])
                _check_pad(sec, rec["count"] * rec["width"])
            elif rec["coding"] == "ans":
                from dcomp.compressors import rans
                try:
                    out[i] = rans.decode(sec, rec["count"], rec["alphabet"], rec["precision"])
                except rans.RansError as e:
                    raise StreamError(str(e)) from None
            elif rec["count"] == 0:
                _parse_huffman(rec, sec)
                out[i] = np.zeros(0, dtype=np.int64)
            else:
                lens, bb, payload = _parse_huffman(rec, sec)
                _check_pad(payload, rec["bits"])
                huff.append((i, rec, lens, bb, payload))
        except StreamError as e:
            raise StreamError(str(e), i) from None
    for batch in _batches(huff):
        decoded = None
        if _numba_kernel() is not None:
            try:
                decoded = _decode_huffman_numba(batch)
            except StreamError:
                raise
            except Exception:  # noqa: BLE001 - compiling or threading failed here: numpy from now on
                global _KERNEL
                _KERNEL = None
        if decoded is None:
            decoded = _decode_huffman_lockstep(batch)
        for i, arr in decoded:
            out[i] = arr
    for i, item in enumerate(items):
        rec = item[0]
        if out[i].size and int(out[i].max()) >= rec["alphabet"]:
            raise StreamError("symbol outside the alphabet", i)
    return out  # type: ignore[return-value]


def _decode_cabac(rec: dict, sec, geom) -> np.ndarray:
    from dcomp.compressors import cabac
    try:
        if rec["model"] != cabac.SIGNIFICANCE:
            return cabac.decode_tree(sec, rec["count"], rec["alphabet"], rec["model"])
        if geom is None:
            raise StreamError("cabac significance model is only for the gap stream of a sparse tensor")
        numel, cols, k = geom
        pos = cabac.decode_significance(sec, numel, cols, rec["count"])
    except cabac.CabacError as e:
        raise StreamError(str(e)) from None
    from dcomp.formats.dcz.spec import gap_symbols
    syms = gap_symbols(pos, numel, k)
    if len(syms) != rec["count"]:
        raise StreamError(f"cabac significance map gives {len(syms)} relative indices, the record says {rec['count']}")
    return syms


LUT_BUDGET = 1 << 22        # lookup-table entries decoded together (each stream's table has 2^maxlen)
LOCKSTEP_BUDGET = 1 << 24   # numpy path: (longest block) x (blocks) entries decoded together


def _batches(huff: list) -> list[list]:
    """Split the Huffman streams into groups decoded together, so that memory stays bounded
    whatever the file claims: at most LUT_BUDGET table entries (a stream with a 15-bit code costs
    32768 however few bytes its table takes) and LOCKSTEP_BUDGET lockstep cells per group (a
    stream with 4096-symbol blocks beside one with a million 1-symbol blocks would otherwise
    need 4096 x 1M cells). A single stream is never split: its cells are about its symbol count."""
    out, cur, lut, bmax, nblocks = [], [], 0, 0, 0
    for h in huff:
        size = 1 << int(h[2].max())
        b, nb = h[1]["block"], len(h[3])
        if cur and (lut + size > LUT_BUDGET or max(bmax, b) * (nblocks + nb) > LOCKSTEP_BUDGET):
            out.append(cur)
            cur, lut, bmax, nblocks = [], 0, 0, 0
        cur.append(h)
        lut += size
        bmax = max(bmax, b)
        nblocks += nb
    if cur:
        out.append(cur)
    return out


def _check_pad(buf, nbits: int) -> None:
    if nbits % 8:
        last = np.frombuffer(buf, dtype=np.uint8)[nbits // 8]
        if last & ((1 << (8 - nbits % 8)) - 1):
            raise StreamError("padding bits after the last symbol are not zero")


def _decode_huffman_lockstep(huff) -> list[tuple[int, np.ndarray]]:
    L = max(int(h[2].max()) for h in huff)
    size = 1 << L
    luts, starts, counts, lut_off, item_of_block = [], [], [], [], []
    payloads, byte_off = [], 0
    max_b = 0
    for k, (i, rec, lens, bb, payload) in enumerate(huff):
        lens64 = lens.astype(np.int64)
        codes = canonical_codes(lens64)
        used = np.flatnonzero(lens64)
        order = used[np.lexsort((used, lens64[used]))]
        span = np.int64(1) << (L - lens64[order])
        lut = np.zeros(size, dtype=np.int64)
        filled = int(span.sum())
        lut[:filled] = np.repeat((order << 5) | lens64[order], span)
        del codes
        luts.append(lut)
        n, b = rec["count"], rec["block"]
        nb = len(bb)
        bstart = np.concatenate([[0], np.cumsum(bb)[:-1]]) + 8 * byte_off
        starts.append(bstart)
        cnt = np.full(nb, b, dtype=np.int64)
        cnt[-1] = n - b * (nb - 1)
        counts.append(cnt)
        lut_off.append(np.full(nb, k * size, dtype=np.int64))
        item_of_block.append(np.full(nb, k, dtype=np.int64))
        payloads.append(bytes(payload))
        byte_off += len(payload)
        max_b = max(max_b, b)
    lut_all = np.concatenate(luts)
    start = np.concatenate(starts)
    cnt = np.concatenate(counts)
    off = np.concatenate(lut_off)
    steps = int(cnt.max())
    # a corrupt block may run past its end by at most steps * L bits: pad so reads stay in bounds
    win = _windows(b"".join(payloads), pad=(steps * L) // 8 + 8).astype(np.int64)
    mask = (1 << L) - 1
    shift = 32 - L
    p = start.copy()
    ent = np.empty((steps, len(start)), dtype=np.int64)
    for j in range(steps):  # lockstep over block positions, every block at once
        w = win[p >> 3]
        e = lut_all[off + ((w >> (shift - (p & 7))) & mask)]
        ent[j] = e
        p += e & 31
    ent = ent.T
    valid = np.arange(steps)[None, :] < cnt[:, None]
    lens_used = np.where(valid, ent & 31, 1)
    bad = (lens_used == 0).any(axis=1)
    item = np.concatenate(item_of_block)
    if bad.any():
        raise StreamError("invalid Huffman code in the payload", huff[int(item[np.argmax(bad)])][0])
    consumed = np.where(valid, ent & 31, 0).sum(axis=1)
    expect = np.concatenate([h[3] for h in huff])
    if (consumed != expect).any():
        k = int(item[np.argmax(consumed != expect)])
        raise StreamError("a Huffman block does not end where its block table says", huff[k][0])
    syms = ent >> 5
    result = []
    first = 0
    for k, h in enumerate(huff):  # loop over streams, not symbols
        nb = len(h[3])
        blk = syms[first:first + nb]
        v = valid[first:first + nb]
        result.append((h[0], blk[v]))
        first += nb
    return result


# ---- optional compiled decoder -------------------------------------------------------------------
# numba (when installed, and DCOMP_NO_NUMBA is not set) decodes each block sequentially in
# compiled code, ~10x faster than the numpy lockstep loop. Both give identical results; the
# numpy path is the reference (tests run both).

_KERNEL: object = False


def _numba_kernel():
    global _KERNEL
    if _KERNEL is False:
        _KERNEL = None
        if not numba_disabled():
            try:
                _KERNEL = _build_kernel()
            except Exception:  # noqa: BLE001 - numba missing or broken: use numpy
                _KERNEL = None
    return _KERNEL


def _build_kernel():
    import numba

    @numba.njit(cache=True, nogil=True)
    def kernel(buf, start, cnt, outoff, off, lbits, lut, expect, out, status):  # pragma: no cover - compiled
        # Blocks are independent (a numba.prange here would spread them over cores; not used: the
        # default workqueue threading layer aborts on concurrent calls from several threads).
        # Per block a bit buffer ``acc`` holds ``nbits`` unread bits (oldest highest).
        for b in range(start.shape[0]):
            L = lbits[b]
            mask = (1 << L) - 1
            base = off[b]
            p = start[b]
            q = p >> 3
            acc = 0
            nbits = 0
            while nbits <= 48:
                acc = ((acc << 8) | np.int64(buf[q])) & 0xFFFFFFFFFFFFFF
                q += 1
                nbits += 8
            nbits -= p & 7
            used = 0
            o = outoff[b]
            st = 0
            for _ in range(cnt[b]):
                if nbits < L:
                    while nbits <= 48:
                        acc = ((acc << 8) | np.int64(buf[q])) & 0xFFFFFFFFFFFFFF
                        q += 1
                        nbits += 8
                e = lut[base + ((acc >> (nbits - L)) & mask)]
                ln = e & 31
                if ln == 0:
                    st = 1
                    break
                out[o] = e >> 5
                o += 1
                nbits -= ln
                used += ln
            if st == 0 and used != expect[b]:
                st = 2
            status[b] = st

    return kernel


def _decode_huffman_numba(huff) -> list[tuple[int, np.ndarray]]:
    kernel = _numba_kernel()
    luts, starts, counts, offs, lbits, items, payloads = [], [], [], [], [], [], []
    byte_off = lut_off = 0
    Lmax = 1
    for k, (i, rec, lens, bb, payload) in enumerate(huff):
        lens64 = lens.astype(np.int64)
        L = int(lens64.max())
        Lmax = max(Lmax, L)
        used = np.flatnonzero(lens64)
        order = used[np.lexsort((used, lens64[used]))]
        span = np.int64(1) << (L - lens64[order])
        lut = np.zeros(1 << L, dtype=np.int32)
        lut[:int(span.sum())] = np.repeat((order << 5) | lens64[order], span)
        luts.append(lut)
        n, b = rec["count"], rec["block"]
        nb = len(bb)
        starts.append(np.concatenate([[0], np.cumsum(bb)[:-1]]) + 8 * byte_off)
        cnt = np.full(nb, b, dtype=np.int64)
        cnt[-1] = n - b * (nb - 1)
        counts.append(cnt)
        offs.append(np.full(nb, lut_off, dtype=np.int64))
        lbits.append(np.full(nb, L, dtype=np.int64))
        items.append(np.full(nb, k, dtype=np.int64))
        payloads.append(bytes(payload))
        byte_off += len(payload)
        lut_off += 1 << L
    start = np.concatenate(starts).astype(np.int64)
    cnt = np.concatenate(counts)
    steps = int(cnt.max())
    joined = b"".join(payloads)
    buf = np.zeros(len(joined) + (steps * Lmax) // 8 + 16, dtype=np.uint8)
    buf[:len(joined)] = np.frombuffer(joined, dtype=np.uint8)
    out = np.empty(int(cnt.sum()), dtype=np.int32)
    expect = np.concatenate([h[3] for h in huff]).astype(np.int64)
    status = np.zeros(len(start), dtype=np.int8)
    outoff = np.concatenate([[0], np.cumsum(cnt)[:-1]]).astype(np.int64)
    kernel(buf, start, cnt, outoff, np.concatenate(offs), np.concatenate(lbits), np.concatenate(luts), expect, out,
           status)
    if status.any():
        bad = int(np.flatnonzero(status)[0])
        k = int(np.concatenate(items)[bad])
        msg = ("invalid Huffman code in the payload" if status[bad] == 1
               else "a Huffman block does not end where its block table says")
        raise StreamError(msg, huff[k][0])
    result, first = [], 0
    for h in huff:
        n = h[1]["count"]
        result.append((h[0], out[first:first + n]))
        first += n
    return result
