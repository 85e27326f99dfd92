"""Options of data-free distillation (DAFL): the generator, data-free retraining, and the
`dcomp distill` / recipe `dafl` stage."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcomp.config.train import TrainConfig

# The student's optimisation in the paper's MNIST run (the DAFL preset); a user may shorten it.
PAPER_TRAIN = {"epochs": 200, "batch_size": 512, "lr": 2e-3, "optimizer": "adam", "weight_decay": 0.0,
               "lr_schedule": "constant"}


def paper_train_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**PAPER_TRAIN, **{k: v for k, v in overrides.items() if v is not None}})


class DAFLConfig(BaseModel):
    """The generator and its loss; the student's optimiser is the stage's TrainConfig."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(120, ge=1, description="generated batches per epoch")
    latent_dim: int = Field(100, ge=1, description="size of the generator's noise vector z")
    generator_width: int = Field(128, ge=2, description="channels of the generator's first conv (the second has half); "
                                                        "the paper's 128 dominates the CPU cost, time ~ width^2")
    lr_g: float = Field(0.2, gt=0, description="generator Adam learning rate")
    oh: float = Field(1.0, ge=0, description="weight of the one-hot loss (CE of the teacher against its argmax)")
    ie: float = Field(5.0, ge=0, description="weight of the information-entropy loss (class balance)")
    a: float = Field(0.1, ge=0, description="weight of the activation loss (-mean |teacher features|)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the student's KL loss")
    generator: str | None = Field(None, description="start from a generator saved by `distill --save-generator` "
                                                    "(its size and input range come from the file)")
    input_mean: list[float] = Field(default_factory=lambda: [0.0],
                                    description="per-channel mean of the inputs the teacher expects (one value = all channels)")
    input_std: list[float] = Field(default_factory=lambda: [1.0],
                                   description="per-channel std of the inputs the teacher expects; the generator's "
                                               "last BatchNorm makes outputs mean 0 / std 1, then this affine map applies")

    @field_validator("input_std")
    @classmethod
    def _positive(cls, v):
        if not v or any(s <= 0 for s in v):
            raise ValueError("input_std values must be positive, e.g. [0.3081] for MNIST in [0, 1]")
        return v

    @field_validator("input_mean")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("input_mean needs at least one value, e.g. [0.1307] for MNIST in [0, 1]")
        return v


class DataFreeConfig(DAFLConfig):
    """Data-free retraining (``retrain --data-free --teacher T``, recipe ``retrain`` with ``dafl:``)."""

    teacher: str = Field(..., description="teacher model file ('input' in a recipe: the run's input model)")


class DistillStudentConfig(BaseModel):
    """``dcomp distill`` and the recipe ``dafl`` stage: distil the input model (the teacher) into
    a student. Data-free (DAFL) by default; ``data_free: false`` distils on the real training
    split with Hinton KD instead (the baseline DAFL is measured against)."""

    model_config = ConfigDict(extra="forbid")

    student: str | None = Field(None, description="zoo name, or a model file (pruned/shrunk: weights and masks "
                                                   "kept); omitted: the teacher's architecture")
    width: float | None = Field(None, gt=0, le=1, description="scale every free Linear/Conv width (0.5: LeNet-5-half)")
    data_free: bool = Field(True, description="DAFL on generated batches (true) or KD on the real training split")
    train: TrainConfig = Field(default_factory=paper_train_config,
                               description="the student's optimisation (DAFL preset: 200 epochs, batch 512, Adam 2e-3)")
    dafl: DAFLConfig = Field(default_factory=DAFLConfig)
    kd_temperature: float = Field(4.0, gt=0, description="real-data KD only: softmax temperature")
    kd_alpha: float = Field(0.9, ge=0, le=1, description="real-data KD only: weight of the soft term")

    @field_validator("train", mode="before")
    @classmethod
    def _preset(cls, v):
        """A partial train block (a recipe's ``train: {epochs: 5}``) starts from the DAFL preset."""
        return {**PAPER_TRAIN, **v} if isinstance(v, dict) else v

    def model_post_init(self, _ctx) -> None:
        if self.student is None and self.width is None:
            raise ValueError("which student? set student (a zoo name or a model file) and/or width "
                             "(a narrower copy of the teacher, e.g. 0.5)")
        if self.train.select == "best" and self.data_free:
            raise ValueError("data-free distillation has no real validation split for select=best; use last")
