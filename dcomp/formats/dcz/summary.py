"""`dcomp inspect`: per-tensor sizes and stream statistics from the header and section table alone."""

from __future__ import annotations

import struct

from dcomp.compressors import huffman as hf
from dcomp.formats import limits as _limits
from dcomp.formats.dcz.claims import _check_claims
from dcomp.formats.dcz.header import read_header
from dcomp.formats.dcz.spec import MAJOR, _numel


# ---- inspect (header only) ---------------------------------------------------------------------

def _stream_stats(s: dict | None) -> dict | None:
    if not s:
        return None
    n = s["count"]
    payload = hf.stream_size(s) - hf.table_bytes(s)
    bits = {"huffman": lambda: s["bits"], "ans": lambda: 8 * s["bytes"], "cabac": lambda: 8 * s["bytes"]}.get(s["coding"], lambda: n * s["width"])()
    bps = bits / n if n else 0.0
    ent = s.get("entropy") if isinstance(s.get("entropy"), (int, float)) else None
    return {"coding": s["coding"], "count": n, "bits_per_symbol": bps, "entropy": ent,
            "over_entropy": (bps / ent - 1) if ent else None,
            "payload_bytes": payload, "table_bytes": hf.table_bytes(s)}


def inspect_bytes(data: bytes, source: str = "input", limits: _limits.Limits | None = None) -> dict:
    """Per-tensor sizes and stream statistics from the header and section table alone.

    Every header limit applies except the decoded size, which is reported (``decoded_bytes``,
    ``max_decoded``) rather than refused: inspect is how one learns what a file would cost."""
    lim = limits or _limits.current()
    hdr = read_header(data, source, lim)
    rd = _check_claims(data, hdr, source, 1 << 80, lim)
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
                if "from" not in q[key]:
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
            "header_stored_bytes": hdr.stored, "header_compressed": hdr.compressed,
            "header_format": "binary" if hdr.binary else "json", "sections": len(hdr.sections),
            "dense_float32_bytes": dense, "ratio": dense / file_bytes if file_bytes else None,
            "params": sum(r["numel"] for r in rows),
            "decoded_bytes": rd.total, "max_decoded": lim.decoded(), "layers": rows, "provenance_stages": [p.get("stage") for p in h["provenance"] if isinstance(p, dict)]}
