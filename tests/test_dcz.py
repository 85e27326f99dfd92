"""The .dcz container: bit-identical round trips for every encoding, one hand-made byte string
per reader check, fuzzing (untrusted bytes raise only FormatError), and the saved corpus."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcomp.errors import DcompError, FormatError
from dcomp.formats import DCZ_MAGIC, dcz
from dcomp.formats.checkpoint import Checkpoint, read_checkpoint

CORPUS = Path(__file__).parent / "data" / "dcz_corpus"


# ---- building checkpoints ------------------------------------------------------------------------

def make_ckpt(sd, masks=None, quant=None, arch=None) -> Checkpoint:
    ck = Checkpoint(arch=arch or {"kind": "zoo", "name": "lenet-300-100", "kwargs": {"hidden": [300, 100]}},
                    state_dict=sd, input_shape=[1, 8, 8], num_classes=10, masks=masks or {}, quant=quant or {},
                    data={"spec": "digits", "resize": None})
    ck.add_provenance("prune", {"sparsity": 0.9, "method": "magnitude"}, {"top1": 97.25, "loss": float("nan")})
    return ck


def quantized(shape, density, bits, gen, fill=0, adtype=torch.uint8):
    """weight == where(mask, codebook[assignments], 0) with assignments = fill where pruned."""
    k = 1 << bits
    cb = torch.randn(k, generator=gen)
    mask = torch.rand(shape, generator=gen) < density
    a = torch.randint(0, k, shape, generator=gen)
    a = torch.where(mask, a, torch.full_like(a, fill)).to(adtype)
    w = torch.where(mask, cb[a.long()], torch.zeros(()))
    return w, mask, {"bits": bits, "codebook": cb, "assignments": a}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(dcz._bits(a), dcz._bits(b))


def assert_same(ck: Checkpoint, back: Checkpoint, provenance: str = "brief"):
    assert list(back.state_dict) == list(ck.state_dict)
    for k, v in ck.state_dict.items():
        assert bits_equal(v, back.state_dict[k]), k
    assert set(back.masks) == set(ck.masks)
    for k, v in ck.masks.items():
        assert bits_equal(v, back.masks[k]), k
    assert set(back.quant) == set(ck.quant)
    for k, q in ck.quant.items():
        assert set(back.quant[k]) == set(q)
        for key, v in q.items():
            if isinstance(v, torch.Tensor):
                assert bits_equal(v, back.quant[k][key]), (k, key)
            else:
                assert back.quant[k][key] == v
    assert back.input_shape == ck.input_shape and back.num_classes == ck.num_classes and back.data == ck.data
    # the default keeps a brief provenance (test_dcz_provenance.py covers full/brief/none)
    assert json.dumps(back.provenance) == json.dumps(dcz.writer.provenance_for(ck.provenance, provenance, True))
    for key, v in ck.arch.items():
        if isinstance(v, torch.Tensor):
            assert bits_equal(v, back.arch[key])
        else:
            assert back.arch[key] == v


def roundtrip(ck, **cfg) -> tuple[bytes, dict, Checkpoint]:
    data, report = dcz.pack(ck, dcz.PackConfig(**cfg))
    back = read_checkpoint(data, "test.dcz")
    assert_same(ck, back)
    return data, report, back


# ---- round trips ---------------------------------------------------------------------------------

def test_pruned_quantized_lenet_round_trip_and_size():
    g = torch.Generator().manual_seed(0)
    sd, masks, quant = {}, {}, {}
    for name, shape in (("fc1", (300, 784)), ("fc2", (100, 300)), ("fc3", (10, 100))):
        w, m, q = quantized(shape, 0.1, 5, g)
        sd[f"{name}.weight"], masks[f"{name}.weight"], quant[f"{name}.weight"] = w, m, q
        sd[f"{name}.bias"] = torch.randn(shape[0], generator=g)
    data, report, _ = roundtrip(make_ckpt(sd, masks, quant))
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["fc1.weight"]["encoding"] == "sparse" and rows["fc1.weight"]["bits"] == 5
    assert rows["fc1.bias"]["encoding"] == "raw"
    assert report["file_bytes"] == len(data)
    assert report["ratio"] >= 25  # Deep Compression's regime: 10% density, 5 bits
    gaps = rows["fc1.weight"]["gaps"]  # geometric gaps: an entropy coder wins, close to the entropy
    assert gaps["coding"] in ("huffman", "ans", "cabac") and gaps["bits_per_symbol"] <= 1.02 * gaps["entropy"]
    idx = rows["fc1.weight"]["indices"]  # uniform random indices here: fixed 5 bits is as good
    assert idx["coding"] == "fixed" and idx["bits_per_symbol"] == 5


def test_every_encoding_and_dtype():
    g = torch.Generator().manual_seed(1)
    w_q, m_q, q_q = quantized((64, 32), 0.2, 4, g, fill=3, adtype=torch.int16)
    dense_q_cb = torch.randn(4, generator=g)
    dense_q_a = torch.randint(0, 4, (50, 50), generator=g, dtype=torch.int64)
    odd = torch.randn(40, 40, generator=g)
    odd[0, 0] = -0.0
    odd[1, 1] = float("nan")
    odd[2, 2] = float("inf")
    odd_mask = torch.rand(40, 40, generator=g) < 0.3
    odd_w = torch.where(odd_mask, odd, torch.zeros(()))
    odd_w[5, 5] = -0.0  # a -0.0 outside the mask: support can't be the mask, must still be exact
    sd = {
        "q.weight": w_q,
        "dq.weight": dense_q_cb[dense_q_a],
        "odd.weight": odd_w,
        "half.weight": (torch.randn(30, 30, generator=g) * (torch.rand(30, 30, generator=g) < 0.05)).half(),
        "bf.weight": torch.randn(7, 9, generator=g).bfloat16(),
        "f64": torch.randn(5, generator=g, dtype=torch.float64),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g) * (torch.rand(8, 4, 3, 3, generator=g) < 0.1),
        "bn.num_batches_tracked": torch.tensor(17),
        "flag": torch.tensor([True, False, True]),
        "u8": torch.arange(10, dtype=torch.uint8),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(1.5),
        "zeros": torch.zeros(1000),
    }
    masks = {"q.weight": m_q, "odd.weight": odd_mask, "full.mask.only": torch.ones(3, 3, dtype=torch.bool)}
    quant = {"q.weight": q_q, "dq.weight": {"bits": 2, "codebook": dense_q_cb, "assignments": dense_q_a, "method": "kmeans"}}
    _, report, _ = roundtrip(make_ckpt(sd, masks, quant))
    enc = {r["name"]: r["encoding"] for r in report["layers"]}
    assert enc["q.weight"] == "sparse" and enc["dq.weight"] == "codebook"
    assert enc["conv.weight"] == "sparse" and enc["zeros"] == "sparse"
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["conv.weight"]["index_bits"] == 8 and rows["half.weight"]["index_bits"] == 5


def test_torchscript_archive_goes_in_a_raw_section():
    m = torch.jit.script(torch.nn.Linear(4, 2))
    buf = io.BytesIO()
    torch.jit.save(m, buf)
    archive = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    ck = make_ckpt({k: v.detach() for k, v in m.state_dict().items()}, arch={"kind": "torchscript", "archive": archive})
    data, _, back = roundtrip(ck)
    assert dcz.read_header(data).h["arch"]["archive"]["section"] == len(dcz.read_header(data).sections) - 1
    data_json, _, _ = roundtrip(ck, header="json")
    assert b'"archive":{"section"' in header_json(data_json)
    with pytest.raises(DcompError, match="TorchScript.*--trust-pickle"):  # code from the file: never by default
        back.build_model()
    assert isinstance(back.build_model(trust_pickle=True), torch.nn.Module)


def test_inconsistent_quant_entries_still_round_trip():
    g = torch.Generator().manual_seed(2)
    w, m, q = quantized((20, 30), 0.3, 3, g)
    q["assignments"] = torch.randint(0, 8, (20, 30), generator=g, dtype=torch.int32)  # noise where pruned
    q["assignments"][m] = torch.randint(0, 8, (int(m.sum()),), generator=g, dtype=torch.int32)
    w = torch.where(m, q["codebook"][q["assignments"].long()], torch.zeros(()))
    w2 = torch.randn(10, 10, generator=g)  # claims a codebook it does not use
    q2 = {"bits": 2, "codebook": torch.randn(4, generator=g), "assignments": torch.zeros(10, 10, dtype=torch.int64)}
    roundtrip(make_ckpt({"a.weight": w, "b.weight": w2}, {"a.weight": m}, {"a.weight": q, "b.weight": q2}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=4).filter(lambda s: np.prod(s) <= 6000),
    density=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]),
    bits=st.integers(1, 8),
    index_bits=st.integers(1, 8),
    quant=st.booleans(),
    masked=st.booleans(),
    empty_rows=st.booleans(),
    huffman=st.booleans(),
    block=st.integers(1, 300),
    seed=st.integers(0, 2**31),
)
def test_property_round_trip(shape, density, bits, index_bits, quant, masked, empty_rows, huffman, block, seed):
    g = torch.Generator().manual_seed(seed)
    w, m, q = quantized(tuple(shape), density, bits, g)
    if empty_rows and len(shape) >= 2 and shape[0] > 1:
        m[::2] = False  # whole rows pruned: gaps much longer than the index width
        w = torch.where(m, w, torch.zeros(()))
    if not quant:
        w = torch.where(m, torch.randn(tuple(shape), generator=g), torch.zeros(()))
    masks = {"l.weight": m} if masked else {}
    qd = {"l.weight": q} if quant else {}
    if quant and not masked:
        w = torch.where(m, w, q["codebook"][q["assignments"].long()])  # quantized everywhere, no mask
    roundtrip(make_ckpt({"l.weight": w, "l.bias": torch.randn(3, generator=g)}, masks, qd),
              index_bits=index_bits, huffman=huffman, block=block)


def test_apply_pack_stage():
    g = torch.Generator().manual_seed(5)
    w, m, q = quantized((50, 40), 0.1, 4, g)
    res = dcz.apply_pack(make_ckpt({"a.weight": w}, {"a.weight": m}, {"a.weight": q}))
    assert res.metrics["file_bytes"] == len(res.data) and res.metrics["encodings"] == {"a.weight": "sparse"}
    assert res.report["layers"][0]["bits"] == 4


def test_numpy_and_compiled_decoders_agree(monkeypatch):
    from dcomp.compressors import huffman as hf

    g = torch.Generator().manual_seed(6)
    w, m, q = quantized((64, 90), 0.15, 5, g, fill=2)
    ck = make_ckpt({"a.weight": w}, {"a.weight": m}, {"a.weight": q})
    data = dcz.write_bytes(ck, dcz.PackConfig(index_bits=3, block=50))
    fast = dcz.read_bytes(data)
    monkeypatch.setattr(hf, "_KERNEL", None)
    monkeypatch.setattr(dcz.kernels, "_ASSEMBLE", None)
    slow = dcz.read_bytes(data)
    assert_same(ck, fast)
    assert_same(ck, slow)


def test_gap_symbols_fillers():
    pos = np.array([0, 3, 40])
    syms = dcz.gap_symbols(pos, 100, 2)  # M = 3: gap 37 -> 12 fillers + symbol 0
    assert syms.tolist() == [0, 2] + [3] * 12 + [0] + [3] * 19
    np.testing.assert_array_equal(dcz.gap_positions(syms, 100, 2), pos)


def test_pack_config_rejects_bad_values():
    with pytest.raises(ValueError, match="index bits must be between 1 and 16"):
        dcz.PackConfig(index_bits=0)
    with pytest.raises(ValueError, match="Huffman block"):
        dcz.PackConfig(block=10**6)
    with pytest.raises(ValueError):
        dcz.PackConfig(foo=1)


# ---- hand-made files: one per reader check ---------------------------------------------------------

def header_json(data: bytes) -> bytes:
    """The header JSON bytes of a well-formed file, decompressed when flags bit 0 says so."""
    flags, hlen, _, usize = struct.unpack_from("<IQII", data, 12)
    stored = data[32:32 + hlen]
    return zlib.decompress(stored) if flags & 1 else stored


def reframe(data: bytes, h: dict) -> bytes:
    """Replace the header of a file by ``h`` (compressed like the original), with a valid CRC."""
    flags, hlen = struct.unpack_from("<IQ", data, 12)
    d = (32 + hlen + 7) // 8 * 8
    new = json.dumps(h, separators=(",", ":")).encode()
    usize = 0
    if flags & 1:
        new, usize = zlib.compress(new, 9), len(new)
    pad = b"\0" * (-(32 + len(new)) % 8)
    return data[:16] + struct.pack("<QII", len(new), zlib.crc32(new), usize) + new + pad + data[d:]


def frame(header: dict | bytes, sections: list[bytes], *, major=1, minor=0, flags=0, reserved=0, fix_table=True,
          stored: bytes | None = None) -> bytes:
    """Assemble a file around a header and section bytes (filling the section table).

    ``stored``: the header bytes as they go into the file (e.g. a zlib stream, with flags=1 and
    reserved = the decompressed size); by default the JSON itself."""
    if isinstance(header, dict):
        header = dict(header)
        if fix_table:
            table, off = [], 0
            for s in sections:
                table.append([off, off + len(s), zlib.crc32(s)])
                off = (off + len(s) + 7) // 8 * 8
            header["sections"] = table
        hj = json.dumps(header).encode()
    else:
        hj = header
    if stored is not None:
        hj = stored
    out = bytearray(DCZ_MAGIC + struct.pack("<HHIQII", major, minor, flags, len(hj), zlib.crc32(hj), reserved) + hj)
    out += b"\0" * (-len(out) % 8)
    for i, s in enumerate(sections):
        out += s
        if i + 1 < len(sections):
            out += b"\0" * (-len(out) % 8)
    return bytes(out)


def base_header(tensors=None) -> dict:
    return {"dcz": 1, "dcomp_version": "0", "arch": {"kind": "zoo", "name": "x", "kwargs": {}}, "input_shape": [4],
            "num_classes": 2, "data": {}, "provenance": [], "sections": [], "tensors": tensors or [],
            "masks": {}, "quant": {}}


RAW = {"name": "w", "dtype": "float32", "shape": [2], "encoding": "raw", "section": 0}
GOOD_W = np.array([1.0, 2.0], "<f4").tobytes()
GOOD = frame(base_header([RAW]), [GOOD_W])


def _sparse_file(numel_shape, count=4, nnz=1) -> bytes:
    gaps = {"section": 0, "count": count, "alphabet": 32, "coding": "fixed", "width": 5}
    t = {"name": "big", "dtype": "float32", "shape": numel_shape, "encoding": "sparse", "index_bits": 5, "nnz": nnz,
         "gaps": gaps, "values": {"kind": "raw", "section": 1}}
    return frame(base_header([t]), [bytes((count * 5 + 7) // 8), bytes(4 * nnz)])


def _zframe(stored: bytes | None = None, usize: int | None = None, flags: int = 1) -> bytes:
    """GOOD's header and section, the header zlib-compressed (format 1.1); override the stream or size."""
    hj = json.dumps({**base_header([RAW]), "sections": [[0, 8, zlib.crc32(GOOD_W)]]}).encode()
    z = zlib.compress(hj, 9) if stored is None else stored
    return frame(hj, [GOOD_W], minor=1, flags=flags, reserved=len(hj) if usize is None else usize, stored=z)


