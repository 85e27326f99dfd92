"""Dynamic Network Surgery (Guo, Yao & Chen, NIPS 2016): pruning with splicing.

Every target layer keeps a dense weight W and a binary mask T. The forward pass uses W*T; the
gradient with respect to W*T updates ALL of W, so a pruned weight keeps learning and is
spliced back when its magnitude grows past ``b``. The mask follows

    h(w) = 0 if |w| < a,   1 if |w| >= b,   T unchanged if a <= |w| < b
    a, b = 0.9 * t, 1.1 * t,    t = max(mean(|w|) + c * std(|w|), 0)

with mean and std of |w| taken per layer over the weights not already pruned at the start of
training (as the authors' Caffe code does, once). At iteration ``i`` the mask is updated with
probability ``(1 + gamma * i) ** -power`` until ``stop`` iterations; after that T is fixed and W
keeps training. At the end the layer's weight is W*T and ``ckpt.masks`` holds T.

How it sits in the training loop: between steps the parameter holds W*T (so evaluation and
best-epoch selection see the surgically pruned net) and the dense W lives in this callback.
``after_backward`` swaps the dense W back in before the optimizer step, ``after_step`` stores
it, updates T and swaps W*T in again. The layers' masks are taken out of ``ctx.masks`` during
training, so the loop's MaskKeeper does not zero the pruned weights, and put back at the end.
"""

from __future__ import annotations

import torch

from dcomp.compressors.schedules import target_layers
from dcomp.config.retrain import DNSConfig
from dcomp.train import Callback


@torch.no_grad()
def dns_thresholds(w: torch.Tensor, c: float, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(a, b) for one layer from the |w| not pruned by ``mask``."""
    a = w.detach().abs().float()
    if mask is not None and bool(mask.any()):
        a = a[mask]
    t = max(float(a.mean()) + c * float(a.std()) if a.numel() > 1 else float(a.mean()), 0.0)
    return 0.9 * t, 1.1 * t


@torch.no_grad()
def dns_mask_update(w: torch.Tensor, mask: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """h(w): prune below a, splice at or above b, keep the mask in between."""
    mag = w.abs()
    return torch.where(mag < a, torch.zeros_like(mask), torch.where(mag >= b, torch.ones_like(mask), mask))


class DNS(Callback):
    """The surgery callback. Counters: ``pruned_events`` and ``spliced`` (weights switched 0 -> 1)."""

    def __init__(self, cfg: DNSConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.dense: dict[str, torch.Tensor] = {}
        self.T: dict[str, torch.Tensor] = {}
        self.ab: dict[str, tuple[float, float]] = {}
        self.spliced = 0
        self.pruned_events = 0
        self.updates = 0
        self.splice_log: list[tuple[int, str, int, float, float]] = []  # (iter, layer, flat index, |w|, b), first few

    @torch.no_grad()
    def on_train_begin(self, ctx):
        self.owned = target_layers(ctx, self.cfg.layers)
        self.stop = self.cfg.stop if self.cfg.stop is not None else ctx.total_steps
        # the same draws on every rank: the weights are identical under DDP, so the masks are too
        self.gen = torch.Generator().manual_seed(self.seed * 7919 + 17)
        for name in self.owned:
            p = ctx.params[name]
            start = ctx.masks.pop(name, None)  # ours now: the MaskKeeper must not zero W
            T = start.clone() if start is not None else torch.ones_like(p, dtype=torch.bool)
            self.ab[name] = dns_thresholds(p, self.cfg.c, T)
            self.T[name] = T
            self.dense[name] = p.detach().clone()
        self._update_masks(ctx, 0)
        self._swap_in_masked(ctx)

    @torch.no_grad()
    def _swap_in_masked(self, ctx):
        for name in self.owned:
            ctx.params[name].copy_(self.dense[name] * self.T[name])

    @torch.no_grad()
    def after_backward(self, ctx):
        # the gradient is dL/d(W*T); it updates every entry of the dense W
        for name in self.owned:
            ctx.params[name].copy_(self.dense[name])

    @torch.no_grad()
    def after_step(self, ctx):
        for name in self.owned:
            self.dense[name].copy_(ctx.params[name])
        self._update_masks(ctx, ctx.step)
        self._swap_in_masked(ctx)

    @torch.no_grad()
    def _update_masks(self, ctx, it: int):
        if it >= self.stop:
            return
        cfg = self.cfg
        prob = (1.0 + cfg.gamma * it) ** (-cfg.power)
        draws = torch.rand(len(self.owned), generator=self.gen)
        for name, r in zip(self.owned, draws.tolist()):
            if r >= prob:
                continue
            a, b = self.ab[name]
            old = self.T[name]
            new = dns_mask_update(self.dense[name], old, a, b)
            grown = new & ~old
            n_grown = int(grown.sum())
            if n_grown and len(self.splice_log) < 32:
                idx = int(torch.nonzero(grown.reshape(-1))[0])
                self.splice_log.append((it, name, idx, float(self.dense[name].reshape(-1)[idx].abs()), b))
            self.spliced += n_grown
            self.pruned_events += int((old & ~new).sum())
            self.T[name] = new
            self.updates += 1

    @torch.no_grad()
    def on_train_end(self, ctx):
        self._swap_in_masked(ctx)
        for name in self.owned:
            ctx.masks[name] = self.T[name].clone()

    def summary(self) -> dict:
        return {"dns_spliced": self.spliced, "dns_pruned_events": self.pruned_events, "dns_mask_updates": self.updates}
