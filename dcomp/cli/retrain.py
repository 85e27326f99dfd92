"""Fine-tune a pruned or quantized checkpoint with its masks kept (pruned weights stay zero)."""

from __future__ import annotations

from dcomp.cli import common
from dcomp.cli.common import (ArchKwargsOpt, ArchOpt, BatchSizeOpt, DataOpt, EpochsOpt, InputArg, LrOpt,
                              LrScheduleOpt, MomentumOpt, OptimizerOpt, OutputOpt, ResizeOpt, SelectOpt,
                              WeightDecayOpt)
from dcomp.cli.ui import TrainProgress, kv_table


def retrain(
    model: InputArg = None,
    output: OutputOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = None,
    resize: ResizeOpt = None,
    epochs: EpochsOpt = 5,
    batch_size: BatchSizeOpt = 64,
    lr: LrOpt = 0.01,
    optimizer: OptimizerOpt = "sgd",
    momentum: MomentumOpt = 0.9,
    weight_decay: WeightDecayOpt = 0.0,
    lr_schedule: LrScheduleOpt = "cosine",
    select: SelectOpt = "last",
):
    from dcomp.retrain import accuracy
    from dcomp.retrain import retrain as run_retrain

    cfg = common.train_config(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                              weight_decay=weight_decay, lr_schedule=lr_schedule, select=select)
    inp = common.read_input(model)
    sink = common.plan_output(output, inp)
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, data, resize)
    ds = common.dataset_for(ckpt, data, resize)
    trust = common.state.trust_pickle
    before = accuracy(ckpt, ds, trust)
    out, result = run_retrain(ckpt, ds, cfg, seed=common.state.seed,
                              progress=TrainProgress(common.console(), "retrain"), trust_pickle=trust)
    after = accuracy(out, ds, trust)
    metrics = {"top1_before": before, "top1_after": after, "nonzero": out.nonzero_count(), "params": out.param_count()}
    out.add_provenance("retrain", {"data": ds.spec, "seed": common.state.seed, **cfg.model_dump()}, metrics)
    dest = sink.write(out.to_bytes())
    common.emit({"output": dest, **metrics},
                lambda c: c.print(kv_table("retrained", {"test top-1 % before": before, "test top-1 % after": after,
                                                          "non-zero / params": f"{metrics['nonzero']:,} / {metrics['params']:,}",
                                                          "output": dest})))
