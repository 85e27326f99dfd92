"""Retraining a compressed checkpoint: the masks are kept (pruned weights stay exactly zero),
and a quantized checkpoint is fine-tuned by its centroids (assignments fixed).

Training-time methods (schedules, surgery, regularisers, distillation) come in as callbacks of
the one training loop (dcomp.train); this module wires a checkpoint to them:

    retrain(ckpt, data, train_cfg, callbacks)        the plain loop, masks kept
    RetrainConfig + apply_retrain(ckpt, cfg, ctx)    the stage: training config plus at most one
                                                     mask-changing method (agp | dns | iht) and any
                                                     of l1, group_lasso (+ structural removal),
                                                     distill, sws (soft weight-sharing: a learned
                                                     mixture prior); what `dcomp retrain` and recipes call
                                                     (``dafl``: data-free, the batches come from a
                                                     generator trained against the teacher)
"""

from __future__ import annotations

from typing import Sequence

from dcomp.config.retrain import GroupLassoConfig, RetrainConfig, default_train  # noqa: F401 - re-exported
from dcomp.data import Dataset
from dcomp.errors import UsageError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.stages import StageContext, StageResult
from dcomp.train import Callback, TrainConfig, TrainResult, evaluate, fit


def retrain(ckpt: Checkpoint, data: Dataset, cfg: TrainConfig, callbacks: Sequence[Callback] = (),
            seed: int = 0, progress=None, trust_pickle: bool = False) -> tuple[Checkpoint, TrainResult]:
    """Fine-tune ``ckpt`` on ``data``; returns a new checkpoint (no provenance added) and the result."""
    import torch

    torch.manual_seed(seed)
    model = ckpt.build_model(trust_pickle=trust_pickle)
    cbs = list(callbacks)
    trainable = None
    if ckpt.quant:
        from dcomp.compressors.quantization import CentroidFinetune

        centroid = CentroidFinetune(ckpt, model)
        cbs.append(centroid)
        trainable = centroid.trainable_parameters()
    result = fit(model, data, cfg, masks=ckpt.masks, callbacks=cbs, seed=seed, progress=progress,
                 trainable=trainable)
    out = ckpt.copy()
    out.update_from_model(model)
    out.masks = {k: v.clone() for k, v in result.masks.items()}
    for cb in cbs:
        cb.update_checkpoint(out)
    return out, result


def accuracy(ckpt: Checkpoint, data: Dataset, trust_pickle: bool = False) -> float:
    """Test top-1 of a checkpoint, in percent."""
    return evaluate(ckpt.build_model(trust_pickle=trust_pickle), data.x_test, data.y_test)["top1"]


def build_callbacks(ckpt: Checkpoint, cfg: RetrainConfig, seed: int = 0, teacher=None) -> list[Callback]:
    """The callbacks of ``cfg`` (``teacher``: an nn.Module, needed when cfg.distill is set)."""
    from dcomp.compressors.distill import Distiller
    from dcomp.compressors.dsd import IHT
    from dcomp.compressors.regularizers import Regularizer
    from dcomp.compressors.schedules import AGP
    from dcomp.compressors.surgery import DNS

    if ckpt.quant and (cfg.mask_method() or cfg.l1 or cfg.group_lasso or cfg.sws):
        raise UsageError("this checkpoint is quantized: retraining only fine-tunes its centroids; apply "
                         "AGP, DNS, IHT/DSD, --l1, --group-lasso or --method sws before `dcomp quantize`")
    cbs: list[Callback] = []
    if cfg.distill is not None:
        if teacher is None:
            raise UsageError("distillation needs a teacher model (--teacher)")
        cbs.append(Distiller(teacher, cfg.distill))
    if cfg.l1 is not None or cfg.group_lasso is not None:
        cbs.append(Regularizer(cfg.l1, cfg.group_lasso))
    if cfg.agp is not None:
        cbs.append(AGP(cfg.agp))
    if cfg.dns is not None:
        cbs.append(DNS(cfg.dns, seed=seed))
    if cfg.iht is not None:
        cbs.append(IHT(cfg.iht))
    if cfg.sws is not None:
        from dcomp.compressors.sws import SoftWeightSharing

        cbs.append(SoftWeightSharing(cfg.sws))
    return cbs


def _structural_removal(out: Checkpoint, gl: GroupLassoConfig, trust_pickle: bool) -> dict:
    from dcomp.compressors.regularizers import remove_groups

    model = out.build_model(trust_pickle=trust_pickle)
    units_before = out.param_count()
    model, info = remove_groups(model, out.input_shape, gl.remove_below, list(gl.groups), gl.layers)
    masked = set(out.masks) | set(info["shape_masks"])
    out.update_from_model(model)
    # shapes may have changed: a mask is now "the weight is non-zero" where a mask existed
    out.masks = {n: out.state_dict[n] != 0 for n in masked if n in out.state_dict}
    return {"units_removed": info["units_removed"], "shape_groups_zeroed": info["shape_groups_zeroed"],
            "params_before_removal": units_before, "params_after_removal": out.param_count()}


