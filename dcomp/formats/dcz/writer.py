"""Writing .dcz files: per tensor the smallest encoding, then preamble, header and sections."""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dcomp import __version__
from dcomp.compressors import cabac, rans
from dcomp.compressors import huffman as hf
from dcomp.config.pack import CABAC_AUTO_BINS, PackConfig  # noqa: F401 - re-exported
from dcomp.errors import FormatError
from dcomp.formats import DCZ_MAGIC
from dcomp.formats.checkpoint import Checkpoint
from dcomp.formats.dcz.reader import read_bytes
from dcomp.formats.dcz import compact
from dcomp.formats.dcz.spec import (DTYPES, FLAG_ANS, FLAG_BINARY, FLAG_CABAC, FLAG_STORED_DTYPE, FLAG_ZHEADER, FLOATS, MAJOR, _align,
                                    _bits, _dtype_name, _half_bits, _name_of, gap_symbols)
from dcomp.formats.dcz.summary import inspect_bytes

# ---- writing ----------------------------------------------------------------------------------

class _Sections:
    def __init__(self):
        self.parts: list[bytes] = []
        self.narrowed = False    # some record got "stored_dtype" (sets flags bit 1)
        self.ans = False         # some stream is rANS-coded (format 1.3)
        self.cabac = False       # some stream is cabac-coded (format 1.4)
        self.cabac_bins = 0      # their decoding work (PackConfig.cabac_budget)

    def budget(self, cfg: "PackConfig", *plans) -> int | None:
        """cabac bins still allowed in this file (None: no limit), net of ``plans`` not yet written."""
        if cfg.coder != "auto":
            return None
        return cfg.cabac_budget - self.cabac_bins - sum(getattr(p, "bins", 0) for p in plans)

    def add(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(self.parts) - 1


@dataclass
class _AnsPlan:
    nbytes: int
    data: bytes
    rec: dict
    coding: str = "ans"
    bins: int = 0            # cabac: binary decisions the decoder makes


def coders(cfg: PackConfig) -> set[str]:
    """The codings the writer may choose from (fixed width always)."""
    if not cfg.huffman:                       # huffman=False keeps its meaning: fixed width only
        return {"fixed"}
    allowed = {"auto": {"fixed", "huffman", "ans", "cabac"}, "huffman": {"fixed", "huffman"},
               "rans": {"fixed", "ans"}, "cabac": {"fixed", "cabac"}}[cfg.coder]
    if not cfg.ans:                           # --no-ans (deprecated: --coder huffman)
        allowed = allowed - {"ans", "cabac"}
    return allowed


def _plan(symbols: np.ndarray, alphabet: int, cfg: PackConfig, geom: tuple | None = None, budget: int | None = None):
    """The smallest section among the allowed coders for this stream. ``geom`` = (positions, numel,
    cols) for a gap stream: the cabac significance model codes the positions instead. ``budget``:
    cabac bins still allowed (None: no limit)."""
    allowed = coders(cfg)
    counts = np.bincount(symbols, minlength=alphabet)
    plan = hf.plan_stream(counts, alphabet, cfg.block, "huffman" in allowed)
    if "ans" in allowed and len(symbols):
        freqs = rans.quantize_freqs(counts)
        # estimate first (table + ideal payload + state); encode only when it may win
        if freqs is not None and 2 * alphabet + 4 + rans.cost_bits(counts, freqs, rans.PRECISION) / 8 < plan.nbytes:
            enc = rans.encode_stream(symbols, alphabet, counts)
            if enc is not None and len(enc[0]) < plan.nbytes:
                plan = _AnsPlan(len(enc[0]), enc[0], enc[1])
    if "cabac" in allowed and len(symbols):
        for model in ((cabac.SIGNIFICANCE,) if geom is not None else ()) + (cabac.TREE, cabac.TREE_PREV):
            bins = geom[1] if model == cabac.SIGNIFICANCE else len(symbols) * (alphabet.bit_length() - 1)
            if budget is not None and bins > budget:
                continue
            if model == cabac.SIGNIFICANCE:
                pos, numel, cols = geom
                data = cabac.encode_significance(pos, numel, cols)
                rec = {"count": int(len(symbols)), "alphabet": int(alphabet), "coding": "cabac", "model": model,
                       "bytes": len(data), "entropy": round(hf.entropy(counts), 6)}
            else:
                data, rec = cabac.encode_stream(symbols, alphabet, model)
            if len(data) < plan.nbytes:
                plan = _AnsPlan(len(data), data, rec, "cabac", bins)
    return plan


def _stream(sec: _Sections, symbols: np.ndarray, alphabet: int, cfg: PackConfig, plan=None) -> dict:
    if plan is None:
        plan = _plan(symbols, alphabet, cfg)
    if isinstance(plan, _AnsPlan):
        if plan.coding == "cabac":
            sec.cabac = True
            sec.cabac_bins += plan.bins
        else:
            sec.ans = True
        return {"section": sec.add(plan.data), **plan.rec}
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
    if a.shape != t.shape or a.dtype.is_floating_point or a.dtype == torch.bool or _name_of(a.dtype) is None:
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
        gplan = _plan(gaps, 1 << k, cfg, (pos, numel, cabac.matrix_cols(shape)), sec.budget(cfg))
        side = 0 if support_is_mask else bitmap_cost
        vplan = None
        if qinfo is not None:
            cbb, af, qbits = qinfo
            sa = af[pos]
            outside = af[~support]
            if (cbb[sa] == u[pos]).all():
                vplan = _plan(sa, 1 << qbits, cfg, budget=sec.budget(cfg, gplan))
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
                dplan = _plan(af, 1 << qbits, cfg, budget=sec.budget(cfg))
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
        "provenance": _json_plain(provenance_for(ckpt.provenance, cfg.provenance, cfg.keep_times), "provenance"),
        "sections": [], "tensors": tensors, "masks": masks, "quant": quant,
    }
    flags = (FLAG_STORED_DTYPE if sec.narrowed else 0) | (FLAG_ANS if sec.ans else 0) | (FLAG_CABAC if sec.cabac else 0)
    if cfg.header == "binary":
        # format 1.5: the binary header; sections contiguous, aligned only in large files (docs/FORMAT.md)
        align = BINARY_ALIGN if sum(len(p) for p in sec.parts) >= BINARY_ALIGN_FROM else 0
        body, parts = compact.encode(header, sec.parts, align)
        flags |= FLAG_BINARY
        minor = 5
    else:
        align = 3
        parts = sec.parts
        offset = 0
        for part in parts:
            header["sections"].append([offset, offset + len(part), zlib.crc32(part)])
            offset = _align(offset + len(part))
        body = json.dumps(header, separators=(",", ":")).encode("utf-8")
        minor = 4 if sec.cabac else 3 if sec.ans else 2
    stored, usize = body, 0
    if cfg.compress_header:
        z = compact.compress(body) if cfg.header == "binary" else zlib.compress(body, 9)
        if len(z) < len(body):
            stored, flags, usize = z, flags | FLAG_ZHEADER, len(body)
    pre = DCZ_MAGIC + struct.pack("<HHIQII", MAJOR, minor, flags, len(stored), zlib.crc32(stored), usize)
    out = bytearray(pre + stored)
    out += b"\0" * (compact._align(len(out), align) - len(out))
    for i, part in enumerate(parts):
        out += part
        if i + 1 < len(parts):
            out += b"\0" * (compact._align(len(out), align) - len(out))
    data = bytes(out)
    if cfg.verify:
        _verify(ckpt, read_bytes(data, source="packed bytes"))
    report = inspect_bytes(data, source="packed bytes")
    # a 1.5 header stores no entropies (a reader can compute them from the symbols): the writer knows them
    byname = {t["name"]: t for t in tensors}
    for row in report["layers"]:
        t = byname[row["name"]]
        for key, s in (("gaps", t.get("gaps")), ("indices", (t.get("values") or {}).get("indices"))):
            st = row.get(key)
            if st is not None and st.get("entropy") is None and isinstance(s, dict) and s.get("entropy"):
                st["entropy"] = s["entropy"]
                st["over_entropy"] = st["bits_per_symbol"] / s["entropy"] - 1
    return data, report


