"""Options of the training-time methods the retrain stage runs as callbacks: AGP, Dynamic
Network Surgery, IHT/DSD, L1 and group-lasso regularisers, distillation (KD / CC), soft
weight-sharing (a mixture prior)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dcomp.config.dafl import DataFreeConfig
from dcomp.config.train import FINETUNE_DEFAULTS, TrainConfig

Unit = Literal["epochs", "steps"]


class AGPConfig(BaseModel):
    """Gradual magnitude pruning on a cubic schedule (paper defaults: s_i = 0, updates every dt)."""

    model_config = ConfigDict(extra="forbid")

    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="s_i: sparsity at the first update")
    final_sparsity: float = Field(0.9, gt=0.0, lt=1.0, description="s_f: sparsity from start + n*every on")
    start: float = Field(0.0, ge=0, description="t0: first mask update (in `unit`)")
    end: float | None = Field(None, gt=0, description="last update no later than this (in `unit`); default: 3/4 of training")
    every: float = Field(1.0, gt=0, description="dt: steps or epochs between mask updates")
    unit: Unit = Field("epochs", description="unit of start, end and every")
    layers: list[str] | None = Field(None, description="parameter names to prune (default: every Linear/Conv weight)")

    @model_validator(mode="after")
    def _check(self):
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError(f"final sparsity {self.final_sparsity} is below the initial sparsity "
                             f"{self.initial_sparsity}; AGP only adds to the pruned set")
        if self.end is not None and self.end - self.start < self.every:
            raise ValueError(f"start ({self.start}) must come at least one interval ({self.every}) before end "
                             f"({self.end}); lower --start or raise --end")
        return self


class DNSConfig(BaseModel):
    """Paper / reference-code defaults: gamma 1e-4, power 1; c sets how hard each layer is pruned."""

    model_config = ConfigDict(extra="forbid")

    c: float = Field(1.0, description="threshold multiplier: t = mean(|w|) + c * std(|w|); larger prunes more")
    gamma: float = Field(1e-4, ge=0, description="mask-update probability (1 + gamma*iter)^-power")
    power: float = Field(1.0, ge=0, description="mask-update probability (1 + gamma*iter)^-power")
    stop: int | None = Field(None, ge=0, description="iteration after which T is frozen (default: never, i.e. end of training)")
    layers: list[str] | None = Field(None, description="parameter names (default: every Linear/Conv weight)")


class IHTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["iht", "dsd"] = Field("iht", description="iht starts sparse, dsd starts dense; both end sparse")
    sparsity: float | None = Field(None, gt=0.0, lt=1.0, description="per-layer sparsity of the sparse phases (default: the input masks')")
    sparse_len: float = Field(2.0, gt=0, description="length of a sparse phase (in `unit`)")
    dense_len: float = Field(1.0, gt=0, description="length of a dense phase (in `unit`)")
    unit: Unit = Field("epochs", description="unit of the phase lengths")
    layers: list[str] | None = Field(None, description="parameter names (default: every Linear/Conv weight)")


GroupKind = Literal["filter", "channel", "shape", "row", "column"]


def _lambda_ok(v: float) -> float:
    if v < 0:
        raise ValueError(f"lambda must be >= 0 (a negative penalty rewards large weights), got {v}")
    return v


class L1Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lam: float = Field(1e-5, description="lambda: weight of sum |w| in the loss")
    proximal: bool = Field(True, description="apply the penalty as a proximal step after each optimizer step "
                                             "(soft-thresholding: exact zeros) instead of a subgradient in the loss")
    layers: list[str] | None = Field(None, description="module names (default: every Linear/Conv layer)")

    @field_validator("lam")
    @classmethod
    def _lam(cls, v):
        return _lambda_ok(v)


class GroupLassoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lam: float = Field(1e-4, description="lambda: weight of the sum of group L2 norms in the loss")
    groups: list[GroupKind] = Field(["filter"], description="filter, channel, shape (Conv) / row, column (Linear)")
    proximal: bool = Field(True, description="apply the penalty as a proximal step after each optimizer step "
                                             "(group soft-thresholding: whole groups reach exactly zero) instead "
                                             "of a subgradient in the loss")
    remove_below: float | None = Field(None, ge=0, description="after training, remove groups whose L2 norm is below this")
    layers: list[str] | None = Field(None, description="module names (default: every Linear/Conv layer)")

    @field_validator("lam")
    @classmethod
    def _lam(cls, v):
        return _lambda_ok(v)

    @field_validator("groups")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("give at least one group kind: filter, channel, shape, row or column")
        return list(dict.fromkeys(v))


class DistillConfig(BaseModel):
    """Defaults: Hinton's T = 4 / alpha = 0.9 style soft targets; Peng et al.'s gamma 0.4, P 2."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(..., description="teacher model file (any format dcomp reads)")
    temperature: float = Field(4.0, gt=0, description="T: softmax temperature of the soft targets")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft (KD) term; 1 - alpha weighs the hard CE")
    cc_weight: float = Field(0.0, ge=0, description="weight of the correlation-congruence term (0 = off)")
    cc_gamma: float = Field(0.4, gt=0, description="gamma of the Gaussian RBF kernel")
    cc_order: int = Field(2, ge=0, le=8, description="P: order of the kernel's Taylor expansion")


