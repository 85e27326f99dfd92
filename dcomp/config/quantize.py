"""Options of the quantize stage (`dcomp quantize`): k-means weight sharing, TTQ, binary."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcomp.config.checks import check_excludes, check_layer_values
from dcomp.config.train import TrainConfig

MIN_BITS, MAX_BITS = 1, 16
DEFAULT_CONV_BITS, DEFAULT_FC_BITS = 8, 5  # Han et al.: 8 bits for conv, 5 for fully connected


def _check_bits(v: int | None, what: str) -> int | None:
    if v is not None and not MIN_BITS <= v <= MAX_BITS:
        raise ValueError(f"{what} must be between {MIN_BITS} and {MAX_BITS} (k = 2^bits clusters), got {v}")
    return v


class QuantizeConfig(BaseModel):
    """The quantize stage. Bits per layer: ``layers`` (last matching regex wins), else
    ``conv_bits`` / ``fc_bits``, else ``bits``, else 8 for conv and 5 for fully connected."""

    model_config = ConfigDict(extra="forbid")

    bits: int | None = Field(None, description="bits for every quantized layer (k = 2^bits)")
    conv_bits: int | None = Field(None, description="bits for conv weights (default: bits, else 8)")
    fc_bits: int | None = Field(None, description="bits for fully connected weights (default: bits, else 5)")
    layers: dict[str, int] = Field(default_factory=dict, description="regex on the parameter name -> bits")
    exclude: list[str] = Field(default_factory=list, description="regexes of parameter names left unquantized")
    init: Literal["linear", "density", "random"] = Field("linear", description="k-means initialisation")
    max_iter: int = Field(1000, ge=1, description="Lloyd iterations at most (each is O(k log n))")
    codebook: Literal["kmeans", "uniform"] = Field(
        "kmeans", description="kmeans: 2^bits shared values from 1-D k-means; uniform: 2^bits equally spaced levels "
                              "from the smallest to the largest weight of the layer (a fixed grid)")
    rd_lambda: float = Field(0.0, ge=0, description="rate-distortion rounding: each weight goes to the level minimising "
                                                    "(w - c)^2 / var(w) + rd_lambda x code length of c in bits (the "
                                                    "label frequencies, re-estimated; with kmeans the levels too): "
                                                    "fewer bits per index once entropy-coded, at some error. 0: "
                                                    "nearest level (plain k-means / uniform rounding)")
    requantize: bool = Field(False, description="allow asking more bits than a layer is already quantized to")
    finetune: TrainConfig | None = Field(None, description="centroid fine-tuning after clustering (needs data)")
    centroid_lr: float | None = Field(None, gt=0, description="centroid learning rate (default: the optimizer's)")
    bias_bits: int | None = Field(None, description="also share the values of every 1-D float parameter not "
                                                    "quantized otherwise (biases, BatchNorm weight/bias): per "
                                                    "tensor k-means to 2^bias_bits values, after fine-tuning; "
                                                    "off by default (pack then stores a codebook + indices when "
                                                    "that is smaller than the float16/float32 values)")
    float16: bool = Field(False, description="round codebooks and the unquantized float parameters and buffers "
                                             "(biases, BatchNorm) to the nearest float16 value, kept as float32: "
                                             "`pack` then stores them in half the bytes without loss")
    mode: Literal["kmeans", "ttq", "binary"] = Field(
        "kmeans", description="kmeans: weight sharing; ttq: Trained Ternary Quantization (3 values per layer, learned "
                              "positive/negative scales); binary: sign(w) x a scale per layer or per channel")
    threshold: float = Field(0.05, description="ttq: weights with |w| <= threshold x max|w| of the layer become 0")
    scale: Literal["layer", "channel"] = Field("layer", description="binary: one scale per layer (2 values, 1 bit) or "
                                                                   "per output channel (2 per channel: more bits)")
    keep_first_last: bool = Field(True, description="ttq/binary: keep the first and last layer at k-means "
                                                    "precision (conv_bits/fc_bits, default 8/5)")

    @field_validator("bits", "conv_bits", "fc_bits", "bias_bits")
    @classmethod
    def _bits(cls, v, info):
        return _check_bits(v, f"--{info.field_name.replace('_', '-')}")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: dict[str, int]):
        return check_layer_values(v, _check_bits)

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v: list[str]):
        return check_excludes(v)

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"--threshold must be in [0, 1) (a fraction of the layer's max |w|; TTQ uses 0.05), got {v}")
        return v