BRIEF_STR = 40   # longest string param a brief provenance keeps
BINARY_ALIGN = 3                 # format 1.5: sections of large files start at multiples of 8 bytes...
BINARY_ALIGN_FROM = 1 << 20      # ...when the sections hold at least 1 MiB (padding is then < 0.1%)


def provenance_for(prov: list, mode: str = "full", keep_times: bool = False) -> list:
    """The provenance a packed file carries (PackConfig.provenance; docs/FORMAT.md, "provenance").

    full: every entry as it is; brief: per entry the stage name and its scalar params (numbers,
    booleans, null, strings up to 40 characters), no metrics, versions, nested params or notes;
    none: an empty list. Times are dropped unless ``keep_times`` (full and brief)."""
    if mode == "none":
        return []
    if mode == "brief":
        out = []
        for p in prov:
            if not isinstance(p, dict):
                continue
            params = p.get("params") if isinstance(p.get("params"), dict) else {}
            e: dict[str, Any] = {"stage": p.get("stage"),
                                 "params": {k: v for k, v in params.items()
                                            if v is None or isinstance(v, (bool, int, float))
                                            or (isinstance(v, str) and len(v) <= BRIEF_STR)}}
            if keep_times and "time" in p:
                e["time"] = p["time"]
            out.append(e)
        return out
    return prov if keep_times else _without_times(prov)


