"""The training options every training command and recipe stage shares (``TrainConfig``) and
the fine-tuning defaults; torch-free so that the CLI can declare its options without loading
torch. ``dcomp.train`` re-exports both."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Fine-tuning a trained model (retraining, pruning rounds, centroid fine-tuning) starts from
# these instead of the from-scratch defaults of TrainConfig; commands and recipes share them.
FINETUNE_DEFAULTS = {"lr": 0.01, "weight_decay": 0.0}


class TrainConfig(BaseModel):
    """Options of every command that trains (train, retrain, fine-tuning stages)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=0, description="passes over the training set")
    batch_size: int = Field(64, ge=1, description="samples per step (per rank under torchrun)")
    lr: float = Field(0.1, gt=0, description="learning rate")
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    lr_schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="learning-rate schedule over all steps")
    select: Literal["last", "best"] = Field("last", description="keep the last epoch, or the best on a validation split")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="training data held out when select=best")
