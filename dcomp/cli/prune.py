"""Prune a model: unstructured magnitude (layer-wise, global, Han's std), N:M, or structured
neuron/filter/channel pruning that makes the model smaller; optionally iterative with retraining.

With --data (or when retraining) the test top-1 is reported before and after, and BatchNorm
statistics are re-estimated on training data after each pruning step (--no-recalibrate-bn: off).
Iterative pruning (--rounds N) raises the target step by step: s*i/N (linear) or
s*(1-(1-i/N)^3) (cubic), retraining --epochs-per-round epochs with the masks kept after each step.

Examples:

\b
  dcomp prune model.pt --sparsity 0.9 -o pruned.pt
  dcomp prune model.pt --method global --sparsity 0.9 --layer 'fc3=0.5' -o pruned.pt
  dcomp prune model.pt --method nm --nm 2:4 -o sparse24.pt
  dcomp prune model.pt --method filter --sparsity 0.5 --data digits -o thin.pt
  dcomp prune --arch torchvision.models:mobilenet_v2 --arch-kwargs '{"num_classes": 10}' --method group -s 0.5 -o thin.pt
  dcomp prune model.pt --sparsity 0.9 --rounds 5 --schedule cubic --epochs-per-round 6 --lr 0.05 --data digits -o pruned.pt
  dcomp prune model.pt --max-drop 1 --data digits -o pruned.pt           # per-layer sparsities from a sweep
  dcomp prune model.pt --max-drop 1 --sweep sweep.json --data digits -o pruned.pt

--max-drop POINTS chooses each layer's sparsity from the per-layer curves of a sensitivity sweep
(--sweep FILE from 'dcomp sweep', else one measured now on the test split): the most weights
removed while the per-layer drops add up to at most POINTS; then it prunes them together, measures
the real drop on the sweep's split, and shrinks the budget while the drop exceeds POINTS.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, OutputOpt, ResizeOpt


@common.with_train_options(exclude=("select",))
def prune(
    model: InputArg = None,
    output: OutputOpt = None,
    method: Annotated[str, typer.Option("--method", "-m", help="magnitude (layer-wise), global, std, nm, neuron, filter, channel or group (every prunable group: filters, units, attention heads)")] = "magnitude",
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", "-s", help="fraction of weights (structured: units) to remove, in [0, 1)")] = None,
    quality: Annotated[Optional[float], typer.Option("--quality", help="std method: prune |w| <= quality x std(layer)")] = None,
    nm: Annotated[Optional[str], typer.Option("--nm", help="nm method: N kept of every M weights (default 2:4)")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="per-layer override REGEX=VALUE, e.g. 'fc3=0.7' (0 = dense); repeatable")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="leave layers matching REGEX dense (structured: also modules not to trace into); repeatable")] = None,
    importance: Annotated[Optional[str], typer.Option("--importance", help="structured: unit score l1, l2, channel, bn (BatchNorm scale) or taylor (needs --data)")] = None,
    global_rank: Annotated[bool, typer.Option("--global-rank", help="structured: rank units of all groups together instead of the same ratio per group")] = False,
    min_weights: Annotated[int, typer.Option("--min-weights", min=0, help="leave layers with fewer weights dense")] = 100,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="iterative pruning: reach the target in N prune-retrain steps")] = 1,
    epochs_per_round: Annotated[int, typer.Option("--epochs-per-round", min=0, help="retraining epochs after each round (needs data)")] = 0,
    schedule: Annotated[str, typer.Option("--schedule", help="sparsity over rounds: linear (s*i/N) or cubic")] = "linear",
    recalibrate_bn: Annotated[bool, typer.Option("--recalibrate-bn/--no-recalibrate-bn", help="with --data: re-estimate BatchNorm statistics after pruning")] = True,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", min=0.0, help="choose per-layer sparsities from a sweep: lose at most POINTS of top-1 before retraining, removing the most weights")] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="with --max-drop: a sweep JSON from dcomp sweep (default: sweep now)")] = None,
    data: DataOpt = None,
    resize: ResizeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    train_opts: dict | None = None,
):
    from dcomp.compressors.pruning import PruneConfig, apply_prune

    overrides = common.layer_values(layer)
    retrain_cfg = None
    if epochs_per_round > 0:
        retrain_cfg = common.train_config(epochs=epochs_per_round, **train_opts)
    cfg = common.build_config(PruneConfig, method=method, sparsity=sparsity, quality=quality, nm=nm, layers=overrides,
                              exclude=list(exclude or []), min_weights=min_weights, rounds=rounds,
                              schedule=schedule, retrain=retrain_cfg, recalibrate_bn=recalibrate_bn,
                              importance=importance, global_rank=global_rank, max_drop=max_drop, sweep=sweep)

    sink, ckpt, ctx = common.stage_input(model, output, arch, arch_kwargs, data, resize,
                                         needs_data=retrain_cfg is not None or max_drop is not None)
    result = apply_prune(ckpt, cfg, ctx)
    dest = sink.write(result.checkpoint.to_bytes())
    summary = {"output": dest, **result.metrics}
    common.emit(summary, lambda c: render(c, result.metrics, dest))


def render(c, metrics: dict, dest: str) -> None:
    """Per-layer table, overall line, and the rounds (if any), on the stderr console."""
    from rich.table import Table

    from dcomp.cli.ui import fmt, kv_table

    rows = metrics["layers"]
    if metrics["structured"]:
        t = Table(title=f"pruned ({metrics['method']}, {metrics['target']} of units)", title_justify="left")
        t.add_column("layer", no_wrap=True)
        t.add_column("shape", no_wrap=True)
        t.add_column("weights", justify="right", no_wrap=True)
        t.add_column("note", overflow="fold")
        for r in rows:
            t.add_row(r["layer"], f"{'x'.join(map(str, r['shape_before']))} -> {'x'.join(map(str, r['shape_after']))}",
                      f"{fmt(r['weights_before'])} -> {fmt(r['weights_after'])}", r["note"].split(" (")[0])
        o = metrics["overall"]
        overall = {"params": f"{o['params_before']:,} -> {o['params_after']:,} ({o['param_ratio']:.1%})"}
        if "conv_ratio" in o:
            overall["conv weights"] = f"{o['conv_weights_before']:,} -> {o['conv_weights_after']:,} ({o['conv_ratio']:.1%})"
        if "macs_before" in o:
            overall["MACs (batch 1)"] = (f"{o['macs_before']:,} -> {o['macs_after']:,} "
                                         f"({o['macs_after'] / max(o['macs_before'], 1):.1%})")
        for nf in o.get("not_followed", [])[:8]:
            overall[f"not followed: {nf['module']}"] = f"{nf['op']}: {nf['reason']}"
    else:
        target = "per layer from --max-drop" if metrics.get("budget") else f"target {metrics['target']}"
        t = Table(title=f"pruned ({metrics['method']}, {target})", title_justify="left")
        for col in ("layer", "shape", "weights", "pruned", "sparsity", "note"):
            t.add_column(col, justify="right" if col in ("weights", "pruned", "sparsity") else "left", overflow="fold")
        for r in rows:
            t.add_row(r["layer"], "x".join(map(str, r["shape"])), fmt(r["weights"]), fmt(r["pruned"]),
                      f"{r['sparsity']:.2%}", r["note"])
        o = metrics["overall"]
        overall = {"prunable weights pruned": f"{o['pruned']:,} / {o['prunable_weights']:,} ({o['sparsity']:.2%})",
                   "non-zero / params": f"{o['nonzero']:,} / {o['params']:,}"}
    c.print(t)
    if "top1_before" in metrics:
        overall["test top-1 % before"] = metrics["top1_before"]
        overall["test top-1 % after"] = metrics["top1_after"]
    overall["output"] = dest
    b = metrics.get("budget")
    if b:
        overall["--max-drop"] = (f"{b['max_drop']:g} points: predicted {b['predicted_drop']:.2f}, measured "
                                 f"{b['measured_drop']:.2f} on {b['split']} ({len(b['attempts'])} attempt(s), sweep {b['sweep']})")
    c.print(kv_table("overall", overall))
    hist = metrics.get("history") or []
    if len(hist) > 1:
        h = Table(title="rounds", title_justify="left")
        keys = [k for k in ("round", "target", "top1_pruned", "top1_retrained") if any(k in r for r in hist)]
        for k in keys:
            h.add_column(k.replace("_", " "), justify="right")
        for r in hist:
            h.add_row(*[fmt(r[k]) if k in r else "" for k in keys])
        c.print(h)
