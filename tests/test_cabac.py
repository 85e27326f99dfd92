"""The context-adaptive coder (.dcz format 1.4, coding "cabac"): exact round trips for every model,
within 1% of the source entropy on long synthetic streams, smaller than the order-0 coders where
the significance map has structure, a decode budget in auto mode, old coders still selectable, and
a reader that refuses malformed records and payloads with one-line errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dcomp.compressors import cabac
from dcomp.compressors import huffman as hf
from dcomp.compressors import rans
from dcomp.formats import dcz
from dcomp.formats.checkpoint import Checkpoint
from dcomp.formats.dcz import errors as E
from fuzzing import targets


def _geometric(n: int, q: float, a: int, seed: int = 0) -> np.ndarray:
    return np.minimum(np.random.default_rng(seed).geometric(q, n) - 1, a - 1)


# ---- the coder ------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(bits=st.integers(1, 16), n=st.integers(0, 2000), skew=st.integers(0, 8), seed=st.integers(0, 2**30),
       model=st.sampled_from([cabac.TREE, cabac.TREE_PREV]))
def test_tree_round_trip_property(bits, n, skew, seed, model):
    a = 1 << bits
    rng = np.random.default_rng(seed)
    syms = rng.integers(0, a, n) if skew == 0 else _geometric(n, 1 - 0.5 ** (1 / skew), a, seed)
    sec, rec = cabac.encode_stream(syms, a, model)
    assert len(sec) == hf.stream_size(rec) and rec["coding"] == "cabac" and rec["model"] == model
    assert np.array_equal(hf.decode_streams([(rec, sec)])[0], syms)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(0, 40), cols=st.integers(1, 120), dens=st.sampled_from([0.0, 0.02, 0.3, 0.97, 1.0]),
       seed=st.integers(0, 2**30), k=st.integers(1, 8))
def test_significance_round_trip_property(rows, cols, dens, seed, k):
    numel = rows * cols
    pos = np.flatnonzero(np.random.default_rng(seed).random(numel) < dens)
    sec = cabac.encode_significance(pos, numel, cols)
    assert np.array_equal(cabac.decode_significance(sec, numel, cols, len(pos)), pos)
    # through the stream decoder, as the reader does: back to the gap stream
    gaps = dcz.gap_symbols(pos, numel, k)
    rec = {"count": len(gaps), "alphabet": 1 << k, "coding": "cabac", "model": cabac.SIGNIFICANCE, "bytes": len(sec)}
    assert np.array_equal(hf.decode_streams([(rec, sec, (numel, cols, k))])[0], gaps)


@pytest.mark.parametrize("syms,a", [
    (np.zeros(0, np.int64), 2),                       # empty
    (np.zeros(1, np.int64), 2),                       # one symbol
    (np.full(5000, 7), 8),                            # one symbol repeated
    (np.arange(1 << 16), 1 << 16),                    # the largest alphabet, every symbol once
    (np.array([65535, 0, 65535]), 1 << 16),
])
def test_edge_streams(syms, a):
    for model in (cabac.TREE, cabac.TREE_PREV):
        sec, rec = cabac.encode_stream(syms, a, model)
        assert np.array_equal(cabac.decode_tree(sec, len(syms), a, model), syms)
    if len(syms) == 5000:
        assert len(sec) < 40      # a constant stream costs almost nothing: no table, the model learns it


def test_all_zero_and_all_nonzero_maps_cost_almost_nothing():
    for flags in (np.zeros(300 * 784, bool), np.ones(300 * 784, bool)):
        pos = np.flatnonzero(flags)
        sec = cabac.encode_significance(pos, flags.size, 784)
        assert 8 * len(sec) < flags.size / 100     # < 0.01 bit per element
        assert np.array_equal(cabac.decode_significance(sec, flags.size, 784, flags.size), pos)


def test_tree_within_one_percent_of_the_source_entropy():
    q, a, n = 0.3, 32, 400_000
    p = q * (1 - q) ** np.arange(a)
    p[-1] = (1 - q) ** (a - 1)                          # the truncated tail
    h = float(-(p * np.log2(p)).sum())
    syms = _geometric(n, q, a, seed=3)
    sec, _ = cabac.encode_stream(syms, a, cabac.TREE)
    assert 8 * len(sec) / n <= 1.01 * h


def test_significance_within_one_percent_of_the_source_entropy():
    d = 0.2
    flags = np.random.default_rng(4).random(400 * 1000) < d
    h = -(d * np.log2(d) + (1 - d) * np.log2(1 - d)) * flags.size
    sec = cabac.encode_significance(np.flatnonzero(flags), flags.size, 1000)
    assert 8 * len(sec) <= 1.01 * h


def _structured_mask(rows=300, cols=784, seed=0) -> np.ndarray:
    """Like a pruned first layer on MNIST: dead input columns (border pixels), rows of varying density."""
    rng = np.random.default_rng(seed)
    col_d = np.where(rng.random(cols) < 0.3, 0.0, rng.uniform(0.01, 0.2, cols))
    row_d = rng.uniform(0.3, 1.7, rows)
    return rng.random((rows, cols)) < np.clip(row_d[:, None] * col_d[None, :], 0, 1)


def test_context_model_beats_order_zero_coders_on_a_structured_map():
    m = _structured_mask()
    pos = np.flatnonzero(m)
    sig = len(cabac.encode_significance(pos, m.size, m.shape[1]))
    gaps = dcz.gap_symbols(pos, m.size, 5)
    best_static = min(len(rans.encode(gaps, 32)),
                      hf.plan_stream(np.bincount(gaps, minlength=32), 32).nbytes)
    assert sig < 0.9 * best_static


def test_compiled_and_reference_coders_agree():
    """The numba kernels and the same functions run as Python give the same bytes and symbols."""
    syms = _geometric(3000, 0.4, 16, seed=5)
    m = _structured_mask(20, 50, seed=1).reshape(-1).astype(np.uint8)
    for model in (0, 1):
        out = np.empty(2 * 4 * len(syms) + 16, np.uint8)
        j = cabac._tree_encode(syms, 4, model == 1, cabac.RATE_FAST, cabac.RATE_SLOW, out)
        assert out[:j].tobytes() == cabac.encode_tree(syms, 16, model)
        back = np.empty(len(syms), np.int64)
        assert cabac._tree_decode(out[:j], len(syms), 4, model == 1, cabac.RATE_FAST, cabac.RATE_SLOW, back) == 0
        assert np.array_equal(back, syms)
    out = np.empty(2 * m.size + 16, np.uint8)
    j = cabac._sig_encode(m, 20, 50, cabac.RATE_FAST, cabac.RATE_SLOW, out)
    assert out[:j].tobytes() == cabac.encode_significance(np.flatnonzero(m), m.size, 50)


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[:-1], "ends before"),
    (lambda b: b + b"\0", "left after"),
    (lambda b: b"\1" + b[1:], "coder state"),
    (lambda b: b[:3], "shorter than"),
])
def test_corrupt_payloads_raise_stream_errors(mutate, msg):
    syms = _geometric(2000, 0.3, 32, seed=6)
    sec, rec = cabac.encode_stream(syms, 32)
    bad = mutate(sec)
    with pytest.raises(hf.StreamError, match=msg):
        hf.decode_streams([({**rec, "bytes": len(bad)}, bad)])


# ---- in the .dcz file ---------------------------------------------------------------------------------

def _ckpt(rows=300, cols=784) -> Checkpoint:
    g = torch.Generator().manual_seed(0)
    mask = torch.from_numpy(_structured_mask(rows, cols))
    cb = torch.linspace(-1, 1, 32)
    a = torch.from_numpy(_geometric(rows * cols, 0.25, 32, seed=2).reshape(rows, cols)).to(torch.uint8)
    a = torch.where(mask, a, torch.zeros((), dtype=torch.uint8))
    w = torch.where(mask, cb[a.long()], torch.zeros(()))
    return Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}},
                      state_dict={"fc.weight": w, "fc.bias": torch.randn(rows, generator=g)},
                      input_shape=[1, 28, 28], num_classes=10, masks={"fc.weight": mask},
                      quant={"fc.weight": {"bits": 5, "codebook": cb, "assignments": a}})


def _same(ck, back):
    for k, v in ck.state_dict.items():
        assert torch.equal(v.view(torch.int32), back.state_dict[k].view(torch.int32)), k
    assert torch.equal(back.masks["fc.weight"], ck.masks["fc.weight"])
    assert torch.equal(back.quant["fc.weight"]["assignments"], ck.quant["fc.weight"]["assignments"])


def test_auto_picks_cabac_where_smaller_and_the_file_unpacks_bit_exactly():
    ck = _ckpt()
    sizes = {}
    for coder in ("huffman", "rans", "cabac", "auto"):
        data, report = dcz.pack(ck, dcz.PackConfig(header="json", coder=coder))
        _same(ck, dcz.read_bytes(data))
        sizes[coder] = len(data)
        codings = {report["layers"][0]["gaps"]["coding"], report["layers"][0]["indices"]["coding"]}
        assert codings <= {"huffman": {"fixed", "huffman"}, "rans": {"fixed", "ans"}, "cabac": {"fixed", "cabac"},
                           "auto": {"fixed", "huffman", "ans", "cabac"}}[coder]
        flags = struct.unpack_from("<I", data, 12)[0]
        assert bool(flags & 8) == ("cabac" in codings)
        assert report["version"] == ("1.4" if flags & 8 else "1.3" if flags & 4 else "1.2")
    assert report["layers"][0]["gaps"]["coding"] == "cabac"
    assert sizes["auto"] <= min(sizes.values()) and sizes["auto"] < 0.95 * sizes["huffman"]
    legacy, rep = dcz.pack(ck, dcz.PackConfig(header="json", ans=False))          # what --no-ans always meant
    assert rep["version"] == "1.2"


def test_auto_keeps_cabac_within_its_decode_budget():
    ck = _ckpt()
    _, rep = dcz.pack(ck, dcz.PackConfig(header="json", cabac_budget=0))
    assert "cabac" not in {rep["layers"][0]["gaps"]["coding"], rep["layers"][0]["indices"]["coding"]}
    # room for the index stream (5 bins per symbol) but not for the significance map (one bin per element)
    nnz = int(ck.masks["fc.weight"].sum())
    _, rep = dcz.pack(ck, dcz.PackConfig(header="json", cabac_budget=5 * nnz))
    assert rep["layers"][0]["gaps"]["coding"] != "cabac" and rep["layers"][0]["indices"]["coding"] == "cabac"
    _, rep = dcz.pack(ck, dcz.PackConfig(header="json", coder="cabac", cabac_budget=0))   # forced: no budget
    assert rep["layers"][0]["gaps"]["coding"] == "cabac"


def test_dense_codebook_tensor_with_cabac_indices():
    g = torch.Generator().manual_seed(1)
    cb = torch.linspace(-1, 1, 16)
    a = torch.from_numpy(_geometric(64 * 64, 0.4, 16, seed=8).reshape(64, 64)).to(torch.uint8)
    ck = Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}},
                    state_dict={"w": cb[a.long()], "b": torch.randn(3, generator=g)}, input_shape=[4], num_classes=3,
                    quant={"w": {"bits": 4, "codebook": cb, "assignments": a}})
    data, rep = dcz.pack(ck, dcz.PackConfig(header="json", coder="cabac"))
    assert rep["layers"][0]["encoding"] == "codebook" and rep["layers"][0]["indices"]["coding"] == "cabac"
    back = dcz.read_bytes(data)
    assert torch.equal(back.state_dict["w"], ck.state_dict["w"]) and torch.equal(back.quant["w"]["assignments"], a)


def _cabac_file():
    ck = _ckpt(60, 100)
    data, _ = dcz.pack(ck, dcz.PackConfig(header="json", coder="cabac"))
    return data


@pytest.mark.parametrize("where,field,value,cls,msg", [
    ("gaps", "model", 3, E.BadHeaderField, "model"),
    ("gaps", "model", "2", E.BadHeaderField, "model"),
    ("gaps", "bytes", 4, E.BadHeaderField, "bytes"),
    ("indices", "model", 2, E.BadRecord, "significance map"),
    ("gaps", "count", 60 * 100 + 1, E.BadRecord, "gap stream claims"),
    ("indices", "bytes", 10**6, E.BadRecord, "holds"),
    ("gaps", "coding", "cabacx", E.BadHeaderField, "coding"),
])
def test_reader_refuses_bad_records(where, field, value, cls, msg):
    data = _cabac_file()

    def fn(h, area):
        t = h["tensors"][0]
        (t["gaps"] if where == "gaps" else t["values"]["indices"])[field] = value
    with pytest.raises(cls, match=msg) as e:
        dcz.read_bytes(targets.edit(data, fn), "m.dcz")
    assert "\n" not in str(e.value) and str(e.value).startswith("m.dcz: ")


def test_flags_bit_3_says_whether_the_file_has_cabac_streams():
    data = _cabac_file()
    h, area, flags = targets.split(data)
    assert flags & 8
    with pytest.raises(E.BadRecord, match="flags bit 3 is clear"):
        dcz.read_bytes(targets.frame(h, area, flags & ~8), "m.dcz")
    plain, _ = dcz.pack(_ckpt(60, 100), dcz.PackConfig(header="json", coder="huffman"))
    h, area, flags = targets.split(plain)
    with pytest.raises(E.BadRecord, match="no stream is cabac-coded"):
        dcz.read_bytes(targets.frame(h, area, flags | 8), "m.dcz")


def test_mutated_cabac_streams_raise_only_documented_errors():
    """Record fields and payload bytes of the cabac streams edited, CRCs fixed: one-line DczErrors only."""
    targets.check_mutated_stream(
        _cabac_file(), lambda h, i: h["tensors"][0]["gaps"] if i % 4 < 2 else h["tensors"][0]["values"]["indices"],
        ["count", "alphabet", "model", "bytes", "coding"], [None, True, -1, 0, 1, 2, 3, 5, 6, 2**31, 1.5, "cabac", [], {}],
        80, (60, 100))


# ---- CLI --------------------------------------------------------------------------------------------

def test_pack_coder_flags(tmp_path):
    from dcomp.cli.app import app

    src = tmp_path / "q.pt"
    src.write_bytes(_ckpt(60, 100).to_bytes())
    r = CliRunner().invoke(app, ["pack", str(src), "-o", str(tmp_path / "c.dcz"), "--coder", "cabac", "--header", "json"])
    assert r.exit_code == 0, r.output
    assert struct.unpack_from("<H", (tmp_path / "c.dcz").read_bytes(), 10)[0] == 4
    r = CliRunner().invoke(app, ["pack", str(src), "-o", str(tmp_path / "b.dcz"), "--coder", "cabac"])
    minor, flags = struct.unpack_from("<HHI", (tmp_path / "b.dcz").read_bytes(), 8)[1:]
    assert r.exit_code == 0 and minor == 5 and flags & 24 == 24    # binary header (bit 4), cabac (bit 3)
    r = CliRunner().invoke(app, ["pack", str(src), "-o", str(tmp_path / "h.dcz"), "--no-ans", "--header", "json"])
    assert r.exit_code == 0 and struct.unpack_from("<H", (tmp_path / "h.dcz").read_bytes(), 10)[0] == 2
    r = CliRunner().invoke(app, ["pack", str(src), "-o", str(tmp_path / "x.dcz"), "--no-ans", "--coder", "cabac"])
    assert r.exit_code == 2 and "--no-ans" in r.output
    r = CliRunner().invoke(app, ["pack", str(src), "-o", str(tmp_path / "y.dcz"), "--coder", "lzma"])
    assert r.exit_code == 2


# ---- start-up: reading a header needs no torch (issue 19 item 4) -------------------------------------

def test_importing_dcz_and_inspecting_a_file_does_not_import_torch(tmp_path):
    import os
    import subprocess
    import sys

    f = tmp_path / "m.dcz"
    f.write_bytes(dcz.pack(_ckpt(60, 100))[0])      # the default: a 1.5 binary header
    code = ("import sys, dcomp.formats.dcz as d\n"
            "assert 'torch' not in sys.modules, 'import'\n"
            f"info = d.inspect_bytes(open({str(f)!r}, 'rb').read())\n"
            "h = d.read_header(open(%r, 'rb').read())\n"
            "assert 'torch' not in sys.modules, 'inspect'\n"
            "assert info['layers'][0]['gaps']['coding'] == 'cabac'\n"
            "d.read_bytes\n"
            "assert 'torch' in sys.modules\n") % str(f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_context_tables_count_against_the_decode_limit():
    """A tree model's context tables (up to 9 x 2^16 entries) are claimed before decoding: a file of
    many tiny streams with large alphabets hits --max-decoded instead of costing unbounded work."""
    data = _cabac_file()

    def big(h, area):
        rec = h["tensors"][0]["values"]["indices"]
        rec.update(alphabet=1 << 16, model=1)
    with pytest.raises(E.LimitExceeded, match="would decode to more than"):
        dcz.read_bytes(targets.edit(data, big), "m.dcz", max_bytes=2 << 20)
    assert cabac.context_bytes({"model": 1, "alphabet": 1 << 16}) == 24 * 9 * (1 << 16)