def _bomb(n: int) -> bytes:
    """A zlib stream of n zero bytes (about n / 1000 bytes long), built without holding n bytes."""
    c = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    out = [c.compress(chunk[:min(len(chunk), n - i)]) for i in range(0, n, len(chunk))]
    return b"".join(out) + c.flush()


GOOD_Z = _zframe()


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x40
    return bytes(b)


CASES = {
    "too small": (GOOD[:20], "shorter than the 32-byte preamble"),
    "wrong magic": (b"PK\x03\x04" + GOOD[4:], "wrong magic"),
    "version": (frame(base_header([RAW]), [bytes(8)], major=2), "unsupported .dcz version 2"),
    "flags": (frame(base_header([RAW]), [bytes(8)], flags=32), "unknown flag bit 5 set"),   # bit 2: rANS (1.3), bit 3: cabac (1.4), bit 4: binary header (1.5)
    "flag bit 31": (_zframe(flags=1 | 1 << 31), "unknown flag bit 31 set"),
    "zheader size zero": (_zframe(usize=0), "decompressed header size 0 stated in the preamble"),
    "zheader size over cap": (_zframe(usize=(1 << 27) + 1), "decompressed header size 134217729"),
    "zheader corrupt": (_zframe(stored=b"x\xda" + bytes(range(40))), "header zlib stream is corrupt"),
    "zheader not zlib": (_zframe(stored=json.dumps(base_header([RAW])).encode()), "header zlib stream is corrupt"),
    "zheader truncated": (_zframe(stored=zlib.compress(json.dumps(base_header([RAW])).encode())[:-9]),
                          "header zlib stream is truncated"),
    "zheader bomb": (_zframe(stored=_bomb(8 << 20), usize=4096), "more than the 4096 bytes stated"),
    "zheader short": (_zframe(usize=5000), "the preamble states 5000"),
    "zheader stray": (_zframe(stored=zlib.compress(json.dumps({**base_header([RAW]), "sections": [[0, 8, zlib.crc32(GOOD_W)]]}).encode()) + b"xx"),
                      "followed by stray bytes"),
    "zheader not json": (_zframe(stored=zlib.compress(b"{not json"), usize=9), "not valid UTF-8 JSON"),
    "reserved": (frame(base_header([RAW]), [bytes(8)], reserved=5), "reserved bits"),
    "header length": (GOOD[:16] + struct.pack("<Q", 10**15) + GOOD[24:], "header length"),
    "header crc": (_flip(GOOD, 40), "header checksum"),
    "not json": (frame(b"{not json", []), "not valid UTF-8 JSON"),
    "not utf8": (frame(b"\xff\xfe", []), "not valid UTF-8 JSON"),
    "not object": (frame(b"[1, 2]", []), "not a JSON object"),
    "missing field": (frame({k: v for k, v in base_header().items() if k != "tensors"}, []), "bad header field tensors"),
    "bad dtype": (frame(base_header([{**RAW, "dtype": "complex64"}]), [bytes(8)]), "tensors[0].dtype: unknown value 'complex64'"),
    "negative shape": (frame(base_header([{**RAW, "shape": [-2]}]), [bytes(8)]), "tensors[0].shape"),
    "duplicate": (frame(base_header([RAW, RAW]), [bytes(8), bytes(8)]), "duplicate tensor name w"),
    "truncated": (GOOD[:-3], "truncated"),
    "trailing bytes": (GOOD + b"\0" * 8, "trailing bytes"),
    "section order": (frame({**base_header([RAW]), "sections": [[8, 16, 0]]}, [bytes(16)], fix_table=False), "section table"),
    "section crc": (_flip(GOOD, len(GOOD) - 1), "section 0 (tensor w) checksum mismatch"),
    "raw size": (frame(base_header([{**RAW, "shape": [3]}]), [bytes(8)]), "tensor w: section 0 holds 8 bytes, expected 12"),
    "missing section": (frame(base_header([{**RAW, "section": 7}]), [bytes(8)]), "tensor w: refers to section 7"),
    "huge claim": (_sparse_file([10**6, 10**6]), "tensor big: shape [1000000, 1000000]"),
    "huge raw": (frame(base_header([{**RAW, "shape": [10**12]}]), [bytes(8)]), "tensor w: section 0 holds 8 bytes"),
    "nnz mismatch": (_sparse_file([10], count=2, nnz=1), "tensor big: relative indices"),
    "bad stream": (frame(base_header([{**RAW, "encoding": "sparse", "index_bits": 5, "nnz": 0,
                                       "gaps": {"section": 0, "count": 1, "alphabet": 3, "coding": "fixed", "width": 2},
                                       "values": {"kind": "raw", "section": 1}}]), [bytes(1), b""]),
                   "tensors[0].gaps.alphabet: 3 is not a power of two (tensor w)"),
    "bad support mask": (frame({**base_header([RAW]), "masks": {"w": {"encoding": "support"}}}, [bytes(8)]),
                         "mask w: a 'support' mask needs"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reader_rejects(case):
    data, message = CASES[case]
    with pytest.raises(FormatError) as e:
        dcz.read_bytes(data, source="bad.dcz")
    msg = str(e.value)
    assert msg.startswith("bad.dcz: ") and "\n" not in msg
    assert message in msg, msg


def test_good_hand_made_file_reads():
    ck = dcz.read_bytes(GOOD, "good.dcz")
    assert ck.state_dict["w"].tolist() == [1.0, 2.0]
    ck = dcz.read_bytes(GOOD_Z, "good_z.dcz")  # the same file with a compressed header (1.1)
    assert ck.state_dict["w"].tolist() == [1.0, 2.0]


def test_compressed_header_round_trip_and_size():
    """The writer compresses the header when that is smaller; both forms read back identically."""
    g = torch.Generator().manual_seed(5)
    w, m, q = quantized((60, 50), 0.1, 5, g)
    ck = make_ckpt({"fc.weight": w, "fc.bias": torch.randn(60, generator=g)}, {"fc.weight": m}, {"fc.weight": q})
    for i in range(6):  # a long provenance, as after a recipe run (NaN included)
        ck.add_provenance(f"stage{i}", {"lr": 0.01 * i, "epochs": i}, {"top1": 97.123456789 - i, "loss": float("nan")})
    data, report, _ = roundtrip(ck, header="json")      # the JSON header (1.1-1.4); 1.5: test_dcz_binary.py
    major, minor, flags, hlen, _, usize = struct.unpack_from("<HHIQII", data, 8)
    assert major == 1 and flags & 1 and minor == (5 if flags & 16 else 4 if flags & 8 else 3 if flags & 4 else 2)
    assert report["header_compressed"] and report["header_stored_bytes"] == hlen < usize == report["header_json_bytes"]
    plain, plain_report, _ = roundtrip(ck, compress_header=False, header="json")
    assert struct.unpack_from("<IQI", plain, 12)[0] & 1 == 0 and struct.unpack_from("<I", plain, 28)[0] == 0
    assert not plain_report["header_compressed"] and plain_report["header_json_bytes"] == usize
    assert header_json(data) == header_json(plain)  # the same JSON, only stored differently
    assert len(data) < len(plain) and data[report["header_bytes"]:] == plain[plain_report["header_bytes"]:]
    info = dcz.inspect_bytes(data)
    assert info["version"] == f"1.{minor}" and info["provenance_stages"][-1] == "stage5"


def test_tiny_header_stays_uncompressed_when_zlib_does_not_help(monkeypatch):
    monkeypatch.setattr(dcz.zlib, "compress", lambda b, level=9: b + b"pad")
    data, report, _ = roundtrip(make_ckpt({"w": torch.ones(2)}), header="json")   # 1.5: test_dcz_binary.py
    assert struct.unpack_from("<I", data, 12)[0] & 1 == 0 and not report["header_compressed"]


def test_header_bomb_is_capped_not_allocated(monkeypatch):
    """A zlib stream claiming a small header but inflating to 8 MiB: decompression stops at the cap."""
    seen = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self):
            self.z = real()

        def decompress(self, raw, max_length=0):
            out = self.z.decompress(raw, max_length)
            seen.append((max_length, len(out)))
            return out

        def __getattr__(self, name):
            return getattr(self.z, name)

    monkeypatch.setattr(dcz.zlib, "decompressobj", Spy)
    with pytest.raises(FormatError, match="zip bomb"):
        dcz.read_bytes(CASES["zheader bomb"][0], "bomb.dcz")
    assert seen == [(4097, 4097)]


def test_huge_claim_rejected_before_allocation(monkeypatch):
    calls = []
    monkeypatch.setattr(np, "zeros", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("allocated")))
    with pytest.raises(FormatError):
        dcz.read_bytes(CASES["huge claim"][0], "x")
    assert not calls


