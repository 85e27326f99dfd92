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
accuracy is within 1 (and 2) points of the dense baseline ("at equal accuracy").

A third table (``--only group-lasso``): group lasso (row + column groups, proximal) on
LeNet-300-100 followed by structural removal of the zeroed units, for several lambdas.

    python benchmarks/bench_sparsify.py            # both models and the group-lasso table (about 15 minutes with 1 thread)
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

TOLS = (1.0, 2.0)  # "equal accuracy": within this many points of the dense baseline


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


def run_method(method: str, base: Checkpoint, ds, s: float | None, epochs: int, rounds: int, c: float | None,
               seed: int = 0):
    cfg = TrainConfig(epochs=epochs, lr=0.01, weight_decay=0.0)
    if method == "one-shot":
        out, _ = retrain(with_masks(base, s), ds, cfg, seed=seed)
    elif method == "iterative":
        out = base
        rounds = min(rounds, epochs)
        per = epochs // rounds
        for r in range(1, rounds + 1):
            s_r = 1.0 - (1.0 - s) ** (r / rounds)
            e = per if r < rounds else epochs - per * (rounds - 1)
            out, _ = retrain(with_masks(out, s_r), ds, TrainConfig(epochs=e, lr=0.01, weight_decay=0.0), seed=seed)
    elif method == "agp":
        out, _ = retrain(base, ds, cfg, [AGP(AGPConfig(final_sparsity=s, start=0, every=0.5, end=0.75 * epochs))], seed=seed)
    elif method == "iht":
        out, _ = retrain(base, ds, cfg, [IHT(IHTConfig(sparsity=s, sparse_len=epochs / 4, dense_len=epochs / 6))], seed=seed)
    elif method == "dns":
        out, _ = retrain(base, ds, cfg, [DNS(DNSConfig(c=c), seed=seed)], seed=seed)
    else:
        raise ValueError(method)
    return out


def bench_model(title: str, arch: str, resize: int | None, dense_epochs: int, epochs: int, sparsities, cs, rounds: int,
                seeds: int):
    """Every point is the mean over ``seeds`` runs (each seed: its own dense baseline and retraining)."""
    t0 = time.perf_counter()
    points = [(m, s, None) for m in ("one-shot", "iterative", "agp", "iht") for s in sparsities] + \
             [("dns", None, c) for c in cs]
    acc_sum = {p: 0.0 for p in points}
    sp_sum = {p: 0.0 for p in points}
    dense_acc = 0.0
    for seed in range(seeds):
        base, ds = dense_baseline(arch, resize, dense_epochs, seed)
        dense_acc += accuracy(base, ds) / seeds
        for p in points:
            method, s, c = p
            out = run_method(method, base, ds, s, epochs, rounds, c, seed)
            sp, acc = weight_sparsity(out), accuracy(out, ds)
            sp_sum[p] += sp / seeds
            acc_sum[p] += acc / seeds
            print(f"  {title} seed {seed} {method} s={s} c={c}: {sp:.4f} {acc:.2f}", file=sys.stderr, flush=True)
    rows = [(m, f"s={s}" if c is None else f"c={c}", sp_sum[(m, s, c)], acc_sum[(m, s, c)]) for m, s, c in points]
    lines = [f"### {title}", "",
             f"Dense baseline: {dense_acc:.2f}% test top-1 ({dense_epochs} epochs); every method retrains {epochs} epochs "
             f"(iterative: {rounds} rounds). Sparsity = share of zero Linear/Conv weights. Mean of {seeds} seeds "
             f"(test set: {len(ds.y_test)} images, so one image = {100 / len(ds.y_test):.2f} points).", "",
             "| method | setting | sparsity | test top-1 % | vs dense |", "|---|---|---:|---:|---:|"]
    for m, setting, sp, acc in rows:
        lines.append(f"| {m} | {setting} | {sp:.2%} | {acc:.2f} | {acc - dense_acc:+.2f} |")
    for tol in TOLS:
        lines += ["", f"Highest sparsity within {tol} point(s) of dense ({dense_acc:.2f}%):", "",
                  "| method | sparsity | test top-1 % |", "|---|---:|---:|"]
        for m in ("one-shot", "iterative", "agp", "iht", "dns"):
            ok = [(sp, acc) for mm, _, sp, acc in rows if mm == m and acc >= dense_acc - tol]
            if ok:
                sp, acc = max(ok)
                lines.append(f"| {m} | {sp:.2%} | {acc:.2f} |")
            else:
                lines.append(f"| {m} | none of the tried points | - |")
    lines += ["", f"_{time.perf_counter() - t0:.0f} s for this model on this machine._", ""]
    return "\n".join(lines)


