"""Low-rank factorization: each Linear layer becomes two smaller Linear layers (truncated SVD),
each Conv2d a kxk conv to fewer channels plus a 1x1 conv (--conv channel, the default) or a kx1
plus a 1xk conv (--conv spatial). The result is a smaller DENSE model: faster in stock
onnxruntime without a sparse kernel. Layers whose factors would have as many or more parameters
or MACs are left whole and listed. The factors are ordinary layers: prune, quantize, retrain,
export and bench treat them like any other.

Rank per layer: --rank R (layers whose full rank is <= R stay whole), --energy E (the smallest
rank keeping fraction E of the squared singular values), or --ratio Q (the largest rank whose
factors have at most Q of the layer's weights); --layer REGEX=R sets one layer's rank.

Examples:

\b
  dcomp factorize model.pt --energy 0.9 -o lowrank.pt
  dcomp factorize model.pt --ratio 0.3 --finetune-epochs 3 --data digits -o lowrank.pt
  dcomp factorize model.pt --rank 16 --conv spatial --exclude classifier -o lowrank.pt
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, OutputOpt, ResizeOpt


@common.with_train_options()
def factorize(
    model: InputArg = None,
    output: OutputOpt = None,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", help="rank of every factorized layer")] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", help="per layer, keep this fraction of the squared singular values, in (0, 1]")] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", help="per layer, factors with at most this fraction of its weights, in (0, 1)")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="REGEX=RANK for the layer whose name matches (last match wins); repeatable")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="leave layers whose name matches REGEX whole; repeatable")] = None,
    conv: Annotated[str, typer.Option("--conv", help="Conv2d scheme: channel (kxk to r channels + 1x1) or spatial (kx1 + 1xk)")] = "channel",
    force: Annotated[bool, typer.Option("--force", help="factorize also where the factors have more weights or MACs")] = False,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0, help="retrain the factorized model this many epochs (needs data)")] = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = None,
    resize: ResizeOpt = None,
    train_opts: dict | None = None,
):
    from dcomp.compressors.lowrank import FactorizeConfig, apply_factorize

    finetune = common.train_config(epochs=finetune_epochs, **train_opts) if finetune_epochs > 0 else None
    cfg = common.build_config(FactorizeConfig, rank=rank, energy=energy, ratio=ratio,
                              layers=common.layer_values(layer, "RANK", "fc1=64", int), exclude=list(exclude or []), conv=conv,
                              force=force, finetune=finetune)

    sink, ckpt, ctx = common.stage_input(model, output, arch, arch_kwargs, data, resize, needs_data=finetune is not None)
    result = apply_factorize(ckpt, cfg, ctx)
    dest = sink.write(result.checkpoint.to_bytes())
    common.emit({"output": dest, **result.metrics}, lambda c: _render(c, result.metrics, dest))


def _render(c, metrics: dict, dest: str) -> None:
    from rich.table import Table

    from dcomp.cli.ui import fmt, kv_table

    t = Table(title="factorized (truncated SVD)", title_justify="left")
    for col in ("layer", "shape", "rank", "weights", "MACs", "rel. error", "note"):
        t.add_column(col, justify="left" if col in ("layer", "shape", "note") else "right")
    for r in metrics["layers"]:
        done = "params_after" in r and r["note"].startswith("factorized")
        t.add_row(r["layer"], "x".join(map(str, r["shape"])),
                  f"{r['rank']}/{r['full_rank']}" if "rank" in r else "-",
                  f"{fmt(r['params_before'])} -> {fmt(r['params_after'])}" if done else fmt(r["params_before"]),
                  f"{fmt(r['macs_before'])} -> {fmt(r['macs_after'])}" if done else fmt(r["macs_before"]),
                  f"{r['rel_error']:.3f}" if "rel_error" in r else "-", r.get("note", ""))
    c.print(t)
    rows = {
        "layer weights": f"{metrics['weights_before']:,} -> {metrics['weights_after']:,} "
                         f"({metrics['weights_after'] / max(metrics['weights_before'], 1):.1%})",
        "MACs per sample": f"{metrics['macs_before']:,} -> {metrics['macs_after']:,} "
                           f"({metrics['macs_after'] / max(metrics['macs_before'], 1):.1%})",
        "layers factorized": f"{metrics['factorized']} (left whole: {', '.join(metrics['left_whole']) or 'none'})",
    }
    for key, label in (("top1_before", "test top-1 % before"), ("top1_factorized", "test top-1 % factorized"),
                       ("top1_finetuned", "test top-1 % fine-tuned")):
        if key in metrics:
            rows[label] = metrics[key]
    rows["output"] = dest
    c.print(kv_table("overall", rows))
