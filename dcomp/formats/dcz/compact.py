"""The binary header of format 1.5 (flags bit 4; docs/FORMAT.md, "The binary header").

A 1.5 header holds the same logical header as the JSON one of 1.0-1.4 (the ``h`` dict the reader
checks and decodes), written as a byte table instead of JSON: varints, one-byte enums for dtype,
encoding and coder, section numbers implied by the order of the records, section lengths instead
of [begin, end, crc] triples, nothing a reader can compute (alphabets, index-stream counts, payload
sizes, Huffman bit counts, entropies) and one CRC32 for the whole data area. What is free-form
(arch, data, provenance, a quant entry's extra keys) stays JSON inside it.

``encode(h, parts)`` turns a logical header (sections numbered in any order) into the body bytes
and the sections in file order; ``decode(body, source)`` parses a body into the logical header
(``sections`` filled with [begin, end, None] relative to the data area), the alignment exponent
and the data-area CRC. ``decode`` never reads past the body, never allocates more than the body's
length in records and raises only ``BadBinaryHeader`` (check 8), one line naming the field.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from dcomp.formats.dcz import errors as E

# dtype codes (the order of the dtype table of docs/FORMAT.md)
DTYPE_CODES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
DTYPE_CODE = {d: i for i, d in enumerate(DTYPE_CODES)}
CODERS = ("fixed", "huffman", "ans", "cabac")
CODER = {c: i for i, c in enumerate(CODERS)}
FORM_RAW, FORM_SPARSE_RAW, FORM_SPARSE_CB, FORM_CODEBOOK = 0, 1, 2, 3
F16 = 0x40                     # kind byte bit 6: payload stored as float16 (stored_dtype)
Q_BITS, Q_CB_VALUES, Q_A_VALUES, Q_EXTRA, Q_DEFAULT = 1, 2, 4, 8, 16
MAX_DIMS = 32
MAX_VALUE = 1 << 62            # any varint: keeps every product within Python-int sanity
MAX_VERSION = 64               # dcomp_version bytes
MAX_ALIGN = 3                  # sections aligned to 1, 2, 4 or 8 bytes
MAX_BLOCK = 4096               # symbols per Huffman block (dcomp.compressors.huffman.MAX_BLOCK)


# The preset dictionary a 1.5 header's zlib stream MAY use (docs/FORMAT.md, "The preset dictionary"):
# strings common in dcomp headers, the most frequent last (zlib reaches near strings more cheaply).
ZDICT_LINES = (
    '{"kind":"graph","graph":{"format":"dcomp-graph","version":1,"modules":[{"name":"features","type":"container"},'
    '{"name":"","type":"Conv2d","args":{"in_channels":1,"out_channels":,"kernel_size":{"tuple":[3,3]},"stride":'
    '{"tuple":[1,1]},"padding":{"tuple":[1,1]},"bias":false}},{"name":"","type":"BatchNorm2d","args":{"num_features":'
    ',"eps":1e-05,"momentum":0.1,"affine":true,"track_running_stats":true}},{"name":"","type":"ReLU","args":'
    '{"inplace":true}},{"name":"","type":"Linear","args":{"in_features":,"out_features":,"bias":true}}],"tensors":[],'
    '"nodes":[{"name":"x","op":"placeholder","target":"x","args":[],"kwargs":{}},{"name":"","op":"call_module",'
    '"target":"","args":[{"node":""}],"kwargs":{}},{"name":"","op":"call_function","target":"torch.flatten",'
    '"args":[{"node":""},1],"kwargs":{}},{"name":"output","op":"output","target":"output","args":[{"node":""}]',
    '"kind":"factory","target":"torchvision.models:resnet18","kwargs":{}',
    '.running_mean.running_var.num_batches_tracked.downsample.0.layer1.layer2.layer3.features.classifier.shortcut.bn1.bn2',
    '{"stage":"distill","params":{"temperature":4.0,"alpha":0.5,"epochs":}},{"stage":"factorize","params":{"rank":}}',
    '{"stage":"train","params":{"arch":"","data":"","resize":28,"seed":0,"epochs":20,"batch_size":64,"lr":0.1,'
    '"optimizer":"sgd","momentum":0.9,"weight_decay":0.0005,"lr_schedule":"cosine","select":"last","val_fraction":0.1}},'
    '{"stage":"prune","params":{"method":"magnitude","sparsity":0.9,"min_weights":0,"rounds":1,"schedule":"cubic",'
    '"recalibrate_bn":true,"recalibrate_samples":2048,"global_rank":false,"taylor_samples":256}},'
    '{"stage":"retrain","params":{"data":"","seed":0,"epochs":,"method":"dns"}},'
    '{"stage":"quantize","params":{"bits":5,"conv_bits":8,"fc_bits":5,"init":"linear","max_iter":1000,'
    '"codebook":"kmeans","rd_lambda":0,"requantize":false,"bias_bits":4,"float16":true,"mode":"kmeans",'
    '"threshold":0.05,"scale":"layer","keep_first_last":true}}',
    '{"arch":{"kind":"zoo","name":"resnet-small","kwargs":{}},"data":{"spec":"synthetic","resize":null}}',
    '{"arch":{"kind":"zoo","name":"vgg-small","kwargs":{}},"data":{"spec":"idx:mnist","resize":null}}',
    '{"arch":{"kind":"zoo","name":"lenet-300-100","kwargs":{}},"data":{"spec":"digits","resize":null}}',
    '{"arch":{"kind":"zoo","name":"lenet-5","kwargs":{}},"data":{"spec":"npz:mnist.npz","resize":28},"provenance":[',
    'conv1.weightconv1.biasconv2.weightconv2.biasfc1.weightfc1.biasfc2.weightfc2.biasfc3.weightfc3.bias',
)
ZDICT = "\n".join(ZDICT_LINES).encode("utf-8")


def compress(body: bytes) -> bytes:
    """The shortest of zlib level 9 with and without the preset dictionary (a valid zlib stream either way)."""
    plain = zlib.compress(body, 9)
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, ZDICT)
    withdict = c.compress(body) + c.flush()
    return withdict if len(withdict) < len(plain) else plain


def printable(name: str, n: int = 80) -> str:
    """A name from the file as it may appear in a one-line message (control characters as '?')."""
    return "".join(ch if ch.isprintable() else "?" for ch in name[:n])


def _align(n: int, a: int) -> int:
    m = (1 << a) - 1
    return (n + m) & ~m


# ---- writing -------------------------------------------------------------------------------------

def _varint(v: int) -> bytes:
    if not 0 <= v <= MAX_VALUE:
        raise ValueError(f"varint out of range: {v}")
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return _varint(len(b)) + b


def _shape(shape) -> bytes:
    return _varint(len(shape)) + b"".join(_varint(int(s)) for s in shape)


def _json(obj: Any) -> bytes:
    b = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return _varint(len(b)) + b


class _Out:
    def __init__(self, parts: list[bytes]):
        self.buf = bytearray()
        self.parts = parts
        self.order: list[int] = []       # writer's section numbers in file order

    def sec(self, ref: int) -> None:
        self.order.append(ref)

    def stream(self, s: dict) -> None:
        c = CODER[s["coding"]]
        if s["coding"] == "fixed":
            p = 0
        elif s["coding"] == "huffman":
            p = (-s["bits"]) % 8
        elif s["coding"] == "ans":
            p = s["precision"]
        else:
            p = s["model"]
        self.buf.append(c | p << 2)
        if s["coding"] == "huffman":
            self.buf += _varint(s["block"])
        self.sec(s["section"])

    def raw_record(self, r: dict) -> None:
        self.buf.append(DTYPE_CODE[r["dtype"]] | (F16 if r.get("stored_dtype") == "float16" else 0))
        self.buf += _shape(r["shape"])
        self.sec(r["section"])


def encode(h: dict, parts: list[bytes], align: int = 0) -> tuple[bytes, list[bytes]]:
    """(body bytes, sections in file order) of a logical header whose "sections" index ``parts``.
    ``align``: the exponent a, sections start at multiples of 2^a from the data area's start."""
    o = _Out(parts)
    o.buf.append(align)
    o.buf += b"\0\0\0\0"                      # data CRC, filled in below
    o.buf += _str(h.get("dcomp_version", ""))
    o.buf += _shape(h["input_shape"])
    o.buf += _varint(int(h["num_classes"]))
    rest: dict[str, Any] = {}
    arch = dict(h["arch"])
    archive = arch.get("archive") if isinstance(arch.get("archive"), dict) else None
    if archive is not None:
        arch["archive"] = {k: v for k, v in archive.items() if k != "section"}
    rest["arch"] = arch
    if h.get("data"):
        rest["data"] = h["data"]
    if h.get("provenance"):
        rest["provenance"] = h["provenance"]
    o.buf += _json(rest)
    index = {}
    prev = b""
    o.buf += _varint(len(h["tensors"]))
    for i, t in enumerate(h["tensors"]):
        index[t["name"]] = i
        name = t["name"].encode("utf-8")
        p = 0
        while p < min(len(prev), len(name)) and prev[p] == name[p]:
            p += 1
        o.buf += _varint(p) + _varint(len(name) - p) + name[p:]
        prev = name
        enc = t["encoding"]
        v = t.get("values", {})
        if enc == "sparse":
            form = FORM_SPARSE_RAW if v["kind"] == "raw" else FORM_SPARSE_CB
        else:
            form = FORM_RAW if enc == "raw" else FORM_CODEBOOK
        narrow = (t if enc == "raw" else v).get("stored_dtype") == "float16"
        o.buf.append(DTYPE_CODE[t["dtype"]] | form << 4 | (F16 if narrow else 0))
        o.buf += _shape(t["shape"])
        if form == FORM_RAW:
            o.sec(t["section"])
            continue
        if form in (FORM_SPARSE_RAW, FORM_SPARSE_CB):
            o.buf.append(t["index_bits"])
            o.buf += _varint(t["nnz"]) + _varint(t["gaps"]["count"])
            o.stream(t["gaps"])
        if form == FORM_SPARSE_RAW:
            o.sec(v["section"])
        else:
            o.buf.append(v["bits"])
            o.sec(v["codebook"])
            o.stream(v["indices"])
    o.buf += _varint(len(h["masks"]))
    for name, m in h["masks"].items():
        _ref(o, name, index)
        if m["encoding"] == "support":
            o.buf.append(0)
        else:
            o.buf.append(1)
            o.buf += _shape(m["shape"])
            o.sec(m["section"])
    o.buf += _varint(len(h["quant"]))
    for name, q in h["quant"].items():
        _ref(o, name, index)
        t = h["tensors"][index[name]] if name in index else None
        cb, a = q["codebook"], q["assignments"]
        if (t is not None and t["encoding"] != "raw" and t["values"]["kind"] == "codebook"
                and set(q) == {"bits", "codebook", "assignments"} and q["bits"] == t["values"]["bits"]
                and cb == {"from": "values"} and a == {"from": "values", "dtype": "uint8", "fill": 0}):
            o.buf.append(Q_DEFAULT)
            continue
        f = (Q_BITS if "bits" in q else 0) | (Q_CB_VALUES if "from" in cb else 0) \
            | (Q_A_VALUES if "from" in a else 0) | (Q_EXTRA if "extra" in q else 0)
        o.buf.append(f)
        if "bits" in q:
            o.buf.append(q["bits"])
        if "from" not in cb:
            o.raw_record(cb)
        if "from" in a:
            o.buf.append(DTYPE_CODE[a["dtype"]])
            o.buf += _varint(a["fill"])
        else:
            o.raw_record(a)
        if "extra" in q:
            o.buf += _json(q["extra"])
    if archive is not None:
        o.sec(archive["section"])
    if sorted(o.order) != list(range(len(parts))):
        raise ValueError("every section must be referenced exactly once")
    ordered = [parts[r] for r in o.order]
    for p in ordered:
        o.buf += _varint(len(p))
    # the data area: sections at multiples of 2^align, zero padding between them
    crc = 0
    pos = 0
    for i, p in enumerate(ordered):
        if i:
            pad = _align(pos, align) - pos
            crc = zlib.crc32(b"\0" * pad, crc)
            pos += pad
        crc = zlib.crc32(p, crc)
        pos += len(p)
    o.buf[1:5] = crc.to_bytes(4, "little")
    return bytes(o.buf), ordered


