"""Format 1.2: float32 payloads that are exactly float16 are stored in 2 bytes ("stored_dtype")."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dcomp.errors import FormatError
from dcomp.formats import dcz
from tests.test_dcz import assert_same, base_header, frame, make_ckpt, quantized, roundtrip

CORPUS = Path(__file__).parent / "data" / "dcz_corpus"


def header(data: bytes) -> dict:
    """The logical header (from JSON or from the 1.5 binary table)."""
    return dcz.read_header(data).h


def flags(data: bytes) -> int:
    return struct.unpack_from("<I", data, 12)[0]


def f16_exact(bits16: np.ndarray) -> torch.Tensor:
    """float32 tensor whose values are the given float16 bit patterns, widened."""
    return torch.from_numpy(bits16.astype("<i2").view("<f2").astype("<f4"))


# ---- the writer narrows exactly when it is lossless ----------------------------------------------

_FINITE_OR_INF = st.integers(-32768, 32767).filter(lambda b: (b & 0x7C00) != 0x7C00 or (b & 0x3FF) == 0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.lists(_FINITE_OR_INF, min_size=1, max_size=300), spoil=st.integers(0, 299),
       quant=st.booleans(), seed=st.integers(0, 2**31))
def test_property_fp16_representable_is_stored_as_float16(bits, spoil, quant, seed):
    b = f16_exact(np.array(bits))
    g = torch.Generator().manual_seed(seed)
    w, m, q = quantized((8, 16), 0.2, 3, g)
    q["codebook"] = f16_exact(np.array(bits[:8] * 8)[:8]) if len(bits) >= 8 else q["codebook"].half().float()
    q["codebook"] = torch.where(torch.isinf(q["codebook"]), torch.ones(()), q["codebook"])
    w = torch.where(m, q["codebook"][q["assignments"].long()], torch.zeros(()))
    ck = make_ckpt({"l.weight": w, "l.bias": b}, {"l.weight": m}, {"l.weight": q} if quant else {})
    data, report, _ = roundtrip(ck)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["l.bias"]["stored_dtype"] == "float16" and rows["l.bias"]["dtype"] == "float32"
    assert rows["l.weight"]["stored_dtype"] == "float16"
    f = flags(data)
    assert f & 2 and struct.unpack_from("<H", data, 10)[0] == (5 if f & 16 else 4 if f & 8 else 3 if f & 4 else 2)

    # one value that float16 cannot hold keeps the whole tensor float32
    b2 = b.clone()
    b2[spoil % len(bits)] = 1.0 + 2.0**-20
    data2, report2, back = roundtrip(make_ckpt({"l.bias": b2}))
    assert report2["layers"][0]["stored_dtype"] == "float32"
    assert "stored_dtype" not in json.dumps(header(data2)) and not flags(data2) & 2
    assert back.state_dict["l.bias"].dtype == torch.float32


def test_special_values_round_trip_bit_identically():
    tiny = 2.0**-24  # smallest float16 subnormal
    special = torch.tensor([-0.0, 0.0, tiny, -tiny, 2.0**-15, 65504.0, -65504.0, float("inf"), float("-inf"),
                            float("nan"), 1.5], dtype=torch.float32)
    data, report, back = roundtrip(make_ckpt({"b": special}))
    assert report["layers"][0]["stored_dtype"] == "float16"
    got = back.state_dict["b"]
    assert got.dtype == torch.float32
    assert np.array_equal(dcz._bits(got), dcz._bits(special))  # -0.0 stays -0.0, NaN keeps its bits
    # not exactly float16: float32 subnormal, a value that rounds to inf, a signalling NaN pattern
    for bad in (1e-40, 65520.0, 0.1):
        t = special.clone()
        t[-1] = bad
        _, rep, _ = roundtrip(make_ckpt({"b": t}))
        assert rep["layers"][0]["stored_dtype"] == "float32", bad
    snan = special.clone()
    snan.view(torch.int32)[-1] = 0x7F802000  # float16-exact bits, but a signalling NaN
    _, rep, _ = roundtrip(make_ckpt({"b": snan}))
    assert rep["layers"][0]["stored_dtype"] == "float32"


def test_sparse_raw_values_and_raw_quant_codebook_narrow():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 40, generator=g).half().float()
    w[torch.rand(40, 40, generator=g) < 0.9] = 0.0
    # a quant entry that is not consistent with the weight: stored raw, codebook narrowed on its own
    q = {"bits": 2, "codebook": torch.tensor([0.5, -0.25, 3.0, 0.0]), "assignments": torch.zeros(40, 40, dtype=torch.uint8)}
    data, report, _ = roundtrip(make_ckpt({"w": w}, quant={"w": q}))
    h = header(data)
    t = h["tensors"][0]
    assert t["encoding"] == "sparse" and t["values"] == {**t["values"], "kind": "raw", "stored_dtype": "float16"}
    assert h["quant"]["w"]["codebook"]["stored_dtype"] == "float16"
    assert "stored_dtype" not in h["quant"]["w"]["assignments"]


def test_lenet_rounded_is_smaller_and_option_disables_it():
    g = torch.Generator().manual_seed(0)
    sd, masks, quant = {}, {}, {}
    for name, (o, i) in {"fc1": (300, 64), "fc2": (100, 300), "fc3": (10, 100)}.items():
        w, m, q = quantized((o, i), 0.1, 5, g)
        q["codebook"] = q["codebook"].half().float()
        w = torch.where(m, q["codebook"][q["assignments"].long()], torch.zeros(()))
        sd[f"{name}.weight"], masks[f"{name}.weight"], quant[f"{name}.weight"] = w, m, q
        sd[f"{name}.bias"] = torch.randn(o, generator=g).half().float()
    ck = make_ckpt(sd, masks, quant)
    small, _, _ = roundtrip(ck)
    big, _, _ = roundtrip(ck, fp16_exact=False)
    assert not flags(big) & 2 and "stored_dtype" not in json.dumps(header(big))
    saved = sum(4 * 32 // 2 for _ in range(3)) + sum(o * 2 for o in (300, 100, 10))
    assert len(big) - len(small) >= saved - 64  # codebooks and biases at half size (header may differ a little)
    h = header(small)
    assert all(t.get("stored_dtype", t.get("values", {}).get("stored_dtype")) == "float16" for t in h["tensors"])


def test_inspect_json_shows_stored_dtype(tmp_path):
    from dcomp.cli.app import app

    f = tmp_path / "m.dcz"
    f.write_bytes(dcz.write_bytes(make_ckpt({"b": torch.tensor([1.0, 2.0]), "c": torch.tensor([0.1])})))
    r = CliRunner().invoke(app, ["--json", "inspect", str(f)])
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in json.loads(r.stdout)["layers"]}
    assert rows["b"]["stored_dtype"] == "float16" and rows["c"]["stored_dtype"] == "float32"
    assert rows["b"]["bytes"]["values"] == 4


# ---- the reader checks the field strictly ------------------------------------------------------

H16 = np.array([1.0, -2.0], "<f2").tobytes()
RAW16 = {"name": "w", "dtype": "float32", "shape": [2], "encoding": "raw", "section": 0, "stored_dtype": "float16"}
GOOD16 = frame(base_header([RAW16]), [H16], minor=2, flags=2)
CB = {"name": "c", "dtype": "float32", "shape": [4], "encoding": "codebook",
      "values": {"kind": "codebook", "bits": 1, "codebook": 0, "stored_dtype": "float16",
                 "indices": {"section": 1, "count": 4, "alphabet": 2, "coding": "fixed", "width": 1}}}
GOOD_CB16 = frame(base_header([CB]), [H16, bytes([0b01100000])], minor=2, flags=2)


def test_hand_made_float16_files_read():
    w = dcz.read_bytes(GOOD16, "good16.dcz").state_dict["w"]
    assert w.dtype == torch.float32 and w.tolist() == [1.0, -2.0]
    c = dcz.read_bytes(GOOD_CB16, "cb16.dcz").state_dict["c"]
    assert c.dtype == torch.float32 and c.tolist() == [1.0, -2.0, -2.0, 1.0]


BAD = {
    "stored_dtype unknown": (frame(base_header([{**RAW16, "stored_dtype": "float8"}]), [H16], flags=2),
                             "tensor w: unknown stored_dtype 'float8'"),
    "stored_dtype not a string": (frame(base_header([{**RAW16, "stored_dtype": 16}]), [H16], flags=2),
                                  "tensor w: unknown stored_dtype 16"),
    "stored_dtype widening": (frame(base_header([{**RAW16, "dtype": "float16", "stored_dtype": "float32"}]),
                                    [bytes(8)], flags=2), "tensor w: unknown stored_dtype 'float32'"),
    "stored_dtype on int": (frame(base_header([{**RAW16, "dtype": "int32"}]), [H16], flags=2),
                            "tensor w: unknown stored_dtype 'float16' for a int32 payload"),
    "stored_dtype size": (frame(base_header([RAW16]), [bytes(8)], flags=2), "tensor w: section 0 holds 8 bytes, expected 4"),
    "stored_dtype without flag": (frame(base_header([RAW16]), [H16]), "tensor w: has stored_dtype but flags bit 1 is clear"),
    "stored_dtype flag unused": (frame(base_header([{**RAW16, "stored_dtype": None} if False else
                                                    {k: v for k, v in RAW16.items() if k != "stored_dtype"}]),
                                       [bytes(8)], flags=2), "flags bit 1 (stored_dtype) is set but no record"),
    "stored_dtype codebook size": (frame(base_header([CB]), [H16 + b"\0", bytes([0])], flags=2),
                                   "tensor c: codebook section holds 5 bytes, not 1..2 float16 values"),
    "stored_dtype misplaced": (frame(base_header([{**CB, "stored_dtype": "float16"}]), [H16, bytes([0])], flags=2),
                               "tensor c: stored_dtype belongs in the values record"),
    "stored_dtype huge": (frame(base_header([{**RAW16, "shape": [2**40]}]), [H16], flags=2),
                          "tensor w: section 0 holds 4 bytes, expected 2199023255552"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_reader_rejects_bad_stored_dtype(case):
    data, message = BAD[case]
    with pytest.raises(FormatError) as e:
        dcz.read_bytes(data, source="bad.dcz")
    msg = str(e.value)
    assert msg.startswith("bad.dcz: ") and "\n" not in msg
    assert message in msg, msg
    with pytest.raises(FormatError):
        dcz.inspect_bytes(data, source="bad.dcz")


def test_quant_from_values_cannot_have_stored_dtype():
    h = header(GOOD_CB16)
    h["quant"] = {"c": {"bits": 1, "codebook": {"from": "values", "stored_dtype": "float16"},
                        "assignments": {"from": "values", "dtype": "uint8", "fill": 0}}}
    with pytest.raises(FormatError, match="quant c: codebook comes from the tensor's values and cannot have a stored_dtype"):
        dcz.read_bytes(frame(h, [H16, bytes([0b01100000])], flags=2), "bad.dcz")


# ---- corpus -------------------------------------------------------------------------------------

def test_corpus_float16_files():
    ok = sorted(CORPUS.glob("ok_fp16*.dcz"))
    assert len(ok) >= 3
    for f in ok:
        data = f.read_bytes()
        assert flags(data) & 2
        ck = dcz.read_bytes(data, f.name)
        assert_same(ck, dcz.read_bytes(dcz.write_bytes(ck, dcz.PackConfig(keep_times=True))))
    for name, (data, message) in BAD.items():
        f = CORPUS / f"bad_{name.replace(' ', '_')}.dcz"
        assert f.read_bytes() == data
    # files written before format 1.2 (no flags bit 1) still read
    older = [f for f in sorted(CORPUS.glob("ok_*.dcz")) if struct.unpack_from("<H", f.read_bytes(), 10)[0] < 2]
    assert len(older) >= 6
    for f in older:
        dcz.read_bytes(f.read_bytes(), f.name)


def write_corpus() -> None:  # pragma: no cover - run by hand: python -c "import tests.test_dcz_fp16 as t; t.write_corpus()"
    def put(name: str, data: bytes) -> None:
        if not (CORPUS / name).exists():
            (CORPUS / name).write_bytes(data)

    put("ok_fp16_hand_made.dcz", GOOD16)
    put("ok_fp16_codebook.dcz", GOOD_CB16)
    g = torch.Generator().manual_seed(3)
    w, m, q = quantized((30, 20), 0.2, 4, g)
    q["codebook"] = q["codebook"].half().float()
    w = torch.where(m, q["codebook"][q["assignments"].long()], torch.zeros(()))
    ck = make_ckpt({"l.weight": w, "l.bias": torch.randn(30, generator=g).half().float()}, {"l.weight": m}, {"l.weight": q})
    put("ok_fp16_sample.dcz", dcz.write_bytes(ck))
    for name, (data, _) in BAD.items():
        put(f"bad_{name.replace(' ', '_')}.dcz", data)