def apply_retrain(ckpt: Checkpoint, cfg: RetrainConfig, ctx: StageContext, progress=None,
                  teacher_ckpt: Checkpoint | None = None) -> StageResult:
    """Run the retrain stage; ``ctx.data`` must be set (data-free: optional, and only its test split
    is read, to report accuracy). Never modifies ``ckpt``."""
    if cfg.dafl is not None:
        return _apply_data_free(ckpt, cfg, ctx, progress, teacher_ckpt)
    if ctx.data is None:
        raise UsageError("retrain needs training data")
    teacher = None
    if cfg.distill is not None:
        from dcomp.compressors.distill import check_teacher, load_teacher

        teacher_ckpt = teacher_ckpt or load_teacher(cfg.distill.teacher, ctx.trust_pickle)
        check_teacher(teacher_ckpt, ckpt, f"--teacher {cfg.distill.teacher}")
        teacher = teacher_ckpt.build_model(trust_pickle=ctx.trust_pickle)
    callbacks = build_callbacks(ckpt, cfg, ctx.seed, teacher)
    if progress is None and ctx.console is not None:
        from dcomp.cli.ui import TrainProgress

        progress = TrainProgress(ctx.console, "retrain")
    before = accuracy(ckpt, ctx.data, ctx.trust_pickle)
    out, result = retrain(ckpt, ctx.data, cfg.train, callbacks, seed=ctx.seed, progress=progress,
                          trust_pickle=ctx.trust_pickle)
    metrics: dict = {"top1_before": before}
    for cb in callbacks:
        if hasattr(cb, "summary"):
            metrics.update(cb.summary())
    if cfg.group_lasso is not None and cfg.group_lasso.remove_below is not None:
        metrics["top1_before_removal"] = accuracy(out, ctx.data, ctx.trust_pickle)
        metrics.update(_structural_removal(out, cfg.group_lasso, ctx.trust_pickle))
    nonzero, params = out.nonzero_count(), out.param_count()
    metrics.update({"top1_after": accuracy(out, ctx.data, ctx.trust_pickle), "nonzero": nonzero,
                    "params": params, "sparsity": 1.0 - nonzero / max(params, 1)})
    if out.masks:
        kept = sum(int(m.sum()) for m in out.masks.values())
        total = sum(m.numel() for m in out.masks.values())
        metrics["masked_sparsity"] = 1.0 - kept / max(total, 1)
    out.add_provenance("retrain", {"data": ctx.data.spec, "seed": ctx.seed,
                                   **cfg.model_dump(exclude_none=True)}, metrics)
    return StageResult(out, metrics)


def _apply_data_free(ckpt: Checkpoint, cfg: RetrainConfig, ctx: StageContext, progress,
                     teacher_ckpt: Checkpoint | None) -> StageResult:
    """apply_retrain with ``cfg.dafl``: the loop's batches come from a DAFL generator trained
    against the teacher in the same iterations; the real data (if any) is only evaluated on."""
    from dcomp.compressors.dafl import DAFL, GeneratedBatches
    from dcomp.compressors.distill import check_teacher, load_teacher

    teacher_ckpt = teacher_ckpt or load_teacher(cfg.dafl.teacher, ctx.trust_pickle)
    check_teacher(teacher_ckpt, ckpt, f"--teacher {cfg.dafl.teacher}")
    teacher = teacher_ckpt.build_model(trust_pickle=ctx.trust_pickle)
    test = (ctx.data.x_test, ctx.data.y_test) if ctx.data is not None else None
    dafl = DAFL(teacher, ckpt.input_shape, cfg.dafl, seed=ctx.seed, eval_data=test)
    callbacks = build_callbacks(ckpt, cfg, ctx.seed) + [dafl]
    if progress is None and ctx.console is not None:
        from dcomp.cli.ui import DAFLProgress

        progress = DAFLProgress(ctx.console, "retrain (data-free)", dafl)
    metrics: dict = {"data_free": True}
    if ctx.data is not None:
        metrics["top1_before"] = accuracy(ckpt, ctx.data, ctx.trust_pickle)
    out, result = retrain(ckpt, GeneratedBatches(dafl), cfg.train, callbacks, seed=ctx.seed, progress=progress,
                          trust_pickle=ctx.trust_pickle)
    for cb in callbacks:
        if hasattr(cb, "summary"):
            metrics.update(cb.summary())
    if cfg.group_lasso is not None and cfg.group_lasso.remove_below is not None:
        metrics.update(_structural_removal(out, cfg.group_lasso, ctx.trust_pickle))
    nonzero, params = out.nonzero_count(), out.param_count()
    if ctx.data is not None:
        metrics["top1_after"] = accuracy(out, ctx.data, ctx.trust_pickle)
    metrics.update({"nonzero": nonzero, "params": params, "sparsity": 1.0 - nonzero / max(params, 1)})
    if out.masks:
        kept = sum(int(m.sum()) for m in out.masks.values())
        total = sum(m.numel() for m in out.masks.values())
        metrics["masked_sparsity"] = 1.0 - kept / max(total, 1)
    params_rec = {"data": "none (data-free)", "test_data": ctx.data.spec if ctx.data is not None else None,
                  "seed": ctx.seed, **cfg.model_dump(exclude_none=True)}
    out.add_provenance("retrain", params_rec, metrics)
    return StageResult(out, metrics)
