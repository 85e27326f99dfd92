"""Options of the bench stage (`dcomp bench`): batch sizes, variants, timing budget."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

TARGET_VARIANTS = ("dense", "shrunk", "sparse", "hybrid")


DEFAULT_SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batches: list[int] = [1, 8, 64]
    variants: list[str] = list(TARGET_VARIANTS)
    warmup: int = 10
    iters: int = 100
    seconds: float = 2.0
    kernel: Literal["torch", "numba"] = "numba"
    min_sparsity: float = 0.5
    eager: bool = True
    sweep: bool = True
    sweep_sparsities: list[float] = list(DEFAULT_SWEEP)
    sweep_seconds: float = 0.3

    @field_validator("batches")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or any(int(b) < 1 for b in v):
            raise ValueError("batch sizes must be positive integers, e.g. 1,8,64")
        return sorted(set(int(b) for b in v))

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in TARGET_VARIANTS]
        if bad or not v:
            raise ValueError(f"variants must be among {', '.join(TARGET_VARIANTS)}; got {', '.join(bad) or 'none'}")
        return list(dict.fromkeys(v))

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, v: int) -> int:
        if v < 0:
            raise ValueError("warm-up calls must be 0 or more")
        return v

    @field_validator("iters")
    @classmethod
    def _iters(cls, v: int) -> int:
        if v < 1:
            raise ValueError("timed calls must be at least 1 (100 is a good number)")
        return v

    @field_validator("seconds", "sweep_seconds")
    @classmethod
    def _seconds(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("time budgets must be positive seconds")
        return v

    @field_validator("min_sparsity")
    @classmethod
    def _min_sparsity(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("min sparsity is a fraction in [0, 1), e.g. 0.5")
        return v

    @field_validator("sweep_sparsities")
    @classmethod
    def _sweep(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= s < 1.0 for s in v):
            raise ValueError("sweep sparsities are fractions in [0, 1), e.g. 0.5,0.9,0.99")
        return sorted(set(float(s) for s in v))
