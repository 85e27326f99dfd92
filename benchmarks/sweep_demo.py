"""`make sweep-demo`: LeNet-300-100's degradation curves, weight (magnitude) pruning against unit
(neuron) pruning, on digits and on MNIST-10k (../shared/data/mnist10k.npz; skipped with a message
when absent), without retraining (whole model and each layer alone) and with retraining (whole
model, 3 retraining seeds). Writes the pictures to docs/bench/sweep-*.png and docs/bench/sweep.md.

    python benchmarks/sweep_demo.py [--out sweep-demo-out] [--retrain-epochs 2] [--seeds 3]

Everything goes through the CLI (`dcomp train`, `dcomp sweep`), one thread per process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist10k.npz"
DOCS = ROOT / "docs" / "bench"


def dcomp(*args: str) -> str:
    cmd = [sys.executable, "-m", "dcomp", "--threads", "1", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return r.stdout


def pct(v) -> str:
    return "none" if v is None else f"{v:.1%}"


def run(name: str, spec: str, out: Path, train_epochs: int, retrain_epochs: int, seeds: int, shown: str) -> list[str]:
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base.pt"
    t0 = time.time()
    if not base.exists():
        dcomp("train", "--arch", "lenet-300-100", "--data", spec, "--epochs", train_epochs, "-o", base, "-q")
    one = work / "sweep.json"
    dcomp("sweep", base, "--data", spec, "-m", "magnitude", "-m", "neuron", "-o", one, "-q")
    shutil.copy(work / "sweep.png", DOCS / f"sweep-{name}.png")
    doc = json.loads(one.read_text())
    rt = []
    for seed in range(seeds):
        p = work / f"sweep-retrained-seed{seed}.json"
        dcomp("sweep", base, "--data", spec, "-m", "magnitude", "-m", "neuron", "--no-per-layer",
              "--retrain-epochs", retrain_epochs, "--seed", seed, "-o", p, "-q")
        rt.append(json.loads(p.read_text()))
    shutil.copy(work / "sweep-retrained-seed0.png", DOCS / f"sweep-{name}-retrained.png")
    minutes = (time.time() - t0) / 60
    base_top1 = doc["baseline_top1"]
    n_test = {"digits": 359, "mnist10k": 2000}.get(name)
    lines = [f"### LeNet-300-100 on {name} (`--data {shown}`)", "",
             f"Dense baseline (`dcomp train --epochs {train_epochs}`): top-1 {base_top1:.2f}% on the test split"
             + (f" ({n_test} images, 1 image = {100 / n_test:.2f} points)" if n_test else "") + ". "
             f"{len(doc['points'])} points without retraining, {len(rt[0]['points'])} x {seeds} with "
             f"{retrain_epochs} epochs of retraining each (lr 0.01, masks kept); {minutes:.1f} minutes "
             "(points already measured by an earlier run are reused, so a rerun takes less).", "",
             f"![{name}: whole model and each layer alone, no retraining](sweep-{name}.png)", "",
             f"![{name}: whole model, pruned and after {retrain_epochs} epochs of retraining (seed 0)](sweep-{name}-retrained.png)", "",
             "Largest grid sparsity whose accuracy is still within 1 point of the dense baseline "
             "(weights for magnitude, units for neuron; the grid is "
             + ", ".join(f"{s:g}" for s in doc["config"]["grid"]) + "):", "",
             "| method | scope | no retraining | " + " | ".join(f"retrained, seed {s}" for s in range(seeds))
             + " | retrained, median |", "|---|---|---|" + "---|" * (seeds + 1)]
    for row in doc["summary"]:
        scope = "whole model" if row["scope"] == "*" else f"{row['scope']} alone"
        cells = [row["method"], scope, pct(row["within_1pt"])]
        if row["scope"] == "*":
            vals = [next(r for r in d["summary"] if r["method"] == row["method"] and r["scope"] == "*")
                    .get("within_1pt_retrained") for d in rt]
            cells += [pct(v) for v in vals]
            known = [v for v in vals if v is not None]
            cells.append(pct(statistics.median(known)) if known else "none")
        else:
            cells += ["-"] * (seeds + 1)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    # weights removed at those points (units remove whole rows and the next layer's columns)
    total = sum(doc["layers"].values())
    lines += [f"Whole model at a few grid points: share of all {total:,} Linear weights removed (neuron pruning "
              "also removes the next layer's inputs), top-1 right after pruning, and after retraining "
              f"(mean and range over the {seeds} seeds):", "",
              "| method | sparsity | weights removed | top-1 pruned | top-1 retrained, mean | min - max |", "|---|---|---|---|---|---|"]
    for p0 in doc["points"]:
        if p0["scope"] != "*" or p0["sparsity"] not in (0.5, 0.8, 0.9, 0.95, 0.99):
            continue
        accs = [next(p for p in d["points"] if p["method"] == p0["method"] and p["scope"] == "*"
                     and p["sparsity"] == p0["sparsity"])["top1_retrained"] for d in rt]
        lines.append(f"| {p0['method']} | {p0['sparsity']:g} | {p0['removed_fraction']:.1%} | {p0['top1']:.2f} | "
                     f"{statistics.mean(accs):.2f} | {min(accs):.2f} - {max(accs):.2f} |")
    lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "sweep-demo-out"))
    ap.add_argument("--retrain-epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-epochs", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    DOCS.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    sections = [run("digits", "digits", out, args.train_epochs, args.retrain_epochs, args.seeds, "digits")]
    if MNIST.is_file():
        sections.append(run("mnist10k", f"npz:{MNIST}", out, args.train_epochs, args.retrain_epochs, args.seeds,
                            "npz:../shared/data/mnist10k.npz"))
    else:
        print(f"skipping MNIST-10k: {MNIST} not found (see /work/shared/data/README.md)", file=sys.stderr)
    load_end = os.getloadavg()
    head = ["# Sensitivity sweeps (`dcomp sweep`)", "",
            "Produced by `make sweep-demo` (`python benchmarks/sweep_demo.py "
            f"--retrain-epochs {args.retrain_epochs} --seeds {args.seeds} --train-epochs {args.train_epochs}`), "
            "torch 2.13 CPU, one thread per process, on a shared 2-core machine: load average "
            f"{load[0]:.1f} at the start and {load_end[0]:.1f} at the end (loaded; accuracies do not depend on it).", ""]
    text = "\n".join(head + [line for s in sections for line in s])
    print(text)
    Path(out / "sweep-results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
