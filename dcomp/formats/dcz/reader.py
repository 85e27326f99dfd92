"""Decoding a checked .dcz file into a Checkpoint (checks 12-13 of docs/FORMAT.md)."""

from __future__ import annotations

import itertools
import zlib
from typing import Any

import numpy as np
import torch

from dcomp.compressors import huffman as hf
from dcomp.compressors.cabac import matrix_cols
from dcomp.formats.checkpoint import Checkpoint
from dcomp.formats import limits as _limits
from dcomp.formats.dcz import errors as E
from dcomp.formats.dcz import kernels
from dcomp.formats.dcz.claims import _check_claims
from dcomp.formats.dcz.compact import printable
from dcomp.formats.dcz.header import _fail, read_header
from dcomp.formats.dcz.spec import DTYPES, _from_bits, _numel, _widen, gap_positions


# ---- reading: decode ---------------------------------------------------------------------------

def read_bytes(data: bytes, source: str = "input", max_bytes: int | None = None,
               limits: _limits.Limits | None = None) -> Checkpoint:
    """Decode a .dcz file into a Checkpoint; any defect raises a one-line FormatError (a subclass of
    dcomp.formats.dcz.errors.DczError naming the check). ``max_bytes`` overrides ``limits.max_decoded``
    (default: dcomp.formats.limits.current())."""
    data = bytes(data)
    lim = limits or _limits.current()
    hdr = read_header(data, source, lim)
    rd = _check_claims(data, hdr, source, max_bytes, lim)
    h = hdr.h
    if hdr.data_crc is not None:      # format 1.5: one CRC32 for the whole data area
        if zlib.crc32(memoryview(data)[hdr.d:]) != hdr.data_crc:
            raise _fail(source, f"data area checksum mismatch (corrupt file: some byte of the {len(hdr.sections)} "
                                "sections changed; a 1.5 file has one CRC32 for all of them, so which one is not "
                                "known)", E.SectionChecksum)
    for i, (b, e, crc) in enumerate(hdr.sections if hdr.data_crc is None else ()):
        if zlib.crc32(memoryview(data)[b:e]) != crc:
            raise _fail(source, f"section {i} ({rd.used.get(i, 'unused')}) checksum mismatch (corrupt file)",
                        E.SectionChecksum)
    # all streams of the file decoded together
    items, owners = [], []
    for t in h["tensors"]:
        if t["encoding"] == "sparse":
            numel = _numel(t["shape"])
            items.append((t["gaps"], rd.sec_bytes(t["gaps"]["section"]),
                          (numel, matrix_cols(t["shape"]), t["index_bits"])))
            owners.append(printable(t["name"]))
        if t["encoding"] != "raw" and t["values"]["kind"] == "codebook":
            s = t["values"]["indices"]
            items.append((s, rd.sec_bytes(s["section"])))
            owners.append(printable(t["name"]))
    try:
        decoded = hf.decode_streams(items)
    except hf.StreamError as e:
        who = owners[e.index] if e.index is not None else "?"
        raise _fail(source, f"tensor {who}: {e}", E.BadStream) from None
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
        what = f"tensor {printable(name)}"
        if t["encoding"] == "raw":
            arr = _widen(rd.sec_bytes(t["section"]), t.get("stored_dtype", dt), dt)
            if dt == "bool" and arr.size and (arr.view(np.uint8) > 1).any():
                raise rd.fail_decode(what, "bool bytes other than 0 and 1")
            state_dict[name] = _from_bits(arr, dt, shape)
            continue
        if t["encoding"] == "sparse" and t["values"]["kind"] == "codebook" and kernels._assemble_kernel() is not None:
            gsyms, isyms = next(it), next(it)
            try:
                _assemble_fused(t, gsyms, isyms, rd, h, state_dict, fused_masks, fused_assign)
                continue
            except E.DczError:
                raise
            except Exception:  # noqa: BLE001 - the compiled kernel failed to build here: numpy from now on
                kernels._ASSEMBLE = None
                it = itertools.chain([gsyms, isyms], it)
        if t["encoding"] == "sparse":
            try:
                pos = gap_positions(next(it), numel, t["index_bits"])
            except ValueError as e:
                raise rd.fail_decode(what, str(e)) from None
            if len(pos) != t["nnz"]:
                raise rd.fail_decode(what, f"relative indices list {len(pos)} values, header says nnz {t['nnz']}")
        else:
            pos = None
        v = t["values"]
        if v["kind"] == "raw":
            vals = _widen(rd.sec_bytes(v["section"]), v.get("stored_dtype", dt), dt)
        else:
            cb = _widen(rd.sec_bytes(v["codebook"]), v.get("stored_dtype", dt), dt)
            idx = next(it)
            if idx.size and int(idx.max()) >= len(cb):
                raise rd.fail_decode(what, f"codebook index {int(idx.max())} out of range for {len(cb)} entries")
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
                raise rd.fail_decode(f"mask {printable(name)}", "padding bits of the bitmap are not zero")
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
        raise rd.fail_decode(f"tensor {printable(name)}", f"index stream holds {len(idx)} values, header says nnz {t['nnz']}")
    status = kernels._assemble_kernel()(gsyms, (1 << t["index_bits"]) - 1, numel, idx, cb, out, mask, want_mask,
                                assign, want_assign)
    if status:
        raise rd.fail_decode(f"tensor {printable(name)}", {
            1: "relative indices run past the end of the tensor",
            2: "relative indices stop short of the tensor's end",
            3: f"relative indices do not list exactly nnz={t['nnz']} values",
            4: f"codebook index out of range for {len(cb)} entries"}[status])
    state_dict[name] = _from_bits(out, dt, shape)
    if want_mask:
        fused_masks[name] = mask
    if want_assign:
        fused_assign[name] = assign
