"""The ``search`` stage's options (torch-free: the CLI builds its help from them)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dcomp.config.train import TrainConfig

PAPER_GRID = [round(0.1 + 0.9 * i / 30, 6) for i in range(31)]


def _default_train() -> TrainConfig:
    return TrainConfig(epochs=3, lr=0.01, weight_decay=0.0)


class SearchConfig(BaseModel):
    """MetaPruning: train a PruningNet, then search per-group widths under a budget (see dcomp.compressors.metaprune)."""

    model_config = ConfigDict(extra="forbid")

    max_macs: Union[float, str, None] = Field(None, description="MACs budget: a fraction of the input such as 0.5x, or absolute (12M)")
    max_params: Union[float, str, None] = Field(None, description="parameter budget: 0.5x or absolute (250k)")
    max_latency_ms: Union[float, str, None] = Field(None, description="onnxruntime latency budget in ms (or 0.5x) at latency_batch")
    min_fraction: float = Field(0.9, gt=0, le=1, description="a candidate must use at least this fraction of each budget")
    latency_batch: int = Field(1, ge=1, description="batch size of the latency measurement")
    grid: list[float] = Field(default_factory=lambda: list(PAPER_GRID), description="width ratios a group may take")
    population: int = Field(50, ge=2)
    parents: int = Field(10, ge=1, description="the best candidates mutations and crossovers start from")
    mutations: int = Field(25, ge=0)
    crossovers: int = Field(25, ge=0)
    mutation_prob: float = Field(0.1, gt=0, le=1, description="probability each gene is redrawn in a mutation")
    iterations: int = Field(20, ge=1)
    hidden: int = Field(32, ge=1, description="hidden units of each layer's weight generator")
    pruningnet_init: Literal["input", "random"] = Field("input", description="generators start at the input's weights, or at random")
    init: Literal["l1", "generated"] = Field("l1", description="output weights: the input's top units by L1, or the PruningNet's generated weights")
    train: TrainConfig = Field(default_factory=_default_train, description="PruningNet training (one random candidate per step)")
    recal_samples: int = Field(512, ge=2, description="training samples that re-estimate a candidate's BatchNorm statistics")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="training data held out to score candidates (never the test split)")
    val_samples: int = Field(1000, ge=10, description="at most this many held-out samples score a candidate")
    exclude: list[str] = Field(default_factory=list, description="regexes of layers whose width is not searched")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        if not v or any(not (0 < r <= 1) for r in v):
            raise ValueError("grid ratios must lie in (0, 1], e.g. 0.1:1:31")
        return sorted(set(float(r) for r in v))

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v):
        import re

        for rx in v:
            try:
                re.compile(rx)
            except re.error as e:
                raise ValueError(f"exclude {rx!r} is not a regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.max_macs is None and self.max_params is None and self.max_latency_ms is None:
            raise ValueError("give a budget: max_macs, max_params or max_latency_ms (e.g. --max-macs 0.5x)")
        if self.parents > self.population:
            raise ValueError(f"parents ({self.parents}) cannot exceed the population ({self.population})")
        return self


def parse_grid(text: str) -> list[float]:
    """'0.1:1:31' (LO:HI:COUNT) or '0.25,0.5,0.75,1'."""
    from dcomp.errors import UsageError

    try:
        if ":" in text:
            lo, hi, n = text.split(":")
            n = int(n)
            if n < 1:
                raise ValueError
            return [round(float(lo) + (float(hi) - float(lo)) * i / max(n - 1, 1), 6) for i in range(n)]
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--grid {text!r}: give LO:HI:COUNT such as 0.1:1:31, or ratios such as 0.25,0.5,1") from None
