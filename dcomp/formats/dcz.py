"""The .dcz packed checkpoint: writer, checked reader, header-only inspection.

The layout is specified in docs/FORMAT.md; this module follows it section by section.

    data, report = pack(ckpt, PackConfig())      # bytes + per-layer rows
    ckpt2 = read_bytes(data, source="model.dcz")  # bit-identical state_dict, masks, quant
    info = inspect_bytes(data)                    # header and section table only

Reading needs numpy only (torch just wraps the arrays as tensors); when numba is installed two hot
loops (Huffman blocks, and symbols -> weights/mask/assignments) run compiled, with the numpy code as
the reference. Nothing is unpickled or run from the file.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcomp import __version__
from dcomp.compressors import huffman as hf
from dcomp.errors import FormatError
from dcomp.formats import DCZ_MAGIC
from dcomp.formats.checkpoint import Checkpoint

MAJOR, MINOR = 1, 2
PREAMBLE = 32
MAX_HEADER = 1 << 27          # limit for the header as stored and, when compressed, as decompressed
FLAG_ZHEADER = 1              # flags bit 0: the header is a zlib stream (format 1.1)
FLAG_STORED_DTYPE = 2         # flags bit 1: some record has "stored_dtype" (float32 kept as float16, format 1.2)
KNOWN_FLAGS = FLAG_ZHEADER | FLAG_STORED_DTYPE
STORED_DTYPES = {"float32": ("float16",)}   # declared dtype -> narrower dtypes a payload may be stored in
ALIGN = 8
DEFAULT_MAX_BYTES = 1 << 34   # refuse files that would decode to more than 16 GiB

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4), "float16": (torch.float16, 2), "bfloat16": (torch.bfloat16, 2),
    "float64": (torch.float64, 8), "int64": (torch.int64, 8), "int32": (torch.int32, 4),
    "int16": (torch.int16, 2), "int8": (torch.int8, 1), "uint8": (torch.uint8, 1), "bool": (torch.bool, 1),
}
FLOATS = {"float32", "float16", "bfloat16", "float64"}
_NAME_OF = {v[0]: k for k, v in DTYPES.items()}
_SINT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PackConfig(BaseModel):
    """How ``pack`` encodes (every choice is recorded in the file, so reading needs none of it)."""

    model_config = ConfigDict(extra="forbid")

    index_bits: Optional[int] = Field(None, description="gap width for every sparse tensor (overrides fc/conv)")
    index_bits_fc: int = Field(5, description="gap width for 2-D and smaller weights (Deep Compression: 5)")
    index_bits_conv: int = Field(8, description="gap width for conv weights, 3-D and up (Deep Compression: 8)")
    huffman: bool = Field(True, description="allow Huffman coding (off: fixed width only)")
    block: int = Field(hf.DEFAULT_BLOCK, description="symbols per Huffman block")
    verify: bool = Field(True, description="decode the packed bytes and compare bit for bit")
    compress_header: bool = Field(True, description="store the header JSON zlib-compressed when that is smaller")
    fp16_exact: bool = Field(True, description="store float32 payloads (raw tensors, raw values, codebooks) as "
                                               "float16 when every element converts back bit-identically")

    @field_validator("index_bits", "index_bits_fc", "index_bits_conv")
    @classmethod
    def _bits(cls, v):
        if v is not None and not 1 <= v <= 16:
            raise ValueError(f"index bits must be between 1 and 16 (Deep Compression uses 5 for fc, 8 for conv), got {v}")
        return v

    @field_validator("block")
    @classmethod
    def _block(cls, v):
        if not 1 <= v <= hf.MAX_BLOCK:
            raise ValueError(f"Huffman block must be between 1 and {hf.MAX_BLOCK} symbols, got {v}")
        return v

    def index_bits_for(self, t: torch.Tensor) -> int:
        if self.index_bits is not None:
            return self.index_bits
        return self.index_bits_conv if t.dim() >= 3 else self.index_bits_fc


# ---- helpers ----------------------------------------------------------------------------------

def _dtype_name(t: torch.Tensor, what: str) -> str:
    name = _NAME_OF.get(t.dtype)
    if name is None:
        raise FormatError(f"{what}: dtype {t.dtype} cannot be stored in a .dcz file")
    return name


def _bits(t: torch.Tensor) -> np.ndarray:
    """The tensor's raw element bits as a flat signed-int numpy array (exact, -0.0 != +0.0)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    size = DTYPES[_NAME_OF[t.dtype]][1]
    a = t.view(_SINT[size]).numpy()
    return a if sys.byteorder == "little" else a.astype(a.dtype.newbyteorder("<"))  # the file is little-endian


def _from_bits(arr: np.ndarray, dtype: str, shape: list[int]) -> torch.Tensor:
    tdtype, size = DTYPES[dtype]
    arr = np.ascontiguousarray(arr, dtype=np.dtype(f"=i{size}"))
    return torch.from_numpy(arr).view(tdtype).reshape(shape)


def _half_bits(u: np.ndarray) -> np.ndarray | None:
    """float16 bits of float32 bits ``u`` (int32, little-endian) if every element survives
    float32 -> float16 -> float32 bit for bit (-0.0, fp16 subnormals, +-inf, most NaNs do), else None."""
    if u.size == 0:
        return None   # nothing to save
    f = u.view("<f4")
    with np.errstate(over="ignore", invalid="ignore"):
        h = f.astype("<f2")
    if not np.array_equal(h.astype("<f4").view("<i4"), u.view("<i4")):
        return None
    hb = h.view("<i2")
    if (((hb & 0x7E00) == 0x7C00) & ((hb & 0x03FF) != 0)).any():
        return None   # a signalling NaN: hardware converters may quiet it, so keep float32
    return hb


