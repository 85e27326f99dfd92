"""Every stream coder of the .dcz format (fixed width, Huffman, rANS, cabac tree models) on the same
edge-case streams, through the reader's stream decoder; and every `pack --coder` on the same edge-case
checkpoints (100% sparse, dense, one element), unpacked bit-exactly. Entropy bounds per coder live in
test_rans.py (Huffman on a dyadic stream, rANS on a skewed one) and test_cabac.py (cabac)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcomp.compressors import cabac
from dcomp.compressors import huffman as hf
from dcomp.compressors import rans
from dcomp.formats import dcz
from dcomp.formats.checkpoint import Checkpoint


def _encode(coder: str, syms: np.ndarray, a: int):
    """(section, record) or None when the coder cannot code the stream (the writer then skips it)."""
    counts = np.bincount(syms, minlength=a)
    if coder in ("fixed", "huffman"):
        plan = hf.plan_stream(counts, a, hf.DEFAULT_BLOCK, coder == "huffman")
        return hf.encode_stream(syms, plan)
    if coder == "ans":
        return rans.encode_stream(syms, a, counts)
    return cabac.encode_stream(syms, a, {"cabac-tree": cabac.TREE, "cabac-prev": cabac.TREE_PREV}[coder])


STREAMS = {
    "empty": (np.zeros(0, np.int64), 4),
    "one symbol": (np.array([3]), 4),
    "all zeros": (np.zeros(10_000, np.int64), 32),
    "constant top symbol": (np.full(777, 255), 256),
    "16-bit alphabet, all symbols": (np.random.default_rng(0).permutation(1 << 16), 1 << 16),
    "16-bit alphabet, few symbols": (np.random.default_rng(1).choice([0, 7, 65535], 5000), 1 << 16),
    "uniform": (np.random.default_rng(2).integers(0, 32, 20_000), 32),
    "binary skewed": ((np.random.default_rng(3).random(20_000) < 0.03).astype(np.int64), 2),
}


@pytest.mark.parametrize("coder", ["fixed", "huffman", "ans", "cabac-tree", "cabac-prev"])
@pytest.mark.parametrize("name", list(STREAMS))
def test_every_coder_round_trips_edge_streams(coder, name):
    syms, a = STREAMS[name]
    enc = _encode(coder, syms, a)
    if enc is None:
        # rANS declines empty streams and more than 2^15 distinct symbols; nothing else may decline
        assert coder == "ans" and (len(syms) == 0 or len(np.unique(syms)) > 1 << rans.PRECISION)
        return
    sec, rec = enc
    hf.check_record(rec)
    assert len(sec) == hf.stream_size(rec)
    assert np.array_equal(hf.decode_streams([(rec, sec)])[0], syms)


def _ckpt(w: torch.Tensor, mask: torch.Tensor | None = None) -> Checkpoint:
    return Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}}, state_dict={"w": w},
                      input_shape=[4], num_classes=2, masks={} if mask is None else {"w": mask})


CKPTS = {
    "100% sparse": lambda: _ckpt(torch.zeros(50, 80), torch.zeros(50, 80, dtype=torch.bool)),
    "100% sparse, no mask": lambda: _ckpt(torch.zeros(50, 80)),
    "dense": lambda: _ckpt(torch.randn(50, 80, generator=torch.Generator().manual_seed(0))),
    "one element": lambda: _ckpt(torch.tensor([[0.5]]), torch.ones(1, 1, dtype=torch.bool)),
    "one non-zero in a large tensor": lambda: _ckpt(torch.zeros(300, 784).index_put_((torch.tensor([299]), torch.tensor([783])), torch.tensor(1.0))),
    "conv, 97% sparse": lambda: _ckpt(torch.randn(20, 8, 5, 5, generator=torch.Generator().manual_seed(1))
                                      * (torch.rand(20, 8, 5, 5, generator=torch.Generator().manual_seed(2)) < 0.03)),
}


@pytest.mark.parametrize("coder", ["auto", "huffman", "rans", "cabac"])
@pytest.mark.parametrize("name", list(CKPTS))
def test_every_pack_coder_unpacks_bit_exactly(coder, name):
    ck = CKPTS[name]()
    data, _ = dcz.pack(ck, dcz.PackConfig(coder=coder))
    back = dcz.read_bytes(data, "m.dcz")
    assert np.array_equal(dcz._bits(back.state_dict["w"]), dcz._bits(ck.state_dict["w"]))
    for k, m in ck.masks.items():
        assert torch.equal(back.masks[k], m)
    assert dcz.write_bytes(back, dcz.PackConfig(coder=coder)) == data    # unpack -> pack gives the same bytes


def test_a_compiled_kernel_that_fails_to_build_falls_back_to_the_reference(monkeypatch):
    """numba may be unable to compile (a fuzzer's instrumented code, a broken install): decoding must
    then use the numpy/Python reference and give the same checkpoint, not crash."""
    from dcomp.formats.dcz import kernels

    def broken(*args):
        raise RuntimeError("cannot compile")
    g = torch.Generator().manual_seed(3)
    cb = torch.linspace(-1, 1, 8)
    mask = torch.rand(40, 60, generator=g) < 0.2
    a = torch.where(mask, torch.randint(0, 8, (40, 60), generator=g), torch.zeros((), dtype=torch.int64)).to(torch.uint8)
    ck = Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}},
                    state_dict={"w": torch.where(mask, cb[a.long()], torch.zeros(()))}, input_shape=[4], num_classes=2,
                    masks={"w": mask}, quant={"w": {"bits": 3, "codebook": cb, "assignments": a}})
    files = [dcz.pack(ck, dcz.PackConfig(coder=c))[0] for c in ("rans", "auto")]
    monkeypatch.setattr(kernels, "_ASSEMBLE", broken)
    monkeypatch.setattr(rans, "_KERNELS", (broken, broken))
    for data in files:
        back = dcz.read_bytes(data, "m.dcz")
        assert torch.equal(back.state_dict["w"], ck.state_dict["w"]) and torch.equal(back.masks["w"], mask)
        assert torch.equal(back.quant["w"]["assignments"], a)
