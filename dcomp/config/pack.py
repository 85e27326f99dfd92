"""Options of the pack stage (`dcomp pack`): gap widths, stream coders, provenance kept."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcomp.compressors import huffman as hf

if TYPE_CHECKING:
    import torch


CABAC_AUTO_BINS = 1 << 21    # ~0.05-0.08 s of cabac decoding per file (docs/bench/size.md)


class PackConfig(BaseModel):
    """How ``pack`` encodes (every choice is recorded in the file, so reading needs none of it)."""

    model_config = ConfigDict(extra="forbid")

    index_bits: Optional[int] = Field(None, description="gap width for every sparse tensor (overrides fc/conv)")
    index_bits_fc: int = Field(5, description="gap width for 2-D and smaller weights (Deep Compression: 5)")
    index_bits_conv: int = Field(8, description="gap width for conv weights, 3-D and up (Deep Compression: 8)")
    huffman: bool = Field(True, description="allow Huffman coding (off: fixed width only)")
    ans: bool = Field(True, description="allow rANS coding of a stream when its section is smaller than Huffman's "
                                        "and fixed width's (format 1.3; off: files readable by dcomp before 1.3)")
    coder: Literal["auto", "huffman", "rans", "cabac"] = Field(
        "auto", description="stream coders to choose from, per stream the smallest section: 'auto' every coder "
                            "(fixed width, Huffman, rANS, cabac), 'huffman' fixed width and Huffman (format 1.2, "
                            "what dcomp before 1.3 reads), 'rans' fixed width and rANS, 'cabac' fixed width and "
                            "the context-adaptive arithmetic coder (format 1.4)")
    cabac_budget: int = Field(
        CABAC_AUTO_BINS, ge=0,
        description="with coder 'auto': at most this many cabac bins per file (a bin is one element of a "
                    "significance-coded tensor, or one bit of a tree-coded symbol). Decoding costs ~25-40 ns per bin "
                    "(docs/bench/size.md), against ~9 ns per parameter for torch.load of a dense float32 file, so "
                    "auto keeps large tensors on the fast coders; coder 'cabac' has no budget")
    block: int = Field(hf.DEFAULT_BLOCK, description="symbols per Huffman block")
    verify: bool = Field(True, description="decode the packed bytes and compare bit for bit")
    compress_header: bool = Field(True, description="store the header JSON zlib-compressed when that is smaller")
    header: Literal["binary", "json"] = Field(
        "binary", description="header form: 'binary' (format 1.5: a byte table of varints and enums, one CRC32 for "
                              "the data area, sections unpadded in small files; ~0.3 KB on LeNet-5 against ~1 KB) or "
                              "'json' (the JSON header of formats 1.0-1.4, for dcomp releases before 1.5)")
    provenance: Literal["full", "brief", "none"] = Field(
        "brief", description="provenance kept in the header: 'full' (every stage's params and metrics), 'brief' "
                             "(stage names and scalar params: what was done, at a fraction of the bytes; the "
                             "default, since a .dcz exists to be small and the .pt keeps the full record) or 'none'")
    keep_times: bool = Field(False, description="keep provenance 'time' entries (off: packed files carry no "
                                                "wall-clock time, so the same checkpoint always packs to the same bytes)")
    fp16_exact: bool = Field(True, description="store float32 payloads (raw tensors, raw values, codebooks) as "
                                               "float16 when every element converts back bit-identically")

    @field_validator("index_bits", "index_bits_fc", "index_bits_conv")
    @classmethod
    def _bits(cls, v):
        if v is not None and not 1 <= v <= 16:
            raise ValueError(f"index bits must be between 1 and 16 (Deep Compression uses 5 for fc, 8 for conv), got {v}")
        return v

    @field_validator("block")
    @classmethod
    def _block(cls, v):
        if not 1 <= v <= hf.MAX_BLOCK:
            raise ValueError(f"Huffman block must be between 1 and {hf.MAX_BLOCK} symbols, got {v}")
        return v

    def index_bits_for(self, t: torch.Tensor) -> int:
        if self.index_bits is not None:
            return self.index_bits
        return self.index_bits_conv if t.dim() >= 3 else self.index_bits_fc
