"""Runtime benchmark: structured speed in onnxruntime, and the hybrid sparse path.

Part 1 (vgg): vgg-small trained on digits resized to 32x32 (so convolution compute dominates
the per-call overhead), then 50% of the filters of every prunable conv layer removed by
``prune --method filter`` (L1 norm) and retrained. Both run in onnxruntime in this process,
interleaved, same threads: latency p50/p90/p99 at batch 1 and 64, accuracy on the test split.

Part 2 (stack): a stack of 4096x4096 Linear layers (ReLU between) pruned to 95% unstructured
sparsity (exact magnitude masks) and shared to 32 values (5-bit codebook, as `dcomp quantize`
leaves fc layers). Dense onnxruntime vs the hybrid path (compiled sparse-codebook kernel, calibrated
per layer at load), interleaved, batch 1/8/64. Then a sweep on one 4096x4096 layer over sparsities
and batch sizes, giving the break-even sparsity of the kernel per batch size.

Part 3 (lenet): LeNet-300-100 and LeNet-5 compressed by the deep-compression recipes (files given
with --lenet300 / --lenet5, e.g. the output of `dcomp run configs/deep-compression.yaml`), dense
onnxruntime vs the calibrated hybrid path, with the per-layer choice.

--busy: parts 2 and 3 run twice, the second time with one competing CPU-bound process (a Python
busy loop started by this script and stopped after).

    python benchmarks/bench_runtime.py --part stack,lenet --busy --lenet300 A.dcz --lenet5 B.dcz
    python benchmarks/bench_runtime.py --part vgg
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
from dcomp.runtime.runner import OrtRunner, apply_threads
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
            row = {"target": r.name, "batch": b, **p, "throughput": b / float(np.median(lat)), "speedup": ref / p["p50_ms"],
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

def share_values(w: torch.Tensor, levels: int = 32) -> torch.Tensor:
    """Weight sharing as `dcomp quantize --init linear` starts it: every non-zero replaced by the
    nearest of ``levels`` values spread linearly over the non-zero range (zeros stay zeros)."""
    nz = w != 0
    v = w[nz]
    book = torch.linspace(float(v.min()), float(v.max()), levels)
    mid = (book[1:] + book[:-1]) / 2
    out = torch.zeros_like(w)
    out[nz] = book[torch.searchsorted(mid, v.contiguous())]
    return out


def choice_lines(h) -> list[str]:
    d = h.describe()
    lines = []
    for lay in d["layers"]:
        per = ", ".join(f"b{b}: {v}" + (f" ({lay['sparse_ms'][b]:.3f} vs {lay['dense_ms'][b]:.3f} ms)"
                                        if "sparse_ms" in lay else "") for b, v in lay["choice"].items())
        lines.append(f"* `{lay['name']}` ({lay['kind']}, {lay['sparsity']:.1%} zeros, "
                     f"{'codebook' if lay['codebook'] else 'float values'}): {per}")
    lines.append("* plans: " + "; ".join(f"batch {b}: {p}" for b, p in d["plans"].items()))
    return lines


def part_stack(args, label: str) -> dict:
    width, depth, sparsity = args.width, args.depth, 0.95
    torch.manual_seed(0)
    log(f"building a stack of {depth} Linear({width}, {width}) layers at {sparsity:.0%} sparsity, 5-bit shared")
    model = LinearStack(width, depth).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(share_values(m.weight * magnitude_mask(m.weight, sparsity), 32))
    threads = torch.get_num_threads()
    log("exporting dense ONNX, calibrating the hybrid path")
    from dcomp.formats.onnx_export import export_module

    t0 = time.perf_counter()
    dense_bytes = export_module(model, [width])
    runners = [OrtRunner(dense_bytes, threads, "dense onnxruntime")]
    hy = HybridRunner(model, [width], threads, name="hybrid (sparse-codebook kernel)", calibrate=args.batches)
    runners.append(hy)
    calib_s = time.perf_counter() - t0
    x = make_batch(None, [width], 4)
    ref = runners[0].run(x)
    diffs = {r.name: float(np.abs(r.run(x) - ref).max() / np.abs(ref).max()) for r in runners}
    extra = {r.name: {"max rel diff vs dense ORT": f"{diffs[r.name]:.1e}",
                      "model bytes": f"{r.model_bytes / 2**20:.1f} MiB"} for r in runners}
    print(f"\n## {label}: {depth} x Linear({width}, {width}), 95% zeros, 5-bit codebook\n")
    rows = timing_table(f"{label}: {depth}-layer {width}x{width} stack", runners, args.batches, None, [width],
                        args.iters, args.seconds, extra)
    print("\nPer-layer choice (calibrated at load, "
          f"{calib_s:.1f} s including the dense export):\n")
    print("\n".join(choice_lines(hy)))
    del runners, hy
    out = {"rows": rows, "diffs": diffs}
    if args.sweep:
        print(f"\n### {label}: break-even sweep, one {width}x{width} layer, 5-bit codebook\n")
        print(f"load average before the sweep: {loadavg()}\n")
        print("| sparsity | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
        print("|---" * (1 + len(args.batches)) + "|")
        sw = sweep((width, width), args.sparsities, args.batches, threads, "numba", args.sweep_seconds, levels=32)
        for s_ in args.sparsities:
            cells = [next(r for r in sw if r["sparsity"] == s_ and r["batch"] == b) for b in args.batches]
            print(f"| {s_:.0%} | " + " | ".join(f"{speed_words(r['speedup'], 'dense')} ({r['dense_s'] * 1e3:.2f} / "
                                                  f"{r['sparse_s'] * 1e3:.2f} ms)" for r in cells) + " |")
        be = {b: break_even(sw, b) for b in args.batches}
        print("\nBreak-even sparsity: " + ", ".join(f"batch {b}: {v:.0%}" if v is not None else f"batch {b}: never"
                                                   for b, v in be.items()))
        out.update(sweep=sw, break_even=be)
    return out


# ---- part 3 ------------------------------------------------------------------------------------------

def part_lenet(args, label: str) -> dict:
    from dcomp.formats.model_input import load_model

    out = {}
    ds = load_dataset(args.data, None) if args.data else None
    threads = torch.get_num_threads()
    for path in [p for p in (args.lenet300, args.lenet5) if p]:
        with open(path, "rb") as f:
            ckpt = load_model(f.read(), path)
        model = ckpt.build_model()
        shape = list(ckpt.input_shape)
        from dcomp.formats.onnx_export import export_module

        dense = OrtRunner(export_module(model, shape), threads, "dense onnxruntime")
        hy = HybridRunner(model, shape, threads, name="hybrid (sparse-codebook kernel)", calibrate=args.batches)
        runners = [dense, hy]
        x_pool = None
        if ds is not None and list(ds.input_shape) == shape:
            x_pool = ds.x_test.numpy()
        x = make_batch(x_pool, shape, 64)
        ref = dense.run(x)
        diff = float(np.abs(hy.run(x) - ref).max() / np.abs(ref).max())
        acc = {r.name: top1(r, x_pool, ds.y_test.numpy()) for r in runners} if x_pool is not None else {}
        name = ckpt.arch.get("name") or path
        extra = {r.name: {"top-1 %": f"{acc[r.name]:.2f}" if acc else "",
                          "max rel diff vs dense ORT": f"{0.0 if r is dense else diff:.1e}"} for r in runners}
        print(f"\n## {label}: {name} ({path})\n")
        rows = timing_table(f"{label}: {name}", runners, args.batches, x_pool, shape, args.iters, args.seconds, extra)
        print("\nPer-layer choice:\n")
        print("\n".join(choice_lines(hy)))
        out[name] = {"rows": rows, "diff": diff, "accuracy": acc, "choice": hy.describe()}
    return out


class BusyProcess:
    """One competing CPU-bound process (a Python busy loop) for the duration of a with-block."""

    def __enter__(self):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="stack,lenet", help="comma list of vgg, stack, lenet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", action="store_true", help="repeat stack and lenet with one competing busy process")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--lenet300", help="LeNet-300-100 from configs/deep-compression.yaml (.dcz or checkpoint)")
    ap.add_argument("--lenet5", help="LeNet-5 from configs/lenet5.yaml (.dcz or checkpoint)")
    ap.add_argument("--data", help="dataset of the LeNets for inputs and accuracy, e.g. npz:../shared/data/mnist10k.npz")
    ap.add_argument("--quick", action="store_true", help="smaller and shorter (a smoke run)")
    ap.add_argument("--json", help="also write every number to this JSON file")
    args = ap.parse_args()
    parts = [p.strip() for p in args.part.split(",")]
    args.resize, args.epochs, args.retrain_epochs = 32, 8, 4
    args.width, args.depth = 4096, 4
    args.batches = [1, 8, 64]
    args.iters, args.seconds, args.sweep_seconds = 200, 3.0, 0.5
    args.sparsities = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
    if args.quick:
        args.resize, args.epochs, args.retrain_epochs = 16, 1, 1
        args.width, args.depth, args.iters, args.seconds, args.sweep_seconds = 1024, 2, 20, 0.3, 0.1
        args.sparsities = [0.5, 0.9, 0.99]
    apply_threads(args.threads)
    print(f"# bench_runtime: threads={args.threads}, torch {torch.__version__}, cores {os.cpu_count()}, "
          f"load average {loadavg()}")
    result = {}
    if "vgg" in parts:
        result["vgg"] = part_vgg(args)
    rounds = [("no competing process", None)] + ([("one competing busy process", BusyProcess)] if args.busy else [])
    for label, ctx in rounds:
        if ctx is not None:
            log("starting a competing busy process")
        cm = ctx() if ctx is not None else None
        if cm is not None:
            cm.__enter__()
        try:
            print(f"\n# {label}: load average {loadavg()}")
            if "stack" in parts:
                result[f"stack, {label}"] = part_stack(args, label)
            if "lenet" in parts:
                result[f"lenet, {label}"] = part_lenet(args, label)
        finally:
            if cm is not None:
                cm.__exit__(None, None, None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
