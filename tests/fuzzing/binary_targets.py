"""Fuzz targets for the binary header of format 1.5 (dcomp/formats/dcz/compact.py), in the style of
targets.py:

* ``dcz_binary_decode``: a real 1.5 file whose decompressed binary header is mutated byte-wise (flip,
  set, insert, delete, truncate, a varint grown or shrunk), then re-framed with the header CRC (and,
  most of the time, the data-area CRC) recomputed, so the checks behind the CRCs are reached. Only
  the documented one-line errors may come out; a file that still reads decodes fully.
* ``dcz_binary_round_trip``: a generated checkpoint packs with the binary header, unpacks bit for bit,
  carries the same logical header as the JSON form, and re-headering the JSON file gives the binary
  file byte for byte.
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np
import torch

from dcomp.formats import DCZ_MAGIC, dcz
from dcomp.formats.checkpoint import Checkpoint
from dcomp.formats.dcz import compact
from dcomp.formats.dcz.writer import reheader
from fuzzing.targets import Choices, _read_dcz, _seed_checkpoint


@functools.lru_cache(maxsize=None)
def binary_seed_files() -> tuple[bytes, ...]:
    ck = _seed_checkpoint()
    return (dcz.write_bytes(ck), dcz.write_bytes(ck, dcz.PackConfig(huffman=False, compress_header=False)),
            dcz.write_bytes(ck, dcz.PackConfig(block=4, fp16_exact=False, coder="rans", provenance="full")),
            dcz.write_bytes(ck, dcz.PackConfig(coder="cabac", provenance="none")))


def split_binary(data: bytes) -> tuple[bytes, bytes, int, int]:
    """(binary header body, data area, flags, minor) of a well-formed 1.5 file."""
    minor, flags, hlen = struct.unpack_from("<HIQ", data, 10)
    raw = data[32:32 + hlen]
    body = zlib.decompressobj(zdict=compact.ZDICT).decompress(raw) if flags & 1 else raw
    align = body[0] if body and body[0] <= compact.MAX_ALIGN else 0
    d = compact._align(32 + hlen, align)
    return body, data[d:], flags, minor


def frame_binary(body: bytes, area: bytes, flags: int, minor: int = 5, compress: bool | None = None,
                 fix_data_crc: bool = True) -> bytes:
    """A 1.5 file of header body ``body`` over data area ``area``: lengths, header CRC and (optionally)
    the data CRC recomputed; padding after the header from the alignment byte when it is valid."""
    body = bytearray(body)
    if fix_data_crc and len(body) >= 5:
        body[1:5] = zlib.crc32(area).to_bytes(4, "little")
    compress = bool(flags & 1) if compress is None else compress
    stored = compact.compress(bytes(body)) if compress else bytes(body)
    flags = (flags | 1) if compress else (flags & ~1)
    pre = DCZ_MAGIC + struct.pack("<HHIQII", 1, minor, flags & 0xFFFFFFFF, len(stored), zlib.crc32(stored),
                                  len(body) if compress else 0)
    out = pre + stored
    a = body[0] if body and body[0] <= compact.MAX_ALIGN else 0
    out += b"\0" * (compact._align(len(out), a) - len(out))
    return out + area


def _json_span(body: bytes) -> tuple[int, int]:
    """[start, end) of the JSON part of a well-formed body (the tables after it are what to mutate)."""
    r = compact._In(body, "seed")
    r.u8("align")
    r.bytes_(4, "crc")
    r.bytes_(r.varint("v"), "v")
    r.shape("input_shape")
    r.varint("num_classes")
    n = r.varint("json")
    return r.i, r.i + n


def mutate_binary(data: bytes) -> bytes:
    c = Choices(data)
    seeds = binary_seed_files()
    body, area, flags, minor = split_binary(seeds[c.int(len(seeds))])
    j0, j1 = _json_span(body)
    body = bytearray(body)
    area = bytearray(area)
    for _ in range(1 + c.int(4)):
        op = c.pick([0, 0, 0, 1, 1, 1, 1, 2, 3, 4, 5, 6, 7])   # mostly in place: the layout stays parseable
        at = c.int(len(body) + 1)
        if j0 <= at < j1 and c.int(8):          # mostly the binary tables, not the JSON inside
            at = c.pick([c.int(j0), j1 + c.int(max(1, len(body) + 1 - j1))])
        if op == 0 and body:
            body[min(at, len(body) - 1)] ^= 1 << c.int(8)
        elif op == 1 and body:
            body[min(at, len(body) - 1)] = c.pick([0, 1, 2, 3, 4, 7, 8, 15, 16, 0x3F, 0x40, 0x7F, 0x80, 0xFF, c.byte()])
        elif op == 2:
            body[at:at] = bytes([c.pick([0, 1, 0x7F, 0x80, 0xFF, c.byte()])]) * (1 + c.int(3))
        elif op == 3 and body:
            del body[at:at + 1 + c.int(4)]
        elif op == 4:
            del body[at:]
        elif op == 5:            # a varint continuation: grows a number (or makes it overlong)
            body[at:at] = b"\x80" * (1 + c.int(9))
        elif op == 6 and area:   # the data area: a byte or the length
            if c.int(2):
                area[c.int(len(area))] ^= 1 + c.int(255)
            else:
                del area[c.int(len(area)):]
        elif op == 7:
            body += bytes([c.byte()]) * (1 + c.int(4))
    if c.int(8) == 0:
        flags ^= 1 << c.int(5)
    return frame_binary(bytes(body), bytes(area), flags, minor, compress=c.pick([None, True, False]),
                        fix_data_crc=c.int(8) != 0)


def dcz_binary_decode(data: bytes) -> None:
    """A real 1.5 file with its binary header mutated and CRCs/lengths fixed up."""
    _read_dcz(mutate_binary(data))


def dcz_binary_round_trip(data: bytes) -> None:
    c = Choices(data)
    g = torch.Generator().manual_seed(c.int(1 << 30))
    sd, masks, quant = {}, {}, {}
    for i in range(1 + c.int(5)):
        shape = [1 + c.int(30) for _ in range(c.int(4))]
        name = c.pick(["fc", "conv", "layer.0", "é", "a" * 40]) + f"{i}." + c.pick(["weight", "bias"])
        dt = c.pick([torch.float32, torch.float32, torch.float16, torch.int64, torch.bool])
        if dt == torch.float32 and c.int(3):
            bits = 1 + c.int(6)
            k = 1 + c.int(1 << bits)
            cb = torch.randn(k, generator=g)
            if c.int(2):
                cb = cb.half().float()
            m = torch.rand(shape, generator=g) < c.pick([0.0, 0.05, 0.3, 1.0])
            a = torch.randint(0, k, shape, generator=g)
            a = torch.where(m, a, torch.zeros_like(a)).to(c.pick([torch.uint8, torch.uint8, torch.int16]))
            sd[name] = torch.where(m, cb[a.long()], torch.zeros(()))
            if c.int(4):
                masks[name] = m
            q = {"bits": bits, "codebook": cb, "assignments": a}
            if c.int(4) == 0:
                q["method"] = "kmeans"
            quant[name] = q
        elif dt.is_floating_point:
            sd[name] = (torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < c.pick([0.1, 1.0]))).to(dt)
        elif dt == torch.bool:
            sd[name] = torch.rand(shape, generator=g) < 0.5
        else:
            sd[name] = torch.randint(0, 9, shape, generator=g)
    if c.int(4) == 0:
        masks["other.mask"] = torch.rand(7, generator=g) < 0.5
    ck = Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}}, state_dict=sd, input_shape=[1, 8, 8],
                    num_classes=1 + c.int(1000), masks=masks, quant=quant,
                    data=c.pick([{}, {"spec": "digits", "resize": None}]))
    ck.add_provenance("prune", {"sparsity": 0.9, "note": "x" * 50}, {"top1": 97.5})
    opts = dict(coder=c.pick(["auto", "huffman", "rans", "cabac"]), huffman=bool(c.int(5)),
                block=c.pick([1, 7, 1024]), index_bits=c.pick([None, 1, 3, 8]),
                compress_header=bool(c.int(2)), fp16_exact=bool(c.int(3)),
                provenance=c.pick(["none", "brief", "full"]))
    blob = dcz.write_bytes(ck, dcz.PackConfig(**opts))
    back = dcz.read_bytes(blob, "round trip")
    for k, v in sd.items():
        assert v.dtype == back.state_dict[k].dtype and np.array_equal(dcz._bits(v), dcz._bits(back.state_dict[k])), k
    for k, v in masks.items():
        assert torch.equal(v, back.masks[k]), k
    assert dcz.write_bytes(back, dcz.PackConfig(**opts)) == blob, "unpack -> pack is not byte-identical"
    js = dcz.write_bytes(ck, dcz.PackConfig(**opts, header="json"))
    assert reheader(js, compress_header=opts["compress_header"]) == blob, "JSON -> binary header differs"
    hb, hj = dcz.read_header(blob).h, dcz.read_header(js).h
    for h in (hb, hj):
        h.pop("sections")
        for t in h["tensors"]:
            for s in (t.get("gaps"), t.get("values", {}).get("indices")):
                if s:
                    s.pop("entropy", None)
                    s.pop("section")
            for r in (t, t.get("values", {})):
                for key in ("section", "codebook"):
                    if isinstance(r.get(key), int):
                        r.pop(key)
        for m in h["masks"].values():
            m.pop("section", None)
        for q in h["quant"].values():
            for r in (q["codebook"], q["assignments"]):
                r.pop("section", None)
    assert hb == hj, "the binary header does not hold the same logical header as the JSON one"
