"""Runtime benchmark: structured speed in onnxruntime, and the hybrid sparse path.

Part 1 (vgg): vgg-small trained on digits resized to 32x32 (so convolution compute dominates
the per-call overhead), then 50% of the filters of every prunable conv layer removed by
``prune --method filter`` (L1 norm) and retrained. Both run in onnxruntime in this process,
interleaved, same threads: latency p50/p90/p99 at batch 1 and 64, accuracy on the test split.

Part 2 (stack): a stack of 4096x4096 Linear layers (ReLU between) pruned to 95% unstructured
sparsity (exact magnitude masks). Dense onnxruntime vs the hybrid path with the torch CSR kernel
and with the numba CSR kernel, interleaved. Then a sweep on one 4096x4096 layer over sparsities
and batch sizes, giving the break-even sparsity of each kernel.

    python benchmarks/bench_runtime.py                  # everything, --threads 2
    python benchmarks/bench_runtime.py --part stack --threads 1
    python benchmarks/bench_runtime.py --quick          # smaller, for a smoke run

Prints markdown tables (paste into docs/bench/runtime.md); nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from dcomp.compressors.masks import magnitude_mask
from dcomp.data import load_dataset
from dcomp.formats.checkpoint import Checkpoint
from dcomp.formats.onnx_export import ExportConfig, export_checkpoint
from dcomp.models import build_zoo
from dcomp.runtime.bench import LinearStack, make_batch, percentiles, time_interleaved, top1
from dcomp.runtime.runner import OrtRunner, TorchRunner, apply_threads
from dcomp.runtime.sparse import HybridRunner, break_even, speed_words, sweep


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def timing_table(title: str, runners: list, batches: list[int], x_pool, input_shape, iters: int, seconds: float,
                 extra: dict[str, dict] | None = None) -> list[dict]:
    """Time ``runners`` interleaved per batch size; print a markdown table; return the rows."""
    extra = extra or {}
    rows = []
    print(f"\n### {title}\n")
    print(f"threads {torch.get_num_threads()}, load average (1/5/15 min) before timing: {loadavg()}\n")
    print("| target | batch | p50 ms | p90 ms | p99 ms | samples/s | vs first row (p50) | " +
          " | ".join(k for k in next(iter(extra.values()), {})) + " |")
    print("|---" * (7 + len(next(iter(extra.values()), {}))) + "|")
    for b in batches:
        x = make_batch(x_pool, input_shape, b)
        lats = time_interleaved(runners, x, warmup=5, iters=iters, seconds=seconds)
        ref = None
        for r, lat in zip(runners, lats):
            p = percentiles(lat)
            ref = ref or p["p50_ms"]
            row = {"target": r.name, "batch": b, **p, "throughput": b / float(lat.mean()), "speedup": ref / p["p50_ms"],
                   "calls": int(lat.size)}
            rows.append(row)
            ex = extra.get(r.name, {})
            print(f"| {r.name} | {b} | {p['p50_ms']:.3f} | {p['p90_ms']:.3f} | {p['p99_ms']:.3f} | "
                  f"{row['throughput']:,.0f} | {'reference' if r is runners[0] else speed_words(row['speedup'])} | "
                  + " | ".join(str(v) for v in ex.values()) + " |")
    return rows


# ---- part 1 ------------------------------------------------------------------------------------------

def part_vgg(args) -> dict:
    from dcomp.compressors.pruning import PruneConfig, apply_prune
    from dcomp.retrain import retrain
    from dcomp.stages import StageContext
    from dcomp.train import TrainConfig, fit

    ds = load_dataset("digits", args.resize)
    shape = list(ds.input_shape)
    torch.manual_seed(0)
    log(f"training vgg-small on digits at {shape} ({args.epochs} epochs)")
    model = build_zoo("vgg-small", shape, 10)
    fit(model, ds, TrainConfig(epochs=args.epochs, lr=0.05), seed=0)
    dense = Checkpoint(arch={"kind": "zoo", "name": "vgg-small", "kwargs": {}}, state_dict={}, input_shape=shape,
                       num_classes=10, data={"spec": "digits", "resize": args.resize})
    dense.update_from_model(model)
    log("removing 50% of the filters (prune --method filter --sparsity 0.5)")
    pruned = apply_prune(dense, PruneConfig(method="filter", sparsity=0.5), StageContext(data=ds)).checkpoint
    log(f"retraining the shrunk model ({args.retrain_epochs} epochs)")
    shrunk, _ = retrain(pruned, ds, TrainConfig(epochs=args.retrain_epochs, lr=0.01), seed=0)
    e_dense = export_checkpoint(dense, ExportConfig(variant="dense"))
    e_shrunk = export_checkpoint(shrunk, ExportConfig(variant="shrunk"))
    layers = e_shrunk.info["shrunk_layers"]
    print("\n## Part 1: vgg-small with 50% of its filters removed, onnxruntime\n")
    print(f"input 1x{shape[1]}x{shape[2]} (digits --resize {args.resize}); shrunk conv layers: "
          + ", ".join(f"{l['name']} {l['built']}->{l['stored']}" for l in layers if len(l["built"]) == 4))
    x_pool = ds.x_test.numpy()
    threads = torch.get_num_threads()
    runners = [OrtRunner(e_dense.onnx_bytes, threads, "dense original"), OrtRunner(e_shrunk.onnx_bytes, threads, "shrunk 50% filters")]
    acc = {r.name: top1(r, x_pool, ds.y_test.numpy()) for r in runners}
    params = {"dense original": dense.param_count(), "shrunk 50% filters": shrunk.param_count()}
    extra = {r.name: {"top-1 %": f"{acc[r.name]:.2f}", "params": f"{params[r.name]:,}",
                      "file": f"{r.model_bytes / 1024:.0f} KiB"} for r in runners}
    rows = timing_table("vgg-small dense vs shrunk (onnxruntime)", runners, [1, 64], x_pool, shape, args.iters,
                        args.seconds, extra)
    return {"rows": rows, "accuracy": acc, "params": params, "shrunk_layers": layers}


# ---- part 2 ------------------------------------------------------------------------------------------

def part_stack(args) -> dict:
    width, depth, sparsity = args.width, args.depth, 0.95
    torch.manual_seed(0)
    log(f"building a stack of {depth} Linear({width}, {width}) layers at {sparsity:.0%} sparsity")
    model = LinearStack(width, depth).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(magnitude_mask(m.weight, sparsity))
    ckpt = Checkpoint(arch={"kind": "import", "target": "dcomp.runtime.bench:LinearStack",
                            "kwargs": {"width": width, "depth": depth}},
                      state_dict={}, input_shape=[width], num_classes=width)
    ckpt.update_from_model(model)
    threads = torch.get_num_threads()
    log("exporting dense and sparse ONNX, building the hybrid paths")
    e_dense = export_checkpoint(ckpt, ExportConfig(variant="dense"))
    e_sparse = export_checkpoint(ckpt, ExportConfig(variant="sparse"), )
    runners = [OrtRunner(e_dense.onnx_bytes, threads, "dense onnxruntime"),
               HybridRunner(model, [width], threads, kernel="torch", name="hybrid torch CSR"),
               HybridRunner(model, [width], threads, kernel="numba", name="hybrid numba CSR")]
    if args.eager:
        runners.append(TorchRunner(model, "pytorch eager (dense)"))
    x = make_batch(None, [width], 4)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    diffs = {r.name: float(np.abs(r.run(x) - ref).max() / np.abs(ref).max()) for r in runners}
    sizes = {"dense onnxruntime": e_dense.info["file_bytes"]}
    sizes.update({r.name: r.model_bytes for r in runners[1:3]})
    extra = {r.name: {"max rel diff vs PyTorch": f"{diffs[r.name]:.1e}",
                      "model bytes": f"{sizes[r.name] / 2**20:.1f} MiB" if r.name in sizes else ""} for r in runners}
    print(f"\n## Part 2: {depth} x Linear({width}, {width}) at {sparsity:.0%} unstructured sparsity\n")
    print(f"sparse ONNX file (sparse initializers): {e_sparse.info['file_bytes'] / 2**20:.1f} MiB vs dense "
          f"{e_dense.info['file_bytes'] / 2**20:.1f} MiB (onnxruntime densifies it at load, so it runs like dense)")
    rows = timing_table(f"{depth}-layer {width}x{width} stack, 95% sparse", runners, args.batches, None, [width],
                        args.iters, args.seconds, extra)
    del runners
    out = {"rows": rows, "diffs": diffs}
    print(f"\n### Break-even sweep: one {width}x{width} layer, dense onnxruntime Gemm vs the CSR kernel\n")
    print(f"load average before the sweep: {loadavg()}\n")
    print("| kernel | sparsity | batch | dense ms | sparse ms | sparse is |")
    print("|---|---|---|---|---|---|")
    be = {}
    for kernel in ("torch", "numba"):
        log(f"sweep, {kernel} kernel")
        rows = sweep((width, width), args.sparsities, args.batches, threads, kernel, args.sweep_seconds)
        for r in rows:
            print(f"| {kernel} | {r['sparsity']:.0%} | {r['batch']} | {r['dense_s'] * 1e3:.3f} | {r['sparse_s'] * 1e3:.3f} | "
                  f"{speed_words(r['speedup'], 'dense')} |")
        be[kernel] = {b: break_even(rows, b) for b in args.batches}
        out[f"sweep_{kernel}"] = rows
    print("\n| kernel | " + " | ".join(f"break-even, batch {b}" for b in args.batches) + " |")
    print("|---" * (1 + len(args.batches)) + "|")
    for kernel, per in be.items():
        print(f"| {kernel} | " + " | ".join(f"{v:.0%}" if v is not None else "never" for v in per.values()) + " |")
    out["break_even"] = be
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["vgg", "stack", "all"], default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller and shorter (a smoke run)")
    ap.add_argument("--json", help="also write every number to this JSON file")
    ap.add_argument("--eager", action="store_true", help="also time eager PyTorch in part 2")
    args = ap.parse_args()
    args.resize, args.epochs, args.retrain_epochs = 32, 8, 4
    args.width, args.depth = 4096, 4
    args.batches = [1, 8, 64]
    args.iters, args.seconds, args.sweep_seconds = 100, 3.0, 0.5
    args.sparsities = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
    if args.quick:
        args.resize, args.epochs, args.retrain_epochs = 16, 1, 1
        args.width, args.depth, args.iters, args.seconds, args.sweep_seconds = 1024, 2, 20, 0.3, 0.1
        args.sparsities = [0.5, 0.9, 0.99]
    apply_threads(args.threads)
    print(f"# bench_runtime: threads={args.threads}, torch {torch.__version__}, cores {os.cpu_count()}, "
          f"load average {loadavg()}")
    result = {}
    if args.part in ("vgg", "all"):
        result["vgg"] = part_vgg(args)
    if args.part in ("stack", "all"):
        result["stack"] = part_stack(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