def bench_group_lasso(lams, epochs: int, seeds: int) -> str:
    """Group lasso (filter/row + column groups, proximal) then structural removal of the zero units."""
    from dcomp.compressors.regularizers import GroupLassoConfig
    from dcomp.retrain import RetrainConfig, apply_retrain
    from dcomp.stages import StageContext

    lines = ["### Group lasso + structural removal, LeNet-300-100 on digits", "",
             f"Same dense baselines and budget ({epochs} epochs, lr 0.01 cosine); groups = row (fc units, bias "
             f"included) and column; units whose group norm is below 1e-6 are removed by "
             f"`remove_units`. Mean of {seeds} seeds.", "",
             "| lambda | hidden units left (of 300 + 100) | params left | test top-1 % before removal | after removal | vs dense |",
             "|---:|---:|---:|---:|---:|---:|"]
    for lam in lams:
        acc = {"units": 0.0, "params": 0.0, "before": 0.0, "after": 0.0, "dense": 0.0, "dense_params": 0}
        for seed in range(seeds):
            base, ds = dense_baseline("lenet-300-100", None, 30, seed)
            cfg = RetrainConfig(train=TrainConfig(epochs=epochs, lr=0.01, weight_decay=0.0),
                                group_lasso=GroupLassoConfig(lam=lam, groups=["row", "column"], remove_below=1e-6))
            r = apply_retrain(base, cfg, StageContext(data=ds, seed=seed))
            sd = r.checkpoint.state_dict
            acc["units"] += (sd["fc1.weight"].shape[0] + sd["fc2.weight"].shape[0]) / seeds
            acc["params"] += r.metrics["params"] / seeds
            acc["before"] += r.metrics["top1_before_removal"] / seeds
            acc["after"] += r.metrics["top1_after"] / seeds
            acc["dense"] += accuracy(base, ds) / seeds
            acc["dense_params"] = base.param_count()
            print(f"  group lasso {lam} seed {seed}: {r.metrics['units_removed']} {r.metrics['top1_after']:.2f}",
                  file=sys.stderr, flush=True)
        lines.append(f"| {lam} | {acc['units']:.0f} | {acc['params']:,.0f} (dense {acc['dense_params']:,}) | {acc['before']:.2f} | "
                     f"{acc['after']:.2f} | {acc['after'] - acc['dense']:+.2f} |")
    return "\n".join(lines + [""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points (smoke run)")
    ap.add_argument("--only", choices=["lenet-300-100", "lenet-5", "group-lasso"], help="one part only")
    ap.add_argument("--seeds", type=int, default=3, help="runs per point (own dense baseline each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny nets)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = [f"torch {torch.__version__}, {torch.get_num_threads()} threads", ""]
    if args.only in (None, "lenet-300-100"):
        sp = [0.9, 0.95] if args.quick else [0.8, 0.9, 0.93, 0.95, 0.97]
        cs = [1.5, 2.5] if args.quick else [1.0, 1.5, 2.0, 2.5, 3.0]
        out.append(bench_model("LeNet-300-100 on digits (8x8)", "lenet-300-100", None, 30, 3 if args.quick else 12,
                               sp, cs, 3, 1 if args.quick else args.seeds))
    if args.only in (None, "lenet-5"):
        sp = [0.9] if args.quick else [0.9, 0.95, 0.97, 0.98]
        cs = [2.0] if args.quick else [1.5, 2.0, 2.5, 3.0, 3.5]
        out.append(bench_model("LeNet-5 on digits resized to 28x28", "lenet-5", 28, 10, 2 if args.quick else 6,
                               sp, cs, 3, 1 if args.quick else args.seeds))
    if args.only in (None, "group-lasso"):
        out.append(bench_group_lasso([0.05, 0.1, 0.2, 0.3, 0.4] if not args.quick else [0.1], 3 if args.quick else 12,
                                     1 if args.quick else args.seeds))
    print("\n".join(out))


if __name__ == "__main__":
    main()