def _widen(raw, stored: str, dtype: str) -> np.ndarray:
    """Element bits of ``dtype`` (native int array) from a little-endian section stored as ``stored``."""
    size = DTYPES[dtype][1]
    if stored == dtype:
        return np.frombuffer(raw, dtype=f"<i{size}").astype(f"=i{size}")
    # float16 -> float32 is exact for every value (NaN: sign kept, 10 payload bits shifted up by 13)
    return np.frombuffer(raw, dtype="<f2").astype("<f4").view("<i4").astype(f"=i{size}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def gap_symbols(pos: np.ndarray, numel: int, k: int) -> np.ndarray:
    """Relative-index symbols for sorted positions (docs/FORMAT.md, "the gap stream")."""
    m = (1 << k) - 1
    g = np.diff(pos, prepend=-1)
    e = (g - 1) // m
    last = int(pos[-1]) + 1 if len(pos) else 0
    tail = (numel - last) // m
    syms = np.full(len(pos) + int(e.sum()) + tail, m, dtype=np.int64)
    syms[np.cumsum(e + 1) - 1] = (g - 1) - e * m
    return syms


def gap_positions(syms: np.ndarray, numel: int, k: int) -> np.ndarray:
    """Inverse of gap_symbols, with the checks a reader needs (raises ValueError)."""
    m = (1 << k) - 1
    # int32 arithmetic when it cannot overflow (half the memory traffic of int64)
    dt = np.int32 if (len(syms) + 1) * (m + 1) < 2**31 else np.int64
    filler = syms == m
    adv = syms.astype(dt) + 1
    adv[filler] = m
    c = np.cumsum(adv, dtype=dt)
    end = int(c[-1]) if len(c) else 0
    if end > numel:
        raise ValueError(f"relative indices run past the end of the tensor ({end} > {numel})")
    if numel - end >= m:
        raise ValueError("relative indices stop short of the tensor's end")
    pos = c[~filler]
    pos -= 1
    return pos


# ---- writing ----------------------------------------------------------------------------------

class _Sections:
    def __init__(self):
        self.parts: list[bytes] = []
        self.narrowed = False    # some record got "stored_dtype" (sets flags bit 1)

    def add(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(self.parts) - 1


def _stream(sec: _Sections, symbols: np.ndarray, alphabet: int, cfg: PackConfig,
            plan: hf.StreamPlan | None = None) -> dict:
    if plan is None:
        plan = hf.plan_stream(np.bincount(symbols, minlength=alphabet), alphabet, cfg.block, cfg.huffman)
    data, rec = hf.encode_stream(symbols, plan)
    return {"section": sec.add(data), **rec}


def _quant_ok(q: dict, t: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(codebook bits, flat assignments, bits) if the quant entry can share the weight's codebook."""
    try:
        bits, cb, a = q["bits"], q["codebook"], q["assignments"]
    except (KeyError, TypeError):
        return None
    if not (isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 16):
        return None
    if not (isinstance(cb, torch.Tensor) and isinstance(a, torch.Tensor)):
        return None
    if cb.dtype != t.dtype or cb.dim() != 1 or not 1 <= cb.numel() <= (1 << bits):
        return None
    if a.shape != t.shape or a.dtype.is_floating_point or a.dtype == torch.bool or _NAME_OF.get(a.dtype) is None:
        return None
    af = a.detach().reshape(-1).to(torch.int64).numpy()
    if af.size and (af.min() < 0 or af.max() >= (1 << bits)):
        return None
    return _bits(cb), af, bits


def _raw_quant(sec: _Sections, name: str, q: dict, fp16: bool = False) -> dict:
    out: dict[str, Any] = {}
    for key, v in q.items():
        if key in ("codebook", "assignments") and isinstance(v, torch.Tensor):
            b = _bits(v)
            h = _half_bits(b) if fp16 and key == "codebook" and v.dtype == torch.float32 else None
            out[key] = {"section": sec.add((b if h is None else h).tobytes()),
                        "dtype": _dtype_name(v, f"quant {name} {key}"), "shape": list(v.shape)}
            if h is not None:
                out[key]["stored_dtype"] = "float16"
                sec.narrowed = True
        elif key == "bits":
            out[key] = v
    extra = {k: v for k, v in q.items() if k not in ("bits", "codebook", "assignments")}
    if extra:
        out["extra"] = _json_plain(extra, f"quant {name}")
    return out


def _json_plain(obj: Any, what: str) -> Any:
    try:
        json.dumps(obj)
    except (TypeError, ValueError):
        raise FormatError(f"{what}: holds values that are not plain data (JSON); a .dcz cannot store them") from None
    return obj


def _encode_tensor(name: str, t: torch.Tensor, mask: torch.Tensor | None, q: dict | None,
                   cfg: PackConfig, sec: _Sections) -> tuple[dict, dict | None, dict | None]:
    dt = _dtype_name(t, f"tensor {name}")
    size = DTYPES[dt][1]
    u = _bits(t)
    numel = u.size
    shape = list(t.shape)
    mflat = None
    if mask is not None and mask.dtype == torch.bool and mask.shape == t.shape:
        mflat = mask.detach().reshape(-1).numpy()
    bitmap_cost = (mask.numel() + 7) // 8 if mask is not None else 0
    qinfo = _quant_ok(q, t) if q is not None else None
    raw_q_cost = 0
    if q is not None:
        raw_q_cost = sum(v.numel() * v.element_size() for v in q.values() if isinstance(v, torch.Tensor))
    # float32 payloads that are exactly float16 are stored in 2 bytes (docs/FORMAT.md, "stored_dtype")
    fp16 = cfg.fp16_exact and dt == "float32"
    h = _half_bits(u) if fp16 else None
    vsize = size if h is None else 2
    cbh = _half_bits(qinfo[0]) if fp16 and qinfo is not None else None
    cb_nbytes = (qinfo[0] if cbh is None else cbh).nbytes if qinfo is not None else 0

    # candidate: raw
    best = ("raw", numel * vsize + bitmap_cost + raw_q_cost, None)
    if dt in FLOATS and numel > 0:
        # candidate: sparse over the support (the mask, else the non-zero bits)
        if mflat is not None and not u[~mflat].any():
            support, support_is_mask = mflat, True
        else:
            support, support_is_mask = u != 0, False
        pos = np.flatnonzero(support)
        k = cfg.index_bits_for(t)
        gaps = gap_symbols(pos, numel, k)
        gplan = hf.plan_stream(np.bincount(gaps, minlength=1 << k), 1 << k, cfg.block, cfg.huffman)
        side = 0 if support_is_mask else bitmap_cost
        vplan = None
        if qinfo is not None:
            cbb, af, qbits = qinfo
            sa = af[pos]
            outside = af[~support]
            if (cbb[sa] == u[pos]).all():
                vplan = hf.plan_stream(np.bincount(sa, minlength=1 << qbits), 1 << qbits, cfg.block, cfg.huffman)
                fill_ok = outside.size == 0 or (outside == outside[0]).all()
                cost = gplan.nbytes + vplan.nbytes + cb_nbytes + side + (0 if fill_ok else af.size * q["assignments"].element_size())
                if cost < best[1]:
                    best = ("sparse-cb", cost, (pos, gaps, gplan, k, support_is_mask, sa, vplan, fill_ok, outside))
        if vplan is None or best[0] != "sparse-cb":
            cost = gplan.nbytes + len(pos) * vsize + side + raw_q_cost
            if cost < best[1]:
                best = ("sparse-raw", cost, (pos, gaps, gplan, k, support_is_mask))
        # candidate: dense codebook (quantized, every element listed)
        if qinfo is not None:
            cbb, af, qbits = qinfo
            if (cbb[af] == u).all():
                allmask = mflat is not None and bool(mflat.all())
                dplan = hf.plan_stream(np.bincount(af, minlength=1 << qbits), 1 << qbits, cfg.block, cfg.huffman)
                cost = dplan.nbytes + cb_nbytes + (0 if allmask else bitmap_cost)
                if cost < best[1]:
                    best = ("codebook", cost, (dplan, allmask))

    kind, _, info = best
    rec: dict[str, Any] = {"name": name, "dtype": dt, "shape": shape}
    mrec: dict | None = None
    qrec: dict | None = None
    narrow = {"stored_dtype": "float16"}
    if kind == "raw":
        rec.update(encoding="raw", section=sec.add((u if h is None else h).tobytes()))
        if h is not None:
            rec.update(narrow)
            sec.narrowed = True
    elif kind in ("sparse-raw", "sparse-cb"):
        pos, gaps, gplan, k, support_is_mask = info[:5]
        rec.update(encoding="sparse", index_bits=k, nnz=int(len(pos)), gaps=_stream(sec, gaps, 1 << k, cfg, gplan))
        if kind == "sparse-raw":
            rec["values"] = {"kind": "raw", "section": sec.add((u if h is None else h)[pos].tobytes())}
            if h is not None:
                rec["values"].update(narrow)
                sec.narrowed = True
        else:
            sa, vplan, fill_ok, outside = info[5:]
            cbb, af, qbits = qinfo
            rec["values"] = {"kind": "codebook", "bits": qbits, "codebook": sec.add((cbb if cbh is None else cbh).tobytes()),
                             "indices": _stream(sec, sa, 1 << qbits, cfg, vplan)}
            if cbh is not None:
                rec["values"].update(narrow)
                sec.narrowed = True
            qrec = _shared_quant(sec, name, q, fill_ok, int(outside[0]) if fill_ok and outside.size else 0)
        if support_is_mask:
            mrec = {"encoding": "support"}
    else:
        dplan, allmask = info
        cbb, af, qbits = qinfo
        rec.update(encoding="codebook", values={"kind": "codebook", "bits": qbits,
                                                  "codebook": sec.add((cbb if cbh is None else cbh).tobytes()),
                                                  "indices": _stream(sec, af, 1 << qbits, cfg, dplan)})
        if cbh is not None:
            rec["values"].update(narrow)
            sec.narrowed = True
        qrec = _shared_quant(sec, name, q, True, 0)
        if allmask:
            mrec = {"encoding": "support"}
    if mask is not None and mrec is None:
        mrec = _bitmap(sec, mask, name)
    if q is not None and qrec is None:
        qrec = _raw_quant(sec, name, q, cfg.fp16_exact)
    return rec, mrec, qrec


def _shared_quant(sec: _Sections, name: str, q: dict, fill_ok: bool, fill: int) -> dict:
    a = q["assignments"]
    out: dict[str, Any] = {"bits": q["bits"], "codebook": {"from": "values"}}
    if fill_ok:
        out["assignments"] = {"from": "values", "dtype": _dtype_name(a, f"quant {name} assignments"), "fill": fill}
    else:
        out["assignments"] = {"section": sec.add(_bits(a).tobytes()), "dtype": _dtype_name(a, f"quant {name}"),
                              "shape": list(a.shape)}
    extra = {k: v for k, v in q.items() if k not in ("bits", "codebook", "assignments")}
    if extra:
        out["extra"] = _json_plain(extra, f"quant {name}")
    return out


def _bitmap(sec: _Sections, mask: torch.Tensor, name: str) -> dict:
    if mask.dtype != torch.bool:
        raise FormatError(f"mask {name}: dtype {mask.dtype} is not bool; masks must be bool tensors")
    bits = np.packbits(mask.detach().reshape(-1).numpy().astype(np.uint8))
    return {"encoding": "bitmap", "section": sec.add(bits.tobytes()), "shape": list(mask.shape)}


def pack(ckpt: Checkpoint, cfg: PackConfig | None = None) -> tuple[bytes, dict]:
    """Encode a checkpoint. Returns the file bytes and ``inspect_bytes`` of them (the report)."""
    cfg = cfg or PackConfig()
    sec = _Sections()
    tensors, masks, quant = [], {}, {}
    for name, t in ckpt.state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"state_dict entry {name} is not a tensor")
        rec, m, q = _encode_tensor(name, t, ckpt.masks.get(name), ckpt.quant.get(name), cfg, sec)
        tensors.append(rec)
        if m is not None:
            masks[name] = m
        if q is not None:
            quant[name] = q
    for name, m in ckpt.masks.items():
        if name not in masks:
            masks[name] = _bitmap(sec, m, name)
    for name, q in ckpt.quant.items():
        if name not in quant:
            quant[name] = _raw_quant(sec, name, q, cfg.fp16_exact)
    arch = dict(ckpt.arch)
    for key, v in list(arch.items()):
        if isinstance(v, torch.Tensor):
            arch[key] = {"section": sec.add(_bits(v).tobytes()), "dtype": _dtype_name(v, f"arch {key}"),
                         "shape": list(v.shape)}
    header = {
        "dcz": MAJOR, "dcomp_version": __version__,
        "arch": _json_plain(arch, "arch"), "input_shape": [int(s) for s in ckpt.input_shape],
        "num_classes": int(ckpt.num_classes), "data": _json_plain(ckpt.data, "data"),
        "provenance": _json_plain(ckpt.provenance, "provenance"),
        "sections": [], "tensors": tensors, "masks": masks, "quant": quant,
    }
    offset = 0
    for part in sec.parts:
        header["sections"].append([offset, offset + len(part), zlib.crc32(part)])
        offset = _align(offset + len(part))
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    stored, usize = hjson, 0
    flags = FLAG_STORED_DTYPE if sec.narrowed else 0
    if cfg.compress_header:
        z = zlib.compress(hjson, 9)
        if len(z) < len(hjson):
            stored, flags, usize = z, flags | FLAG_ZHEADER, len(hjson)
    pre = DCZ_MAGIC + struct.pack("<HHIQII", MAJOR, MINOR, flags, len(stored), zlib.crc32(stored), usize)
    out = bytearray(pre + stored)
    out += b"\0" * (_align(len(out)) - len(out))
    for i, part in enumerate(sec.parts):
        out += part
        if i + 1 < len(sec.parts):
            out += b"\0" * (_align(len(out)) - len(out))
    data = bytes(out)
    if cfg.verify:
        _verify(ckpt, read_bytes(data, source="packed bytes"))
    return data, inspect_bytes(data, source="packed bytes")


def write_bytes(ckpt: Checkpoint, cfg: PackConfig | None = None) -> bytes:
    return pack(ckpt, cfg)[0]


@dataclass
class PackResult:
    data: bytes                 # the .dcz file
    report: dict                # inspect_bytes(data): per-layer rows and totals
    metrics: dict[str, Any]     # plain numbers for --json / a recipe run log


def apply_pack(ckpt: Checkpoint, cfg: PackConfig | None = None, ctx: Any = None) -> PackResult:
    """The pack stage for the recipe runner: unlike other stages it ends the chain with bytes."""
    cfg = cfg or PackConfig()
    data, report = pack(ckpt, cfg)
    metrics = {"file_bytes": report["file_bytes"], "dense_float32_bytes": report["dense_float32_bytes"],
               "ratio": report["ratio"], "header_bytes": report["header_bytes"],
               "header_json_bytes": report["header_json_bytes"], "header_compressed": report["header_compressed"],
               "encodings": {r["name"]: r["encoding"] for r in report["layers"]}}
    if ctx is not None and getattr(ctx, "console", None) is not None:
        ctx.console.print(f"packed: {report['file_bytes']:,} bytes, {report['ratio']:.1f}x smaller than float32 dense")
    return PackResult(data, report, metrics)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


def _verify(ckpt: Checkpoint, back: Checkpoint) -> None:
    """Bit-for-bit comparison after packing (a bug here must never ship a wrong file)."""
    for name, t in ckpt.state_dict.items():
        if name not in back.state_dict or not _same(t, back.state_dict[name]):
            raise FormatError(f"internal error: tensor {name} did not survive packing bit-identically")
    for name, m in ckpt.masks.items():
        if not _same(m, back.masks[name]):
            raise FormatError(f"internal error: mask {name} did not survive packing")
    for name, q in ckpt.quant.items():
        for k in ("codebook", "assignments"):
            if isinstance(q.get(k), torch.Tensor) and not _same(q[k], back.quant[name][k]):
                raise FormatError(f"internal error: quant {name} {k} did not survive packing")


# ---- reading: header and section table ----------------------------------------------------------

class _Header:
    def __init__(self, h: dict, data_start: int, sections: list[tuple[int, int, int]],
                 stored: int = 0, json_bytes: int = 0, compressed: bool = False, flags: int = 0):
        self.h = h
        self.d = data_start
        self.sections = sections
        self.stored = stored            # header bytes as stored in the file
        self.json_bytes = json_bytes    # header JSON bytes (after decompression)
        self.compressed = compressed
        self.flags = flags


def _fail(source: str, msg: str) -> FormatError:
    return FormatError(f"{source}: {msg}")


def read_header(data: bytes, source: str = "input") -> _Header:
    """Checks 1-10 of docs/FORMAT.md: preamble, flags, (compressed) header JSON, schema basics, section table."""
    n = len(data)
    if n < PREAMBLE:
        raise _fail(source, f"truncated .dcz file: {n} bytes, shorter than the {PREAMBLE}-byte preamble")
    if data[:8] != DCZ_MAGIC:
        raise _fail(source, "not a .dcz file (wrong magic bytes)")
    major, minor, flags, hlen, hcrc, usize = struct.unpack_from("<HHIQII", data, 8)
    if major != MAJOR:
        raise _fail(source, f"unsupported .dcz version {major}.{minor} (this dcomp reads {MAJOR}.x); upgrade dcomp")
    unknown = flags & ~KNOWN_FLAGS
    if unknown:
        bits = ", ".join(str(i) for i in range(32) if unknown >> i & 1)
        raise _fail(source, f"unknown flag bit {bits} set in the .dcz preamble (corrupt file or newer writer); upgrade dcomp")
    compressed = bool(flags & FLAG_ZHEADER)
    if not compressed and usize:
        raise _fail(source, "reserved bits set in the .dcz preamble (corrupt file or newer writer)")
    if compressed and not 1 <= usize <= MAX_HEADER:
        raise _fail(source, f"decompressed header size {usize} stated in the preamble is not between 1 and "
                            f"{MAX_HEADER} bytes (corrupt file)")
    if hlen == 0 or hlen > MAX_HEADER or PREAMBLE + hlen > n:
        raise _fail(source, f"header length {hlen} does not fit the {n}-byte file (truncated or corrupt)")
    raw = data[PREAMBLE:PREAMBLE + hlen]
    if zlib.crc32(raw) != hcrc:
        raise _fail(source, "header checksum mismatch (corrupt file)")
    if compressed:
        raw = _inflate_header(raw, usize, source)
    try:
        h = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail(source, "header is not valid UTF-8 JSON") from None
    if not isinstance(h, dict):
        raise _fail(source, "header is not a JSON object")
    _check_schema(h, source)
    d = _align(PREAMBLE + hlen)
    if d > n or any(data[PREAMBLE + hlen:d]):
        raise _fail(source, "padding after the header is missing or not zero")
    secs = []
    pos = 0
    for i, s in enumerate(h["sections"]):
        if not (isinstance(s, list) and len(s) == 3 and all(_is_int(x) for x in s)):
            raise _fail(source, f"section table: entry {i} is not [begin, end, crc32]")
        b, e, c = s
        if b != pos or e < b:
            raise _fail(source, f"section table: section {i} starts at {b}, expected {pos} (ordered, aligned, no gaps)")
        if d + e > n:
            raise _fail(source, f"section table: section {i} ends at byte {d + e}, past the end of the {n}-byte file (truncated)")
        pos = _align(e)
        if pos != e and d + pos <= n and any(data[d + e:d + pos]):
            raise _fail(source, f"section table: padding after section {i} is not zero")
        secs.append((d + b, d + e, c))
    end = d + (h["sections"][-1][1] if secs else 0)
    if end != n:
        raise _fail(source, f"section table: file is {n} bytes but the sections end at {end} (truncated or trailing bytes)")
    return _Header(h, d, secs, stored=hlen, json_bytes=len(raw), compressed=compressed, flags=flags)


def _inflate_header(raw: bytes, usize: int, source: str) -> bytes:
    """Decompress a zlib-stored header, never producing more than ``usize + 1`` bytes."""
    z = zlib.decompressobj()
    try:
        out = z.decompress(raw, usize + 1)
    except zlib.error as e:
        raise _fail(source, f"header zlib stream is corrupt ({e})") from None
    if len(out) > usize:
        raise _fail(source, f"header decompresses to more than the {usize} bytes stated in the preamble "
                            "(corrupt file or zip bomb)")
    if not z.eof:
        raise _fail(source, "header zlib stream is truncated (corrupt file)")
    if z.unused_data:
        raise _fail(source, "header zlib stream is followed by stray bytes (corrupt file)")
    if len(out) != usize:
        raise _fail(source, f"header decompresses to {len(out)} bytes, the preamble states {usize} (corrupt file)")
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_schema(h: dict, source: str) -> None:
    def bad(field: str, why: str) -> FormatError:
        return _fail(source, f"bad header field {field}: {why}")

    if h.get("dcz") != MAJOR:
        raise bad("dcz", f"expected {MAJOR}")
    for key, typ in (("arch", dict), ("input_shape", list), ("num_classes", int), ("data", dict),
                     ("provenance", list), ("sections", list), ("tensors", list), ("masks", dict), ("quant", dict)):
        if not isinstance(h.get(key), typ) or isinstance(h.get(key), bool):
            raise bad(key, f"missing or not a {typ.__name__}")
    names = set()
    for i, t in enumerate(h["tensors"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad(f"tensors[{i}]", "not an object with a name")
        if t["name"] in names:
            raise bad(f"tensors[{i}]", f"duplicate tensor name {t['name']}")
        names.add(t["name"])
        if t.get("dtype") not in DTYPES:
            raise bad(f"tensors[{i}].dtype", f"unknown dtype {t.get('dtype')!r} (tensor {t['name']})")
        if not isinstance(t.get("shape"), list) or not all(_is_int(s) for s in t["shape"]) or len(t["shape"]) > 32:
            raise bad(f"tensors[{i}].shape", f"not a list of non-negative integers (tensor {t['name']})")
        if t.get("encoding") not in ("raw", "sparse", "codebook"):
            raise bad(f"tensors[{i}].encoding", f"unknown encoding {t.get('encoding')!r} (tensor {t['name']})")


# ---- reading: per-tensor claims (check 11) -------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes, hdr: _Header, source: str, max_bytes: int):
        self.data, self.hdr, self.source, self.max_bytes = data, hdr, source, max_bytes
        self.total = 0
        self.used: dict[int, str] = {}
        self.narrowed = 0       # records with "stored_dtype"

    def stored(self, rec: dict, dt: str, what: str) -> str:
        """The dtype a payload is stored in: ``dt``, or a valid "stored_dtype" of the record."""
        if "stored_dtype" not in rec:
            return dt
        sd = rec["stored_dtype"]
        if not isinstance(sd, str) or sd not in STORED_DTYPES.get(dt, ()):
            allowed = ", ".join(f"{n} for {d}" for d, ns in STORED_DTYPES.items() for n in ns)
            raise self.fail(what, f"unknown stored_dtype {sd!r} for a {dt} payload (allowed: {allowed}); "
                                  "corrupt file or newer writer")
        if not self.hdr.flags & FLAG_STORED_DTYPE:
            raise self.fail(what, "has stored_dtype but flags bit 1 is clear (corrupt file)")
        self.narrowed += 1
        return sd

    def fail(self, what: str, msg: str) -> FormatError:
        return _fail(self.source, f"{what}: {msg}")

    def section(self, ref, what: str, length: int | None = None) -> int:
        if not _is_int(ref) or ref >= len(self.hdr.sections):
            raise self.fail(what, f"refers to section {ref!r}, but the file has {len(self.hdr.sections)}")
        if ref in self.used:
            raise self.fail(what, f"section {ref} is already used by {self.used[ref]}")
        self.used[ref] = what
        b, e, _ = self.hdr.sections[ref]
        if length is not None and e - b != length:
            raise self.fail(what, f"section {ref} holds {e - b} bytes, expected {length}")
        return ref

    def sec_bytes(self, ref: int) -> memoryview:
        b, e, _ = self.hdr.sections[ref]
        return memoryview(self.data)[b:e]

    def claim(self, what: str, nbytes: int) -> None:
        self.total += nbytes
        if self.total > self.max_bytes:
            raise self.fail(what, f"the file would decode to more than {self.max_bytes:,} bytes; refusing (corrupt or hostile header)")

    def stream(self, rec, what: str) -> dict:
        if not isinstance(rec, dict):
            raise self.fail(what, "stream record is not an object")
        try:
            hf.check_record(rec)
        except hf.StreamError as e:
            raise self.fail(what, str(e)) from None
        self.section(rec.get("section"), what, hf.stream_size(rec))
        return rec

    def codebook_section(self, v: dict, dt: str, what: str, size: int) -> int:
        bits = v.get("bits")
        if not _is_int(bits) or not 1 <= bits <= 16:
            raise self.fail(what, "codebook bits must be 1..16")
        ref = self.section(v.get("codebook"), what + " codebook")
        b, e, _ = self.hdr.sections[ref]
        k, r = divmod(e - b, size)
        if r or not 1 <= k <= (1 << bits):
            raise self.fail(what, f"codebook section holds {e - b} bytes, not 1..{1 << bits} {v.get('stored_dtype', dt)} values")
        return k

    def tensor(self, t: dict) -> None:
        name, dt, shape, enc = t["name"], t["dtype"], t["shape"], t["encoding"]
        what = f"tensor {name}"
        numel = _numel(shape)
        size = DTYPES[dt][1]
        if enc == "raw":
            self.section(t.get("section"), what, numel * DTYPES[self.stored(t, dt, what)][1])
        else:
            if "stored_dtype" in t:
                raise self.fail(what, f"stored_dtype belongs in the values record of a {enc} tensor")
            if dt not in FLOATS:
                raise self.fail(what, f"encoding {enc} needs a floating dtype, not {dt}")
            v = t.get("values")
            if not isinstance(v, dict) or v.get("kind") not in ("raw", "codebook"):
                raise self.fail(what, "values record missing or of unknown kind")
            if enc == "sparse":
                k, nnz = t.get("index_bits"), t.get("nnz")
                if not _is_int(k) or not 1 <= k <= 16 or not _is_int(nnz):
                    raise self.fail(what, "index_bits must be 1..16 and nnz a non-negative integer")
                g = self.stream(t.get("gaps"), what + " gaps")
                if g["alphabet"] != 1 << k:
                    raise self.fail(what, "gap stream alphabet does not match index_bits")
                if numel >= (g["count"] + 1) * ((1 << k) - 1) + 1 or nnz > g["count"]:
                    raise self.fail(what, f"shape {shape} ({numel:,} elements) is more than its {g['count']:,} relative indices can cover")
            else:
                if v.get("kind") != "codebook":
                    raise self.fail(what, "encoding codebook needs codebook values")
                nnz = numel
            vsize = DTYPES[self.stored(v, dt, what)][1]
            if v["kind"] == "raw":
                self.section(v.get("section"), what + " values", nnz * vsize)
            else:
                self.codebook_section(v, dt, what, vsize)
                s = self.stream(v.get("indices"), what + " indices")
                if s["alphabet"] != 1 << v["bits"] or s["count"] != nnz:
                    raise self.fail(what, f"index stream holds {s['count']} symbols over {s['alphabet']}, expected {nnz} over {1 << v['bits']}")
        self.claim(what, numel * size)

    def raw_ref(self, r, what: str) -> int:
        if not isinstance(r, dict) or r.get("dtype") not in DTYPES or not isinstance(r.get("shape"), list) \
                or not all(_is_int(s) for s in r["shape"]):
            raise self.fail(what, "raw tensor record needs section, dtype and shape")
        numel = _numel(r["shape"])
        self.section(r.get("section"), what, numel * DTYPES[self.stored(r, r["dtype"], what)][1])
        n = numel * DTYPES[r["dtype"]][1]
        self.claim(what, n)
        return n


def _check_claims(data: bytes, hdr: _Header, source: str, max_bytes: int) -> _Reader:
    rd = _Reader(data, hdr, source, max_bytes)
    h = hdr.h
    byname = {t["name"]: t for t in h["tensors"]}
    for t in h["tensors"]:
        rd.tensor(t)
    for name, m in h["masks"].items():
        what = f"mask {name}"
        if not isinstance(m, dict) or m.get("encoding") not in ("support", "bitmap"):
            raise rd.fail(what, "unknown mask encoding")
        if m["encoding"] == "support":
            if byname.get(name, {}).get("encoding") not in ("sparse", "codebook"):
                raise rd.fail(what, "a 'support' mask needs a sparse or codebook tensor of the same name")
            rd.claim(what, _numel(byname[name]["shape"]))
        else:
            if not isinstance(m.get("shape"), list) or not all(_is_int(s) for s in m["shape"]):
                raise rd.fail(what, "bitmap needs a shape")
            numel = _numel(m["shape"])
            rd.section(m.get("section"), what, (numel + 7) // 8)
            rd.claim(what, numel)
    for name, q in h["quant"].items():
        what = f"quant {name}"
        if not isinstance(q, dict) or not isinstance(q.get("codebook"), dict) or not isinstance(q.get("assignments"), dict):
            raise rd.fail(what, "needs codebook and assignments records")
        t = byname.get(name, {})
        shared = t.get("values", {}).get("kind") == "codebook" if isinstance(t.get("values"), dict) else False
        for key in ("codebook", "assignments"):
            r = q[key]
            if r.get("from") == "values":
                if "stored_dtype" in r:
                    raise rd.fail(what, f"{key} comes from the tensor's values and cannot have a stored_dtype")
                if not shared:
                    raise rd.fail(what, f"{key} comes from the tensor's values, but tensor {name} has no codebook")
                if key == "assignments":
                    fill = r.get("fill")
                    if r.get("dtype") not in DTYPES or DTYPES[r["dtype"]][0].is_floating_point \
                            or not _is_int(fill) or fill >= 1 << t["values"].get("bits", 0):
                        raise rd.fail(what, "assignments need an integer dtype and a fill index below 2^bits")
                    rd.claim(what, _numel(t["shape"]) * DTYPES[r["dtype"]][1])
            else:
                rd.raw_ref(r, f"{what} {key}")
    arch = h["arch"]
    if isinstance(arch.get("archive"), dict):
        rd.raw_ref(arch["archive"], "arch archive")
    if hdr.flags & FLAG_STORED_DTYPE and not rd.narrowed:
        raise rd.fail("header", "flags bit 1 (stored_dtype) is set but no record has a stored_dtype (corrupt file)")
    return rd


# ---- reading: decode ---------------------------------------------------------------------------

def read_bytes(data: bytes, source: str = "input", max_bytes: int = DEFAULT_MAX_BYTES) -> Checkpoint:
    """Decode a .dcz file into a Checkpoint; any defect raises a one-line FormatError."""
    data = bytes(data)
    hdr = read_header(data, source)
    rd = _check_claims(data, hdr, source, max_bytes)
    h = hdr.h
    for i, (b, e, crc) in enumerate(hdr.sections):
        if zlib.crc32(memoryview(data)[b:e]) != crc:
            raise _fail(source, f"section {i} ({rd.used.get(i, 'unused')}) checksum mismatch (corrupt file)")
    # all streams of the file decoded together
    items, owners = [], []
    for t in h["tensors"]:
        if t["encoding"] == "sparse":
            items.append((t["gaps"], rd.sec_bytes(t["gaps"]["section"])))
            owners.append(t["name"])
        if t["encoding"] != "raw" and t["values"]["kind"] == "codebook":
            s = t["values"]["indices"]
            items.append((s, rd.sec_bytes(s["section"])))
            owners.append(t["name"])
    try:
        decoded = hf.decode_streams(items)
    except hf.StreamError as e:
        who = owners[e.index] if e.index is not None else "?"
        raise _fail(source, f"tensor {who}: {e}") from None
    it = iter(decoded)
    byname = {t["name"]: t for t in h["tensors"]}
    state_dict: dict[str, torch.Tensor] = {}
    support: dict[str, np.ndarray] = {}
    indices: dict[str, np.ndarray] = {}
    fused_masks: dict[str, np.ndarray] = {}
    fused_assign: dict[str, np.ndarray] = {}
    for t in h["tensors"]:
        name, dt, shape = t["name"], t["dtype"], t["shape"]
        size = DTYPES[dt][1]
        numel = _numel(shape)
        what = f"tensor {name}"
        if t["encoding"] == "raw":
            arr = _widen(rd.sec_bytes(t["section"]), t.get("stored_dtype", dt), dt)
            if dt == "bool" and arr.size and (arr.view(np.uint8) > 1).any():
                raise rd.fail(what, "bool bytes other than 0 and 1")
            state_dict[name] = _from_bits(arr, dt, shape)
            continue
        if t["encoding"] == "sparse" and t["values"]["kind"] == "codebook" and _assemble_kernel() is not None:
            _assemble_fused(t, next(it), next(it), rd, h, state_dict, fused_masks, fused_assign)
            continue
        if t["encoding"] == "sparse":
            try:
                pos = gap_positions(next(it), numel, t["index_bits"])
            except ValueError as e:
                raise rd.fail(what, str(e)) from None
            if len(pos) != t["nnz"]:
                raise rd.fail(what, f"relative indices list {len(pos)} values, header says nnz {t['nnz']}")
        else:
            pos = None
        v = t["values"]
        if v["kind"] == "raw":
            vals = _widen(rd.sec_bytes(v["section"]), v.get("stored_dtype", dt), dt)
        else:
            cb = _widen(rd.sec_bytes(v["codebook"]), v.get("stored_dtype", dt), dt)
            idx = next(it)
            if idx.size and int(idx.max()) >= len(cb):
                raise rd.fail(what, f"codebook index {int(idx.max())} out of range for {len(cb)} entries")
            vals = cb[idx]
            indices[name] = idx
        if pos is None:
            out = np.ascontiguousarray(vals, dtype=f"=i{size}")
        else:
            out = np.zeros(numel, dtype=f"=i{size}")
            out[pos] = vals
            support[name] = pos
        state_dict[name] = _from_bits(out, dt, shape)
    masks = {}
    for name, m in h["masks"].items():
        if name in fused_masks:
            masks[name] = torch.from_numpy(fused_masks[name]).reshape(byname[name]["shape"])
        elif m["encoding"] == "support":
            shape = byname[name]["shape"]
            numel = _numel(shape)
            if name in support:
                flat = np.zeros(numel, dtype=bool)
                flat[support[name]] = True
            else:
                flat = np.ones(numel, dtype=bool)
            masks[name] = torch.from_numpy(flat).reshape(shape)
        else:
            numel = _numel(m["shape"])
            raw = np.frombuffer(rd.sec_bytes(m["section"]), dtype=np.uint8)
            bits = np.unpackbits(raw)
            if bits[numel:].any():
                raise rd.fail(f"mask {name}", "padding bits of the bitmap are not zero")
            masks[name] = torch.from_numpy(bits[:numel].astype(bool)).reshape(m["shape"])
    quant = {}
    for name, q in h["quant"].items():
        entry: dict[str, Any] = {}
        if "bits" in q:
            entry["bits"] = q["bits"]
        t = byname.get(name)
        for key in ("codebook", "assignments"):
            r = q[key]
            if r.get("from") == "values":
                if key == "codebook":
                    cb = _widen(rd.sec_bytes(t["values"]["codebook"]), t["values"].get("stored_dtype", t["dtype"]), t["dtype"])
                    entry[key] = _from_bits(cb, t["dtype"], [len(cb)])
                else:
                    tdtype = DTYPES[r["dtype"]][0]
                    npdtype = torch.empty(0, dtype=tdtype).numpy().dtype
                    numel = _numel(t["shape"])
                    if name in fused_assign:
                        a = fused_assign[name]
                    elif name in support:
                        a = np.full(numel, r["fill"], dtype=npdtype)
                        a[support[name]] = indices[name]
                    else:
                        a = indices[name].astype(npdtype)
                    entry[key] = torch.from_numpy(a).reshape(t["shape"])
            else:
                arr = _widen(rd.sec_bytes(r["section"]), r.get("stored_dtype", r["dtype"]), r["dtype"])
                entry[key] = _from_bits(arr, r["dtype"], r["shape"])
        if isinstance(q.get("extra"), dict):
            entry.update(q["extra"])
        quant[name] = entry
    arch = dict(h["arch"])
    if isinstance(arch.get("archive"), dict):
        r = arch["archive"]
        arr = _widen(rd.sec_bytes(r["section"]), r.get("stored_dtype", r["dtype"]), r["dtype"])
        arch["archive"] = _from_bits(arr, r["dtype"], r["shape"])
    return Checkpoint(arch=arch, state_dict=state_dict, input_shape=list(h["input_shape"]),
                      num_classes=int(h["num_classes"]), masks=masks, quant=quant, data=h["data"],
                      provenance=list(h["provenance"]))


# ---- fused assembly (numba) ---------------------------------------------------------------------
# For sparse codebook tensors: one compiled pass from gap and index symbols to the weight bits, the
# mask and the assignments, with the same checks as gap_positions (the numpy path is the reference).

_ASSEMBLE: object = False


def _assemble_kernel():
    global _ASSEMBLE
    if _ASSEMBLE is False:
        _ASSEMBLE = None
        if hf._numba_kernel() is not None:
            try:
                import numba

                @numba.njit(cache=True, nogil=True)
                def assemble(gsyms, m, numel, idx, cb, out, mask, want_mask, assign, want_assign):  # pragma: no cover
                    c = 0
                    j = 0
                    nnz = idx.shape[0]
                    k = cb.shape[0]
                    for s in gsyms:
                        if s == m:
                            c += m
                            continue
                        c += s + 1
                        if c > numel:
                            return 1
                        if j >= nnz:
                            return 3
                        v = idx[j]
                        if v >= k:
                            return 4
                        out[c - 1] = cb[v]
                        if want_mask:
                            mask[c - 1] = True
                        if want_assign:
                            assign[c - 1] = v
                        j += 1
                    if c > numel:
                        return 1
                    if numel - c >= m:
                        return 2
                    if j != nnz:
                        return 3
                    return 0

                _ASSEMBLE = assemble
            except Exception:  # noqa: BLE001
                _ASSEMBLE = None
    return _ASSEMBLE


def _assemble_fused(t, gsyms, idx, rd, h, state_dict, fused_masks, fused_assign) -> None:
    name, dt, shape = t["name"], t["dtype"], t["shape"]
    size = DTYPES[dt][1]
    numel = _numel(shape)
    cb = _widen(rd.sec_bytes(t["values"]["codebook"]), t["values"].get("stored_dtype", dt), dt)
    out = np.zeros(numel, dtype=f"=i{size}")
    want_mask = h["masks"].get(name, {}).get("encoding") == "support"
    mask = np.zeros(numel if want_mask else 0, dtype=bool)
    q = h["quant"].get(name, {})
    want_assign = q.get("assignments", {}).get("from") == "values"
    if want_assign:
        npdtype = torch.empty(0, dtype=DTYPES[q["assignments"]["dtype"]][0]).numpy().dtype
        fill = q["assignments"]["fill"]
        assign = np.zeros(numel, dtype=npdtype) if fill == 0 else np.full(numel, fill, dtype=npdtype)
    else:
        assign = np.zeros(0, dtype=np.uint8)
    if t["nnz"] != len(idx):
        raise rd.fail(f"tensor {name}", f"index stream holds {len(idx)} values, header says nnz {t['nnz']}")
    status = _assemble_kernel()(gsyms, (1 << t["index_bits"]) - 1, numel, idx, cb, out, mask, want_mask,
                                assign, want_assign)
    if status:
        raise rd.fail(f"tensor {name}", {
            1: "relative indices run past the end of the tensor",
            2: "relative indices stop short of the tensor's end",
            3: f"relative indices do not list exactly nnz={t['nnz']} values",
            4: f"codebook index out of range for {len(cb)} entries"}[status])
    state_dict[name] = _from_bits(out, dt, shape)
    if want_mask:
        fused_masks[name] = mask
    if want_assign:
        fused_assign[name] = assign


# ---- inspect (header only) ---------------------------------------------------------------------

def _stream_stats(s: dict | None) -> dict | None:
    if not s:
        return None
    n = s["count"]
    payload = hf.stream_size(s) - hf.table_bytes(s)
    bps = (s["bits"] if s["coding"] == "huffman" else n * s["width"]) / n if n else 0.0
    ent = s.get("entropy") if isinstance(s.get("entropy"), (int, float)) else None
    return {"coding": s["coding"], "count": n, "bits_per_symbol": bps, "entropy": ent,
            "over_entropy": (bps / ent - 1) if ent else None,
            "payload_bytes": payload, "table_bytes": hf.table_bytes(s)}


def inspect_bytes(data: bytes, source: str = "input") -> dict:
    """Per-tensor sizes and stream statistics from the header and section table alone."""
    hdr = read_header(data, source)
    rd = _check_claims(data, hdr, source, DEFAULT_MAX_BYTES * 1024)
    h = hdr.h

    def slen(ref) -> int:
        b, e, _ = hdr.sections[ref]
        return e - b

    rows = []
    for t in h["tensors"]:
        numel = _numel(t["shape"])
        parts = {"indices": 0, "values": 0, "codebook": 0, "tables": 0, "other": 0}
        gaps = vals = None
        bits = None
        nnz = None
        stored = t.get("stored_dtype", t["dtype"]) if t["encoding"] == "raw" \
            else t["values"].get("stored_dtype", t["dtype"])
        if t["encoding"] == "raw":
            parts["values"] = slen(t["section"])
        else:
            v = t["values"]
            nnz = t["nnz"] if t["encoding"] == "sparse" else numel
            if t["encoding"] == "sparse":
                gaps = _stream_stats(t["gaps"])
                parts["indices"] = gaps["payload_bytes"]
                parts["tables"] += gaps["table_bytes"]
            if v["kind"] == "raw":
                parts["values"] = slen(v["section"])
            else:
                bits = v["bits"]
                vals = _stream_stats(v["indices"])
                parts["values"] = vals["payload_bytes"]
                parts["tables"] += vals["table_bytes"]
                parts["codebook"] = slen(v["codebook"])
        m = h["masks"].get(t["name"])
        if m and m.get("encoding") == "bitmap":
            parts["other"] += slen(m["section"])
        q = h["quant"].get(t["name"])
        if q:
            for key in ("codebook", "assignments"):
                if "section" in q[key]:
                    parts["other"] += slen(q[key]["section"])
        total = sum(parts.values())
        rows.append({"name": t["name"], "shape": t["shape"], "dtype": t["dtype"], "stored_dtype": stored,
                     "encoding": t["encoding"],
                     "numel": numel, "nnz": nnz, "density": (nnz / numel) if nnz is not None and numel else None,
                     "bits": bits, "index_bits": t.get("index_bits"), "bytes": parts, "total_bytes": total,
                     "ratio": (numel * 4 / total) if total else None, "gaps": gaps, "indices": vals})
    dense = sum(r["numel"] * 4 for r in rows)
    file_bytes = len(data)
    return {"source": source, "version": f"{MAJOR}.{struct.unpack_from('<H', data, 10)[0]}",
            "dcomp_version": h.get("dcomp_version"), "arch": {k: v for k, v in h["arch"].items() if k != "archive"},
            "file_bytes": file_bytes, "header_bytes": hdr.d, "header_json_bytes": hdr.json_bytes,
            "header_stored_bytes": hdr.stored, "header_compressed": hdr.compressed, "sections": len(hdr.sections),
            "dense_float32_bytes": dense, "ratio": dense / file_bytes if file_bytes else None,
            "params": sum(r["numel"] for r in rows), "layers": rows, "provenance_stages": [p.get("stage") for p in h["provenance"] if isinstance(p, dict)]}
