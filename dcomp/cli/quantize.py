"""Share weights by k-means: each layer's non-pruned weights become 2^bits centroids (codebook +
per-weight index), optionally with centroid fine-tuning. Default bits: 8 for conv, 5 for fc.
A checkpoint already quantized to fewer bits than asked is refused unless --requantize.

--mode ttq (Trained Ternary Quantization: 3 values per layer, 0 below --threshold x max|w|,
learned positive/negative scales) and --mode binary (sign(w) x mean|w|, per layer or
--scale channel) train with a straight-through estimator for --finetune-epochs epochs (0: no
training, just the initial ternary/binary weights). By default the FIRST AND LAST layers are
kept at k-means precision (--conv-bits/--fc-bits, default 8/5), their centroids fine-tuned in
the same loop (at --centroid-lr, default a tenth of --lr); --no-keep-first-last makes every
layer ternary/binary."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, OutputOpt, ResizeOpt
from dcomp.cli.ui import TrainProgress, fmt, kv_table


@common.with_train_options()
def quantize(
    model: InputArg = None,
    output: OutputOpt = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="bits for every layer (k = 2^bits clusters), 1..16")] = None,
    conv_bits: Annotated[Optional[int], typer.Option("--conv-bits", help="bits for conv weights (default: --bits, else 8)")] = None,
    fc_bits: Annotated[Optional[int], typer.Option("--fc-bits", help="bits for fully connected weights (default: --bits, else 5)")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="REGEX=BITS for weights whose name matches (re.search; last match wins); repeatable")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="leave weights whose name matches REGEX unquantized; repeatable")] = None,
    init: Annotated[str, typer.Option("--init", help="k-means initialisation: linear, density or random (uses --seed)")] = "linear",
    max_iter: Annotated[int, typer.Option("--max-iter", min=1, help="Lloyd iterations at most")] = 1000,
    codebook: Annotated[str, typer.Option("--codebook", help="kmeans (shared values from k-means) or uniform (2^bits equally spaced levels)")] = "kmeans",
    rd_lambda: Annotated[float, typer.Option("--rd-lambda", help="rate-distortion rounding: minimise (w-c)^2/var(w) + LAMBDA x code length of c in bits (fewer index bits once entropy-coded; 0: nearest level)")] = 0.0,
    requantize: Annotated[bool, typer.Option("--requantize", help="allow more bits than a layer is already quantized to (keeps its values)")] = False,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0, help="epochs of centroid fine-tuning (needs data)")] = 0,
    centroid_lr: Annotated[Optional[float], typer.Option("--centroid-lr", help="centroid learning rate (default: --lr, scheduled)")] = None,
    bias_bits: Annotated[Optional[int], typer.Option("--bias-bits", help="also share biases and BatchNorm weight/bias values: 2^N per tensor (k-means; default off)")] = None,
    float16: Annotated[bool, typer.Option("--float16", help="round codebooks, biases and BatchNorm to float16 values (pack stores them in half the bytes, losslessly)")] = False,
    mode: Annotated[str, typer.Option("--mode", help="kmeans (weight sharing), ttq (ternary, learned scales) or binary")] = "kmeans",
    threshold: Annotated[float, typer.Option("--threshold", help="ttq: |w| <= threshold x max|w| of the layer becomes 0")] = 0.05,
    scale: Annotated[str, typer.Option("--scale", help="binary: one scale per 'layer' (1 bit) or per output 'channel'")] = "layer",
    keep_first_last: Annotated[bool, typer.Option("--keep-first-last/--no-keep-first-last", help="ttq/binary: keep the first and last layer at k-means precision (default: kept)")] = True,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = None,
    resize: ResizeOpt = None,
    train_opts: dict | None = None,
):
    from pydantic import ValidationError

    from dcomp.compressors.quantization import QuantizeConfig, apply_quantize

    finetune = None
    if finetune_epochs > 0:
        finetune = common.train_config(epochs=finetune_epochs, **train_opts)
    try:
        cfg = QuantizeConfig(bits=bits, conv_bits=conv_bits, fc_bits=fc_bits, layers=common.layer_values(layer, "BITS", "fc1=4", int),
                             exclude=list(exclude or []), init=init, max_iter=max_iter, requantize=requantize,
                             finetune=finetune, centroid_lr=centroid_lr, float16=float16,
                             mode=mode, threshold=threshold, scale=scale, keep_first_last=keep_first_last,
                             bias_bits=bias_bits, codebook=codebook, rd_lambda=rd_lambda)
    except ValidationError as e:
        raise common.UsageError(_message(e)) from None

    sink, ckpt, ctx = common.stage_input(model, output, arch, arch_kwargs, data, resize, needs_data=finetune is not None)
    label = "centroid fine-tune" if mode == "kmeans" else f"{mode} training"
    result = apply_quantize(ckpt, cfg, ctx, progress=TrainProgress(ctx.console, label) if finetune else None)
    out, metrics = result.checkpoint, result.metrics
    dest = sink.write(out.to_bytes())
    common.emit({"output": dest, **metrics}, lambda c: _render(c, metrics, dest))


def _message(e) -> str:
    err = e.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error":
        return msg
    return common.pydantic_message(e)


def _render(c, metrics: dict, dest: str) -> None:
    title = {"ttq": "quantized (ternary, TTQ)", "binary": "quantized (binary)"}.get(metrics.get("mode"),
                                                                                 "quantized (k-means weight sharing)")
    t = Table(title=title, title_justify="left")
    for col in ("layer", "bits", "clusters", "non-zeros", "MSE", "SQNR dB", "note"):
        t.add_column(col, justify="left" if col in ("layer", "note") else "right", overflow="fold")
    for name, m in metrics["layers"].items():
        sqnr = "exact" if m["sqnr_db"] is None else f"{m['sqnr_db']:.1f}"
        t.add_row(name, str(m["bits"]), f"{m['clusters']}/{m['k']}", fmt(m["nonzero"]), f"{m['mse']:.3g}", sqnr,
                  m.get("note", "" if m["converged"] else f"stopped after {m['iterations']} iterations"))
    for name, why in metrics["skipped"].items():
        t.add_row(name, "-", "-", "-", "-", "-", why)
    c.print(t)
    rows = {}
    for key, label in (("top1_before", "test top-1 % before"), ("top1_quantized", "test top-1 % quantized"),
                       ("top1_finetuned", "test top-1 % fine-tuned"), ("top1_biases", "test top-1 % biases shared"),
                       ("top1_float16", "test top-1 % float16")):
        if key in metrics:
            rows[label] = metrics[key]
    if "float16" in metrics:
        f16 = metrics["float16"]
        rows["float16"] = f"{f16['rounded']} tensors rounded, max relative change {f16['max_relative_change']:.2g}"
    rows["output"] = dest
    c.print(kv_table("accuracy" if "top1_before" in metrics else "result", rows))
