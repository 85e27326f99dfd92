"""The one training loop.

Training from scratch, retraining with masks, centroid fine-tuning, sparsification schedules and
distillation all run through ``fit``; what differs between them is a list of callbacks:

    before_batch(ctx)                      before the forward pass (e.g. DNS swaps in W*T)
    compute_loss(ctx, x, out, y, loss)     returns the loss to minimise (KD, regularisers)
    after_backward(ctx)                    gradients are ready (masking, per-cluster sums)
    after_step(ctx)                        the optimizer has stepped (re-masking, mask updates)
    on_epoch_end(ctx)

What the loop iterates over is a ``BatchSource``: a ``Dataset`` becomes ``TensorBatches`` over its
training split (seeded per-epoch permutations); data-free distillation passes a source that
yields generated batches instead (``dcomp.compressors.dafl.GeneratedBatches``), so the same loop,
masks and callbacks train on them.

Masks are kept by the built-in ``MaskKeeper``: gradients of pruned weights are zeroed after
backward and the weights are re-masked after every step, so pruned weights stay exactly zero
whatever the optimizer's momentum or weight decay does.

Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel over gloo,
each rank takes its own slice of every epoch's permutation, masks are broadcast from rank 0
at the start, and their checksums are compared across ranks at the end (``masks_identical``).
"""

from __future__ import annotations

import copy
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dcomp.data import Dataset
from dcomp.errors import DcompError

_DEVICE = torch.device("cpu")


def use_device(name: str) -> None:
    """Where ``fit`` and ``evaluate`` compute (the global --device). Checkpoints stay on the CPU."""
    global _DEVICE
    _DEVICE = torch.device(name)


# TrainConfig and FINETUNE_DEFAULTS live in dcomp.config.train (no torch import: the CLI builds
# every command's --help from them without loading torch).
from dcomp.config.train import FINETUNE_DEFAULTS, TrainConfig  # noqa: E402,F401


@dataclass
class TrainContext:
    model: nn.Module                 # the bare model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    masks: dict[str, torch.Tensor]
    params: dict[str, nn.Parameter]  # name -> parameter of the bare model
    steps_per_epoch: int
    total_steps: int
    rank: int = 0
    world_size: int = 1
    step: int = 0                    # optimizer steps taken so far
    epoch: int = 0
    state: dict[str, Any] = field(default_factory=dict)  # scratch space for callbacks

    def broadcast_masks(self) -> None:
        """Make every rank hold rank 0's masks (call after changing masks under DDP)."""
        if self.world_size > 1:
            for name in sorted(self.masks):
                m = self.masks[name].to(torch.uint8)
                torch.distributed.broadcast(m, src=0)
                self.masks[name] = m.bool()


class Callback:
    def on_train_begin(self, ctx: TrainContext) -> None: ...
    def before_batch(self, ctx: TrainContext) -> None: ...
    def compute_loss(self, ctx: TrainContext, x, out, y, loss: torch.Tensor) -> torch.Tensor:
        return loss
    def after_backward(self, ctx: TrainContext) -> None: ...
    def after_step(self, ctx: TrainContext) -> None: ...
    def on_epoch_end(self, ctx: TrainContext) -> None: ...
    def on_train_end(self, ctx: TrainContext) -> None: ...
    def update_checkpoint(self, ckpt) -> None:
        """After training: write what this callback owns (masks, codebooks) into the checkpoint."""


class MaskKeeper(Callback):
    """Pruned weights stay exactly zero: no gradient, and re-masked after every step."""

    def on_train_begin(self, ctx):
        ctx.broadcast_masks()
        self.after_step(ctx)

    def after_backward(self, ctx):
        for name, m in ctx.masks.items():
            p = ctx.params[name]
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def after_step(self, ctx):
        for name, m in ctx.masks.items():
            ctx.params[name].mul_(m)


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int | None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # the masks at the end (schedules change them)
    masks_identical: bool | None = None  # under DDP: checksums equal on every rank


def dist_info() -> tuple[int, int]:
    """(rank, world_size); initialises a gloo process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy in percent, and mean loss."""
    was_training = model.training
    model.eval()
    n, correct1, correct5, loss_sum, classes = len(x), 0, 0, 0.0, 0
    dev = next(iter(model.parameters()), torch.empty(0)).device
    for i in range(0, n, batch_size):
        xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
        out = model(xb)
        classes = int(out.shape[1])
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == yb).sum())
        correct5 += int((top == yb[:, None]).any(dim=1).sum())
    model.train(was_training)
    res = {"top1": 100.0 * correct1 / max(n, 1), "loss": loss_sum / max(n, 1), "samples": n}
    if classes > 5:
        res["top5"] = 100.0 * correct5 / max(n, 1)
    return res


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.lr_schedule == "constant" or total <= 0:
        return 1.0
    t = min(step / total, 1.0)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 0.1 ** int(t * 3)  # step: /10 at 1/3 and 2/3 of training


