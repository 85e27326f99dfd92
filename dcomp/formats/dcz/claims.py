"""Per-record checks of a parsed header against the section table and the limits (check 11 of
docs/FORMAT.md), before anything is allocated. The header has passed the schema (check 9), so
every field here has its spec type and range; what remains is consistency: section references,
lengths, stream sizes, stored dtypes, totals against the resource limits.
"""

from __future__ import annotations

from dcomp.compressors import cabac
from dcomp.compressors import huffman as hf
from dcomp.formats import limits as _limits
from dcomp.formats.dcz import errors as E
from dcomp.formats.dcz.compact import printable
from dcomp.formats.dcz.header import _fail, _Header
from dcomp.formats.dcz.spec import SIZES, FLAG_ANS, FLAG_CABAC, FLAG_STORED_DTYPE, FLOATS, STORED_DTYPES, _numel


class _Reader:
    def __init__(self, data: bytes, hdr: _Header, source: str, max_bytes: int,
                 lim: _limits.Limits | None = None):
        self.data, self.hdr, self.source, self.max_bytes = data, hdr, source, max_bytes
        self.lim = lim or _limits.current()
        self.total = 0
        self.used: dict[int, str] = {}
        self.narrowed = 0       # records with "stored_dtype"
        self.tables = 0         # Huffman streams (each has its own code table)
        self.ans = 0            # rANS streams
        self.cabac = 0          # context-adaptive arithmetic coded streams

    def stored(self, rec: dict, dt: str, what: str) -> str:
        """The dtype a payload is stored in: ``dt``, or a valid "stored_dtype" of the record."""
        if "stored_dtype" not in rec:
            return dt
        sd = rec["stored_dtype"]
        if not isinstance(sd, str) or sd not in STORED_DTYPES.get(dt, ()):
            allowed = ", ".join(f"{n} for {d}" for d, ns in STORED_DTYPES.items() for n in ns)
            raise self.fail(what, f"unknown stored_dtype {repr(sd)[:40]} for a {dt} payload (allowed: {allowed}); "
                                  "corrupt file or newer writer")
        if not self.hdr.flags & FLAG_STORED_DTYPE:
            raise self.fail(what, "has stored_dtype but flags bit 1 is clear (corrupt file)")
        self.narrowed += 1
        return sd

    def fail(self, what: str, msg: str, cls: type[E.DczError] = E.BadRecord) -> E.DczError:
        return _fail(self.source, f"{what}: {msg}", cls)

    def fail_decode(self, what: str, msg: str) -> E.DczError:
        return self.fail(what, msg, E.BadStream)

    def section(self, ref: int, what: str, length: int | None = None) -> int:
        if ref >= len(self.hdr.sections):
            raise self.fail(what, f"refers to section {ref}, but the file has {len(self.hdr.sections)}")
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
            raise self.fail(what, f"the file would decode to more than {self.max_bytes:,} bytes "
                                  f"({self.total:,} claimed so far); refusing ({_limits.hint('max_decoded')})",
                            E.LimitExceeded)

    def stream(self, rec: dict, what: str, cols: int = 1) -> dict:
        try:
            hf.check_record(rec)
        except hf.StreamError as e:
            raise self.fail(what, str(e)) from None
        self.section(rec["section"], what, hf.stream_size(rec))
        if rec["coding"] == "ans":
            if not self.hdr.flags & FLAG_ANS:
                raise self.fail(what, "is an rANS stream but flags bit 2 is clear (corrupt file)")
            self.ans += 1
        if rec["coding"] == "cabac":
            if not self.hdr.flags & FLAG_CABAC:
                raise self.fail(what, "is a cabac stream but flags bit 3 is clear (corrupt file)")
            if rec["model"] == 2 and not what.endswith(" gaps"):
                raise self.fail(what, "cabac model 2 (significance map) codes only the gap stream of a sparse tensor")
            self.cabac += 1
            if self.cabac > self.lim.max_tables:
                raise self.fail(what, f"more than {self.lim.max_tables:,} cabac streams in one file; refusing "
                                      f"({_limits.hint('max_tables')})", E.LimitExceeded)
            # the decoder's context tables (up to 9 x 2^16 entries for a tree model): claimed like decoded bytes
            self.claim(what, cabac.context_bytes(rec, cols))
        if rec["coding"] == "huffman":
            self.tables += 1
            if self.tables > self.lim.max_tables:
                raise self.fail(what, f"more than {self.lim.max_tables:,} Huffman tables in one file; refusing "
                                      f"({_limits.hint('max_tables')})", E.LimitExceeded)
        return rec

    def codebook_section(self, v: dict, dt: str, what: str, size: int) -> int:
        ref = self.section(v["codebook"], what + " codebook")
        b, e, _ = self.hdr.sections[ref]
        k, r = divmod(e - b, size)
        if r or not 1 <= k <= (1 << v["bits"]):
            raise self.fail(what, f"codebook section holds {e - b} bytes, not 1..{1 << v['bits']} "
                                  f"{v.get('stored_dtype', dt)} values")
        return k

    def tensor(self, t: dict) -> None:
        name, dt, shape, enc = t["name"], t["dtype"], t["shape"], t["encoding"]
        what = f"tensor {printable(name)}"
        numel = _numel(shape)
        size = SIZES[dt]
        if enc == "raw":
            self.section(t["section"], what, numel * SIZES[self.stored(t, dt, what)])
            self.claim(what, numel * size)
            return
        if "stored_dtype" in t:
            raise self.fail(what, f"stored_dtype belongs in the values record of a {enc} tensor")
        if dt not in FLOATS:
            raise self.fail(what, f"encoding {enc} needs a floating dtype, not {dt}")
        v = t["values"]
        if enc == "sparse":
            k, nnz = t["index_bits"], t["nnz"]
            g = self.stream(t["gaps"], what + " gaps", cabac.matrix_cols(shape))
            if g["alphabet"] != 1 << k:
                raise self.fail(what, "gap stream alphabet does not match index_bits")
            if numel >= (g["count"] + 1) * ((1 << k) - 1) + 1 or nnz > g["count"]:
                raise self.fail(what, f"shape {shape} ({numel:,} elements) is more than its {g['count']:,} "
                                      "relative indices can cover")
            if nnz > numel:
                raise self.fail(what, f"nnz {nnz:,} is more than the tensor's {numel:,} elements")
            if g["coding"] in ("ans", "cabac") and g["count"] > numel:
                # every gap symbol advances at least 1: bounds rANS decoding work by the tensor's size
                raise self.fail(what, f"gap stream claims {g['count']:,} symbols for {numel:,} elements")
        else:
            if v["kind"] != "codebook":
                raise self.fail(what, "encoding codebook needs codebook values")
            nnz = numel
        vsize = SIZES[self.stored(v, dt, what)]
        if v["kind"] == "raw":
            self.section(v["section"], what + " values", nnz * vsize)
        else:
            self.codebook_section(v, dt, what, vsize)
            s = self.stream(v["indices"], what + " indices")
            if s["alphabet"] != 1 << v["bits"] or s["count"] != nnz:
                raise self.fail(what, f"index stream holds {s['count']} symbols over {s['alphabet']}, expected "
                                      f"{nnz} over {1 << v['bits']}")
        self.claim(what, numel * size)

    def raw_ref(self, r: dict, what: str) -> int:
        numel = _numel(r["shape"])
        n = numel * SIZES[r["dtype"]]
        self.section(r["section"], what, numel * SIZES[self.stored(r, r["dtype"], what)])
        self.claim(what, n)
        return n


