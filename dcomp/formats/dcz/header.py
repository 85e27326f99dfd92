"""Reading a .dcz file's preamble, header JSON and section table (checks 1-10 of docs/FORMAT.md)."""

from __future__ import annotations

import json
import struct
import zlib

from dcomp.errors import FormatError
from dcomp.formats import DCZ_MAGIC
from dcomp.formats.dcz.spec import (DTYPES, FLAG_ZHEADER, KNOWN_FLAGS, MAJOR, MAX_HEADER, PREAMBLE, _align,
                                    _is_int)


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