def _without_times(prov: list) -> list:
    return [{k: v for k, v in p.items() if k != "time"} if isinstance(p, dict) else p for p in prov]


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


def reheader(data: bytes, header: str = "binary", source: str = "input", compress_header: bool = True) -> bytes:
    """The same file with its header rewritten in another form ('binary': format 1.5, 'json': 1.0-1.4),
    every section's bytes unchanged (so the tensors decode identically). The input is fully checked
    (CRCs and decoding) first. Entropy figures of a JSON header are not carried into a binary one."""
    from dcomp.formats.dcz.header import read_header
    read_bytes(data, source=source)
    hdr = read_header(data, source)
    h = json.loads(json.dumps(hdr.h))
    parts = [bytes(data[b:e]) for b, e, _ in hdr.sections]
    for t in h["tensors"]:
        for s in (t.get("gaps"), (t.get("values") or {}).get("indices")):
            if isinstance(s, dict):
                s.pop("entropy", None)
    flags = hdr.flags & ~(FLAG_ZHEADER | FLAG_BINARY)
    h["sections"] = []
    if header == "binary":
        align = BINARY_ALIGN if sum(len(p) for p in parts) >= BINARY_ALIGN_FROM else 0
        body, parts = compact.encode(h, parts, align)
        flags |= FLAG_BINARY
        minor = 5
    else:
        align = 3
        offset = 0
        for part in parts:
            h["sections"].append([offset, offset + len(part), zlib.crc32(part)])
            offset = _align(offset + len(part))
        body = json.dumps(h, separators=(",", ":")).encode("utf-8")
        minor = 4 if flags & FLAG_CABAC else 3 if flags & FLAG_ANS else 2
    stored, usize = body, 0
    if compress_header:
        z = compact.compress(body) if header == "binary" else zlib.compress(body, 9)
        if len(z) < len(body):
            stored, flags, usize = z, flags | FLAG_ZHEADER, len(body)
    out = bytearray(DCZ_MAGIC + struct.pack("<HHIQII", MAJOR, minor, flags, len(stored), zlib.crc32(stored), usize))
    out += stored
    out += b"\0" * (compact._align(len(out), align) - len(out))
    for i, part in enumerate(parts):
        out += part
        if i + 1 < len(parts):
            out += b"\0" * (compact._align(len(out), align) - len(out))
    return bytes(out)
