"""Retraining a compressed checkpoint: the masks are kept (pruned weights stay exactly zero),
and a quantized checkpoint is fine-tuned by its centroids (assignments fixed).

Training-time methods (schedules, surgery, regularisers, distillation) come in as callbacks of
the one training loop (dcomp.train); this module only wires a checkpoint to it.
"""

from __future__ import annotations

from typing import Sequence

from dcomp.data import Dataset
from dcomp.formats.checkpoint import Checkpoint
from dcomp.train import Callback, TrainConfig, TrainResult, evaluate, fit


def retrain(ckpt: Checkpoint, data: Dataset, cfg: TrainConfig, callbacks: Sequence[Callback] = (),
            seed: int = 0, progress=None, trust_pickle: bool = False) -> tuple[Checkpoint, TrainResult]:
    """Fine-tune ``ckpt`` on ``data``; returns a new checkpoint (no provenance added) and the result."""
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
