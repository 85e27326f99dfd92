"""rANS streams (.dcz format 1.3, coding "ans"): close to the entropy, exact round trips, a reader
that refuses malformed records with named errors, old files still read, and a short fuzz budget."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcomp.compressors import huffman as hf
from dcomp.compressors import rans
from dcomp.formats import dcz
from dcomp.formats.checkpoint import Checkpoint
from dcomp.formats.dcz import errors as E
from fuzzing import rans_targets, targets


def _stream(p: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, float]:
    p = p / p.sum()
    syms = np.random.default_rng(seed).choice(len(p), size=n, p=p)
    return syms, float(-(p * np.log2(p)).sum())


def _bps(sec: bytes, n: int) -> float:
    return 8 * len(sec) / n


def test_rans_within_one_percent_of_the_entropy_where_huffman_is_not():
    syms, h = _stream(0.45 ** np.arange(32), 400_000)    # skewed, not dyadic: p0 = 0.55
    a = 32
    r = _bps(rans.encode(syms, a), len(syms))
    plan = hf.plan_stream(np.bincount(syms, minlength=a), a)
    huff = _bps(hf.encode_stream(syms, plan)[0], len(syms))
    assert r <= 1.01 * h
    assert huff > 1.01 * h and r < huff    # why the coder is worth having


def test_huffman_within_one_percent_of_the_entropy_on_a_dyadic_stream():
    p = 0.5 ** np.arange(1, 17)
    p[-1] *= 2                                            # sums to 1 exactly
    syms, h = _stream(p, 400_000, seed=1)
    plan = hf.plan_stream(np.bincount(syms, minlength=16), 16)
    assert _bps(hf.encode_stream(syms, plan)[0], len(syms)) <= 1.01 * h


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(bits=st.integers(1, 12), n=st.integers(0, 3000), skew=st.integers(0, 8), seed=st.integers(0, 2**30))
def test_round_trip_property(bits, n, skew, seed):
    a = 1 << bits
    rng = np.random.default_rng(seed)
    syms = rng.integers(0, a, n) if skew == 0 else np.minimum(rng.geometric(1 - 0.5 ** (1 / skew), n) - 1, a - 1)
    if n == 0:
        assert rans.encode_stream(syms, a) is None    # an empty stream is written fixed width
        return
    sec, rec = rans.encode_stream(syms, a)
    assert len(sec) == hf.stream_size(rec)
    assert np.array_equal(hf.decode_streams([(rec, sec)])[0], syms)


def test_compiled_and_reference_coders_agree():
    syms, _ = _stream(0.7 ** np.arange(8), 3000, seed=2)
    f = rans.quantize_freqs(np.bincount(syms, minlength=8))
    cum = np.concatenate([[0], np.cumsum(f)[:-1]])
    payload = rans._encode_py(syms, f, cum, rans.PRECISION)
    assert payload == rans.encode_payload(syms, f, rans.PRECISION)
    out = np.empty(len(syms), dtype=np.int64)
    slot2sym = np.repeat(np.arange(8), f)
    assert rans._decode_py(np.frombuffer(payload, np.uint8), len(syms), f, cum, slot2sym, rans.PRECISION, out) == 0
    assert np.array_equal(out, syms)


def test_frequencies_are_exact_and_keep_every_used_symbol():
    counts = np.array([10**9, 1, 0, 3, 1] + [1] * 100)
    f = rans.quantize_freqs(counts)
    assert f.sum() == 1 << rans.PRECISION and (f[counts > 0] >= 1).all() and f[2] == 0
    assert rans.quantize_freqs(np.ones(1 << 16, dtype=np.int64)) is None    # too many symbols for 2^15


# ---- in the .dcz file -------------------------------------------------------------------------------

def _ckpt() -> Checkpoint:
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(16, generator=g)
    mask = torch.rand(200, 300, generator=g) < 0.08
    # skewed indices (a few values common): rANS beats Huffman here
    a = torch.from_numpy(np.minimum(np.random.default_rng(0).geometric(0.8, (200, 300)) - 1, 15)).to(torch.uint8)
    a = torch.where(mask, a, torch.zeros((), dtype=torch.uint8))
    w = torch.where(mask, cb[a.long()], torch.zeros(()))
    return Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}},
                      state_dict={"fc.weight": w, "fc.bias": torch.randn(200, generator=g)},
                      input_shape=[1, 8, 8], num_classes=10, masks={"fc.weight": mask},
                      quant={"fc.weight": {"bits": 4, "codebook": cb, "assignments": a}})


def _ans_file():
    ck = _ckpt()
    data, report = dcz.pack(ck, dcz.PackConfig(header="json", coder="rans"))   # the default (auto) may choose cabac
    return ck, data, report


def test_writer_picks_rans_when_smaller_and_the_file_round_trips():
    ck, data, report = _ans_file()
    row = report["layers"][0]
    assert row["indices"]["coding"] == "ans" and report["version"] == "1.3"
    huff, hreport = dcz.pack(ck, dcz.PackConfig(header="json", ans=False))
    assert hreport["version"] == "1.2" and hreport["layers"][0]["indices"]["coding"] == "huffman"
    assert len(data) < len(huff)
    back = dcz.read_bytes(data)
    for k, v in ck.state_dict.items():
        assert torch.equal(v.view(torch.int32), back.state_dict[k].view(torch.int32))
    assert torch.equal(back.masks["fc.weight"], ck.masks["fc.weight"])
    assert torch.equal(back.quant["fc.weight"]["assignments"], ck.quant["fc.weight"]["assignments"])


def _indices(h):
    return h["tensors"][0]["values"]["indices"]


@pytest.mark.parametrize("field,value,cls", [
    ("precision", 0, E.BadHeaderField), ("precision", 16, E.BadHeaderField), ("precision", "15", E.BadHeaderField),
    ("bytes", 3, E.BadHeaderField), ("bytes", True, E.BadHeaderField), ("coding", "rans", E.BadHeaderField),
    ("entropy", "x", E.BadHeaderField),
])
def test_reader_refuses_bad_record_fields(field, value, cls):
    _, data, _ = _ans_file()
    bad = targets.edit(data, lambda h, area: _indices(h).__setitem__(field, value))
    with pytest.raises(cls, match="indices"):
        dcz.read_bytes(bad, "m.dcz")


def test_reader_refuses_a_payload_size_that_does_not_match_the_section():
    _, data, _ = _ans_file()
    bad = targets.edit(data, lambda h, area: _indices(h).__setitem__("bytes", _indices(h)["bytes"] + 1))
    with pytest.raises(E.BadRecord):
        dcz.read_bytes(bad, "m.dcz")


def _section(h, area, ref):
    b, e, _ = h["sections"][ref]
    return b, e


def test_reader_refuses_corrupt_tables_and_payloads_as_stream_errors():
    _, data, _ = _ans_file()

    def table_sum(h, area):
        b, _ = _section(h, area, _indices(h)["section"])
        area[b] ^= 1                                  # frequency of symbol 0 off by one
    with pytest.raises(E.BadStream, match="frequencies sum"):
        dcz.read_bytes(targets.edit(data, table_sum), "m.dcz")

    def payload(h, area):
        b, e = _section(h, area, _indices(h)["section"])
        area[e - 5] ^= 0x5A                           # a payload byte: the final state check catches it
    with pytest.raises(E.BadStream, match="rANS"):
        dcz.read_bytes(targets.edit(data, payload), "m.dcz")

    def count(h, area):
        _indices(h)["count"] -= 1
        h["tensors"][0]["nnz"] -= 1
    with pytest.raises(E.DczError):
        dcz.read_bytes(targets.edit(data, count), "m.dcz")


def test_flags_bit_2_says_whether_the_file_has_rans_streams():
    _, data, _ = _ans_file()
    assert struct.unpack_from("<I", data, 12)[0] & 4
    h, area, flags = targets.split(data)
    with pytest.raises(E.BadRecord, match="flags bit 2 is clear"):
        dcz.read_bytes(targets.frame(h, area, flags & ~4), "m.dcz")
    plain, _ = dcz.pack(_ckpt(), dcz.PackConfig(header="json", ans=False))
    assert not struct.unpack_from("<I", plain, 12)[0] & 4
    h, area, flags = targets.split(plain)
    with pytest.raises(E.BadRecord, match="no stream is rANS-coded"):
        dcz.read_bytes(targets.frame(h, area, flags | 4), "m.dcz")


def test_gap_stream_count_is_bounded_by_the_tensor():
    """Every gap symbol advances at least one element: a rANS gap stream claiming more symbols than
    the tensor has elements is refused before decoding (this bounds the decoding work)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g) * (torch.rand(200, 300, generator=g) < 0.7)   # gaps mostly 1: rANS
    ck = Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}}, state_dict={"w": w},
                    input_shape=[1, 8, 8], num_classes=10)
    data, report = dcz.pack(ck, dcz.PackConfig(header="json", coder="rans"))
    assert report["layers"][0]["gaps"]["coding"] == "ans"
    assert torch.equal(dcz.read_bytes(data).state_dict["w"], w)
    bad = targets.edit(data, lambda h, area: h["tensors"][0]["gaps"].__setitem__("count", 200 * 300 + 1))
    with pytest.raises(E.BadRecord, match="gap stream claims"):
        dcz.read_bytes(bad, "m.dcz")


@pytest.mark.parametrize("name,budget", [("rans_decode", 200), ("rans_round_trip", 40)])
def test_short_fuzz_budget(name, budget):
    fn = rans_targets.TARGETS[name]

    @settings(max_examples=budget, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=512))
    def check(data):
        t = time.process_time()
        fn(data)
        assert time.process_time() - t < 5

    check()


def test_mutated_rans_streams_raise_only_documented_errors():
    """Record fields and section bytes of the rANS stream edited, CRCs fixed: one-line DczErrors only."""
    targets.check_mutated_stream(
        _ans_file()[1], lambda h, i: _indices(h), ["count", "alphabet", "precision", "bytes", "coding"],
        [None, True, -1, 0, 1, 3, 4, 5, 15, 16, 2**31, 2**63, 1.5, "ans", "huffman", [], {}], 120, (200, 300))
