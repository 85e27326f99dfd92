"""Fuzz targets for the rANS stream coder (format 1.3, coding "ans"), in the style of targets.py:
``rans_decode`` (untrusted record fields + section bytes -> only StreamError) and
``rans_round_trip`` (any stream the writer can code comes back symbol for symbol)."""

from __future__ import annotations

import numpy as np

from dcomp.compressors import huffman as hf
from dcomp.compressors import rans
from fuzzing.targets import Choices


def rans_decode(data: bytes) -> None:
    """A stream record (from the first bytes) over a section (the rest), as the reader sees it after
    check 11: the section length is fixed up to what the record implies. Half the inputs get a
    valid frequency table (summing to 2^precision), so the payload decoder is reached."""
    c = Choices(data)
    a = 1 << (1 + c.int(12))
    count = c.pick([0, 1, 2, 7, 100, c.int(1 << 14)])
    p = c.pick([15, 15, 1, 8, 12, 14, 16, 0, c.int(20)])
    nbytes = c.pick([4, 5, 8, 64, count, 2 * count, c.int(1 << 12), 3])
    rec = {"section": 0, "count": count, "alphabet": a, "coding": "ans", "precision": p, "bytes": nbytes}
    valid_table = c.int(2)
    body = c.rest()
    try:
        hf.check_record(rec)
        size = hf.stream_size(rec)
    except hf.StreamError:
        return
    sec = bytearray((body * (size // max(1, len(body)) + 1))[:size] if body else bytes(size))
    if valid_table:
        f = np.frombuffer(bytes(sec[:2 * a]), dtype="<u2").astype(np.int64) % 64 + 1
        f = rans.quantize_freqs(f, p)
        if f is not None:
            sec[:2 * a] = f.astype("<u2").tobytes()
    try:
        out = hf.decode_streams([(rec, bytes(sec))])
    except hf.StreamError:
        return
    assert len(out[0]) == count and (not count or int(out[0].max()) < a)


def rans_round_trip(data: bytes) -> None:
    c = Choices(data)
    a = 1 << (1 + c.int(16))
    n = c.int(5000)
    skew = c.int(6)
    rng = np.random.default_rng(c.int(1 << 30))
    if skew == 0:
        syms = rng.integers(0, a, n)
    else:
        syms = np.minimum(rng.geometric(1 - 0.5 ** (1 / skew), n) - 1, a - 1)
    enc = rans.encode_stream(syms, a)
    if enc is None:   # empty, or more distinct symbols than 2^15: the writer uses Huffman/fixed
        assert n == 0 or len(np.unique(syms)) > 1 << rans.PRECISION
        return
    sec, rec = enc
    assert len(sec) == hf.stream_size(rec)
    hf.check_record(rec)
    out = hf.decode_streams([(rec, sec)])[0]
    assert np.array_equal(out, syms)


TARGETS = {"rans_decode": rans_decode, "rans_round_trip": rans_round_trip}