def _ref(o: _Out, name: str, index: dict) -> None:
    if name in index:
        o.buf += _varint(index[name] + 1)
    else:
        o.buf += _varint(0) + _str(name)


# ---- reading -------------------------------------------------------------------------------------

class _In:
    """A cursor over the body; every read checks the bytes are there (BadBinaryHeader otherwise)."""

    def __init__(self, body: bytes, source: str):
        self.b, self.i, self.source = body, 0, source
        self.nsec = 0
        self.streams: list[tuple[dict, int, int]] = []   # (record, section, pad) to complete from lengths
        self.where = "header"

    def fail(self, field: str, why: str) -> E.DczError:
        return E.BadBinaryHeader(f"{self.source}: bad binary header field {field}: {why}{self.where_()}")

    def where_(self) -> str:
        return "" if self.where == "header" else f" ({self.where})"

    def u8(self, field: str) -> int:
        if self.i >= len(self.b):
            raise self.fail(field, f"the header ends at byte {len(self.b)} (truncated)")
        self.i += 1
        return self.b[self.i - 1]

    def varint(self, field: str, hi: int = MAX_VALUE) -> int:
        v = shift = 0
        start = self.i
        while True:
            if self.i >= len(self.b):
                raise self.fail(field, f"the header ends at byte {len(self.b)} inside a varint (truncated)")
            c = self.b[self.i]
            self.i += 1
            v |= (c & 0x7F) << shift
            shift += 7
            if not c & 0x80:
                break
            if shift >= 63:
                raise self.fail(field, "varint longer than 9 bytes")
        if c == 0 and self.i - start > 1:
            raise self.fail(field, "varint not in its shortest form")
        if v > hi:
            raise self.fail(field, f"{v} is more than {hi}")
        return v

    def count(self, field: str, per: int = 1) -> int:
        """A number of records, each at least ``per`` bytes: more than the bytes left cannot be true."""
        n = self.varint(field)
        if n * per > len(self.b) - self.i:
            raise self.fail(field, f"{n} records cannot fit in the {len(self.b) - self.i} header bytes left")
        return n

    def bytes_(self, n: int, field: str) -> bytes:
        if n > len(self.b) - self.i:
            raise self.fail(field, f"{n} bytes claimed, {len(self.b) - self.i} left in the header (truncated)")
        self.i += n
        return self.b[self.i - n:self.i]

    def utf8(self, raw: bytes, field: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(field, "not valid UTF-8") from None

    def json_obj(self, field: str) -> dict:
        raw = self.bytes_(self.varint(field), field)
        try:
            v = json.loads(self.utf8(raw, field))
        except (ValueError, RecursionError):
            raise self.fail(field, "not valid JSON") from None
        if not isinstance(v, dict):
            raise self.fail(field, "not a JSON object")
        return v

    def dtype(self, field: str, code: int) -> str:
        if code >= len(DTYPE_CODES):
            raise self.fail(field, f"unknown dtype code {code} (0..{len(DTYPE_CODES) - 1})")
        return DTYPE_CODES[code]

    def shape(self, field: str) -> list[int]:
        r = self.varint(field + " rank", MAX_DIMS)
        return [self.varint(f"{field}[{j}]") for j in range(r)]

    def sec(self) -> int:
        self.nsec += 1
        return self.nsec - 1

    def stream(self, field: str, alphabet: int, count: int) -> dict:
        c = self.u8(field + ".coding")
        coding, p = CODERS[c & 3], c >> 2
        s: dict[str, Any] = {"count": count, "alphabet": alphabet, "coding": coding}
        if coding == "fixed":
            if p:
                raise self.fail(field + ".coding", f"fixed width takes no parameter, got {p}")
            s["width"] = alphabet.bit_length() - 1
        elif coding == "huffman":
            if p > 7:
                raise self.fail(field + ".coding", f"Huffman pad bits {p} is more than 7")
            s["block"] = self.varint(field + ".block", MAX_BLOCK)
            if s["block"] == 0:
                raise self.fail(field + ".block", "0 symbols per Huffman block (at least 1)")
        elif coding == "ans":
            if not 1 <= p <= 15:
                raise self.fail(field + ".coding", f"rANS precision {p} is not between 1 and 15")
            s["precision"] = p
        else:
            if p > 2:
                raise self.fail(field + ".coding", f"cabac model {p} is not 0, 1 or 2")
            s["model"] = p
        s["section"] = self.sec()
        self.streams.append((s, s["section"], p))
        return s

    def raw_record(self, field: str) -> dict:
        k = self.u8(field + ".dtype")
        if k & 0x80 or k & 0x30:
            raise self.fail(field + ".dtype", f"reserved bits set in 0x{k:02X}")
        r: dict[str, Any] = {"dtype": self.dtype(field + ".dtype", k & 0x0F)}
        if k & F16:
            r["stored_dtype"] = "float16"
        r["shape"] = self.shape(field + ".shape")
        r["section"] = self.sec()
        return r

    def name_ref(self, field: str, names: list[str]) -> str:
        r = self.varint(field)
        if r == 0:
            return self.utf8(self.bytes_(self.varint(field + " name length"), field + " name"), field + " name")
        if r > len(names):
            raise self.fail(field, f"refers to tensor {r - 1}, but the header has {len(names)}")
        return names[r - 1]


def decode(body: bytes, source: str = "input") -> tuple[dict, int, int, list[int]]:
    """Parse a 1.5 header body: (logical header, alignment exponent, data CRC32, section lengths).
    The header's "sections" are left empty: the caller lays them out from the lengths."""
    r = _In(body, source)
    align = r.u8("align")
    if align > MAX_ALIGN:
        raise r.fail("align", f"alignment exponent {align} is more than {MAX_ALIGN} (reserved bits set?)")
    crc = int.from_bytes(r.bytes_(4, "data_crc"), "little")
    vlen = r.varint("dcomp_version length", MAX_VERSION)
    h: dict[str, Any] = {"dcz": 1}
    if vlen:
        h["dcomp_version"] = r.utf8(r.bytes_(vlen, "dcomp_version"), "dcomp_version")
    h["input_shape"] = r.shape("input_shape")
    h["num_classes"] = r.varint("num_classes")
    rest = r.json_obj("json")
    if "arch" not in rest:
        raise r.fail("json", "has no \"arch\" object")
    h["arch"] = rest["arch"]
    h["data"] = rest.get("data", {})
    h["provenance"] = rest.get("provenance", [])
    h["tensors"], h["masks"], h["quant"], h["sections"] = [], {}, {}, []
    names: list[str] = []
    prev = b""
    for i in range(r.count("tensors", 4)):
        f = f"tensors[{i}]"
        p = r.varint(f + ".name prefix", len(prev))
        raw = prev[:p] + r.bytes_(r.varint(f + ".name length"), f + ".name")
        prev = raw
        name = r.utf8(raw, f + ".name")
        names.append(name)
        r.where = f"tensor {printable(name)}"
        k = r.u8(f + ".kind")
        if k & 0x80:
            raise r.fail(f + ".kind", f"reserved bit 7 set in 0x{k:02X}")
        form = (k >> 4) & 3
        t: dict[str, Any] = {"name": name, "dtype": r.dtype(f + ".kind", k & 0x0F), "shape": r.shape(f + ".shape")}
        numel = 1
        for s in t["shape"]:
            numel *= s
        if form == FORM_RAW:
            t.update(encoding="raw", section=r.sec())
            if k & F16:
                t["stored_dtype"] = "float16"
        else:
            v: dict[str, Any]
            count = numel
            if form in (FORM_SPARSE_RAW, FORM_SPARSE_CB):
                ib = r.u8(f + ".index_bits")
                if not 1 <= ib <= 16:
                    raise r.fail(f + ".index_bits", f"{ib} is not between 1 and 16")
                nnz = r.varint(f + ".nnz")
                gcount = r.varint(f + ".gaps.count")
                t.update(encoding="sparse", index_bits=ib, nnz=nnz, gaps=r.stream(f + ".gaps", 1 << ib, gcount))
                count = nnz
            else:
                t["encoding"] = "codebook"
            if form == FORM_SPARSE_RAW:
                v = {"kind": "raw", "section": r.sec()}
            else:
                bits = r.u8(f + ".values.bits")
                if not 1 <= bits <= 16:
                    raise r.fail(f + ".values.bits", f"{bits} is not between 1 and 16")
                v = {"kind": "codebook", "bits": bits, "codebook": r.sec()}
                v["indices"] = r.stream(f + ".values.indices", 1 << bits, count)
            if k & F16:
                v["stored_dtype"] = "float16"
            t["values"] = v
        h["tensors"].append(t)
    r.where = "header"
    for i in range(r.count("masks", 2)):
        f = f"masks[{i}]"
        name = r.name_ref(f + ".tensor", names)
        e = r.u8(f + ".encoding")
        if e == 0:
            m: dict[str, Any] = {"encoding": "support"}
        elif e == 1:
            m = {"encoding": "bitmap", "shape": r.shape(f + ".shape"), "section": r.sec()}
        else:
            raise r.fail(f + ".encoding", f"unknown mask encoding {e} (0 support, 1 bitmap)")
        if name in h["masks"]:
            raise r.fail(f + ".tensor", f"second mask for {printable(name)}")
        h["masks"][name] = m
    byname = {t["name"]: t for t in h["tensors"]}
    for i in range(r.count("quant", 2)):
        f = f"quant[{i}]"
        name = r.name_ref(f + ".tensor", names)
        if name in h["quant"]:
            raise r.fail(f + ".tensor", f"second quant entry for {printable(name)}")
        fl = r.u8(f + ".form")
        if fl == Q_DEFAULT:
            t = byname.get(name)
            if t is None or t["encoding"] == "raw" or t["values"]["kind"] != "codebook":
                raise r.fail(f + ".form", f"the shared form needs tensor {printable(name)} to have codebook values")
            h["quant"][name] = {"bits": t["values"]["bits"], "codebook": {"from": "values"},
                                "assignments": {"from": "values", "dtype": "uint8", "fill": 0}}
            continue
        if fl & ~(Q_BITS | Q_CB_VALUES | Q_A_VALUES | Q_EXTRA):
            raise r.fail(f + ".form", f"reserved bits set in 0x{fl:02X}")
        q: dict[str, Any] = {}
        if fl & Q_BITS:
            q["bits"] = r.u8(f + ".bits")
        q["codebook"] = {"from": "values"} if fl & Q_CB_VALUES else r.raw_record(f + ".codebook")
        if fl & Q_A_VALUES:
            q["assignments"] = {"from": "values", "dtype": r.dtype(f + ".assignments.dtype", r.u8(f + ".assignments.dtype")),
                                "fill": r.varint(f + ".assignments.fill")}
        else:
            q["assignments"] = r.raw_record(f + ".assignments")
        if fl & Q_EXTRA:
            q["extra"] = r.json_obj(f + ".extra")
        h["quant"][name] = q
    arch = h["arch"]
    if isinstance(arch, dict) and isinstance(arch.get("archive"), dict):
        arch["archive"] = dict(arch["archive"], section=r.sec())
    lengths = [r.varint(f"sections[{i}] length") for i in range(r.nsec)]
    if r.i != len(body):
        raise r.fail("sections", f"{len(body) - r.i} bytes after the section lengths (the header must end there)")
    # fields a reader computes from the section lengths
    for s, ref, p in r.streams:
        n = lengths[ref]
        if s["coding"] == "cabac":
            s["bytes"] = n
        elif s["coding"] == "ans":
            s["bytes"] = n - 2 * s["alphabet"]
        elif s["coding"] == "huffman":
            nb = -(-s["count"] // s["block"]) if s["count"] else 0
            s["bits"] = 8 * (n - (s["alphabet"] + 1) // 2 - 2 * nb) - p
    return h, align, crc, lengths
