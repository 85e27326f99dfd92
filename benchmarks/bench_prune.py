"""Pruning benchmark: prints the markdown tables of docs/bench/prune.md.

    python benchmarks/bench_prune.py            # everything (a few minutes on 2 cores)
    python benchmarks/bench_prune.py --only big # just the 50M-weight layer

1. LeNet-300-100 on digits: dense baseline (as `dcomp train --epochs 20`), per-layer 90% magnitude
   pruning one-shot then retrained, and iterative (3 rounds); top-1 against the dense baseline.
2. Filter pruning 50% of vgg-small and resnet-small (trained on digits first): conv weight counts
   and top-1 before, right after pruning, and after retraining.
3. A 50M-weight Linear layer: exactness, time and peak memory of layer-wise / global / 2:4 masks,
   against a full sort of the same weights in the same process (torch.quantile refuses > 16M).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from dcomp.compressors.pruning import PruneConfig, apply_prune
from dcomp.data import load_dataset
from dcomp.formats.checkpoint import Checkpoint
from dcomp.models import build_zoo
from dcomp.retrain import accuracy, retrain
from dcomp.stages import StageContext
from dcomp.train import TrainConfig, fit


def _train(arch: str, ds, epochs: int, seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    model = build_zoo(arch, ds.input_shape, ds.num_classes)
    fit(model, ds, TrainConfig(epochs=epochs), seed=seed)  # the `dcomp train` defaults
    ck = Checkpoint(arch={"kind": "zoo", "name": arch, "kwargs": {}}, state_dict={}, input_shape=list(ds.input_shape),
                    num_classes=ds.num_classes, data={"spec": ds.spec, "resize": None})
    ck.update_from_model(model)
    return ck


def _sparsity(ck: Checkpoint) -> float:
    n = sum(m.numel() for m in ck.masks.values())
    return 1.0 - sum(int(m.sum()) for m in ck.masks.values()) / max(n, 1)


def lenet(epochs: int, retrain_epochs: int) -> None:
    ds = load_dataset("digits")
    dense = _train("lenet-300-100", ds, epochs)
    base = accuracy(dense, ds)
    rcfg = TrainConfig(epochs=retrain_epochs, lr=0.01, weight_decay=0.0)
    rows = [("dense baseline", f"{epochs} epochs", 0.0, base, base)]
    one = apply_prune(dense, PruneConfig(sparsity=0.9), StageContext(data=ds))
    pruned_acc = one.metrics["top1_after"]
    back, _ = retrain(one.checkpoint, ds, rcfg, seed=1)
    rows.append(("per-layer 90%, one shot + retrain", f"{retrain_epochs} epochs", _sparsity(back), pruned_acc,
                 accuracy(back, ds)))
    it_epochs = max(1, retrain_epochs // 3)
    it = apply_prune(dense, PruneConfig(sparsity=0.9, rounds=3, retrain=TrainConfig(epochs=it_epochs, lr=0.01,
                                                                                     weight_decay=0.0)),
                     StageContext(data=ds, seed=1))
    rows.append(("per-layer 90%, 3 rounds (linear)", f"3 x {it_epochs} epochs", _sparsity(it.checkpoint),
                 it.metrics["history"][-1]["top1_pruned"], it.metrics["top1_after"]))
    print(f"\n### LeNet-300-100 on digits ({len(ds.x_test)} test images; 1 image = {100 / len(ds.x_test):.2f} points)\n")
    print("| run | retraining | sparsity | top-1 pruned (%) | top-1 final (%) | vs dense (points) |")
    print("|---|---|---|---|---|---|")
    for name, rt, sp, pa, fa in rows:
        print(f"| {name} | {rt} | {sp:.2%} | {pa:.2f} | {fa:.2f} | {fa - base:+.2f} |")


def filters(epochs: int, retrain_epochs: int) -> None:
    ds = load_dataset("digits")
    print("\n### Filter pruning 50% (L1 norm, Li et al.) on digits\n")
    print("| model | conv weights before | after | ratio | params before | after | top-1 dense | pruned | retrained |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in ("vgg-small", "resnet-small"):
        dense = _train(arch, ds, epochs)
        res = apply_prune(dense, PruneConfig(method="filter", sparsity=0.5), StageContext(data=ds))
        back, _ = retrain(res.checkpoint, ds, TrainConfig(epochs=retrain_epochs, lr=0.01, weight_decay=0.0), seed=1)
        o = res.metrics["overall"]
        print(f"| {arch} | {o['conv_weights_before']:,} | {o['conv_weights_after']:,} | {o['conv_ratio']:.3f} | "
              f"{o['params_before']:,} | {o['params_after']:,} | {res.metrics['top1_before']:.2f} | "
              f"{res.metrics['top1_after']:.2f} | {accuracy(back, ds):.2f} |")


def _peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def big(n_out: int = 7072, n_in: int = 7072) -> None:
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in)
    numel = w.numel()
    ck = Checkpoint(arch={"kind": "import", "target": "torch.nn:Linear", "kwargs": {"in_features": n_in, "out_features": n_out}},
                    state_dict={"weight": w, "bias": torch.zeros(n_out)}, input_shape=[n_in], num_classes=n_out)
    wbytes = numel * 4
    print(f"\n### One Linear layer of {numel / 1e6:.1f}M weights ({wbytes / 2**20:.0f} MiB)\n")
    try:
        torch.quantile(w.abs().reshape(-1), 0.9)
        q = "works"
    except RuntimeError as e:
        q = f"refuses ({str(e).splitlines()[0][:60]}...)"
    print(f"torch.quantile on it: {q}\n")
    print("| operation | time (s) | vs full sort | peak RSS above start (x weight size) | exact |")
    print("|---|---|---|---|---|")
    gc.collect()
    _peak_rss_reset()
    start = _rss_kib("VmRSS")
    t = time.perf_counter()
    s = torch.sort(w.abs().reshape(-1)).values
    thr = s[int(round(0.9 * numel)) - 1]
    t_sort = time.perf_counter() - t
    peak = (_rss_kib("VmHWM") - start) * 1024 / wbytes
    del s, thr
    print(f"| baseline: full sort of |w| | {t_sort:.2f} | 1.00x | {peak:.1f} | - |")
    for label, cfg in [("layer-wise 90% (kthvalue)", PruneConfig(sparsity=0.9)),
                       ("global 90%", PruneConfig(method="global", sparsity=0.9)),
                       ("2:4", PruneConfig(method="nm", nm="2:4"))]:
        gc.collect()
        _peak_rss_reset()
        start = _rss_kib("VmRSS")
        t = time.perf_counter()
        out = apply_prune(ck, cfg).checkpoint
        dt = time.perf_counter() - t
        peak = (_rss_kib("VmHWM") - start) * 1024 / wbytes
        m = out.masks["weight"]
        if cfg.method == "nm":
            exact = bool(((m.reshape(-1, 4)).sum(1) == 2).all())
        else:
            exact = int((~m).sum()) == round(0.9 * numel)
        print(f"| {label} (whole prune stage) | {dt:.2f} | {dt / t_sort:.2f}x | {peak:.1f} | {exact} |")
        del out, m
    print("\n(peak = the |w| scores, kthvalue's working copy, the bool mask (1/4) and the new pruned "
          "weight tensor; the architecture is built on the meta device, so it costs nothing)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["lenet", "filters", "big"])
    ap.add_argument("--epochs", type=int, default=20, help="dense training epochs of LeNet-300-100")
    ap.add_argument("--conv-epochs", type=int, default=10, help="dense training epochs of vgg/resnet-small")
    ap.add_argument("--retrain-epochs", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.only in (None, "lenet"):
        lenet(args.epochs, args.retrain_epochs)
    if args.only in (None, "filters"):
        filters(args.conv_epochs, args.retrain_epochs)
    if args.only in (None, "big"):
        big()


if __name__ == "__main__":
    main()
