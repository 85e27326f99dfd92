"""Options of the sensitivity sweep (`dcomp sweep`, recipe stage `sweep`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcomp.config.train import TrainConfig

SWEEP_VERSION = 1
SWEEP_METHODS = ("magnitude", "global", "neuron", "filter")
# dense near the top, where the curves bend
DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.965, 0.975, 0.985, 0.99)


class SweepConfig(BaseModel):
    """Options of the sweep stage (``dcomp sweep`` and the recipe stage ``sweep``)."""

    model_config = ConfigDict(extra="forbid")

    methods: list[str] | None = Field(None, description="pruning methods: magnitude, global, neuron, filter "
                                      "(default: magnitude plus neuron and/or filter where the model has such layers)")
    grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID), description="sparsities to measure, each in [0, 1)")
    whole: bool = Field(True, description="measure the whole model pruned at each sparsity")
    per_layer: bool = Field(True, description="measure each prunable layer pruned alone (the others dense)")
    split: Literal["test", "val", "train"] = Field("test", description="where accuracy is measured")
    retrain: TrainConfig | None = Field(None, description="fine-tune each point this long (masks kept) and measure again")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError(f"give at least one method ({', '.join(SWEEP_METHODS)})")
        for m in v:
            if m not in SWEEP_METHODS:
                raise ValueError(f"unknown method {m!r}: use {', '.join(SWEEP_METHODS)}")
        return list(dict.fromkeys(v))

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        if not v:
            raise ValueError("the grid is empty: give sparsities in [0, 1), e.g. 0,0.5,0.9")
        for s in v:
            if not 0.0 <= s < 1.0:
                raise ValueError(f"every grid sparsity must be in [0, 1) (0.9 removes 90%), got {s}")
        return sorted(set(float(s) for s in v))
