"""The .dcz packed checkpoint: writer, checked reader, header-only inspection.

The layout is specified in docs/FORMAT.md; the modules follow it part by part:

    spec.py     constants of the layout, dtypes, element bits, float16 narrowing, the gap stream
    header.py   preamble, (compressed) header JSON, schema, section table (checks 1-10)
    claims.py   every record against the section table and the limits, before any allocation (check 11)
    reader.py   CRCs and decoding into a Checkpoint (checks 12-13)
    kernels.py  the optional numba kernel for sparse codebook tensors
    writer.py   PackConfig, pack, apply_pack
    summary.py  inspect_bytes (header and section table only)

    data, report = pack(ckpt, PackConfig())      # bytes + per-layer rows
    ckpt2 = read_bytes(data, source="model.dcz")  # bit-identical state_dict, masks, quant
    info = inspect_bytes(data)                    # header and section table only

Reading needs numpy only (torch just wraps the arrays as tensors); when numba is installed two hot
loops (Huffman blocks, and symbols -> weights/mask/assignments) run compiled, with the numpy code as
the reference. Nothing is unpickled or run from the file.
"""

import zlib  # noqa: F401  (tests patch dcz.zlib)

from dcomp.formats.dcz.spec import (  # noqa: F401
    ALIGN, DEFAULT_MAX_BYTES, DTYPES, FLAG_STORED_DTYPE, FLAG_ZHEADER, FLOATS, KNOWN_FLAGS, MAJOR, MAX_HEADER,
    MINOR, PREAMBLE, STORED_DTYPES, _align, _bits, _from_bits, _half_bits, _is_int, _numel, _widen,
    gap_positions, gap_symbols)
from dcomp.formats.dcz.header import _check_schema, _fail, _Header, _inflate_header, read_header  # noqa: F401
from dcomp.formats.dcz.claims import _check_claims, _Reader  # noqa: F401
from dcomp.formats.dcz.reader import read_bytes  # noqa: F401
from dcomp.formats.dcz.summary import inspect_bytes  # noqa: F401
from dcomp.formats.dcz.writer import PackConfig, PackResult, apply_pack, pack, write_bytes  # noqa: F401
