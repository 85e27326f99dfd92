"""Per-record checks of a parsed header against the section table (check 11 of docs/FORMAT.md)."""

from __future__ import annotations

from dcomp.compressors import huffman as hf
from dcomp.errors import FormatError
from dcomp.formats.dcz.header import _fail, _Header
from dcomp.formats.dcz.spec import (DTYPES, FLAG_STORED_DTYPE, FLOATS, STORED_DTYPES, _is_int, _numel)


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