def test_decode_limit_is_enforced():
    data, _, _ = roundtrip(make_ckpt({"w": torch.randn(100, 100)}))
    with pytest.raises(FormatError, match="would decode to more than"):
        dcz.read_bytes(data, "x", max_bytes=1000)


# ---- fuzzing -------------------------------------------------------------------------------------

def _sample_file() -> bytes:
    g = torch.Generator().manual_seed(3)
    w, m, q = quantized((30, 40), 0.2, 3, g)
    return dcz.write_bytes(make_ckpt({"a.weight": w, "a.bias": torch.randn(30, generator=g),
                                       "c.weight": torch.randn(4, 2, 3, 3, generator=g) * (torch.rand(4, 2, 3, 3, generator=g) < 0.2)},
                                      {"a.weight": m}, {"a.weight": q}), dcz.PackConfig(header="json"))


SAMPLE = _sample_file()   # a JSON-header (1.4) file: these tests mutate its JSON


def _decode_only_format_errors(data: bytes):
    try:
        dcz.read_bytes(data, "fuzz")
    except FormatError as e:
        assert "\n" not in str(e)
    try:
        dcz.inspect_bytes(data, "fuzz")
    except FormatError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    _decode_only_format_errors(data)
    _decode_only_format_errors(DCZ_MAGIC + data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(SAMPLE) - 1), st.integers(1, 255)), min_size=1, max_size=4),
       st.integers(0, len(SAMPLE)), st.booleans())
