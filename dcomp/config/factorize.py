"""Options of the factorize stage (low-rank factorization, `dcomp factorize`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dcomp.config.checks import check_excludes, check_layer_values
from dcomp.config.train import TrainConfig

KINDS = ("linear", "conv-channel", "conv-spatial")


def _check_rank(r: int, what: str) -> None:
    if int(r) < 1:
        raise ValueError(f"{what}: rank must be at least 1, got {r}")


class FactorizeConfig(BaseModel):
    """The factorize stage: exactly one of ``rank``, ``energy``, ``ratio`` (or only ``layers``)."""

    model_config = ConfigDict(extra="forbid")

    rank: int | None = Field(None, description="rank for every factorized layer")
    energy: float | None = Field(None, description="per layer, the smallest rank keeping this fraction of the "
                                                   "squared singular values, in (0, 1]")
    ratio: float | None = Field(None, description="per layer, the largest rank whose factors have at most this "
                                                  "fraction of the layer's parameters, in (0, 1)")
    layers: dict[str, int] = Field(default_factory=dict, description="regex on the layer name -> its own rank")
    exclude: list[str] = Field(default_factory=list, description="regexes of layers left whole")
    conv: Literal["channel", "spatial"] = Field("channel", description="Conv2d scheme: kxk conv to r channels + "
                                                                      "1x1 conv (channel), or kx1 + 1xk (spatial)")
    force: bool = Field(False, description="factorize even where the factors have more parameters or MACs")
    finetune: TrainConfig | None = Field(None, description="retrain the factorized model afterwards (needs data)")

    @field_validator("rank")
    @classmethod
    def _rank(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"--rank must be at least 1, got {v}")
        return v

    @field_validator("energy")
    @classmethod
    def _energy(cls, v):
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"--energy must be in (0, 1] (the fraction of squared singular values kept, "
                             f"e.g. 0.9), got {v}")
        return v

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v):
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError(f"--ratio must be in (0, 1) (the factors' share of a layer's parameters, "
                             f"e.g. 0.5), got {v}")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: dict[str, int]):
        return check_layer_values(v, _check_rank)

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v: list[str]):
        return check_excludes(v)

    @model_validator(mode="after")
    def _one_rule(self):
        given = [n for n in ("rank", "energy", "ratio") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of --rank, --energy, --ratio, not {' and '.join('--' + g for g in given)}")
        if not given and not self.layers:
            raise ValueError("say how to choose ranks: --rank R, --energy 0.9 or --ratio 0.5 (or --layer REGEX=R)")
        return self
