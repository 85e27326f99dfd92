"""Train a model from scratch (the dense baseline that compression starts from)."""

from __future__ import annotations

from typing import Annotated

import typer

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, DataOpt, EpochsOpt, OutputOpt, ResizeOpt
from dcomp.cli.ui import TrainProgress, kv_table


@common.with_train_options(lr=0.1, weight_decay=5e-4)
def train(
    arch: Annotated[str, typer.Option("--arch", help="zoo name (see `dcomp zoo`) or package.module:factory")] = "lenet-300-100",
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = None,
    resize: ResizeOpt = None,
    epochs: EpochsOpt = 20,
    output: OutputOpt = None,
    train_opts: dict | None = None,
):
    import torch

    from dcomp.data import load_dataset
    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.formats.model_input import parse_arch_kwargs
    from dcomp.models import ZOO, build_from_factory, build_zoo
    from dcomp.train import evaluate, fit

    cfg = common.train_config(epochs=epochs, **train_opts)
    kwargs = parse_arch_kwargs(arch_kwargs)
    sink = common.plan_output(output)
    ds = load_dataset(data or "digits", resize)
    torch.manual_seed(common.state.seed)
    if arch in ZOO:
        model = build_zoo(arch, ds.input_shape, ds.num_classes, **kwargs)
        common.check_input_fits(model, ds.input_shape, common._data_words(ds.spec, resize))
        arch_d = {"kind": "zoo", "name": arch, "kwargs": kwargs}
    elif ":" in arch:
        from dcomp.models.arch import arch_record

        common.state.typed_archs.add(arch)
        model = build_from_factory(arch, kwargs)
        common.check_input_fits(model, ds.input_shape, common._data_words(ds.spec, resize))
        arch_d, note = arch_record(model, ds.input_shape, arch, kwargs)  # as data when it can: later commands import nothing
        if note:
            common.note_for_output(f"note: {arch} is stored as a reference, not as a graph ({note}); later commands on the "
                       f"output need --arch {arch} again (or --trust-pickle)")
    else:
        raise common.UsageError(f"unknown architecture {arch!r}: zoo models are {', '.join(ZOO)} (or use package.module:factory)")

    con = common.console()
    progress = TrainProgress(con, "train")
    result = fit(model, ds, cfg, seed=common.state.seed, progress=progress)
    test = evaluate(model, ds.x_test, ds.y_test)

    ckpt = Checkpoint(arch=arch_d, state_dict={}, input_shape=list(ds.input_shape), num_classes=ds.num_classes,
                      data={"spec": ds.spec, "resize": resize})
    ckpt.update_from_model(model)
    metrics = {"test_top1": test["top1"], "test_loss": test["loss"], "final_train_loss": result.history[-1]["loss"] if result.history else None}
    if result.best_epoch is not None:
        metrics["best_epoch"] = result.best_epoch
    if result.masks_identical is not None:
        metrics["ranks"] = torch.distributed.get_world_size()
        metrics["masks_identical"] = result.masks_identical
    ckpt.add_provenance("train", {"arch": arch, "arch_kwargs": kwargs, "data": ds.spec, "resize": resize,
                                  "seed": common.state.seed, **cfg.model_dump()}, metrics)
    dest = sink.write(ckpt.to_bytes())
    summary = {"output": dest, "arch": arch, "data": ds.describe(), "params": ckpt.param_count(),
               "test": test, "epochs": cfg.epochs, **({"best_epoch": result.best_epoch} if result.best_epoch else {})}
    if result.masks_identical is not None:
        summary["ranks"] = metrics["ranks"]
        summary["masks_identical"] = True
    common.emit(summary, lambda c: c.print(kv_table("trained", {
        "arch": arch, "data": ds.spec, "params": ckpt.param_count(),
        "test top-1 %": test["top1"], "test loss": test["loss"], "output": dest})))