class SWSConfig(BaseModel):
    """Soft weight-sharing: a learned Gaussian-mixture prior per layer (``retrain --method sws``;
    dcomp.compressors.sws)."""

    model_config = ConfigDict(extra="forbid")

    components: int = Field(8, ge=2, le=256, description="mixture components per layer; quantize afterwards "
                                                          "with bits = log2(components)")
    tau: float = Field(0.005, gt=0, description="weight of the prior against the data term (Ullrich et al.: 0.005)")
    lr: float = Field(0.001, gt=0, description="Adam learning rate of the mixture parameters (means in units of "
                                                "the layer's weight std)")
    init_std: float = Field(0.25, gt=0, description="initial std of every component, in units of the layer's "
                                                     "weight std")
    min_std: float = Field(0.01, gt=0, description="floor of a component's std, in units of the layer's weight std "
                                                    "(bounds the pull on a weight)")
    layers: list[str] | None = Field(None, description="parameter names (default: every Linear/Conv weight)")

    @field_validator("min_std")
    @classmethod
    def _floor(cls, v, info):
        init = info.data.get("init_std")
        if init is not None and v > init:
            raise ValueError(f"min_std ({v}) must not exceed init_std ({init})")
        return v


def default_train() -> TrainConfig:
    return TrainConfig(epochs=5, **FINETUNE_DEFAULTS)


class RetrainConfig(BaseModel):
    """The retrain stage: how to train, and which training-time methods to run."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=default_train)
    agp: AGPConfig | None = None
    dns: DNSConfig | None = None
    iht: IHTConfig | None = None
    l1: L1Config | None = None
    group_lasso: GroupLassoConfig | None = None
    distill: DistillConfig | None = None
    dafl: DataFreeConfig | None = None
    sws: SWSConfig | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.dafl is not None and self.distill is not None:
            raise ValueError("data-free retraining already distils from its teacher on generated batches; "
                             "drop distill (the --kd-*/--cc-* options) or dafl (--data-free)")
        if self.dafl is not None and self.train.select == "best":
            raise ValueError("data-free retraining has no real validation split for --select best; use --select last")
        chosen = [n for n in ("agp", "dns", "iht") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose one mask method, got {' and '.join(chosen)} "
                             f"(--schedule agp, --method dns, --method iht or dsd)")
        if chosen and self.train.select == "best":
            raise ValueError(f"{chosen[0]} changes the masks while training, so --select best could return "
                             f"weights that do not fit the final masks; use --select last")
        return self

    def mask_method(self) -> str | None:
        return next((n for n in ("agp", "dns", "iht") if getattr(self, n) is not None), None)
