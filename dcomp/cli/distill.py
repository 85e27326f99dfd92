"""Distil a trained model (the teacher) into a smaller student. With --data-free no real training
sample is read: DAFL (Chen et al., ICCV 2019) trains a generator against the teacher and distils
the student on its batches. The student is a zoo model (--student lenet-5), a narrower copy of
the teacher (--width 0.5) or a pruned/shrunk checkpoint (--student FILE, masks kept). --data only
supplies the real test split to report accuracy (and, without --data-free, the training split
for ordinary KD)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, OutputOpt, ResizeOpt
from dcomp.errors import UsageError

P_DAFL = "Data-free (DAFL)"


def _floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected numbers separated by commas, e.g. 0.1307 or 0.5,0.5,0.5; got {text!r}") from None


@common.with_train_options(batch_size=512, lr=2e-3, optimizer="adam", weight_decay=0.0, lr_schedule="constant")
def distill(
    teacher: InputArg = None,
    output: OutputOpt = None,
    data_free: Annotated[bool, typer.Option("--data-free", help="DAFL: train on generated batches, read no real training sample")] = False,
    student: Annotated[Optional[str], typer.Option("--student", help="zoo name or model file (pruned/shrunk: weights and masks kept); default: the teacher's architecture")] = None,
    width: Annotated[Optional[float], typer.Option("--width", help="scale every free Linear/Conv layer's width (0.5: LeNet-5-half)")] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = None,
    resize: ResizeOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", min=0, help="epochs (data-free: of --iterations generated batches each)")] = 200,
    iterations: Annotated[Optional[int], typer.Option("--iterations", help="generated batches per epoch [default 120]", rich_help_panel=P_DAFL)] = None,
    latent_dim: Annotated[Optional[int], typer.Option("--latent-dim", help="generator noise size [default 100]", rich_help_panel=P_DAFL)] = None,
    generator_width: Annotated[Optional[int], typer.Option("--generator-width", help="generator channels [default 128, the paper's; CPU time grows with its square]", rich_help_panel=P_DAFL)] = None,
    lr_g: Annotated[Optional[float], typer.Option("--lr-g", help="generator Adam learning rate [default 0.2]", rich_help_panel=P_DAFL)] = None,
    oh: Annotated[Optional[float], typer.Option("--oh", help="one-hot loss weight [default 1]", rich_help_panel=P_DAFL)] = None,
    ie: Annotated[Optional[float], typer.Option("--ie", help="information-entropy loss weight [default 5]", rich_help_panel=P_DAFL)] = None,
    a: Annotated[Optional[float], typer.Option("--a", help="activation loss weight [default 0.1]", rich_help_panel=P_DAFL)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="softmax temperature of the student's KL (data-free) [default 1]; KD on real data: [default 4]")] = None,
    input_mean: Annotated[Optional[str], typer.Option("--input-mean", help="per-channel mean of the teacher's inputs, comma separated [default 0]", rich_help_panel=P_DAFL)] = None,
    input_std: Annotated[Optional[str], typer.Option("--input-std", help="per-channel std of the teacher's inputs [default 1]", rich_help_panel=P_DAFL)] = None,
    samples: Annotated[Optional[str], typer.Option("--samples", help="write a PNG grid of generated samples per class here", rich_help_panel=P_DAFL)] = None,
    save_generator: Annotated[Optional[str], typer.Option("--save-generator", help="write the trained generator here (for `retrain --data-free --generator`)", rich_help_panel=P_DAFL)] = None,
    train_opts: dict | None = None,
):
    from pathlib import Path

    from pydantic import ValidationError

    from dcomp.cli.ui import kv_table
    from dcomp.compressors.dafl import DAFLConfig, DistillStudentConfig, apply_distill
    from dcomp.stages import StageContext

    # ---- every option is checked before anything is read or trained
    dafl_opts = {"iterations": iterations, "latent_dim": latent_dim, "generator_width": generator_width, "lr_g": lr_g, "oh": oh, "ie": ie, "a": a,
                 "input_mean": _floats(input_mean, "--input-mean"), "input_std": _floats(input_std, "--input-std"),
                 "temperature": temperature if data_free else None}
    if not data_free:
        given = [k for k, v in dafl_opts.items() if v is not None]
        if given or samples or save_generator:
            flag = "--" + (given[0].replace("_", "-") if given else "samples" if samples else "save-generator")
            raise UsageError(f"{flag} only applies with --data-free")
        if data is None:
            raise UsageError("distilling on real data needs --data (its training split); add --data-free to use none")
    train_cfg = common.train_config(epochs=epochs, **train_opts)
    try:
        cfg = DistillStudentConfig(
            student=student, width=width, data_free=data_free, train=train_cfg,
            dafl=DAFLConfig(**{k: v for k, v in dafl_opts.items() if v is not None}),
            **({"kd_temperature": temperature} if temperature is not None and not data_free else {}))
    except ValidationError as e:
        raise UsageError(common.pydantic_message(e).replace("--dafl.", "--").replace("--value", "--student")) from None
    for flag, value in (("--samples", samples), ("--save-generator", save_generator)):
        if value is not None and (not Path(value).parent.exists() or Path(value).is_dir()):
            raise UsageError(f"{flag} {value}: give a file name in an existing folder")
    inp = common.read_input(teacher, "a teacher model file")
    sink = common.plan_output(output, inp, reads=(student, samples, save_generator))
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, data, resize)
    ds = common.dataset_for(ckpt, data, resize) if data is not None else None
    if ds is not None and data_free:  # the test split only, for reporting
        from dcomp.compressors.dafl import TestSplitOnly

        ds = TestSplitOnly(ds)
    ctx = StageContext(data=ds, console=common.console(), seed=common.state.seed,
                       trust_pickle=common.state.trust_pickle)
    res = apply_distill(ckpt, cfg, ctx, samples=samples, save_generator_to=save_generator)
    m = res.metrics
    dest = sink.write(res.checkpoint.to_bytes())
    rows = {"mode": "data-free (DAFL)" if data_free else f"KD on {ds.spec} training split",
            "student": f"{m['student_arch']}" + (f" x{width} width" if width else ""),
            "params teacher / student": f"{m['teacher_params']:,} / {m['student_params']:,}"}
    if "teacher_top1" in m:
        rows["teacher test top-1 %"] = m["teacher_top1"]
        rows["student test top-1 %"] = m["top1"]
    else:
        rows["test top-1"] = "not measured (give --data for the real test split)"
    rows["CPU seconds"] = m["cpu_seconds"]
    if samples:
        rows["samples"] = samples
    if save_generator:
        rows["generator"] = save_generator
    rows["output"] = dest
    common.emit({"output": dest, **m}, lambda c: c.print(kv_table("distilled", rows)))
