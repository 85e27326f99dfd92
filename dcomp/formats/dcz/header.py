"""Reading a .dcz file's preamble, header JSON and section table (checks 1-10 of docs/FORMAT.md).

After ``read_header`` returns, every field the rest of the reader touches has the type and range
the spec gives it (check 9, ``_check_schema``): later code may index and compare without guarding
against lists where a string belongs, negative sizes or booleans posing as integers.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

from dcomp.compressors import huffman as hf
from dcomp.formats import DCZ_MAGIC
from dcomp.formats import limits as _limits
from dcomp.formats.dcz import errors as E
from dcomp.formats.dcz import compact
from dcomp.formats.dcz.spec import (DTYPES, FLAG_BINARY, FLAG_ZHEADER, KNOWN_FLAGS, MAJOR, MAX_HEADER, PREAMBLE, _align,
                                    _is_int)

MAX_DIMS = 32
MAX_DIM = 1 << 62       # any single dimension or count: keeps every product within Python-int sanity


class _Header:
    def __init__(self, h: dict, data_start: int, sections: list[tuple[int, int, int | None]],
                 stored: int = 0, json_bytes: int = 0, compressed: bool = False, flags: int = 0,
                 data_crc: int | None = None):
        self.h = h
        self.d = data_start
        self.sections = sections        # (begin, end, crc32) in file offsets; crc None in format 1.5
        self.stored = stored            # header bytes as stored in the file
        self.json_bytes = json_bytes    # header bytes after decompression (JSON, or the 1.5 binary table)
        self.compressed = compressed
        self.flags = flags
        self.data_crc = data_crc        # format 1.5: CRC32 of the whole data area (one for all sections)

    @property
    def binary(self) -> bool:
        return bool(self.flags & FLAG_BINARY)


def _fail(source: str, msg: str, cls: type[E.DczError] = E.DczError) -> E.DczError:
    return cls(f"{source}: {msg}")


def read_header(data: bytes, source: str = "input", limits: _limits.Limits | None = None) -> _Header:
    """Checks 1-10 of docs/FORMAT.md: preamble, flags, (compressed) header JSON, schema, section table."""
    lim = limits or _limits.current()
    n = len(data)
    if n < PREAMBLE:
        raise _fail(source, f"truncated .dcz file: {n} bytes, shorter than the {PREAMBLE}-byte preamble", E.Truncated)
    if data[:8] != DCZ_MAGIC:
        raise _fail(source, "not a .dcz file (wrong magic bytes)", E.NotDcz)
    major, minor, flags, hlen, hcrc, usize = struct.unpack_from("<HHIQII", data, 8)
    if major != MAJOR:
        raise _fail(source, f"unsupported .dcz version {major}.{minor} (this dcomp reads {MAJOR}.x); upgrade dcomp",
                    E.UnsupportedVersion)
    unknown = flags & ~KNOWN_FLAGS
    if unknown:
        bits = ", ".join(str(i) for i in range(32) if unknown >> i & 1)
        raise _fail(source, f"unknown flag bit {bits} set in the .dcz preamble (corrupt file or newer writer); "
                            "upgrade dcomp", E.BadFlags)
    compressed = bool(flags & FLAG_ZHEADER)
    if not compressed and usize:
        raise _fail(source, "reserved bits set in the .dcz preamble (corrupt file or newer writer)", E.BadFlags)
    if compressed and not 1 <= usize <= MAX_HEADER:
        raise _fail(source, f"decompressed header size {usize} stated in the preamble is not between 1 and "
                            f"{MAX_HEADER} bytes (corrupt file)", E.BadFlags)
    if hlen == 0 or hlen > MAX_HEADER or PREAMBLE + hlen > n:
        raise _fail(source, f"header length {hlen} does not fit the {n}-byte file (truncated or corrupt)",
                    E.BadHeaderLength)
    json_len = usize if compressed else hlen
    if json_len > lim.max_header:
        raise _fail(source, f"header is {json_len:,} bytes of JSON, over the limit of {lim.max_header:,} "
                            f"(hostile or unusually large file; {_limits.hint('max_header')})", E.LimitExceeded)
    raw = data[PREAMBLE:PREAMBLE + hlen]
    if zlib.crc32(raw) != hcrc:
        raise _fail(source, "header checksum mismatch (corrupt file)", E.HeaderChecksum)
    if compressed:
        raw = _inflate_header(raw, usize, source, compact.ZDICT if flags & FLAG_BINARY else None)
    if flags & FLAG_BINARY:
        return _read_binary(data, raw, hlen, compressed, flags, source, lim)
    try:
        h = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail(source, "header is not valid UTF-8 JSON", E.HeaderNotJson) from None
    if not isinstance(h, dict):
        raise _fail(source, "header is not a JSON object", E.HeaderNotJson)
    _check_schema(h, source, lim)
    d = _align(PREAMBLE + hlen)
    if d > n or any(data[PREAMBLE + hlen:d]):
        raise _fail(source, "padding after the header is missing or not zero", E.BadSectionTable)
    secs = []
    pos = 0
    for i, (b, e, c) in enumerate(h["sections"]):
        if b != pos or e < b:
            raise _fail(source, f"section table: section {i} starts at {b}, expected {pos} (ordered, aligned, "
                                "no gaps)", E.BadSectionTable)
        if d + e > n:
            raise _fail(source, f"section table: section {i} ends at byte {d + e}, past the end of the {n}-byte "
                                "file (truncated)", E.BadSectionTable)
        pos = _align(e)
        if pos != e and d + pos <= n and any(data[d + e:d + pos]):
            raise _fail(source, f"section table: padding after section {i} is not zero", E.BadSectionTable)
        secs.append((d + b, d + e, c))
    end = d + (h["sections"][-1][1] if secs else 0)
    if end != n:
        raise _fail(source, f"section table: file is {n} bytes but the sections end at {end} (truncated or "
                            "trailing bytes)", E.BadSectionTable)
    return _Header(h, d, secs, stored=hlen, json_bytes=len(raw), compressed=compressed, flags=flags)


def _read_binary(data: bytes, raw: bytes, hlen: int, compressed: bool, flags: int, source: str,
                 lim: _limits.Limits) -> _Header:
    """Checks 8-10 for a format 1.5 file: the binary table, the schema of the header it holds, and
    the sections laid out from their lengths (contiguous, each at a multiple of 2^align)."""
    n = len(data)
    h, a, crc, lengths = compact.decode(bytes(raw), source)
    _check_schema(h, source, lim)
    d = compact._align(PREAMBLE + hlen, a)
    if d > n or any(data[PREAMBLE + hlen:d]):
        raise _fail(source, "padding after the header is missing or not zero", E.BadSectionTable)
    secs = []
    pos = d
    for i, ln in enumerate(lengths):
        b = compact._align(pos, a) if i else pos
        if b + ln > n:
            raise _fail(source, f"section table: section {i} ends at byte {b + ln}, past the end of the {n}-byte "
                                "file (truncated)", E.BadSectionTable)
        if any(data[pos:b]):
            raise _fail(source, f"section table: padding before section {i} is not zero", E.BadSectionTable)
        secs.append((b, b + ln, None))
        pos = b + ln
    if pos != n:
        raise _fail(source, f"section table: file is {n} bytes but the sections end at {pos} (truncated or "
                            "trailing bytes)", E.BadSectionTable)
    h["sections"] = [[b - d, e - d, None] for b, e, _ in secs]
    return _Header(h, d, secs, stored=hlen, json_bytes=len(raw), compressed=compressed, flags=flags, data_crc=crc)


def _inflate_header(raw: bytes, usize: int, source: str, zdict: bytes | None = None) -> bytes:
    """Decompress a zlib-stored header, never producing more than ``usize + 1`` bytes. ``zdict``: the
    preset dictionary a 1.5 header's stream may name (a stream naming another one is corrupt)."""
    z = zlib.decompressobj() if zdict is None else zlib.decompressobj(zdict=zdict)
    try:
        out = z.decompress(raw, usize + 1)
    except zlib.error as e:
        raise _fail(source, f"header zlib stream is corrupt ({e})", E.BadHeaderZlib) from None
    if len(out) > usize:
        raise _fail(source, f"header decompresses to more than the {usize} bytes stated in the preamble "
                            "(corrupt file or zip bomb)", E.BadHeaderZlib)
    if not z.eof:
        raise _fail(source, "header zlib stream is truncated (corrupt file)", E.BadHeaderZlib)
    if z.unused_data:
        raise _fail(source, "header zlib stream is followed by stray bytes (corrupt file)", E.BadHeaderZlib)
    if len(out) != usize:
        raise _fail(source, f"header decompresses to {len(out)} bytes, the preamble states {usize} (corrupt file)",
                    E.BadHeaderZlib)
    return out


