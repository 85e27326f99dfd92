"""Format 1.5: the binary header (dcomp/formats/dcz/compact.py, docs/FORMAT.md "The binary header").

Round trips over coders, encodings and provenance modes; the same logical header as the JSON form;
hand-made byte strings, one per check of the binary parser; the worked example of docs/FORMAT.md
byte for byte; older readers refuse a 1.5 file with the upgrade message."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest
import torch

from dcomp.formats import DCZ_MAGIC, dcz
from dcomp.formats.checkpoint import Checkpoint
from dcomp.formats.dcz import compact
from dcomp.formats.dcz import errors as E
from dcomp.formats.dcz.writer import reheader
from tests.test_dcz import assert_same, make_ckpt, quantized

ROOT = Path(__file__).resolve().parents[1]


def example_ckpt() -> Checkpoint:
    """The worked example of docs/FORMAT.md: a 2x4 sparse weight on a 2-entry codebook, a raw bias."""
    cb = torch.tensor([-0.5, 0.25])
    a = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.uint8)
    m = torch.tensor([[False, True, True, False], [False, False, True, True]])
    w = torch.where(m, cb[a.long()], torch.zeros(()))
    return Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}},
                      state_dict={"fc.weight": w, "fc.bias": torch.tensor([0.5, -1.0])},
                      input_shape=[1, 28, 28], num_classes=10, masks={"fc.weight": m},
                      quant={"fc.weight": {"bits": 1, "codebook": cb, "assignments": a}}, data={})


EXAMPLE_CFG = dict(compress_header=False, index_bits=2)


def example() -> bytes:
    return dcz.write_bytes(example_ckpt(), dcz.PackConfig(**EXAMPLE_CFG))


def body_of(data: bytes) -> bytes:
    flags, hlen = struct.unpack_from("<IQ", data, 12)
    raw = data[32:32 + hlen]
    return zlib.decompressobj(zdict=compact.ZDICT).decompress(raw) if flags & 1 else raw


def reframe(body: bytes, area: bytes, flags: int = 0x12, fix_crc: bool = True) -> bytes:
    """A 1.5 file (header stored plain) of ``body`` over ``area``, header CRC (and data CRC) fixed."""
    body = bytearray(body)
    if fix_crc:
        body[1:5] = zlib.crc32(area).to_bytes(4, "little")
    pre = DCZ_MAGIC + struct.pack("<HHIQII", 1, 5, flags, len(body), zlib.crc32(bytes(body)), 0)
    return pre + bytes(body) + area


def read(data: bytes):
    return dcz.read_bytes(data, source="bad.dcz")


# ---- round trips ---------------------------------------------------------------------------------

def _mixed_ckpt(seed: int = 0) -> Checkpoint:
    g = torch.Generator().manual_seed(seed)
    w, m, q = quantized((40, 60), 0.1, 4, g)
    cw, cm, cq = quantized((6, 3, 3, 3), 0.3, 3, g)
    sd = {"fc.weight": w, "fc.bias": torch.randn(40, generator=g), "conv.weight": cw,
          "s.weight": torch.randn(80, generator=g) * (torch.rand(80, generator=g) < 0.2),
          "dense.weight": torch.randn(5, 5, generator=g).half(), "bn.num_batches_tracked": torch.tensor(7),
          "flags": torch.rand(9, generator=g) < 0.5}
    ck = make_ckpt(sd, {"fc.weight": m, "conv.weight": cm, "other.mask": torch.rand(11, generator=g) < 0.5},
                   {"fc.weight": q, "conv.weight": {**cq, "method": "kmeans"}})
    ck.add_provenance("prune", {"sparsity": 0.9, "layers": ["fc"]}, {"top1": 97.25})
    ck.add_provenance("quantize", {"bits": 4}, {"top1": float("nan")})
    return ck


@pytest.mark.parametrize("coder", ["auto", "huffman", "rans", "cabac"])
@pytest.mark.parametrize("provenance", ["none", "brief", "full"])
def test_round_trip_every_coder_and_provenance_mode(coder, provenance):
    ck = _mixed_ckpt()
    data = dcz.write_bytes(ck, dcz.PackConfig(coder=coder, provenance=provenance))
    minor, flags = struct.unpack_from("<HI", data, 10)
    assert minor == 5 and flags & 16
    back = dcz.read_bytes(data, "t.dcz")
    assert_same(ck, back, provenance)
    # the JSON form of the same checkpoint holds the same sections: re-headering gives these bytes
    js = dcz.write_bytes(ck, dcz.PackConfig(coder=coder, provenance=provenance, header="json"))
    assert struct.unpack_from("<H", js, 10)[0] <= 4
    assert reheader(js) == data
    assert_same(ck, dcz.read_bytes(reheader(data, "json"), "t.dcz"), provenance)


def test_fixed_width_only_and_uncompressed_header_round_trip():
    ck = _mixed_ckpt(1)
    for cfg in (dict(huffman=False), dict(compress_header=False), dict(fp16_exact=False, block=3)):
        assert_same(ck, dcz.read_bytes(dcz.write_bytes(ck, dcz.PackConfig(**cfg)), "t.dcz"))


def test_large_files_align_sections_to_8_bytes():
    g = torch.Generator().manual_seed(2)
    ck = make_ckpt({"a": torch.randn(300_001, generator=g), "b": torch.randn(3, generator=g)})
    data = dcz.write_bytes(ck, dcz.PackConfig(fp16_exact=False))
    hdr = dcz.read_header(data)
    assert body_of(data)[0] == 3 and all(b % 8 == 0 for b, _, _ in hdr.sections)
    assert_same(ck, dcz.read_bytes(data, "t.dcz"))
    small = dcz.read_header(example())
    assert small.sections[1][0] - small.sections[0][1] == 0      # small files: no padding


def test_binary_header_is_far_smaller_on_a_lenet5_shaped_model():
    """The fixed cost issue 15 is about: a LeNet-5-shaped, pruned and quantized model (random values)."""
    g = torch.Generator().manual_seed(0)
    sd, masks, quant = {}, {}, {}
    for name, shape, dens, bits in (("conv1", (20, 1, 5, 5), 0.4, 4), ("conv2", (50, 20, 5, 5), 0.05, 3),
                                    ("fc1", (500, 800), 0.005, 3), ("fc2", (10, 500), 0.07, 3)):
        w, m, q = quantized(shape, dens, bits, g)
        q["codebook"] = q["codebook"].half().float()
        w = torch.where(m, q["codebook"][q["assignments"].long()], torch.zeros(()))
        sd[f"{name}.weight"], masks[f"{name}.weight"], quant[f"{name}.weight"] = w, m, q
        sd[f"{name}.bias"] = torch.randn(shape[0], generator=g).half().float()
    ck = make_ckpt(sd, masks, quant)
    ck.data = {"spec": "npz:/some/where/mnist10k.npz", "resize": 28}
    ck.arch = {"kind": "zoo", "name": "lenet-5", "kwargs": {}}
    binary, rb = dcz.pack(ck, dcz.PackConfig(provenance="none"))
    js, rj = dcz.pack(ck, dcz.PackConfig(provenance="none", header="json"))
    assert rb["header_bytes"] * 3 < rj["header_bytes"]
    assert len(js) - len(binary) > rj["header_bytes"] - rb["header_bytes"]      # the padding went too
    assert_same(ck, dcz.read_bytes(binary, "t.dcz"), "none")


def test_inspect_shows_every_part_of_a_binary_file():
    ck = _mixed_ckpt()
    data, report = dcz.pack(ck, dcz.PackConfig(coder="huffman"))
    info = dcz.inspect_bytes(data, "t.dcz")
    assert info["version"] == "1.5" and info["header_format"] == "binary"
    assert [r["name"] for r in info["layers"]] == list(ck.state_dict)
    # every section is some row's, except the bitmap of "other.mask" (a mask of no tensor: 11 bits)
    assert sum(r["total_bytes"] for r in info["layers"]) == len(data) - info["header_bytes"] - 2
    fc = {r["name"]: r for r in info["layers"]}["fc.weight"]
    assert fc["gaps"]["count"] and fc["indices"]["count"] == fc["nnz"]
    assert fc["gaps"]["entropy"] is None                 # not in a 1.5 file: not claimed by inspect
    rep = {r["name"]: r for r in report["layers"]}["fc.weight"]
    if rep["gaps"]["coding"] == "huffman":               # pack's own report still has the writer's figure
        assert rep["gaps"]["entropy"] > 0


# ---- older readers ---------------------------------------------------------------------------------

def test_an_older_reader_refuses_a_1_5_file_with_the_upgrade_message(monkeypatch):
    from dcomp.formats.dcz import header
    monkeypatch.setattr(header, "KNOWN_FLAGS", 15)       # what dcomp 1.4 knows
    with pytest.raises(E.BadFlags, match=r"unknown flag bit 4 set .*upgrade dcomp"):
        read(example())


def test_earlier_versions_still_read_and_json_stays_writable():
    ck = _mixed_ckpt()
    for coder, minor in (("huffman", 2), ("rans", 3), ("cabac", 4)):
        js = dcz.write_bytes(ck, dcz.PackConfig(coder=coder, header="json"))
        assert struct.unpack_from("<H", js, 10)[0] in (2, minor) and not struct.unpack_from("<I", js, 12)[0] & 16
        assert_same(ck, dcz.read_bytes(js, "t.dcz"))


# ---- the worked example of docs/FORMAT.md ---------------------------------------------------------------

def test_format_md_worked_example_is_what_the_writer_writes():
    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    block = doc.split("<!-- dcz-1.5-example -->", 2)[1]
    hexes = []
    for line in block.splitlines():
        if line.startswith("```") and hexes:
            break
        left = line.split("   ")[0].strip()
        if re.fullmatch(r"([0-9A-F]{2} )*[0-9A-F]{2}", left):
            hexes += left.split()
    assert bytes.fromhex("".join(hexes)) == example()
    assert_same(example_ckpt(), dcz.read_bytes(example(), "example.dcz"))


# ---- hand-made files: one per check of the binary parser -------------------------------------------

def _cases() -> dict:
    good = example()
    body = bytearray(body_of(good))
    area = good[32 + len(body):]
    j0 = body.index(b"{")
    jlen = body[j0 - 1]
    t0 = j0 + jlen                 # the tensor count byte
    kind = t0 + 1 + 2 + 9          # tensor 0's kind byte

    def edit(at, new, n=1):
        b = bytearray(body)
        b[at:at + n] = new
        return bytes(b)

    lens = len(body) - 4
    return {
        "truncated": (reframe(body[:t0 + 9], area), E.BadBinaryHeader, "tensors[0].name: 9 bytes claimed, 6 left"),
        "align": (reframe(edit(0, b"\x04"), area), E.BadBinaryHeader, "field align"),
        "version length": (reframe(edit(5, b"\x41"), area), E.BadBinaryHeader, "dcomp_version length"),
        "overlong varint": (reframe(edit(t0, b"\x82\x00"), area), E.BadBinaryHeader, "tensors: varint not in its shortest"),
        "too many tensors": (reframe(edit(t0, b"\x7f"), area), E.BadBinaryHeader, "tensors: 127 records cannot fit"),
        "json": (reframe(edit(j0, b"["), area), E.BadBinaryHeader, "field json: not valid JSON"),
        "json not object": (reframe(edit(j0 - 1, b"\x02[]", jlen + 1), area), E.BadBinaryHeader, "json: not a JSON object"),
        "no arch": (reframe(edit(j0 - 1, b"\x02{}", jlen + 1), area), E.BadBinaryHeader, "has no \"arch\""),
        "name prefix": (reframe(edit(t0 + 1, b"\x01"), area), E.BadBinaryHeader, "tensors[0].name prefix: 1 is more than 0"),
        "dtype code": (reframe(edit(kind, b"\x6c"), area), E.BadBinaryHeader, "tensors[0].kind: unknown dtype code 12"),
        "kind bit 7": (reframe(edit(kind, b"\xe0"), area), E.BadBinaryHeader, "reserved bit 7"),
        "rank": (reframe(edit(kind + 1, b"\x21"), area), E.BadBinaryHeader, "tensors[0].shape rank: 33 is more than 32"),
        "index bits": (reframe(edit(kind + 4, b"\x11"), area), E.BadBinaryHeader, "index_bits: 17 is not between 1 and 16"),
        "fixed parameter": (reframe(edit(kind + 7, b"\x04"), area), E.BadBinaryHeader, "gaps.coding: fixed width takes no parameter"),
        "cabac model": (reframe(edit(kind + 7, b"\x0f"), area), E.BadBinaryHeader, "cabac model 3"),
        "values bits": (reframe(edit(kind + 8, b"\x00"), area), E.BadBinaryHeader, "values.bits: 0 is not between 1 and 16"),
        "mask encoding": (reframe(edit(lens - 4, b"\x02"), area), E.BadBinaryHeader, "masks[0].encoding: unknown mask encoding 2"),
        "mask ref": (reframe(edit(lens - 5, b"\x05"), area), E.BadBinaryHeader, "masks[0].tensor: refers to tensor 4"),
        "quant form": (reframe(edit(lens - 1, b"\x30"), area), E.BadBinaryHeader, "quant[0].form: reserved bits"),
        "quant shared on raw": (reframe(edit(lens - 2, b"\x02"), area), E.BadBinaryHeader, "needs tensor fc.bias to have codebook"),
        "trailing": (reframe(body + b"\x00", area), E.BadBinaryHeader, "1 bytes after the section lengths"),
        "schema": (reframe(edit(15, b"\x00"), area), E.BadHeaderField, "bad header field num_classes: 0 is not between"),
        "data crc": (reframe(body, bytes([area[0] ^ 1]) + area[1:], fix_crc=False), E.SectionChecksum,
                     "data area checksum mismatch"),
        "file longer": (reframe(body, area + b"\x00"), E.BadSectionTable, "sections end at"),
        "file shorter": (reframe(body, area[:-1]), E.BadSectionTable, "past the end"),
        "section length": (reframe(edit(len(body) - 4, b"\x03\x03", 2), area), E.BadRecord,
                           "section 0 holds 3 bytes, expected 2"),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_binary_reader_rejects(case):
    data, cls, message = _cases()[case]
    with pytest.raises(cls) as e:
        read(data)
    msg = str(e.value)
    assert msg.startswith("bad.dcz: ") and "\n" not in msg
    assert message in msg, msg


def test_every_truncation_and_byte_flip_of_the_example_raises_only_format_errors():
    good = example()
    body = body_of(good)
    area = good[32 + len(body):]
    for n in range(len(body)):
        with pytest.raises(E.DczError):
            read(reframe(body[:n], area))
    for i in range(len(body)):
        for bit in (0, 3, 7):
            b = bytearray(body)
            b[i] ^= 1 << bit
            try:
                read(reframe(bytes(b), area, fix_crc=i not in range(1, 5)))
            except E.DczError as e:
                assert "\n" not in str(e)


# ---- the preset dictionary of a 1.5 header's zlib stream ------------------------------------------------

def test_format_md_states_the_preset_dictionary():
    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    block = doc.split("<!-- dcz-1.5-zdict -->", 2)[1].split("```", 2)[1]
    lines = block.split("\n")[1:-1]            # between the fence lines
    assert "\n".join(lines).encode() == compact.ZDICT


def _zframe_body(body: bytes, zdict: bytes | None, area: bytes, flags: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, *([zdict] if zdict else []))
    z = c.compress(body) + c.flush()
    return DCZ_MAGIC + struct.pack("<HHIQII", 1, 5, flags | 1, len(z), zlib.crc32(z), len(body)) + z + area


def test_preset_dictionary_reads_and_another_dictionary_is_refused():
    good = example()
    body = body_of(good)
    area = good[32 + len(body):]
    for zd in (None, compact.ZDICT):            # with or without the dictionary: the same file
        assert_same(example_ckpt(), dcz.read_bytes(_zframe_body(body, zd, area, 0x12), "t.dcz"))
    with pytest.raises(E.BadHeaderZlib, match="header zlib stream is corrupt"):
        read(_zframe_body(body, b"another dictionary", area, 0x12))
    # a JSON (1.0-1.4) header never has a dictionary
    js = dcz.write_bytes(example_ckpt(), dcz.PackConfig(header="json", compress_header=False))
    hlen = struct.unpack_from("<Q", js, 16)[0]
    jbody, jarea = js[32:32 + hlen], js[(32 + hlen + 7) // 8 * 8:]
    z = _zframe_body(jbody, compact.ZDICT, b"", 2)
    z = z[:10] + struct.pack("<H", 2) + z[12:]
    z += b"\0" * (-len(z) % 8) + jarea
    with pytest.raises(E.BadHeaderZlib):
        read(z)


def test_writer_stores_the_shortest_of_plain_zlib_and_zlib_with_the_dictionary():
    for ck in (_mixed_ckpt(), make_ckpt({"w": torch.ones(2)})):
        data = dcz.write_bytes(ck)
        body = body_of(data)
        hlen = struct.unpack_from("<Q", data, 16)[0]
        assert hlen == min(len(body), len(zlib.compress(body, 9)), len(compact.compress(body)))
        assert bool(struct.unpack_from("<I", data, 12)[0] & 1) == (hlen < len(body))
        assert dcz.inspect_bytes(data)["header_json_bytes"] == len(body)