def _mask_checksum(masks: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(masks):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(masks[name].to(torch.uint8).numpy().tobytes(), crc)
    return crc


class BatchSource:
    """What ``fit`` iterates over: ``steps_per_epoch`` batches of (x, y) per epoch.

    ``batches`` yields them; ``x`` and ``y`` may live anywhere (``fit`` moves them to the device).
    A source that is not a fixed split of real data has no validation part (``select=best`` is
    refused for it)."""

    def steps_per_epoch(self, batch_size: int, world: int) -> int:
        raise NotImplementedError

    def batches(self, epoch: int, batch_size: int, rank: int, world: int, seed: int):
        raise NotImplementedError


class TensorBatches(BatchSource):
    """Mini-batches of in-memory tensors: a seeded permutation per epoch, rank r takes every
    world-th sample of it (the behaviour ``fit`` has always had for a Dataset)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def steps_per_epoch(self, batch_size, world):
        return max(1, math.ceil(math.ceil(len(self.x) / world) / batch_size))

    def batches(self, epoch, batch_size, rank, world, seed):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
        mine = perm[rank::world]
        for i in range(0, len(mine), batch_size):
            idx = mine[i:i + batch_size]
            yield self.x[idx], self.y[idx]


def fit(
    model: nn.Module,
    data: Dataset | BatchSource,
    cfg: TrainConfig,
    masks: dict[str, torch.Tensor] | None = None,
    callbacks: Sequence[Callback] = (),
    seed: int = 0,
    progress=None,
    trainable: Sequence[nn.Parameter] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (a Dataset's training split, or any BatchSource)
    under ``cfg``; see the module docstring.

    ``progress`` is a ``dcomp.cli.ui.TrainProgress``-like object (or None for silence).
    ``trainable`` restricts the optimizer to these parameters (default: all).
    """
    rank, world = dist_info()
    dev = _DEVICE
    if world > 1 and dev.type != "cpu":
        raise DcompError("multi-process training runs on the CPU (gloo backend): use --device cpu with torchrun")
    model.to(dev)
    masks = {k: v.bool().to(dev) for k, v in (masks or {}).items()}
    params = dict(model.named_parameters())
    missing = [k for k in masks if k not in params]
    if missing:
        raise DcompError(f"masks name parameters the model does not have: {', '.join(missing[:3])}")

    x_val = y_val = None
    if isinstance(data, BatchSource):
        if cfg.select == "best":
            raise DcompError("select=best needs a validation split of real data, and this batch source has "
                             "none; use select=last")
        source = data
    else:
        x_train, y_train = data.x_train, data.y_train
        if cfg.select == "best":
            x_train, y_train, x_val, y_val = data.split_validation(cfg.val_fraction)
        source = TensorBatches(x_train, y_train)

    steps_per_epoch = source.steps_per_epoch(cfg.batch_size, world)
    total = steps_per_epoch * cfg.epochs

    opt_params = list(trainable) if trainable is not None else list(model.parameters())
    if not opt_params:  # callbacks drive every weight (e.g. all quantized, no biases): keep an lr schedule
        opt_params = [nn.Parameter(torch.zeros(0))]
    optimizer = make_optimizer(opt_params, cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    runner: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model)

    ctx = TrainContext(model=model, optimizer=optimizer, config=cfg, masks=masks, params=params,
                       steps_per_epoch=steps_per_epoch, total_steps=total, rank=rank, world_size=world)
    all_callbacks: list[Callback] = ([MaskKeeper()] if masks else []) + list(callbacks)
    for cb in all_callbacks:
        cb.on_train_begin(ctx)

    history: list[dict[str, float]] = []
    best_state, best_acc, best_epoch = None, -1.0, None
    if progress is not None:
        progress.start(cfg.epochs, steps_per_epoch)
    model.train()
    for epoch in range(cfg.epochs):
        ctx.epoch = epoch
        loss_sum, correct, seen = 0.0, 0, 0
        for xb, yb in source.batches(epoch, cfg.batch_size, rank, world, seed):
            xb, yb = xb.to(dev), yb.to(dev)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * _lr_factor(cfg, ctx.step, total)
            for cb in all_callbacks:
                cb.before_batch(ctx)
            out = runner(xb)
            loss = F.cross_entropy(out, yb)
            for cb in all_callbacks:
                loss = cb.compute_loss(ctx, xb, out, yb, loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for cb in all_callbacks:
                cb.after_backward(ctx)
            optimizer.step()
            ctx.step += 1
            for cb in all_callbacks:
                cb.after_step(ctx)
            loss_sum += float(loss.detach()) * len(xb)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(xb)
            if progress is not None:
                progress.advance(loss=loss_sum / seen, acc=100.0 * correct / seen)
        for cb in all_callbacks:
            cb.on_epoch_end(ctx)
        rec = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1)}
        if x_val is not None:
            val = evaluate(model, x_val, y_val)
            rec["val_top1"] = val["top1"]
            if val["top1"] > best_acc:
                best_acc, best_epoch = val["top1"], epoch + 1
                best_state = copy.deepcopy(model.state_dict())
        history.append(rec)
        if progress is not None:
            progress.epoch_done(rec)
    for cb in all_callbacks:
        cb.on_train_end(ctx)
    if progress is not None:
        progress.stop()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    identical = None
    if world > 1:
        import torch.distributed as dist

        sums = [None] * world
        dist.all_gather_object(sums, _mask_checksum(ctx.masks))
        identical = len(set(sums)) == 1
        if not identical:
            raise DcompError(f"masks diverged across ranks (checksums {sums}); this is a bug, please report it")
    model.to("cpu")
    final_masks = {k: v.to("cpu") for k, v in ctx.masks.items()}
    return TrainResult(history=history, best_epoch=best_epoch, masks=final_masks, masks_identical=identical)