def _check_claims(data: bytes, hdr: _Header, source: str, max_bytes: int | None = None,
                  lim: _limits.Limits | None = None) -> _Reader:
    lim = lim or _limits.current()
    rd = _Reader(data, hdr, source, lim.decoded() if max_bytes is None else max_bytes, lim)
    h = hdr.h
    byname = {t["name"]: t for t in h["tensors"]}
    for t in h["tensors"]:
        rd.tensor(t)
    for name, m in h["masks"].items():
        what = f"mask {printable(name)}"
        if m["encoding"] == "support":
            if byname.get(name, {}).get("encoding") not in ("sparse", "codebook"):
                raise rd.fail(what, "a 'support' mask needs a sparse or codebook tensor of the same name")
            rd.claim(what, _numel(byname[name]["shape"]))
        else:
            numel = _numel(m["shape"])
            rd.section(m["section"], what, (numel + 7) // 8)
            rd.claim(what, numel)
    for name, q in h["quant"].items():
        what = f"quant {printable(name)}"
        t = byname.get(name)
        shared = t is not None and t["encoding"] != "raw" and t["values"]["kind"] == "codebook"
        for key in ("codebook", "assignments"):
            r = q[key]
            if "from" in r:
                if "stored_dtype" in r:
                    raise rd.fail(what, f"{key} comes from the tensor's values and cannot have a stored_dtype")
                if not shared:
                    raise rd.fail(what, f"{key} comes from the tensor's values, but tensor {name} has no codebook")
                if key == "assignments":
                    if r["dtype"] in FLOATS or r["dtype"] == "bool" \
                            or r["fill"] >= 1 << t["values"]["bits"]:
                        raise rd.fail(what, "assignments need an integer dtype and a fill index below 2^bits")
                    if r["fill"] > _int_max(r["dtype"]):
                        raise rd.fail(what, f"assignments fill {r['fill']} does not fit dtype {r['dtype']}")
                    rd.claim(what, _numel(t["shape"]) * SIZES[r["dtype"]])
            else:
                rd.raw_ref(r, f"{what} {key}")
    arch = h["arch"]
    if isinstance(arch.get("archive"), dict):
        rd.raw_ref(arch["archive"], "arch archive")
    if hdr.flags & FLAG_STORED_DTYPE and not rd.narrowed:
        raise rd.fail("header", "flags bit 1 (stored_dtype) is set but no record has a stored_dtype (corrupt file)")
    if hdr.flags & FLAG_ANS and not rd.ans:
        raise rd.fail("header", "flags bit 2 (rANS) is set but no stream is rANS-coded (corrupt file)")
    if hdr.flags & FLAG_CABAC and not rd.cabac:
        raise rd.fail("header", "flags bit 3 (cabac) is set but no stream is cabac-coded (corrupt file)")
    return rd


def _int_max(dtype: str) -> int:
    return {"uint8": 255, "int8": 127, "int16": 32767}.get(dtype, (1 << 31) - 1)
