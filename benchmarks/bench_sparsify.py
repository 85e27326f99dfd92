"""Training-time sparsification compared at an equal retraining budget.

For each model (LeNet-300-100 on digits; LeNet-5 on digits resized to 28x28) a dense baseline is
trained once IN THIS PROCESS; every method then gets the same number of retraining epochs from
that baseline, with the same optimizer (SGD, momentum 0.9, lr 0.01 cosine, no weight decay):

    one-shot   magnitude-prune every layer to s, retrain E epochs
    iterative  R rounds of magnitude pruning (kept fraction geometric: (1-s)^(r/R)), E/R epochs each
    agp        Zhu & Gupta's cubic schedule 0 -> s, updates every 1/2 epoch until 3/4 of E
    iht        sparse/dense phases (E/4 sparse, E/6 dense), ending sparse at s
    dns        Dynamic Network Surgery with threshold multiplier c (its sparsity follows from c)

All but DNS prune every Linear/Conv weight to the same per-layer sparsity s. The tables give test
top-1 and the sparsity of the Linear/Conv weights, and per method the highest sparsity whose
accuracy is within 1 point of the dense baseline ("at equal accuracy").

    python benchmarks/bench_sparsify.py            # both models (about 15 minutes on a busy 2-core machine)
    python benchmarks/bench_sparsify.py --quick    # fewer points, for a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dcomp.compressors.dsd import IHT, IHTConfig
from dcomp.compressors.masks import magnitude_mask
from dcomp.compressors.schedules import AGP, AGPConfig
from dcomp.compressors.surgery import DNS, DNSConfig
from dcomp.data import load_dataset
from dcomp.formats.checkpoint import Checkpoint
from dcomp.models import build_zoo, prunable_parameters
from dcomp.retrain import accuracy, retrain
from dcomp.train import TrainConfig, fit

TOL = 1.0  # "equal accuracy": within this many points of the dense baseline


def dense_baseline(arch: str, resize: int | None, epochs: int, seed: int = 0):
    ds = load_dataset("digits", resize)
    torch.manual_seed(seed)
    model = build_zoo(arch, ds.input_shape, ds.num_classes)
    fit(model, ds, TrainConfig(epochs=epochs, lr=0.05, weight_decay=5e-4), seed=seed)
    ck = Checkpoint(arch={"kind": "zoo", "name": arch, "kwargs": {}}, state_dict={}, input_shape=list(ds.input_shape),
                    num_classes=ds.num_classes, data={"spec": "digits", "resize": resize})
    ck.update_from_model(model)
    return ck, ds


def weight_sparsity(ck: Checkpoint) -> float:
    names = list(prunable_parameters(ck.build_model()))
    total = sum(ck.state_dict[n].numel() for n in names)
    zeros = sum(int((ck.state_dict[n] == 0).sum()) for n in names)
    return zeros / total


def with_masks(ck: Checkpoint, s: float) -> Checkpoint:
    out = ck.copy()
    names = prunable_parameters(out.build_model())
    out.masks = {n: magnitude_mask(out.state_dict[n], s, current=out.masks.get(n)) for n in names}
    for n, m in out.masks.items():
        out.state_dict[n] = out.state_dict[n] * m
    return out


def run_method(method: str, base: Checkpoint, ds, s: float | None, epochs: int, rounds: int, c: float | None):
    cfg = TrainConfig(epochs=epochs, lr=0.01, weight_decay=0.0)
    if method == "one-shot":
        out, _ = retrain(with_masks(base, s), ds, cfg)
    elif method == "iterative":
        out = base
        rounds = min(rounds, epochs)
        per = epochs // rounds
        for r in range(1, rounds + 1):
            s_r = 1.0 - (1.0 - s) ** (r / rounds)
            e = per if r < rounds else epochs - per * (rounds - 1)
            out, _ = retrain(with_masks(out, s_r), ds, TrainConfig(epochs=e, lr=0.01, weight_decay=0.0))
    elif method == "agp":
        out, _ = retrain(base, ds, cfg, [AGP(AGPConfig(final_sparsity=s, start=0, every=0.5, end=0.75 * epochs))])
    elif method == "iht":
        out, _ = retrain(base, ds, cfg, [IHT(IHTConfig(sparsity=s, sparse_len=epochs / 4, dense_len=epochs / 6))])
    elif method == "dns":
        out, _ = retrain(base, ds, cfg, [DNS(DNSConfig(c=c))])
    else:
        raise ValueError(method)
    return out


def bench_model(title: str, arch: str, resize: int | None, dense_epochs: int, epochs: int, sparsities, cs, rounds: int):
    t0 = time.perf_counter()
    base, ds = dense_baseline(arch, resize, dense_epochs)
    dense_acc = accuracy(base, ds)
    rows = []
    for method in ("one-shot", "iterative", "agp", "iht"):
        for s in sparsities:
            out = run_method(method, base, ds, s, epochs, rounds, None)
            rows.append((method, f"s={s}", weight_sparsity(out), accuracy(out, ds)))
            print(f"  {title} {method} s={s}: {rows[-1][2]:.4f} {rows[-1][3]:.2f}", file=sys.stderr, flush=True)
    for c in cs:
        out = run_method("dns", base, ds, None, epochs, rounds, c)
        rows.append(("dns", f"c={c}", weight_sparsity(out), accuracy(out, ds)))
        print(f"  {title} dns c={c}: {rows[-1][2]:.4f} {rows[-1][3]:.2f}", file=sys.stderr, flush=True)
    lines = [f"### {title}", "",
             f"Dense baseline: {dense_acc:.2f}% test top-1 ({dense_epochs} epochs); every method retrains {epochs} epochs "
             f"(iterative: {rounds} rounds). Sparsity = share of zero Linear/Conv weights.", "",
             "| method | setting | sparsity | test top-1 % | vs dense |", "|---|---|---:|---:|---:|"]
    for m, setting, sp, acc in rows:
        lines.append(f"| {m} | {setting} | {sp:.2%} | {acc:.2f} | {acc - dense_acc:+.2f} |")
    lines += ["", f"Highest sparsity within {TOL} point of dense ({dense_acc:.2f}%):", "",
              "| method | sparsity | test top-1 % |", "|---|---:|---:|"]
    for m in ("one-shot", "iterative", "agp", "iht", "dns"):
        ok = [(sp, acc) for mm, _, sp, acc in rows if mm == m and acc >= dense_acc - TOL]
        if ok:
            sp, acc = max(ok)
            lines.append(f"| {m} | {sp:.2%} | {acc:.2f} |")
        else:
            lines.append(f"| {m} | none of the tried points | - |")
    lines += ["", f"_{time.perf_counter() - t0:.0f} s for this model on this machine._", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points (smoke run)")
    ap.add_argument("--only", choices=["lenet-300-100", "lenet-5"], help="one model only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny nets)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = [f"torch {torch.__version__}, {torch.get_num_threads()} threads", ""]
    if args.only in (None, "lenet-300-100"):
        sp = [0.9, 0.95] if args.quick else [0.9, 0.95, 0.97]
        cs = [1.5, 2.5] if args.quick else [1.5, 2.0, 2.5]
        out.append(bench_model("LeNet-300-100 on digits (8x8)", "lenet-300-100", None, 20, 3 if args.quick else 6,
                               sp, cs, 3))
    if args.only in (None, "lenet-5"):
        sp = [0.9] if args.quick else [0.9, 0.95]
        cs = [2.0] if args.quick else [1.5, 2.5]
        out.append(bench_model("LeNet-5 on digits resized to 28x28", "lenet-5", 28, 8, 2 if args.quick else 3,
                               sp, cs, 3))
    print("\n".join(out))


if __name__ == "__main__":
    main()
