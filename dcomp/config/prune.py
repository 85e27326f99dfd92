"""Options of the prune stage (`dcomp prune`, recipe stage `prune`) and the parsing of its
values (N:M patterns, per-layer overrides)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dcomp.config.checks import compile_regex
from dcomp.config.train import TrainConfig

SPARSITY_METHODS = ("magnitude", "global", "neuron", "filter", "channel", "group")
STRUCTURED = ("neuron", "filter", "channel", "group")
METHODS = ("magnitude", "global", "std", "nm", "neuron", "filter", "channel", "group")
IMPORTANCE_OF = {"neuron": "l2", "filter": "l1", "channel": "channel", "group": "l1"}


class PruneConfig(BaseModel):
    """Options of the prune stage (``dcomp prune`` and the recipe stage ``prune``)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["magnitude", "global", "std", "nm", "neuron", "filter", "channel", "group"] = "magnitude"
    sparsity: float | None = Field(None, description="fraction of weights (or units) to remove, in [0, 1)")
    quality: float | None = Field(None, description="std method: threshold = quality x std of the layer's weights")
    nm: str | None = Field(None, description="nm method: keep N of every M consecutive weights, e.g. 2:4")
    layers: dict[str, str | float] = Field(default_factory=dict, description="regex -> this layer's own value")
    exclude: list[str] = Field(default_factory=list, description="regexes of layers to leave dense")
    min_weights: int = Field(100, ge=0, description="leave layers with fewer weights dense")
    rounds: int = Field(1, ge=1, description="iterative pruning: reach the target in this many steps")
    schedule: Literal["linear", "cubic"] = Field("linear", description="how the target grows over the rounds")
    retrain: TrainConfig | None = Field(None, description="retraining after each round (epochs per round)")
    recalibrate_bn: bool = Field(True, description="with data: re-estimate BatchNorm statistics after each pruning step")
    recalibrate_samples: int = Field(2048, ge=2, description="training samples used for the BatchNorm re-estimate")
    max_drop: float | None = Field(None, ge=0, description="choose per-layer sparsities from a sensitivity sweep so the "
                                   "model loses at most this many top-1 points before retraining (magnitude, neuron, filter)")
    sweep: str | None = Field(None, description="with max_drop: a sweep JSON from dcomp sweep (default: the recipe's "
                              "last sweep stage, else a sweep measured now)")
    importance: Literal["l1", "l2", "channel", "bn", "taylor"] | None = Field(
        None, description="structured: unit score (default: l2 for neuron, l1 for filter/group, channel for channel)")
    global_rank: bool = Field(False, description="structured: one ranking over all groups instead of the same ratio in each")
    taylor_samples: int = Field(256, ge=2, description="taylor importance: training samples for the gradients")

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v):
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (0.9 removes 90% of the weights), got {v}")
        return v

    @field_validator("quality")
    @classmethod
    def _quality(cls, v):
        if v is not None and not v > 0:
            raise ValueError(f"quality must be > 0 (threshold = quality x std of the layer; Han used about 0.5-1.5), got {v}")
        return v

    @field_validator("nm")
    @classmethod
    def _nm(cls, v):
        if v is not None:
            parse_nm(v)
        return v

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v):
        for rx in v:
            compile_regex(rx, "--exclude")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        m = self.method
        if self.max_drop is not None:
            if m not in ("magnitude", "neuron", "filter"):
                raise ValueError(f"--max-drop chooses per-layer sparsities for --method magnitude, neuron or filter, not {m}")
            if self.sparsity is not None:
                raise ValueError("--max-drop chooses the sparsities itself: leave out --sparsity")
            if self.layers:
                raise ValueError("--max-drop chooses each layer's sparsity: leave out --layer (--exclude keeps a layer dense)")
        elif self.sweep is not None:
            raise ValueError("--sweep is read by --max-drop: give --max-drop POINTS too")
        if m in SPARSITY_METHODS and self.sparsity is None and self.max_drop is None:
            raise ValueError(f"--method {m} needs --sparsity S in [0, 1), e.g. --sparsity {0.5 if m in STRUCTURED else 0.9}")
        if m not in SPARSITY_METHODS and self.sparsity is not None:
            raise ValueError(f"--sparsity does not apply to --method {m} "
                             f"({'its threshold is --quality x std' if m == 'std' else 'give --nm N:M'})")
        if m == "std" and self.quality is None:
            raise ValueError("--method std needs --quality q (threshold = q x std of each layer's weights), e.g. --quality 1.0")
        if m != "std" and self.quality is not None:
            raise ValueError(f"--quality only applies to --method std, not {m}")
        if m not in STRUCTURED and (self.importance is not None or self.global_rank):
            raise ValueError(f"--importance and --global-rank apply to the structured methods (neuron, filter, channel, "
                             f"group), not {m}")
        if m != "nm" and self.nm is not None:
            raise ValueError(f"--nm only applies to --method nm, not {m}")
        if m == "nm" and self.nm is None:
            self.nm = "2:4"
        for rx, val in self.layers.items():
            compile_regex(rx, "--layer")
            _parse_value(m, val, rx)
        if self.rounds > 1:
            if m == "nm":
                raise ValueError("N:M pruning is one-shot: use --rounds 1, then retrain (--epochs-per-round or dcomp retrain)")
            if self.retrain is None or self.retrain.epochs < 1:
                raise ValueError("iterative pruning retrains between rounds: give --epochs-per-round E >= 1 (and --data)")
        return self

    def target(self) -> Any:
        """The global value: sparsity, quality or (n, m)."""
        if self.method in SPARSITY_METHODS:
            return self.sparsity
        if self.method == "std":
            return self.quality
        return parse_nm(self.nm)

    def overrides(self) -> list[tuple[re.Pattern, Any, str]]:
        return [(compile_regex(rx, "--layer"), _parse_value(self.method, v, rx), rx) for rx, v in self.layers.items()]


def _parse_value(method: str, val: Any, rx: str) -> Any:
    """A --layer value: sparsity in [0,1), quality > 0 (0 = dense), or N:M ('0' = dense). 0/None = dense."""
    text = str(val).strip()
    if method == "nm":
        if text in ("0", "dense"):
            return None
        try:
            return parse_nm(text)
        except ValueError as e:
            raise ValueError(f"--layer {rx}={val}: {e}") from None
    try:
        x = float(text)
    except ValueError:
        raise ValueError(f"--layer {rx}={val}: the value must be a number") from None
    if method == "std":
        if x < 0:
            raise ValueError(f"--layer {rx}={val}: quality must be >= 0 (0 leaves the layer dense)")
    elif not 0.0 <= x < 1.0:
        raise ValueError(f"--layer {rx}={val}: sparsity must be in [0, 1)")
    return x if x > 0 else None


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4); raises ValueError with a message saying what to write."""
    try:
        n_s, m_s = str(text).split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ValueError(f"N:M must look like 2:4, got {text!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M (N kept of every M), got {text!r}")
    return n, m
