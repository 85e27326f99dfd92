"""`dcomp run configs/deep-compression.yaml --target-size N` against the hand-tuned shipped recipe
at the same size: LeNet-300-100 on digits (and on MNIST-10k when ../shared/data/mnist10k.npz is
there). The shipped recipe runs first; its .dcz size becomes the target of the --target-size run.

    python benchmarks/bench_target_size.py [--out target-out] [--short] [--only digits|mnist10k]

--short shortens the training of both runs alike (prune retraining 2 epochs per round, distill 5,
centroid fine-tuning 1) and the bench stage; the sizes do not depend on it, the accuracies do.
Needs the dense models of `make sweep-demo` (sweep-demo-out/NAME/base.pt) or trains them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist10k.npz"
RECIPE = ROOT / "configs" / "deep-compression.yaml"


def dcomp(*args) -> dict:
    cmd = [sys.executable, "-m", "dcomp", "--threads", "1", "--json", "-q", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return json.loads(r.stdout) if r.stdout.strip() else {}


def one(name: str, spec: str, out: Path, short: bool) -> list[str]:
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    base = ROOT / "sweep-demo-out" / name / "base.pt"
    if not base.exists():
        base = work / "base.pt"
        if not base.exists():
            dcomp("train", "--arch", "lenet-300-100", "--data", spec, "--epochs", 20, "-o", base)
    sets = ["--set", "stages.5.seconds=0.2", "--set", "stages.5.batches=[1]"]
    if short:
        sets += ["--set", "stages.0.retrain.epochs=2", "--set", "stages.1.train.epochs=5", "--set", "stages.2.finetune.epochs=1"]
    t0 = time.time()
    shipped = dcomp("run", RECIPE, "-m", base, "--data", spec, "-o", work / "shipped.dcz", *sets)
    t1 = time.time()
    target = shipped["output_bytes"]
    tuned = dcomp("run", RECIPE, "-m", base, "--data", spec, "-o", work / "target.dcz", "--target-size", target, *sets)
    t2 = time.time()
    want = {"digits": "40x"}.get(name, "60x")
    ratio = dcomp("run", RECIPE, "-m", base, "--data", spec, "-o", work / "ratio.dcz", "--target-ratio", want, *sets)
    t3 = time.time()
    t = tuned["target"]
    r = ratio["target"]

    def plan(p):
        return ", ".join(f"{n.removesuffix('.weight')} {s:.1%}/{b}b" for n, (s, b) in p.items())

    shipped_layers = "fc1 94%/5b, fc2 94%/5b, fc3 80%/5b"
    return [
        f"| {name} | shipped recipe | {shipped_layers} | - | {target:,} | - | {shipped['compression_ratio']:.1f}x | "
        f"{shipped['top1_before']:.2f} | {shipped['top1_after']:.2f} | 1 | {(t1 - t0) / 60:.1f} |",
        f"| {name} | --target-size {target} | {plan(t['plan'])} | {t['target_bytes']:,} | {t['reached_bytes']:,} | "
        f"{t['error']:+.1%} | {tuned['compression_ratio']:.1f}x | {tuned['top1_before']:.2f} | {tuned['top1_after']:.2f} | "
        f"{len(t['runs'])} | {(t2 - t1) / 60:.1f} |",
        f"| {name} | --target-ratio {want} | {plan(r['plan'])} | {r['target_bytes']:,} | {r['reached_bytes']:,} | "
        f"{r['error']:+.1%} | {ratio['compression_ratio']:.1f}x | {ratio['top1_before']:.2f} | {ratio['top1_after']:.2f} | "
        f"{len(r['runs'])} | {(t3 - t2) / 60:.1f} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "sweep-demo-out" / "target"))
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--only", choices=("digits", "mnist10k"))
    args = ap.parse_args()
    out = Path(args.out)
    load = os.getloadavg()
    rows = []
    if args.only in (None, "digits"):
        rows += one("digits", "digits", out, args.short)
    if args.only in (None, "mnist10k"):
        if MNIST.is_file():
            rows += one("mnist10k", f"npz:{MNIST}", out, args.short)
        else:
            print(f"skipping MNIST-10k: {MNIST} not found", file=sys.stderr)
    print(f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; short={args.short}")
    print("| data | run | per layer (sparsity/bits) | asked bytes | file bytes | vs asked | ratio | top-1 dense | top-1 .dcz | runs | minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
