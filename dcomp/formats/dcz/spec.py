"""The .dcz layout as constants and the byte-level helpers every part shares (docs/FORMAT.md).

Dtype table, preamble layout, flags, alignment; raw element bits <-> tensors; float16 narrowing
and widening; the relative-index (gap) stream.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from dcomp.errors import FormatError

if TYPE_CHECKING:  # torch is imported only where tensors are made (reading a header needs none)
    import torch

MAJOR, MINOR = 1, 5          # 1.5: binary header, 1.4: "cabac" streams, 1.3: "ans" streams
PREAMBLE = 32
MAX_HEADER = 1 << 27          # limit for the header as stored and, when compressed, as decompressed
FLAG_ZHEADER = 1              # flags bit 0: the header is a zlib stream (format 1.1)
FLAG_STORED_DTYPE = 2         # flags bit 1: some record has "stored_dtype" (float32 kept as float16, format 1.2)
FLAG_ANS = 4                  # flags bit 2: some stream is rANS-coded, "coding": "ans" (format 1.3)
FLAG_CABAC = 8               # flags bit 3: some stream is context-adaptive arithmetic coded, "coding": "cabac" (format 1.4)
FLAG_BINARY = 16              # flags bit 4: the header is the binary table of format 1.5 (dcomp/formats/dcz/compact.py)
KNOWN_FLAGS = FLAG_ZHEADER | FLAG_STORED_DTYPE | FLAG_ANS | FLAG_CABAC | FLAG_BINARY
STORED_DTYPES = {"float32": ("float16",)}   # declared dtype -> narrower dtypes a payload may be stored in
ALIGN = 8
DEFAULT_MAX_BYTES = 1 << 34   # refuse files that would decode to more than 16 GiB

SIZES: dict[str, int] = {     # the dtype table of docs/FORMAT.md: name -> bytes per element
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
FLOATS = {"float32", "float16", "bfloat16", "float64"}


class _TorchDtypes(Mapping):
    """name -> (torch dtype, bytes per element), importing torch on the first lookup of a value.
    Membership, iteration and len need no torch (the header checks use them)."""

    def __init__(self):
        self._table: dict | None = None

    def _load(self) -> dict:
        if self._table is None:
            import torch
            self._table = {k: (getattr(torch, k), s) for k, s in SIZES.items()}
        return self._table

    def __getitem__(self, name):
        return self._load()[name]

    def __contains__(self, name) -> bool:
        return name in SIZES

    def __iter__(self):
        return iter(SIZES)

    def __len__(self) -> int:
        return len(SIZES)


DTYPES = _TorchDtypes()


def _name_of(dtype) -> str | None:
    for k, (d, _) in DTYPES.items():
        if d == dtype:
            return k
    return None


# ---- helpers ----------------------------------------------------------------------------------

def _dtype_name(t: "torch.Tensor", what: str) -> str:
    name = _name_of(t.dtype)
    if name is None:
        raise FormatError(f"{what}: dtype {t.dtype} cannot be stored in a .dcz file")
    return name


def _bits(t: "torch.Tensor") -> np.ndarray:
    """The tensor's raw element bits as a flat signed-int numpy array (exact, -0.0 != +0.0)."""
    import torch
    t = t.detach().to("cpu").contiguous().reshape(-1)
    size = SIZES[_name_of(t.dtype)]
    a = t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).numpy()
    return a if sys.byteorder == "little" else a.astype(a.dtype.newbyteorder("<"))  # the file is little-endian


def _from_bits(arr: np.ndarray, dtype: str, shape: list[int]) -> "torch.Tensor":
    import torch
    tdtype, size = DTYPES[dtype]
    arr = np.ascontiguousarray(arr, dtype=np.dtype(f"=i{size}"))
    return torch.from_numpy(arr).view(tdtype).reshape(shape)


def _half_bits(u: np.ndarray) -> np.ndarray | None:
    """float16 bits of float32 bits ``u`` (int32, little-endian) if every element survives
    float32 -> float16 -> float32 bit for bit (-0.0, fp16 subnormals, +-inf, most NaNs do), else None."""
    if u.size == 0:
        return None   # nothing to save
    f = u.view("<f4")
    with np.errstate(over="ignore", invalid="ignore"):
        h = f.astype("<f2")
    if not np.array_equal(h.astype("<f4").view("<i4"), u.view("<i4")):
        return None
    hb = h.view("<i2")
    if (((hb & 0x7E00) == 0x7C00) & ((hb & 0x03FF) != 0)).any():
        return None   # a signalling NaN: hardware converters may quiet it, so keep float32
    return hb


def _widen(raw, stored: str, dtype: str) -> np.ndarray:
    """Element bits of ``dtype`` (native int array) from a little-endian section stored as ``stored``."""
    size = SIZES[dtype]
    if stored == dtype:
        return np.frombuffer(raw, dtype=f"<i{size}").astype(f"=i{size}")
    # float16 -> float32 is exact for every value (NaN: sign kept, 10 payload bits shifted up by 13)
    return np.frombuffer(raw, dtype="<f2").astype("<f4").view("<i4").astype(f"=i{size}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def gap_symbols(pos: np.ndarray, numel: int, k: int) -> np.ndarray:
    """Relative-index symbols for sorted positions (docs/FORMAT.md, "the gap stream")."""
    m = (1 << k) - 1
    g = np.diff(pos, prepend=-1)
    e = (g - 1) // m
    last = int(pos[-1]) + 1 if len(pos) else 0
    tail = (numel - last) // m
    syms = np.full(len(pos) + int(e.sum()) + tail, m, dtype=np.int64)
    syms[np.cumsum(e + 1) - 1] = (g - 1) - e * m
    return syms


def gap_positions(syms: np.ndarray, numel: int, k: int) -> np.ndarray:
    """Inverse of gap_symbols, with the checks a reader needs (raises ValueError)."""
    m = (1 << k) - 1
    # int32 arithmetic when it cannot overflow (half the memory traffic of int64)
    dt = np.int32 if (len(syms) + 1) * (m + 1) < 2**31 else np.int64
    filler = syms == m
    adv = syms.astype(dt) + 1
    adv[filler] = m
    c = np.cumsum(adv, dtype=dt)
    end = int(c[-1]) if len(c) else 0
    if end > numel:
        raise ValueError(f"relative indices run past the end of the tensor ({end} > {numel})")
    if numel - end >= m:
        raise ValueError("relative indices stop short of the tensor's end")
    pos = c[~filler]
    pos -= 1
    return pos


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
