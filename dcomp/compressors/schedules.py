"""Automated gradual pruning (Zhu & Gupta, "To prune, or not to prune", 2017).

The sparsity of every prunable layer follows the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3      for t = t0, t0 + dt, ..., t0 + n*dt

and the masks are recomputed by magnitude (exact counts, ``magnitude_mask``) at those steps
only; already pruned weights stay pruned (the schedule only ever adds to the pruned set), and
between updates the pruned weights are held at exactly zero. ``t`` counts optimizer steps taken
(t = 0 is before the first step). ``start``/``end``/``every`` are given in epochs or in steps
(``unit``); ``n = floor((end - start) / every)``, so the final sparsity is reached at
``start + n*every <= end`` and kept (the weights recover) for the rest of training.

Also here: ``MaskOwner``, the small base class of callbacks that change masks during
training (AGP, IHT/DSD). It keeps its layers' pruned weights at zero itself, so it works
whether or not the training loop's ``MaskKeeper`` is present.
"""

from __future__ import annotations

import torch

from dcomp.compressors.masks import magnitude_mask, sparsity_of
from dcomp.config.retrain import AGPConfig, Unit  # noqa: F401 - re-exported
from dcomp.errors import DcompError
from dcomp.train import Callback, TrainContext


def to_steps(value: float, unit: str, steps_per_epoch: int) -> int:
    """A schedule position in optimizer steps (epochs may be fractional)."""
    return int(round(value * steps_per_epoch)) if unit == "epochs" else int(round(value))


def target_layers(ctx: TrainContext, layers: list[str] | None) -> list[str]:
    """The layers a method acts on: the given names, else every Linear/Conv weight."""
    from dcomp.models import prunable_parameters

    names = list(prunable_parameters(ctx.model)) if layers is None else list(layers)
    unknown = [n for n in names if n not in ctx.params]
    if unknown:
        raise DcompError(f"layers not in the model: {', '.join(unknown[:3])}; see `dcomp info` for the names")
    if not names:
        raise DcompError("the model has no Linear or Conv weights to sparsify")
    return names


class MaskOwner(Callback):
    """Holds pruned weights of ``self.owned`` at zero (gradients masked, weights re-masked)."""

    owned: list[str]

    def after_backward(self, ctx):
        for name in self.owned:
            m = ctx.masks.get(name)
            g = ctx.params[name].grad
            if m is not None and g is not None:
                g.mul_(m)

    @torch.no_grad()
    def after_step(self, ctx):
        self.apply_masks(ctx)

    @torch.no_grad()
    def apply_masks(self, ctx):
        for name in self.owned:
            m = ctx.masks.get(name)
            if m is not None:
                ctx.params[name].mul_(m)


def agp_sparsity(t: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """Zhu & Gupta's target sparsity after ``t`` steps (s_i before t0, s_f from t0 + n*dt on)."""
    if t < t0:
        return s_i
    frac = min((t - t0) / (n * dt), 1.0)
    return s_f + (s_i - s_f) * (1.0 - frac) ** 3


class AGP(MaskOwner):
    """The AGP callback; ``self.log`` records (step, target sparsity, measured sparsity)."""

    def __init__(self, cfg: AGPConfig):
        self.cfg = cfg
        self.log: list[tuple[int, float, float]] = []

    def on_train_begin(self, ctx):
        cfg, spe = self.cfg, ctx.steps_per_epoch
        self.owned = target_layers(ctx, cfg.layers)
        self.t0 = to_steps(cfg.start, cfg.unit, spe)
        self.dt = max(1, to_steps(cfg.every, cfg.unit, spe))
        end = to_steps(cfg.end, cfg.unit, spe) if cfg.end is not None else int(0.75 * ctx.total_steps)
        self.n = (end - self.t0) // self.dt
        if self.n < 1:
            raise DcompError(f"AGP: start ({self.t0} steps) + every ({self.dt} steps) is after end ({end} steps); "
                             f"lower --start/--every or raise --end or --epochs")
        last = self.t0 + self.n * self.dt
        if last > ctx.total_steps:
            raise DcompError(f"AGP: the last mask update (step {last}) is after the end of training "
                             f"({ctx.total_steps} steps); lower --end or raise --epochs")
        for name in self.owned:  # layers without a mask start dense
            ctx.masks.setdefault(name, torch.ones_like(ctx.params[name], dtype=torch.bool))
        self.apply_masks(ctx)
        if self.t0 == 0:
            self._update(ctx, 0)

    def after_step(self, ctx):
        t = ctx.step
        if t >= self.t0 and (t - self.t0) % self.dt == 0 and (t - self.t0) // self.dt <= self.n:
            self._update(ctx, t)
        super().after_step(ctx)

    @torch.no_grad()
    def _update(self, ctx, t: int):
        cfg = self.cfg
        s = agp_sparsity(t, cfg.initial_sparsity, cfg.final_sparsity, self.t0, self.n, self.dt)
        for name in self.owned:
            cur = ctx.masks[name]
            if sparsity_of(cur) < s:  # never release a weight the input already pruned
                ctx.masks[name] = magnitude_mask(ctx.params[name], s, current=cur)
        ctx.broadcast_masks()
        self.apply_masks(ctx)
        measured = sum(int((~ctx.masks[n]).sum()) for n in self.owned) / sum(ctx.masks[n].numel() for n in self.owned)
        self.log.append((t, s, measured))

    def summary(self) -> dict:
        return {"agp_updates": len(self.log), "agp_final_target": self.log[-1][1] if self.log else None}


def agp_update_steps(cfg: AGPConfig, steps_per_epoch: int, total_steps: int) -> list[int]:
    """The steps at which AGP recomputes masks (for tests and plans)."""
    t0 = to_steps(cfg.start, cfg.unit, steps_per_epoch)
    dt = max(1, to_steps(cfg.every, cfg.unit, steps_per_epoch))
    end = to_steps(cfg.end, cfg.unit, steps_per_epoch) if cfg.end is not None else int(0.75 * total_steps)
    n = (end - t0) // dt
    return [t0 + k * dt for k in range(n + 1)] if n >= 1 else []


__all__ = ["AGP", "AGPConfig", "MaskOwner", "agp_sparsity", "agp_update_steps", "target_layers", "to_steps"]
