"""Ternary and binary weights: the quantize stage's ``mode="ttq"`` and ``mode="binary"``.

    ttq     Trained Ternary Quantization (Zhu et al. 2017): per layer, weights with
            |w| <= threshold x max|w| become 0, the others +Wp or -Wn, two scales learned by SGD
            (initialised as the mean |w| of each side, as in Ternary Weight Networks)
    binary  BinaryConnect / XNOR-Net style: w = alpha x sign(w), alpha = mean |w| of the layer
            (``scale="layer"``: 2 values, 1 bit) or of each output channel (``"channel"``: 2 values
            per channel, stored as a codebook of 2 x channels entries, so more bits per weight)

Training goes through the one loop (``dcomp.retrain.retrain`` -> ``dcomp.train.fit``) with the
``LowBitTrainer`` callback: it keeps the latent full-precision weights, puts their ternary /
binary image in the parameters for every forward pass, turns the gradient into the latent's
(straight-through estimator; TTQ scales it by Wp / 1 / Wn per region), lets the optimizer step
the latent weights, and updates the TTQ scales with the gradient sums of their regions.
Between steps, and after training, the parameters hold the quantized weights.

By default the first and last quantizable layers (e.g. the input conv and the classifier) are
kept at k-means precision (``conv_bits``/``fc_bits``, default 8/5) and their centroids are
fine-tuned in the same loop (``CentroidFinetune``); ``keep_first_last=False`` makes every layer
ternary / binary. The result is the checkpoint's ordinary ``quant`` representation: a codebook
of 3 (ttq) or 2 (binary per layer) float32 values and assignments, with
``weight == where(mask, codebook[assignments], 0)`` bit for bit, so ``pack`` stores it through
its codebook path and ``retrain`` afterwards fine-tunes the scales (assignments fixed).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from dcomp.errors import UsageError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.stages import StageContext, StageResult
from dcomp.train import Callback, TrainContext


SCALE_LR = 0.01  # TTQ scales: Adam steps of at most about 1% of the initial scale
KEPT_CENTROID_LR_FACTOR = 0.1  # first/last layer centroids: a tenth of the loop's lr (see apply_lowbit)


def _live(mask: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    return t[mask] if mask is not None else t.reshape(-1)


class LowBitTrainer(Callback):
    """Keeps latent full-precision weights for ``names`` and trains them ternary / binary."""

    def __init__(self, names: list[str], mode: str, threshold: float = 0.05, scale: str = "layer"):
        self.names, self.mode, self.threshold, self.scale = list(names), mode, threshold, scale
        self.latent: dict[str, torch.Tensor] = {}
        self.codes: dict[str, torch.Tensor] = {}
        self.wp: dict[str, torch.Tensor] = {}
        self.wn: dict[str, torch.Tensor] = {}
        self.grad_wp: dict[str, torch.Tensor] = {}
        self.grad_wn: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.nn.Parameter] = {}
        self.masks: dict[str, torch.Tensor | None] = {}
        self.adam: dict[tuple[str, str], tuple] = {}
        self.base_lr = 1.0

    # ---- the quantizers ------------------------------------------------------------------
    def _codes(self, name: str, w: torch.Tensor) -> torch.Tensor:
        mask = self.masks.get(name)
        if self.mode == "ttq":
            live = _live(mask, w)
            delta = self.threshold * float(live.abs().max()) if live.numel() else 0.0
            codes = (w > delta).to(torch.int8) - (w < -delta).to(torch.int8)
        else:
            codes = torch.where(w >= 0, 1, -1).to(torch.int8)
        if mask is not None:
            codes = codes * mask.to(torch.int8)
        return codes

    def _init_scales(self, name: str, w: torch.Tensor, codes: torch.Tensor) -> None:
        pos, neg = w[codes > 0], -w[codes < 0]
        self.wp[name] = torch.tensor(float(pos.mean()) if pos.numel() else 0.0, dtype=torch.float32)
        self.wn[name] = torch.tensor(float(neg.mean()) if neg.numel() else 0.0, dtype=torch.float32)

    def _binary_alpha(self, name: str, w: torch.Tensor) -> torch.Tensor:
        mask = self.masks.get(name)
        a = w.abs() if mask is None else torch.where(mask, w.abs(), torch.zeros((), dtype=w.dtype))
        if self.scale == "layer":
            n = a.numel() if mask is None else max(int(mask.sum()), 1)
            return (a.sum() / n).reshape(1)
        flat = a.reshape(a.shape[0], -1)
        n = flat.shape[1] if mask is None else mask.reshape(a.shape[0], -1).sum(1).clamp(min=1)
        return flat.sum(1) / n

    def quantized(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The ternary / binary image of latent ``w`` (codes recomputed and stored)."""
        codes = self._codes(name, w)
        self.codes[name] = codes
        c = codes.to(w.dtype)
        if self.mode == "ttq":
            wp = self.wp[name].to(w.dtype)
            wn = self.wn[name].to(w.dtype)
            out = torch.where(codes > 0, wp, torch.where(codes < 0, -wn, torch.zeros((), dtype=w.dtype)))
        else:
            alpha = self._binary_alpha(name, w).to(w.dtype)
            shape = (-1,) + (1,) * (w.dim() - 1) if self.scale == "channel" else (1,) * w.dim()
            out = c * alpha.reshape(shape)
        mask = self.masks.get(name)
        if mask is not None:
            out = torch.where(mask, out, torch.zeros((), dtype=w.dtype))
        return out + 0.0  # -0.0 -> +0.0: pruned and zero-coded weights are +0.0 exactly

    @torch.no_grad()
    def start(self, params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
        for n in self.names:
            p = params[n]
            self.params[n] = p
            self.masks[n] = masks.get(n)
            self.latent[n] = p.detach().clone()
            if self.mode == "ttq":
                self._init_scales(n, self.latent[n], self._codes(n, self.latent[n]))
            p.copy_(self.quantized(n, self.latent[n]))

    # ---- callback hooks --------------------------------------------------------------------
    def on_train_begin(self, ctx: TrainContext) -> None:
        self.base_lr = ctx.optimizer.param_groups[0]["lr"]
        self.start(ctx.params, ctx.masks)

    @torch.no_grad()
    def after_backward(self, ctx: TrainContext) -> None:
        for n in self.names:
            p = self.params[n]
            codes = self.codes[n]
            if p.grad is not None:
                g = p.grad
                if self.mode == "ttq":
                    self.grad_wp[n] = g[codes > 0].sum().float()
                    self.grad_wn[n] = -g[codes < 0].sum().float()
                    factor = torch.where(codes > 0, self.wp[n].to(g.dtype),
                                         torch.where(codes < 0, self.wn[n].to(g.dtype), torch.ones((), dtype=g.dtype)))
                    g.mul_(factor)
            p.copy_(self.latent[n])  # the optimizer steps the latent full-precision weights

    @torch.no_grad()
    def after_step(self, ctx: TrainContext) -> None:
        lr = ctx.optimizer.param_groups[0]["lr"]
        for n in self.names:
            p = self.params[n]
            self.latent[n] = p.detach().clone()
            if self.mode == "ttq" and n in self.grad_wp:
                for side, grads in (("wp", self.grad_wp), ("wn", self.grad_wn)):
                    self._adam(n, side, grads.pop(n), lr / max(self.base_lr, 1e-12))
            p.copy_(self.quantized(n, self.latent[n]))

    def _adam(self, name: str, side: str, grad: torch.Tensor, schedule: float) -> None:
        """One Adam step on a TTQ scale. The summed gradient of a scale grows with the layer's size,
        so plain SGD at the weights' learning rate diverges on large layers; Adam's normalised step,
        at SCALE_LR x the initial scale (times the loop's learning-rate schedule), does not."""
        key = (name, side)
        m, v, t, init = self.adam.get(key, (0.0, 0.0, 0, None))
        table = self.wp if side == "wp" else self.wn
        if init is None:
            init = max(float(table[name]), 1e-8)
        g = float(grad)
        t += 1
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        mhat, vhat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        step = SCALE_LR * init * schedule * mhat / (math.sqrt(vhat) + 1e-30)
        table[name] = (table[name] - step).clamp(min=1e-8)
        self.adam[key] = (m, v, t, init)

    def summary(self) -> dict[str, Any]:
        if self.mode != "ttq":
            return {}
        return {"scales": {n: {"wp": float(self.wp[n]), "wn": float(self.wn[n])} for n in self.names}}

    @torch.no_grad()
    def update_checkpoint(self, ckpt: Checkpoint) -> None:
        """Write quant entries read back from the checkpoint's (ternary / binary) weights."""
        for n in self.names:
            ckpt.quant[n] = entry_from_weight(ckpt.state_dict[n], ckpt.masks.get(n), self.mode)


def entry_from_weight(w: torch.Tensor, mask: torch.Tensor | None, mode: str) -> dict[str, Any]:
    """The quant entry of a weight that already takes few values: codebook = its distinct live
    values (ttq: always the 3 slots [-Wn, 0, Wp]), assignments by exact lookup."""
    from dcomp.compressors.quantization import index_dtype

    live = _live(mask, w).float()
    values = torch.unique(live)
    if mode == "ttq":
        neg, pos = values[values < 0], values[values > 0]
        if neg.numel() > 1 or pos.numel() > 1:
            raise AssertionError("a ternary layer took more than 3 values")
        wn = float(-neg[0]) if neg.numel() else (float(pos[0]) if pos.numel() else 1.0)
        wp = float(pos[0]) if pos.numel() else wn  # an unused slot: any value keeps 3 sorted entries
        cb = torch.tensor([-wn, 0.0, wp], dtype=torch.float32)
        if neg.numel():
            cb[0] = neg[0]
        if pos.numel():
            cb[2] = pos[0]
    else:
        cb = values if values.numel() else torch.zeros(1)
    bits = max(1, math.ceil(math.log2(max(cb.numel(), 2))))
    flat = w.reshape(-1).float()
    idx = torch.searchsorted(cb, flat).clamp(max=cb.numel() - 1)
    if mask is not None:
        idx = torch.where(mask.reshape(-1), idx, torch.zeros((), dtype=idx.dtype))
    return {"bits": int(bits), "codebook": cb.float().contiguous(),
            "assignments": idx.reshape(w.shape).to(index_dtype(bits))}


def _layer_metrics(before: torch.Tensor, after: torch.Tensor, q: dict, mask: torch.Tensor | None,
                   mode: str) -> dict[str, Any]:
    a, b = _live(mask, before).double(), _live(mask, after).double()
    err = a - b
    sse, signal = float((err * err).sum()), float((a * a).sum())
    cb = q["codebook"]
    return {"bits": q["bits"], "k": 2 ** q["bits"], "clusters": int(cb.numel()), "distinct": int(torch.unique(b).numel()),
            "weights": int(a.numel()), "nonzero": int(torch.count_nonzero(after)), "params": after.numel(),
            "masked": mask is not None, "mse": sse / max(a.numel(), 1),
            "sqnr_db": 10 * math.log10(signal / sse) if sse > 0 and signal > 0 else None,
            "iterations": 0, "converged": True, "mode": mode,
            "zeros": float((b == 0).double().mean()) if b.numel() else 0.0,
            "note": {"ttq": "ternary (TTQ)", "binary": "binary"}[mode]}


def apply_lowbit(ckpt: Checkpoint, cfg, ctx: StageContext, progress=None) -> StageResult:
    """``apply_quantize`` for mode ttq / binary (cfg is a QuantizeConfig)."""
    from dcomp.compressors.quantization import (QuantizeConfig, check_quantized, plan_bits, quantizable,
                                                quantize_weight, round_to_float16)

    if ckpt.quant:
        raise UsageError(f"{cfg.mode} trains from full-precision weights but this checkpoint is already quantized; "
                         f"give the checkpoint from before `dcomp quantize`")
    fine = cfg.finetune is not None and cfg.finetune.epochs > 0
    if fine and ctx.data is None:
        raise UsageError(f"{cfg.mode} training needs data: give --data (e.g. --data digits)")
    names = [n for n in quantizable(ckpt) if not any(re.search(p, n) for p in cfg.exclude)]
    skipped = {n: "excluded" for n in quantizable(ckpt) if n not in names}
    kept = [names[0], names[-1]] if cfg.keep_first_last and len(names) >= 1 else []
    kept = list(dict.fromkeys(kept))
    low = [n for n in names if n not in kept]
    if not low:
        raise UsageError(f"no layer left to make {cfg.mode}: the model has {len(names)} quantizable weight(s) and the "
                         f"first and last are kept at k-means precision; pass --no-keep-first-last")

    out = ckpt.copy()
    layers: dict[str, dict[str, Any]] = {}
    if kept:  # first / last layer: k-means at the usual bits, centroids fine-tuned in the same loop
        kcfg = QuantizeConfig(bits=cfg.bits, conv_bits=cfg.conv_bits, fc_bits=cfg.fc_bits, layers=cfg.layers,
                              exclude=cfg.exclude + [f"^{re.escape(n)}$" for n in low], init=cfg.init,
                              max_iter=cfg.max_iter)
        plan, _ = plan_bits(ckpt, kcfg)
        for i, (name, bits) in enumerate(plan.items()):
            entry, new_w, m = quantize_weight(out.state_dict[name], out.masks.get(name), bits, cfg.init,
                                              cfg.max_iter, ctx.seed + i)
            out.state_dict[name] = new_w
            out.quant[name] = entry
            m["note"] = "first/last: k-means"
            layers[name] = m

    trainer = LowBitTrainer(low, cfg.mode, cfg.threshold, cfg.scale)
    metrics: dict[str, Any] = {"mode": cfg.mode, "low_bit_layers": low, "kept_layers": kept, "skipped": skipped}
    if ctx.data is not None:
        from dcomp.retrain import accuracy

        metrics["top1_before"] = accuracy(ckpt, ctx.data, ctx.trust_pickle)
    if fine:
        from dcomp.retrain import retrain

        if progress is None and ctx.console is not None:
            from dcomp.cli.ui import TrainProgress

            progress = TrainProgress(ctx.console, f"{cfg.mode} training")
        from dcomp.compressors.quantization import _CentroidLr

        # The kept layers' centroids move by lr x the SUM of their weights' gradients; at the loop's
        # rate that diverged here (LeNet-300-100 on MNIST-10k, fc1 kept at 5 bits, lr 0.02: 2 of 3
        # seeds at 11.5%), at a tenth of it it did not (96.85%). So a tenth unless centroid_lr is given.
        centroid_lr = cfg.centroid_lr if cfg.centroid_lr is not None else KEPT_CENTROID_LR_FACTOR * cfg.finetune.lr
        callbacks = [trainer] + ([_CentroidLr(centroid_lr)] if kept else [])
        if kept:
            metrics["centroid_lr"] = centroid_lr
        out, _ = retrain(out, ctx.data, cfg.finetune, callbacks, seed=ctx.seed, progress=progress,
                         trust_pickle=ctx.trust_pickle)
    else:  # no training: the initial ternary / binary image (TWN / XNOR scales)
        params = {n: torch.nn.Parameter(out.state_dict[n].clone()) for n in low}
        trainer.start(params, out.masks)
        for n in low:
            out.state_dict[n] = params[n].detach().clone()
        trainer.update_checkpoint(out)
    metrics.update(trainer.summary())
    for n in low:
        layers[n] = _layer_metrics(ckpt.state_dict[n], out.state_dict[n], out.quant[n], out.masks.get(n), cfg.mode)
    for n in kept:
        if n in layers and n in out.quant:
            layers[n]["clusters"] = int(out.quant[n]["codebook"].numel())
    if cfg.float16:
        metrics["float16"] = round_to_float16(out)
    check_quantized(out)
    if ctx.data is not None:
        from dcomp.retrain import accuracy

        metrics["top1_after"] = accuracy(out, ctx.data, ctx.trust_pickle)
        metrics["top1_quantized"] = metrics["top1_after"]
    metrics["layers"] = layers
    metrics["quantized_weights"] = sum(m["weights"] for m in layers.values())
    metrics["index_bits"] = sum(m["weights"] * m["bits"] for m in layers.values())
    out.add_provenance("quantize", cfg.model_dump(exclude_none=True), metrics)
    return StageResult(out, metrics)
