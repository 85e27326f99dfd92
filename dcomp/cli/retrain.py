"""Fine-tune a pruned or quantized checkpoint with its masks kept (pruned weights stay zero),
optionally with a training-time method: AGP (--method agp), Dynamic Network Surgery
(--method dns), IHT/DSD (--method iht|dsd), L1 / group-lasso regularisers (--l1, --group-lasso,
--remove-below for structural removal afterwards) and distillation (--teacher). With --data-free
--teacher T, no real training sample is read: a DAFL generator trained against T in the same
iterations supplies the batches (--data then only gives the test split for reporting)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, EpochsOpt, InputArg, OutputOpt, ResizeOpt
from dcomp.cli.ui import TrainProgress, kv_table
from dcomp.errors import UsageError

P_AGP = "AGP (--method agp)"
P_DNS = "Dynamic Network Surgery (--method dns)"
P_IHT = "IHT / DSD (--method iht|dsd)"
P_REG = "Regularisers"
P_KD = "Distillation"
P_DF = "Data-free (DAFL)"
P_SWS = "Soft weight-sharing (--method sws)"


def _opt(*names, help, panel, **kw):
    return typer.Option(*names, help=help, rich_help_panel=panel, **kw)


def _config(cls, values: dict, flags: dict[str, str]):
    """Build a pydantic config from option values; errors become one line naming the option."""
    from pydantic import ValidationError

    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if field in flags:
            got = "" if "got" in msg else f" (got {err.get('input')!r})"
            raise UsageError(f"{flags[field]}: {msg}{got}") from None
        raise UsageError(msg) from None


@common.with_train_options()
def retrain(
    model: InputArg = None,
    output: OutputOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = None,
    resize: ResizeOpt = None,
    epochs: EpochsOpt = 5,
    # ---- mask methods
    schedule: Annotated[Optional[str], typer.Option("--schedule", hidden=True, help="old spelling of --method agp")] = None,
    initial_sparsity: Annotated[Optional[float], _opt("--initial-sparsity", help="AGP s_i [default 0]", panel=P_AGP)] = None,
    final_sparsity: Annotated[Optional[float], _opt("--final-sparsity", help="AGP s_f [default 0.9]", panel=P_AGP)] = None,
    start: Annotated[Optional[float], _opt("--start", help="AGP t0: first mask update, in --schedule-unit [default 0]", panel=P_AGP)] = None,
    end: Annotated[Optional[float], _opt("--end", help="AGP: last update no later than this, in --schedule-unit [default: 3/4 of training]", panel=P_AGP)] = None,
    every: Annotated[Optional[float], _opt("--every", help="AGP dt: interval between mask updates, in --schedule-unit [default 1]", panel=P_AGP)] = None,
    schedule_unit: Annotated[str, _opt("--schedule-unit", help="unit of --start/--end/--every and of the IHT phase lengths: epochs (fractions allowed) or steps (optimizer steps)", panel=P_AGP)] = "epochs",
    method: Annotated[Optional[str], _opt("--method", help="agp (gradual pruning on Zhu & Gupta's cubic schedule), dns (Dynamic Network Surgery), iht (sparse first) or dsd (dense first), all ending sparse; or sws (soft weight-sharing: a learned Gaussian-mixture prior gathers the weights into few clusters with low label entropy, masks kept)", panel=P_DNS)] = None,
    dns_c: Annotated[Optional[float], _opt("--dns-c", help="threshold t = mean|w| + c*std|w| per layer; a, b = 0.9t, 1.1t [default 1.0]", panel=P_DNS)] = None,
    dns_gamma: Annotated[Optional[float], _opt("--dns-gamma", help="mask updated with probability (1+gamma*iter)^-power [default 1e-4]", panel=P_DNS)] = None,
    dns_power: Annotated[Optional[float], _opt("--dns-power", help="see --dns-gamma [default 1]", panel=P_DNS)] = None,
    dns_stop: Annotated[Optional[int], _opt("--dns-stop", help="iteration (optimizer step) after which the mask is frozen [default: never]", panel=P_DNS)] = None,
    sparsity: Annotated[Optional[float], _opt("--sparsity", help="IHT/DSD per-layer sparsity of the sparse phases [default: the input masks']", panel=P_IHT)] = None,
    sparse_len: Annotated[Optional[float], _opt("--sparse-len", help="IHT/DSD sparse phase length, in --schedule-unit [default 2]", panel=P_IHT)] = None,
    dense_len: Annotated[Optional[float], _opt("--dense-len", help="IHT/DSD dense phase length, in --schedule-unit [default 1]", panel=P_IHT)] = None,
    sws_components: Annotated[Optional[int], _opt("--sws-components", help="mixture components per layer; quantize afterwards with bits = log2 of it [default 8]", panel=P_SWS)] = None,
    sws_tau: Annotated[Optional[float], _opt("--sws-tau", help="weight of the mixture prior against the data term [default 0.005]", panel=P_SWS)] = None,
    sws_lr: Annotated[Optional[float], _opt("--sws-lr", help="Adam learning rate of the mixture (means in units of the layer's weight std) [default 0.001]", panel=P_SWS)] = None,
    # ---- regularisers
    l1: Annotated[Optional[float], _opt("--l1", help="L1 penalty lambda on Linear/Conv weights", panel=P_REG)] = None,
    group_lasso: Annotated[Optional[float], _opt("--group-lasso", help="group-lasso lambda (sum of un-squared group L2 norms)", panel=P_REG)] = None,
    groups: Annotated[str, _opt("--groups", help="group kinds, comma separated: filter, channel, shape (Conv) / row, column (Linear)", panel=P_REG)] = "filter",
    remove_below: Annotated[Optional[float], _opt("--remove-below", help="after training, remove groups whose L2 norm is below this (structurally)", panel=P_REG)] = None,
    # ---- distillation
    teacher: Annotated[Optional[str], _opt("--teacher", help="teacher model file: adds Hinton KD (and CC with --cc-weight); with --data-free, the teacher the generator is trained against", panel=P_KD)] = None,
    kd_temperature: Annotated[Optional[float], _opt("--kd-temperature", help="softmax temperature T [default 4]", panel=P_KD)] = None,
    kd_alpha: Annotated[Optional[float], _opt("--kd-alpha", help="weight of the soft term; 1-alpha weighs CE [default 0.9]", panel=P_KD)] = None,
    cc_weight: Annotated[Optional[float], _opt("--cc-weight", help="correlation-congruence weight [default 0: off]", panel=P_KD)] = None,
    cc_gamma: Annotated[Optional[float], _opt("--cc-gamma", help="Gaussian kernel gamma [default 0.4]", panel=P_KD)] = None,
    cc_order: Annotated[Optional[int], _opt("--cc-order", help="P: Taylor order of the kernel [default 2]", panel=P_KD)] = None,
    # ---- data-free
    data_free: Annotated[bool, _opt("--data-free", help="read no real training sample: distil from --teacher on batches of a DAFL generator", panel=P_DF)] = False,
    iterations: Annotated[Optional[int], _opt("--iterations", help="generated batches per epoch [default 120]", panel=P_DF)] = None,
    generator_width: Annotated[Optional[int], _opt("--generator-width", help="generator channels [default 128, the paper's]", panel=P_DF)] = None,
    lr_g: Annotated[Optional[float], _opt("--lr-g", help="generator Adam learning rate [default 0.2]", panel=P_DF)] = None,
    input_mean: Annotated[Optional[str], _opt("--input-mean", help="per-channel mean of the teacher's inputs [default 0]", panel=P_DF)] = None,
    input_std: Annotated[Optional[str], _opt("--input-std", help="per-channel std of the teacher's inputs [default 1]", panel=P_DF)] = None,
    generator: Annotated[Optional[str], _opt("--generator", help="start from a generator saved by `distill --save-generator`", panel=P_DF)] = None,
    train_opts: dict | None = None,
):
    from dcomp.compressors.distill import DistillConfig, check_teacher, load_teacher
    from dcomp.compressors.dsd import IHTConfig
    from dcomp.compressors.regularizers import GroupLassoConfig, L1Config
    from dcomp.compressors.schedules import AGPConfig
    from dcomp.compressors.surgery import DNSConfig
    from dcomp.retrain import RetrainConfig, apply_retrain
    from dcomp.stages import StageContext

    # ---- every option is checked before anything is read or trained
    train_cfg = common.train_config(epochs=epochs, **train_opts)
    if schedule is not None and schedule != "agp":
        raise UsageError(f"--schedule: only 'agp' is known, got {schedule!r} (the new spelling is --method agp)")
    if method == "agp":  # --schedule agp is the old spelling: the AGP code below keys on `schedule`
        if schedule is not None:
            raise UsageError("give AGP once: --method agp (--schedule agp is its old spelling)")
        schedule, method = "agp", None
    if method is not None and method not in ("dns", "iht", "dsd", "sws"):
        raise UsageError(f"--method: choose agp, dns, iht, dsd or sws, got {method!r}")
    if schedule and method:
        raise UsageError(f"--method agp and --method {method} both change the masks; choose one")
    if schedule_unit not in ("epochs", "steps"):
        raise UsageError(f"--schedule-unit: choose epochs or steps, got {schedule_unit!r}")
    _unused(schedule == "agp", "--method agp", initial_sparsity=initial_sparsity, final_sparsity=final_sparsity,
            start=start, end=end, every=every)
    _unused(method == "dns", "--method dns", dns_c=dns_c, dns_gamma=dns_gamma, dns_power=dns_power, dns_stop=dns_stop)
    _unused(method in ("iht", "dsd"), "--method iht or dsd", sparsity=sparsity, sparse_len=sparse_len, dense_len=dense_len)
    _unused(method == "sws", "--method sws", sws_components=sws_components, sws_tau=sws_tau, sws_lr=sws_lr)
    _unused(group_lasso is not None, "--group-lasso", remove_below=remove_below)
    _unused(data_free, "--data-free", iterations=iterations, generator_width=generator_width, lr_g=lr_g,
            input_mean=input_mean, input_std=input_std, generator=generator)
    if data_free and teacher is None:
        raise UsageError("--data-free distils from a teacher: give --teacher MODEL")
    if data_free:
        _unused(False, "--teacher without --data-free", kd_temperature=kd_temperature, kd_alpha=kd_alpha,
                cc_weight=cc_weight, cc_gamma=cc_gamma, cc_order=cc_order)
    _unused(teacher is not None, "--teacher", kd_temperature=kd_temperature, kd_alpha=kd_alpha, cc_weight=cc_weight,
            cc_gamma=cc_gamma, cc_order=cc_order)

    parts: dict = {"train": train_cfg}
    if schedule == "agp":
        parts["agp"] = _config(AGPConfig, dict(initial_sparsity=initial_sparsity, final_sparsity=final_sparsity, start=start,
                                               end=end, every=every, unit=schedule_unit),
                               {"initial_sparsity": "--initial-sparsity", "final_sparsity": "--final-sparsity",
                                "start": "--start", "end": "--end", "every": "--every"})
    if method == "dns":
        parts["dns"] = _config(DNSConfig, dict(c=dns_c, gamma=dns_gamma, power=dns_power, stop=dns_stop),
                               {"c": "--dns-c", "gamma": "--dns-gamma", "power": "--dns-power", "stop": "--dns-stop"})
    if method in ("iht", "dsd"):
        parts["iht"] = _config(IHTConfig, dict(mode=method, sparsity=sparsity, sparse_len=sparse_len, dense_len=dense_len,
                                               unit=schedule_unit),
                               {"sparsity": "--sparsity", "sparse_len": "--sparse-len", "dense_len": "--dense-len"})
    if method == "sws":
        from dcomp.config.retrain import SWSConfig

        parts["sws"] = _config(SWSConfig, dict(components=sws_components, tau=sws_tau, lr=sws_lr),
                               {"components": "--sws-components", "tau": "--sws-tau", "lr": "--sws-lr"})
    if l1 is not None:
        parts["l1"] = _config(L1Config, dict(lam=l1), {"lam": "--l1"})
    if group_lasso is not None:
        kinds = [g.strip() for g in groups.split(",") if g.strip()]
        parts["group_lasso"] = _config(GroupLassoConfig, dict(lam=group_lasso, groups=kinds, remove_below=remove_below),
                                       {"lam": "--group-lasso", "groups": "--groups", "remove_below": "--remove-below"})
    if data_free:
        from dcomp.cli.distill import _floats
        from dcomp.compressors.dafl import DataFreeConfig

        parts["dafl"] = _config(DataFreeConfig, dict(teacher=teacher, iterations=iterations, generator_width=generator_width,
                                                     lr_g=lr_g, input_mean=_floats(input_mean, "--input-mean"),
                                                     input_std=_floats(input_std, "--input-std"), generator=generator),
                                {"iterations": "--iterations", "generator_width": "--generator-width", "lr_g": "--lr-g",
                                 "input_mean": "--input-mean", "input_std": "--input-std"})
    elif teacher is not None:
        parts["distill"] = _config(DistillConfig, dict(teacher=teacher, temperature=kd_temperature, alpha=kd_alpha,
                                                       cc_weight=cc_weight, cc_gamma=cc_gamma, cc_order=cc_order),
                                   {"temperature": "--kd-temperature", "alpha": "--kd-alpha", "cc_weight": "--cc-weight",
                                    "cc_gamma": "--cc-gamma", "cc_order": "--cc-order"})
    cfg = _config(RetrainConfig, parts, {})

    inp = common.read_input(model)
    sink = common.plan_output(output, inp, reads=(teacher,))
    trust = common.state.trust_pickle
    teacher_ckpt = load_teacher(teacher, trust) if teacher is not None else None
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, data, resize)
    if teacher_ckpt is not None:
        check_teacher(teacher_ckpt, ckpt, f"--teacher {teacher}")
    if data_free:  # only the test split, and only when --data names it
        from dcomp.compressors.dafl import TestSplitOnly

        ds = TestSplitOnly(common.dataset_for(ckpt, data, resize)) if data is not None else None
        progress = None  # apply_retrain shows the data-free progress
    else:
        ds = common.dataset_for(ckpt, data, resize)
        progress = TrainProgress(common.console(), "retrain")
    ctx = StageContext(data=ds, console=common.console(), seed=common.state.seed, trust_pickle=trust)
    res = apply_retrain(ckpt, cfg, ctx, progress=progress, teacher_ckpt=teacher_ckpt)
    m = res.metrics
    dest = sink.write(res.checkpoint.to_bytes())
    if "top1_before" not in m:
        rows = {"test top-1": "not measured (give --data for the real test split)"}
    else:
        rows = {"test top-1 % before": m["top1_before"]}
    if "top1_before_removal" in m:
        rows["test top-1 % before removal"] = m["top1_before_removal"]
        rows["units removed"] = ", ".join(f"{k}: {v}" for k, v in m["units_removed"].items()) or "none"
    if "top1_after" in m:
        rows["test top-1 % after"] = m["top1_after"]
    rows.update({"non-zero / params": f"{m['nonzero']:,} / {m['params']:,} (sparsity {m['sparsity']:.2%})"})
    if cfg.mask_method() or cfg.sws is not None:
        rows["method"] = method or schedule
    for name, lay in m.get("sws_layers", {}).items():
        if "label_entropy_bits" in lay:
            rows[f"{name} label entropy"] = f"{lay['label_entropy_bits']:.2f} bits/weight (mixture {lay['mixture_entropy_bits']:.2f})"
    if "dns_spliced" in m:
        rows["spliced back"] = m["dns_spliced"]
    rows["output"] = dest
    common.emit({"output": dest, **m}, lambda c: c.print(kv_table("retrained", rows)))


def _unused(active: bool, needs: str, **values) -> None:
    """An option of a method that is not selected is a mistake worth one line, not silence."""
    if active:
        return
    given = [k for k, v in values.items() if v is not None]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} only applies with {needs}")
