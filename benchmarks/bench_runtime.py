"""Runtime benchmark: the sparse-codebook kernel against dense onnxruntime, and structured speed.

One command gives every table of docs/bench/runtime.md section 2 (about 8 minutes on 2 cores,
plus about 4 minutes the first time, to make the LeNets):

    flock /tmp/dcomp-timing.lock python benchmarks/bench_runtime.py --data npz:../shared/data/mnist10k.npz

stack   4 x Linear(4096, 4096), ReLU between, 95% unstructured zeros (exact magnitude masks), 5-bit
        shared values (as `dcomp quantize` leaves fc layers): dense onnxruntime vs the hybrid runner
        (the kernel for the layers its calibration chose), batch 1/8/64; then a sweep on one
        4096x4096 layer over sparsities and batch sizes: the break-even sparsity per batch size.
lenet   LeNet-300-100 and LeNet-5 compressed by the deep-compression recipes
        (configs/deep-compression.yaml, configs/lenet5.yaml) on --data: given with --lenet300 /
        --lenet5, else made once with `dcomp train` + `dcomp run` into --models (single-threaded,
        shortened epochs, printed) and reused; dense onnxruntime vs the calibrated hybrid runner.
vgg     vgg-small (BatchNorm, random weights, input 1x32x32) magnitude-pruned to 90% zeros with 8-bit
        shared values: BatchNorm folded into the sparse convolutions.
busy    (on by default; --no-busy) stack, lenet and vgg again with one competing CPU-bound process
        (a Python busy loop this script starts and stops).

Every table: interleaved rounds (each target gets 5 calls in turn), p50/p90/p99 per call, and the
speed against dense with the interval from the p10-p90 of the round medians (a difference is
called only outside it); the load average before each table. Nothing is hard-coded; --json
writes every number.

    python benchmarks/bench_runtime.py --part structured   # vgg-small 50% filters removed (trains: ~10 min)
    python benchmarks/bench_runtime.py --quick             # smaller, for a smoke run
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
from dcomp.runtime.bench import (
    LinearStack,
    compare,
    make_batch,
    percentiles,
    speed_label,
    spread,
    time_rounds,
    top1,
)
from dcomp.runtime.runner import OrtRunner, apply_threads
from dcomp.runtime.sparse import HybridRunner, break_even, speed_words, sweep


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def timing_table(title: str, runners: list, batches: list[int], x_pool, input_shape, iters: int, seconds: float,
                 extra: dict[str, dict] | None = None) -> list[dict]:
    """Time ``runners`` in interleaved rounds per batch size; print a markdown table (speed against
    the first runner with the p10-p90 interval of the round medians); return the rows."""
    extra = extra or {}
    rows = []
    cols = list(next(iter(extra.values()), {}))
    print(f"\n### {title}\n")
    print(f"threads {torch.get_num_threads()}, load average (1/5/15 min) before timing: {loadavg()}\n")
    print("| target | batch | p50 ms | p90 ms | p99 ms | samples/s | vs first row (p50, p10-p90 of rounds) | "
          + "".join(f"{k} | " for k in cols))
    print("|---" * (7 + len(cols)) + "|")
    for b in batches:
        x = make_batch(x_pool, input_shape, b)
        lats, rounds = time_rounds(runners, x, warmup=5, iters=iters, seconds=seconds)
        ref = None
        for r, lat, rd in zip(runners, lats, rounds):
            p = {**percentiles(lat), **spread(rd)}
            ref = ref or p
            row = {"target": r.name, "batch": b, **p, "throughput": b / float(np.median(lat)), **compare(p, ref),
                   "calls": int(lat.size), "load": loadavg()}
            rows.append(row)
            ex = extra.get(r.name, {})
            print(f"| {r.name} | {b} | {p['p50_ms']:.3f} | {p['p90_ms']:.3f} | {p['p99_ms']:.3f} | "
                  f"{row['throughput']:,.0f} | {'reference' if r is runners[0] else speed_label(row)} | "
                  + "".join(f"{v} | " for v in ex.values()))
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


def stack_model(args):
    width, depth, sparsity = args.width, args.depth, 0.95
    torch.manual_seed(0)
    log(f"building a stack of {depth} Linear({width}, {width}) layers at {sparsity:.0%} sparsity, 5-bit shared")
    model = LinearStack(width, depth).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(share_values(m.weight * magnitude_mask(m.weight, sparsity), 32))
    from dcomp.formats.onnx_export import export_module

    log("exporting the dense stack to ONNX")
    return model, OrtRunner(export_module(model, [width]), torch.get_num_threads(), "dense onnxruntime")


def part_stack(args, label: str, setup) -> dict:
    model, dense = setup
    width, depth = args.width, args.depth
    threads = torch.get_num_threads()
    log(f"{label}: calibrating the hybrid runner on the stack")
    t0 = time.perf_counter()
    hy = HybridRunner(model, [width], threads, name="hybrid (sparse-codebook kernel)", calibrate=args.batches,
                      calib_seconds=args.calib_seconds)
    calib_s = time.perf_counter() - t0
    runners = [dense, hy]
    x = make_batch(None, [width], 4)
    ref = dense.run(x)
    diffs = {r.name: float(np.abs(r.run(x) - ref).max() / np.abs(ref).max()) for r in runners}
    extra = {r.name: {"max rel diff vs dense ORT": f"{diffs[r.name]:.1e}",
                      "model bytes": f"{r.model_bytes / 2**20:.1f} MiB"} for r in runners}
    print(f"\n## {label}: {depth} x Linear({width}, {width}), 95% zeros, 5-bit codebook\n")
    rows = timing_table(f"{label}: {depth}-layer {width}x{width} stack", runners, args.batches, None, [width],
                        args.iters, args.seconds, extra)
    print(f"\nPer-layer choice (calibrated at load, {calib_s:.1f} s):\n")
    print("\n".join(choice_lines(hy)))
    del hy
    out = {"rows": rows, "diffs": diffs, "calibration_s": calib_s}
    if args.sweep:
        log(f"{label}: break-even sweep")
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

RECIPES = {"lenet-300-100": ("configs/deep-compression.yaml", 10, ["stages.1.train.epochs=8"]),
           "lenet-5": ("configs/lenet5.yaml", 6, ["stages.1.train.epochs=6"])}


def make_lenets(args) -> dict[str, str]:
    """The LeNets from --lenet300/--lenet5, else from --models, made there with the recipes when
    missing (single-threaded subprocesses; shortened epochs, printed)."""
    import subprocess
    from pathlib import Path

    given = {"lenet-300-100": args.lenet300, "lenet-5": args.lenet5}
    root = Path(__file__).resolve().parent.parent
    out = {}
    for arch, (recipe, epochs, sets) in RECIPES.items():
        if given[arch]:
            out[arch] = given[arch]
            continue
        kind, _, rest = args.data.partition(":")  # a file's name and size, not its path: any checkout finds them
        key = f"{kind}_{Path(rest).name}_{Path(rest).stat().st_size}" if kind in ("npz", "idx") and rest else args.data
        folder = Path(args.models).expanduser() / key.replace(":", "_").replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        base, final = folder / f"{arch}.pt", folder / f"{arch}-dc.pt"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmds = [[sys.executable, "-m", "dcomp", "--threads", "1", "train", "--arch", arch, "--data", args.data,
                 "--epochs", str(epochs), "-o", str(base)],
                [sys.executable, "-m", "dcomp", "--threads", "1", "run", str(root / recipe), "-m", str(base),
                 "--data", args.data, "-o", str(final), *[a for kv in sets for a in ("--set", kv)]]]
        if not final.exists():
            for cmd, target in zip(cmds, (base, final)):
                if target.exists():
                    continue
                log("making " + " ".join(c if " " not in c else repr(c) for c in cmd[1:]))
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        print(f"\n{arch}: {final} (made by: dcomp --threads 1 train --arch {arch} --data {args.data} --epochs {epochs}; "
              f"dcomp --threads 1 run {recipe} --data {args.data} {' '.join('--set ' + kv for kv in sets)})")
        out[arch] = str(final)
    return out


def lenet_setup(args) -> list:
    from dcomp.formats.model_input import load_model
    from dcomp.formats.onnx_export import export_module

    ds = load_dataset(args.data, None) if args.data else None
    threads = torch.get_num_threads()
    models = []
    for arch, path in make_lenets(args).items():
        with open(path, "rb") as f:
            ckpt = load_model(f.read(), path)
        model = ckpt.build_model().eval()
        shape = list(ckpt.input_shape)
        dense = OrtRunner(export_module(model, shape), threads, "dense onnxruntime")
        x_pool = ds.x_test.numpy() if ds is not None and list(ds.input_shape) == shape else None
        y_pool = ds.y_test.numpy() if x_pool is not None else None
        models.append((ckpt.arch.get("name") or arch, path, model, shape, dense, x_pool, y_pool))
    return models


def vgg_setup(args):
    """vgg-small at 1x32x32, random weights and BatchNorm statistics, every conv/fc layer magnitude-
    pruned to 90% zeros and shared to 256 values (8 bits, as `dcomp quantize` leaves conv layers)."""
    from dcomp.formats.onnx_export import export_module

    torch.manual_seed(0)
    shape = [1, 32, 32]
    model = build_zoo("vgg-small", shape, 10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(share_values(m.weight * magnitude_mask(m.weight, 0.9), 256))
    return [("vgg-small (90% zeros, BatchNorm, random weights)", "", model, shape,
             OrtRunner(export_module(model, shape), torch.get_num_threads(), "dense onnxruntime"), None, None)]


def part_models(args, label: str, models: list) -> dict:
    out = {}
    threads = torch.get_num_threads()
    for name, path, model, shape, dense, x_pool, y_pool in models:
        log(f"{label}: calibrating the hybrid runner on {name}")
        hy = HybridRunner(model, shape, threads, name="hybrid (sparse-codebook kernel)", calibrate=args.batches,
                          calib_seconds=args.calib_seconds)
        runners = [dense, hy]
        x = make_batch(x_pool, shape, 64)
        ref = dense.run(x)
        diff = float(np.abs(hy.run(x) - ref).max() / np.abs(ref).max())
        acc = {r.name: top1(r, x_pool, y_pool) for r in runners} if x_pool is not None else {}
        extra = {r.name: {"top-1 %": f"{acc[r.name]:.2f}" if acc else "n/a",
                          "max rel diff vs dense ORT": f"{0.0 if r is dense else diff:.1e}"} for r in runners}
        print(f"\n## {label}: {name}{f' ({path})' if path else ''}\n")
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
    ap.add_argument("--part", default="stack,lenet,vgg", help="comma list of stack, lenet, vgg, structured")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-busy", dest="busy", action="store_false", help="skip the round with a competing busy process")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--lenet300", help="LeNet-300-100 from configs/deep-compression.yaml (.dcz or checkpoint)")
    ap.add_argument("--lenet5", help="LeNet-5 from configs/lenet5.yaml (.dcz or checkpoint)")
    ap.add_argument("--models", default="~/.cache/dcomp/bench-runtime",
                    help="where the LeNets are made (once) when --lenet300/--lenet5 are not given")
    ap.add_argument("--data", default=None, help="dataset of the LeNets (default: npz:../shared/data/mnist10k.npz "
                                                 "when it exists, else digits)")
    ap.add_argument("--quick", action="store_true", help="smaller and shorter (a smoke run)")
    ap.add_argument("--json", help="also write every number to this JSON file")
    args = ap.parse_args()
    if args.data is None:
        mnist = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "mnist10k.npz")
        args.data = f"npz:{os.path.normpath(mnist)}" if os.path.exists(mnist) else "digits"
    parts = [p.strip() for p in args.part.split(",")]
    args.resize, args.epochs, args.retrain_epochs = 32, 8, 4
    args.width, args.depth = 4096, 4
    args.batches = [1, 8, 64]
    args.iters, args.seconds, args.sweep_seconds, args.calib_seconds = 300, 2.0, 0.3, 0.05
    args.sparsities = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
    if args.quick:
        args.resize, args.epochs, args.retrain_epochs = 16, 1, 1
        args.width, args.depth, args.iters, args.seconds, args.sweep_seconds = 1024, 2, 20, 0.3, 0.1
        args.sparsities = [0.5, 0.9, 0.99]
    apply_threads(args.threads)
    t_start = time.perf_counter()
    print(f"# bench_runtime: threads={args.threads}, torch {torch.__version__}, cores {os.cpu_count()}, "
          f"load average {loadavg()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    result = {"load_start": loadavg()}
    if "structured" in parts:
        result["structured"] = part_vgg(args)
    setups = {}
    if "stack" in parts:
        setups["stack"] = stack_model(args)
    if "lenet" in parts:
        setups["lenet"] = lenet_setup(args)
    if "vgg" in parts:
        setups["vgg"] = vgg_setup(args)
    rounds = [("no competing process", None)] + ([("one competing busy process", BusyProcess)] if args.busy else [])
    for label, ctx in rounds:
        cm = ctx() if ctx is not None else None
        if cm is not None:
            log("starting a competing busy process")
            cm.__enter__()
        try:
            print(f"\n# {label}: load average {loadavg()}")
            if "stack" in setups:
                result[f"stack, {label}"] = part_stack(args, label, setups["stack"])
            if "lenet" in setups:
                result[f"lenet, {label}"] = part_models(args, label, setups["lenet"])
            if "vgg" in setups:
                result[f"vgg, {label}"] = part_models(args, label, setups["vgg"])
        finally:
            if cm is not None:
                cm.__exit__(None, None, None)
    result["load_end"] = loadavg()
    result["wall_s"] = time.perf_counter() - t_start
    print(f"\n# done in {result['wall_s'] / 60:.1f} min, load average at the end {loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