# ---- check 9: the header schema ------------------------------------------------------------------
# Order: top-level fields (dcz, arch, input_shape, num_classes, data, provenance, sections,
# tensors, masks, quant), then the section table entries, then each tensor record in order (name,
# dtype, shape, encoding, then its encoding's fields: section | index_bits, nnz, gaps | values),
# then each mask record, then each quant record, then arch.archive. The first violation is reported.

class _Schema:
    def __init__(self, source: str, lim: _limits.Limits):
        self.source, self.lim = source, lim
        self.tables = 0     # Huffman streams seen (refused here, before the remaining records are read)
        self.ctx = ""       # " (tensor NAME)" while checking a tensor record

    def bad(self, path: str, why: str) -> E.DczError:
        return _fail(self.source, f"bad header field {path}: {why}{self.ctx}", E.BadHeaderField)

    def int_(self, v: Any, path: str, lo: int = 0, hi: int = MAX_DIM) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.bad(path, f"expected an integer, got {_kind(v)}")
        if not lo <= v <= hi:
            raise self.bad(path, f"{v} is not between {lo} and {hi}")
        return v

    def str_(self, v: Any, path: str, choices=None) -> str:
        if not isinstance(v, str):
            raise self.bad(path, f"expected a string, got {_kind(v)}")
        if choices is not None and v not in choices:
            raise self.bad(path, f"unknown value {v[:40]!r} (expected one of {', '.join(sorted(choices))})")
        return v

    def dict_(self, v: Any, path: str) -> dict:
        if not isinstance(v, dict):
            raise self.bad(path, f"expected an object, got {_kind(v)}")
        return v

    def list_(self, v: Any, path: str) -> list:
        if not isinstance(v, list):
            raise self.bad(path, f"expected a list, got {_kind(v)}")
        return v

    def shape(self, v: Any, path: str) -> list:
        self.list_(v, path)
        if len(v) > MAX_DIMS:
            raise self.bad(path, f"{len(v)} dimensions, more than {MAX_DIMS}")
        for j, s in enumerate(v):
            self.int_(s, f"{path}[{j}]")
        return v

    def section_ref(self, rec: dict, path: str) -> None:
        self.int_(rec.get("section"), f"{path}.section")

    def stream(self, v: Any, path: str) -> None:
        s = self.dict_(v, path)
        self.section_ref(s, path)
        self.int_(s.get("count"), f"{path}.count")
        a = self.int_(s.get("alphabet"), f"{path}.alphabet", 2, 1 << 16)
        if a & (a - 1):
            raise self.bad(f"{path}.alphabet", f"{a} is not a power of two")
        coding = self.str_(s.get("coding"), f"{path}.coding", ("fixed", "huffman", "ans", "cabac"))
        if coding == "fixed":
            self.int_(s.get("width"), f"{path}.width", 1, 16)
        elif coding == "cabac":
            self.int_(s.get("model"), f"{path}.model", 0, 2)
            self.int_(s.get("bytes"), f"{path}.bytes", 5)
            ent = s.get("entropy")
            if ent is not None and (not isinstance(ent, (int, float)) or isinstance(ent, bool)):
                raise self.bad(f"{path}.entropy", f"expected a number, got {_kind(ent)}")
        elif coding == "ans":
            self.int_(s.get("precision"), f"{path}.precision", 1, 15)
            self.int_(s.get("bytes"), f"{path}.bytes", 4)
            ent = s.get("entropy")
            if ent is not None and (not isinstance(ent, (int, float)) or isinstance(ent, bool)):
                raise self.bad(f"{path}.entropy", f"expected a number, got {_kind(ent)}")
        else:
            self.tables += 1
            if self.tables > self.lim.max_tables:
                raise _fail(self.source, f"{path}: more than {self.lim.max_tables:,} Huffman tables in one file; "
                                         f"refusing ({_limits.hint('max_tables')})", E.LimitExceeded)
            self.int_(s.get("block"), f"{path}.block", 1, hf.MAX_BLOCK)
            self.int_(s.get("bits"), f"{path}.bits")
            ent = s.get("entropy")
            if ent is not None and (not isinstance(ent, (int, float)) or isinstance(ent, bool)):
                raise self.bad(f"{path}.entropy", f"expected a number, got {_kind(ent)}")

    def raw_record(self, v: Any, path: str) -> None:
        r = self.dict_(v, path)
        self.section_ref(r, path)
        self.str_(r.get("dtype"), f"{path}.dtype", DTYPES)
        self.shape(r.get("shape"), f"{path}.shape")


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _check_schema(h: dict, source: str, lim: _limits.Limits | None = None) -> None:
    lim = lim or _limits.current()
    S = _Schema(source, lim)
    if h.get("dcz") != MAJOR or isinstance(h.get("dcz"), bool):
        raise S.bad("dcz", f"expected {MAJOR}")
    for key, typ in (("arch", dict), ("input_shape", list), ("num_classes", int), ("data", dict),
                     ("provenance", list), ("sections", list), ("tensors", list), ("masks", dict), ("quant", dict)):
        if not isinstance(h.get(key), typ) or isinstance(h.get(key), bool):
            raise S.bad(key, f"missing or not a {typ.__name__}")
    if "dcomp_version" in h and not isinstance(h["dcomp_version"], str):
        raise S.bad("dcomp_version", f"expected a string, got {_kind(h['dcomp_version'])}")
    S.str_(h["arch"].get("kind"), "arch.kind")
    shape = S.shape(h["input_shape"], "input_shape")
    if any(s == 0 for s in shape):
        raise S.bad("input_shape", f"{shape} has a zero dimension")
    if math.prod(shape) > lim.max_input:
        raise _fail(source, f"input_shape {shape[:8]} claims {math.prod(shape):,} elements per sample, over the "
                            f"limit of {lim.max_input:,} ({_limits.hint('max_input')})", E.LimitExceeded)
    S.int_(h["num_classes"], "num_classes", 1, MAX_DIM)
    if h["num_classes"] > lim.max_classes:
        raise _fail(source, f"num_classes {h['num_classes']:,} is over the limit of {lim.max_classes:,} "
                            f"({_limits.hint('max_classes')})", E.LimitExceeded)
    for i, p in enumerate(h["provenance"]):
        S.dict_(p, f"provenance[{i}]")
    for i, s in enumerate(h["sections"]):
        if not (isinstance(s, list) and len(s) == 3 and all(_is_int(x) for x in s)) or s[2] >= 1 << 32 \
                or s[1] > MAX_DIM:
            raise _fail(source, f"section table: entry {i} is not [begin, end, crc32]", E.BadSectionTable)
    names = set()
    for i, t in enumerate(h["tensors"]):
        p = f"tensors[{i}]"
        S.dict_(t, p)
        name = S.str_(t.get("name"), f"{p}.name")
        if name in names:
            raise S.bad(p, f"duplicate tensor name {compact.printable(name)}")
        names.add(name)
        S.ctx = f" (tensor {compact.printable(name)})"
        S.str_(t.get("dtype"), f"{p}.dtype", DTYPES)
        S.shape(t.get("shape"), f"{p}.shape")
        enc = S.str_(t.get("encoding"), f"{p}.encoding", ("raw", "sparse", "codebook"))
        if enc == "raw":
            S.section_ref(t, p)
            continue
        if enc == "sparse":
            S.int_(t.get("index_bits"), f"{p}.index_bits", 1, 16)
            S.int_(t.get("nnz"), f"{p}.nnz")
            S.stream(t.get("gaps"), f"{p}.gaps")
        v = S.dict_(t.get("values"), f"{p}.values")
        kind = S.str_(v.get("kind"), f"{p}.values.kind", ("raw", "codebook"))
        if kind == "raw":
            S.section_ref(v, f"{p}.values")
        else:
            S.int_(v.get("bits"), f"{p}.values.bits", 1, 16)
            S.int_(v.get("codebook"), f"{p}.values.codebook")
            S.stream(v.get("indices"), f"{p}.values.indices")
    S.ctx = ""
    for name, m in h["masks"].items():
        p = f"masks[{compact.printable(name)!r}]"
        S.dict_(m, p)
        if S.str_(m.get("encoding"), f"{p}.encoding", ("support", "bitmap")) == "bitmap":
            S.section_ref(m, p)
            S.shape(m.get("shape"), f"{p}.shape")
    for name, q in h["quant"].items():
        p = f"quant[{compact.printable(name)!r}]"
        S.dict_(q, p)
        if "bits" in q:
            S.int_(q["bits"], f"{p}.bits", 1, 16)
        for key in ("codebook", "assignments"):
            r = S.dict_(q.get(key), f"{p}.{key}")
            if "from" in r:
                S.str_(r["from"], f"{p}.{key}.from", ("values",))
                if key == "assignments":
                    S.str_(r.get("dtype"), f"{p}.{key}.dtype", DTYPES)
                    S.int_(r.get("fill"), f"{p}.{key}.fill", 0, (1 << 16) - 1)
            else:
                S.raw_record(r, f"{p}.{key}")
        if "extra" in q:
            S.dict_(q["extra"], f"{p}.extra")
    if "archive" in h["arch"] and isinstance(h["arch"]["archive"], dict):
        S.raw_record(h["arch"]["archive"], "arch.archive")
