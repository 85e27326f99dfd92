"""The .dcz packed checkpoint: writer, checked reader, header-only inspection.

The layout is specified in docs/FORMAT.md; the modules follow it part by part:

    spec.py     constants of the layout, dtypes, element bits, float16 narrowing, the gap stream
    header.py   preamble, (compressed) header JSON, schema, section table (checks 1-10)
    compact.py  the binary header of format 1.5 (check 8 for such files): to and from the logical header
    claims.py   every record against the section table and the limits, before any allocation (check 11)
    reader.py   CRCs and decoding into a Checkpoint (checks 12-13)
    kernels.py  the optional numba kernel for sparse codebook tensors
    writer.py   PackConfig, pack, apply_pack
    summary.py  inspect_bytes (header and section table only)

    data, report = pack(ckpt, PackConfig())      # bytes + per-layer rows
    ckpt2 = read_bytes(data, source="model.dcz")  # bit-identical state_dict, masks, quant
    info = inspect_bytes(data)                    # header and section table only

Reading needs numpy only (torch just wraps the arrays as tensors, and is imported only then); when numba is installed two hot
loops (Huffman blocks, and symbols -> weights/mask/assignments) run compiled, with the numpy code as
the reference. Nothing is unpickled or run from the file.
"""

import zlib  # noqa: F401  (tests patch dcz.zlib)

from dcomp.formats.dcz.spec import (  # noqa: F401
    ALIGN, DEFAULT_MAX_BYTES, DTYPES, FLAG_ANS, FLAG_BINARY, FLAG_CABAC, FLAG_STORED_DTYPE, FLAG_ZHEADER, FLOATS, KNOWN_FLAGS, MAJOR, MAX_HEADER,
    MINOR, PREAMBLE, SIZES, STORED_DTYPES, _align, _bits, _from_bits, _half_bits, _is_int, _numel, _widen,
    gap_positions, gap_symbols)
from dcomp.formats.dcz.header import _check_schema, _fail, _Header, _inflate_header, read_header  # noqa: F401
from dcomp.formats.dcz.claims import _check_claims, _Reader  # noqa: F401
from dcomp.formats.dcz.summary import inspect_bytes  # noqa: F401

# Reading the header (inspect_bytes, read_header) needs numpy only; decoding into tensors and
# writing need torch, so those names load their modules on first use (PEP 562): importing this
# package does not import torch (dcomp inspect / info answer without it).
_LAZY = {"read_bytes": "reader", "PackConfig": "writer", "PackResult": "writer", "apply_pack": "writer",
         "pack": "writer", "write_bytes": "writer", "provenance_for": "writer", "reheader": "writer"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