def test_fuzz_mutated_file(flips, cut, fix_crcs):
    b = bytearray(SAMPLE)
    for at, x in flips:
        b[at] ^= x
    data = bytes(b[:cut]) if cut < 64 else bytes(b)
    if fix_crcs:
        data = _fix_crcs(data)
    _decode_only_format_errors(data)


def _fix_crcs(data: bytes) -> bytes:
    """Recompute header and section CRCs so that the deeper checks are reached."""
    try:
        hlen = struct.unpack_from("<Q", data, 16)[0]
        h = json.loads(header_json(data))
        d = (32 + hlen + 7) // 8 * 8
        for s in h["sections"]:
            s[2] = zlib.crc32(data[d + s[0]:d + s[1]])
        return reframe(data, h)
    except Exception:  # noqa: BLE001 - not fixable: fuzz the bytes as they are
        return data


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(["count", "bits", "nnz", "shape", "index_bits", "block", "section"]),
       st.sampled_from([0, 1, -1, 2**40, 10**12, "x", None, [1]]))
def test_fuzz_header_values(which, key, value):
    """Valid CRCs, hostile numbers in the header: still only FormatError, no huge allocation."""
    h = json.loads(header_json(SAMPLE))
    targets = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == key:
                    targets.append(o)
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(h["tensors"])
    if not targets:
        return
    targets[which % len(targets)][key] = value
    _decode_only_format_errors(reframe(SAMPLE, h))


