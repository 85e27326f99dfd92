"""Iterative hard thresholding (Jin et al., 2016) and dense-sparse-dense training (Han et al., 2017).

Training alternates phases:

    sparse   each layer keeps its top-k weights by magnitude (k from ``sparsity``, exact counts);
             only those are trained, the rest are held at exactly zero
    dense    every weight is released; the pruned ones restart from 0

``iht`` starts with a sparse phase, ``dsd`` with a dense one. Both always END sparse, so the
output is a compressed checkpoint: when the alternation would finish in a dense phase, that
phase is cut short so that the last ``sparse_len`` of training is a sparse phase (a dense phase
that would be cut to nothing is dropped and the sparse phase before it extended instead).
Each sparse phase re-selects the top-k from the current weights, so weights grown in a dense
phase can win their place back.

Without ``sparsity`` each layer keeps the sparsity its input mask had (``prune | retrain
--method iht`` continues at the pruned sparsity).
"""

from __future__ import annotations

import torch

from dcomp.compressors.masks import magnitude_mask, sparsity_of
from dcomp.compressors.schedules import MaskOwner, target_layers, to_steps
from dcomp.config.retrain import IHTConfig
from dcomp.errors import DcompError


def iht_phases(total: int, sparse_len: int, dense_len: int, start_dense: bool) -> list[tuple[str, int, int]]:
    """[(kind, begin, end)] in steps covering [0, total), alternating, always ending sparse."""
    sparse_len, dense_len = max(1, sparse_len), max(1, dense_len)
    phases: list[list] = []
    t, kind = 0, ("dense" if start_dense else "sparse")
    while t < total:
        length = sparse_len if kind == "sparse" else dense_len
        phases.append([kind, t, min(t + length, total)])
        t += length
        kind = "dense" if kind == "sparse" else "sparse"
    if phases and phases[-1][0] == "dense":
        last = phases[-1]
        begin_sparse = max(total - sparse_len, last[1])
        if begin_sparse > last[1]:
            last[2] = begin_sparse
            phases.append(["sparse", begin_sparse, total])
        elif len(phases) > 1:
            phases.pop()
            phases[-1][2] = total
        else:
            phases = [["sparse", 0, total]]
    return [(k, b, e) for k, b, e in phases]


class IHT(MaskOwner):
    """The IHT/DSD callback; ``self.log`` records (step, phase kind, overall sparsity of its layers)."""

    def __init__(self, cfg: IHTConfig):
        self.cfg = cfg
        self.log: list[tuple[int, str, float]] = []

    def on_train_begin(self, ctx):
        cfg = self.cfg
        self.owned = target_layers(ctx, cfg.layers)
        self.target: dict[str, float] = {}
        for name in self.owned:
            if cfg.sparsity is not None:
                self.target[name] = cfg.sparsity
            elif name in ctx.masks:
                self.target[name] = sparsity_of(ctx.masks[name])
            else:
                raise DcompError(f"IHT/DSD: no sparsity for {name} (the input is not pruned there); give --sparsity")
        spe = ctx.steps_per_epoch
        self.phases = iht_phases(ctx.total_steps, to_steps(cfg.sparse_len, cfg.unit, spe),
                                 to_steps(cfg.dense_len, cfg.unit, spe), cfg.mode == "dsd")
        self.starts = {b: k for k, b, _ in self.phases}
        self.kind = None
        if 0 in self.starts:
            self._enter(ctx, 0, self.starts[0])

    def after_step(self, ctx):
        super().after_step(ctx)
        kind = self.starts.get(ctx.step)
        if kind is not None and kind != self.kind:
            self._enter(ctx, ctx.step, kind)

    @torch.no_grad()
    def _enter(self, ctx, step: int, kind: str):
        self.kind = kind
        if kind == "sparse":
            for name in self.owned:
                ctx.masks[name] = magnitude_mask(ctx.params[name], self.target[name])
            ctx.broadcast_masks()
            self.apply_masks(ctx)
            kept = sum(int(ctx.masks[n].sum()) for n in self.owned)
            total = sum(ctx.masks[n].numel() for n in self.owned)
            self.log.append((step, kind, 1.0 - kept / total))
        else:
            for name in self.owned:  # released; the pruned weights are exactly 0 and restart from there
                ctx.masks.pop(name, None)
            self.log.append((step, kind, 0.0))

    def summary(self) -> dict:
        return {"iht_phases": [f"{k}@{b}-{e}" for k, b, e in self.phases]}
