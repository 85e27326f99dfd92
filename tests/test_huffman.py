"""Canonical Huffman / fixed-width streams: the spec's worked example, round trips with both
decoders, code-length limits, entropy, and corrupt streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcomp.compressors import huffman as hf


def _roundtrip(symbols, alphabet, block=hf.DEFAULT_BLOCK, huffman=True):
    symbols = np.asarray(symbols, dtype=np.int64)
    plan = hf.plan_stream(np.bincount(symbols, minlength=alphabet), alphabet, block, huffman)
    sec, rec = hf.encode_stream(symbols, plan)
    assert len(sec) == hf.stream_size(rec) == plan.nbytes
    hf.check_record(rec)
    return sec, rec


def _decode_both(items):
    """Decode with the numpy lockstep reference and with the default decoder; they must agree."""
    ref = hf.decode_streams(items)
    huff = []
    for i, (rec, sec) in enumerate(items):
        if rec["coding"] == "huffman" and rec["count"]:
            lens, bb, payload = hf._parse_huffman(rec, sec)
            huff.append((i, rec, lens, bb, payload))
    if huff:
        for i, arr in hf._decode_huffman_lockstep(huff):
            np.testing.assert_array_equal(arr, ref[i])
    return ref


def test_worked_example_from_format_md():
    s = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    lens = hf.code_lengths(np.bincount(s, minlength=4))
    assert lens.tolist() == [1, 2, 3, 3]
    assert hf.canonical_codes(lens).tolist() == [0b0, 0b10, 0b110, 0b111]
    plan = hf.StreamPlan("huffman", 6, 8, 4, 2, lens, 1024, 14, hf.entropy(np.bincount(s)))
    sec, rec = hf.encode_stream(s, plan)
    assert sec == bytes.fromhex("12330e000adc")
    assert rec["bits"] == 14
    assert _decode_both([(rec, sec)])[0].tolist() == s.tolist()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(0, 3000), st.integers(1, 64), st.booleans(), st.integers(0, 2**31))
def test_stream_round_trip(width, n, block, skew, seed):
    rng = np.random.default_rng(seed)
    alphabet = 1 << width
    if skew:
        s = np.minimum(rng.geometric(0.3, n) - 1, alphabet - 1)
    else:
        s = rng.integers(0, alphabet, n)
    items = [_roundtrip(s, alphabet, block)[::-1], _roundtrip(s[::-1].copy(), alphabet, block * 3, huffman=False)[::-1]]
    out = _decode_both(items)
    np.testing.assert_array_equal(out[0], s)
    np.testing.assert_array_equal(out[1], s[::-1])


def test_single_symbol_and_empty_streams():
    sec, rec = _roundtrip(np.full(5000, 7), 16)
    assert rec["coding"] == "huffman" and rec["bits"] == 5000  # one symbol: a 1-bit code
    assert _decode_both([(rec, sec)])[0].tolist() == [7] * 5000
    sec, rec = _roundtrip(np.zeros(0, dtype=np.int64), 32)
    assert sec == b"" and _decode_both([(rec, sec)])[0].size == 0


def test_code_lengths_are_limited_and_canonical():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])  # Fibonacci counts give a 39-deep Huffman tree unlimited
    counts = np.array(fib, dtype=np.int64)
    lens = hf.code_lengths(counts)
    assert lens.max() <= hf.MAX_CODE_LEN
    hf.check_lengths(lens)
    codes = hf.canonical_codes(lens)
    words = {format(int(c), f"0{int(l)}b") for c, l in zip(codes, lens)}
    assert len(words) == len(lens)
    assert not any(a != b and b.startswith(a) for a in words for b in words)  # prefix-free
    s = np.repeat(np.arange(40), counts.clip(max=2000))
    sec, rec = _roundtrip(s, 64)
    np.testing.assert_array_equal(_decode_both([(rec, sec)])[0], s)


@pytest.mark.parametrize("kind", ["gaps", "codebook"])
def test_huffman_within_two_percent_of_entropy(kind):
    rng = np.random.default_rng(0)
    n = 200_000
    if kind == "gaps":  # relative indices of a 90%-sparse layer, 5-bit, fillers at 31
        s = np.minimum(rng.geometric(0.1, n) - 1, 31)
        alphabet = 32
    else:  # 5-bit k-means indices of Gaussian weights (linear init: bell-shaped usage)
        w = rng.standard_normal(n)
        centers = np.linspace(w.min(), w.max(), 32)
        s = np.abs(w[:, None] - centers[None, :]).argmin(1)
        alphabet = 32
    sec, rec = _roundtrip(s, alphabet)
    assert rec["coding"] == "huffman"
    h = hf.entropy(np.bincount(s, minlength=alphabet))
    assert rec["bits"] / n <= 1.02 * h


def test_corrupt_streams_raise_stream_error():
    rng = np.random.default_rng(1)
    s = np.minimum(rng.geometric(0.2, 4000) - 1, 15)
    sec, rec = _roundtrip(s, 16, block=256)
    # a Kraft-violating table
    bad = bytearray(sec)
    bad[0] = 0x11
    with pytest.raises(hf.StreamError):
        hf.decode_streams([(rec, bytes(bad))])
    # a block table that does not add up
    bad = bytearray(sec)
    bad[8] ^= 1
    with pytest.raises(hf.StreamError):
        hf.decode_streams([(rec, bytes(bad))])
    # payload bits flipped: either an invalid code or a block that ends in the wrong place
    bad = bytearray(sec)
    for i in range(len(bad) - 40, len(bad) - 20):
        bad[i] ^= 0xFF
    with pytest.raises(hf.StreamError):
        _decode_both([(rec, bytes(bad))])
    with pytest.raises(hf.StreamError):
        hf.check_record({**rec, "count": rec["bits"] + 1})