# ---- the saved corpus ---------------------------------------------------------------------------

def test_corpus_replay():
    files = sorted(CORPUS.glob("*.dcz"))
    assert len(files) >= 10
    for f in files:
        data = f.read_bytes()
        if f.name.startswith("ok_"):
            ck = dcz.read_bytes(data, f.name)
            assert_same(ck, dcz.read_bytes(dcz.write_bytes(ck, dcz.PackConfig(keep_times=True, provenance="full"))),
                        "full")  # old files carry times
        else:
            with pytest.raises(FormatError):
                dcz.read_bytes(data, f.name)


def test_corpus_keeps_format_1_0_files():
    """Files written before header compression (format 1.0, flags 0) must keep reading."""
    old = [f for f in sorted(CORPUS.glob("ok_*.dcz")) if f.read_bytes()[10:12] == b"\0\0"]
    new = [f for f in sorted(CORPUS.glob("ok_*.dcz")) if struct.unpack_from("<I", f.read_bytes(), 12)[0] == 1]
    assert len(old) >= 3 and len(new) >= 2
    for f in old:
        assert struct.unpack_from("<I", f.read_bytes(), 12)[0] == 0
        dcz.read_bytes(f.read_bytes(), f.name)


def write_corpus() -> None:  # pragma: no cover - run by hand: python -c "import tests.test_dcz as t; t.write_corpus()"
    """Adds missing files; existing ones (e.g. the format 1.0 files) are kept as they are."""
    CORPUS.mkdir(parents=True, exist_ok=True)

    def put(name: str, data: bytes) -> None:
        if not (CORPUS / name).exists():
            (CORPUS / name).write_bytes(data)

    put("ok_sample_z.dcz", SAMPLE)
    put("ok_hand_made_z.dcz", GOOD_Z)
    put("ok_no_huffman_z.dcz", dcz.write_bytes(dcz.read_bytes(SAMPLE), dcz.PackConfig(huffman=False)))
    for name, (data, _) in CASES.items():
        put(f"bad_{name.replace(' ', '_')}.dcz", data)
    rng = np.random.default_rng(0)
    for i in range(6):
        b = bytearray(SAMPLE)
        for at in rng.integers(0, len(b), 3):
            b[at] ^= int(rng.integers(1, 256))
        data = _fix_crcs(bytes(b)) if i % 2 else bytes(b)
        try:
            dcz.read_bytes(data)
            prefix = "ok"
        except FormatError:
            prefix = "bad"
        if not list(CORPUS.glob(f"*_mutated_{i}.dcz")):
            (CORPUS / f"{prefix}_mutated_{i}.dcz").write_bytes(data)
