"""Fuzz targets for the context-adaptive coder (format 1.4, coding "cabac"), in the style of
targets.py: ``cabac_decode`` (untrusted record fields + payload bytes, for every model, as the
reader sees them after check 11 -> only StreamError, bounded work and memory) and
``cabac_round_trip`` (any stream or significance map comes back exactly)."""

from __future__ import annotations

import numpy as np

from dcomp.compressors import cabac
from dcomp.compressors import huffman as hf
from fuzzing.targets import Choices


def cabac_decode(data: bytes) -> None:
    """A stream record (from the first bytes) over a payload (the rest). For the significance model
    a tensor geometry is drawn too (numel up to 2^16, rows x cols); the decoded gap symbols must
    then be a valid gap stream of that tensor or the decoder must refuse."""
    c = Choices(data)
    model = c.pick([0, 1, 2, 2, 3, -1])
    a = 1 << (1 + c.int(16))
    rows, cols = 1 + c.int(64), 1 + c.int(64)
    numel = rows * cols if c.int(8) else 0
    k = 1 + c.int(16)
    count = c.pick([0, 1, 2, 7, 100, c.int(1 << 12), numel])
    body = c.rest()
    rec = {"section": 0, "count": count, "alphabet": a if model != 2 else 1 << k, "coding": "cabac",
           "model": model, "bytes": len(body)}
    try:
        hf.check_record(rec)
    except hf.StreamError:
        return
    if model == 2 and count > numel:
        return     # the reader refuses this at check 11 (a gap stream has at most numel symbols)
    geom = (numel, cols if numel else 1, k) if model == 2 else None
    try:
        out = hf.decode_streams([(rec, body, geom)])[0]
    except hf.StreamError:
        return
    assert len(out) == count and (not count or int(out.max()) < rec["alphabet"])


def cabac_round_trip(data: bytes) -> None:
    c = Choices(data)
    rng = np.random.default_rng(c.int(1 << 30))
    if c.int(2):
        a = 1 << (1 + c.int(16))
        n = c.int(3000)
        skew = c.int(6)
        syms = rng.integers(0, a, n) if skew == 0 else np.minimum(rng.geometric(1 - 0.5 ** (1 / skew), n) - 1, a - 1)
        model = c.pick([cabac.TREE, cabac.TREE_PREV])
        sec, rec = cabac.encode_stream(syms, a, model)
        assert len(sec) == hf.stream_size(rec)
        hf.check_record(rec)
        assert np.array_equal(hf.decode_streams([(rec, sec)])[0], syms)
    else:
        rows, cols = c.int(60), 1 + c.int(200)
        numel = rows * cols
        dens = c.pick([0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
        flags = rng.random(numel) < dens
        if c.int(2) and rows:
            flags.reshape(rows, cols)[:, rng.integers(0, cols, 1 + cols // 4)] = False   # dead columns
        pos = np.flatnonzero(flags)
        sec = cabac.encode_significance(pos, numel, cols)
        assert np.array_equal(cabac.decode_significance(sec, numel, cols, len(pos)), pos)


TARGETS = {"cabac_decode": cabac_decode, "cabac_round_trip": cabac_round_trip}
