"""Pruning benchmark: prints the markdown tables of docs/bench/prune.md.

    python benchmarks/bench_prune.py            # everything (a few minutes on 2 cores)
    python benchmarks/bench_prune.py --only big # just the 50M-weight layer

1. LeNet-300-100 on digits: dense baseline (as `dcomp train --epochs 20`), per-layer 90% magnitude
   pruning one-shot then retrained, and iterative (5 rounds); top-1 against the dense baseline,
   for several retraining seeds (the digits test set has only 359 images).
2. Filter pruning 50% of vgg-small and resnet-small (trained on digits first): conv weight counts
   and top-1 before, right after pruning (stale and re-estimated BatchNorm), and after retraining.
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


def lenet(epochs: int, retrain_epochs: int, seeds: int) -> None:
    ds = load_dataset("digits")
    dense = _train("lenet-300-100", ds, epochs)
    base = accuracy(dense, ds)
    runs = {
        f"one shot, then retrain {retrain_epochs} epochs (lr 0.01)": lambda seed: _one_shot(dense, ds, retrain_epochs, seed),
        "iterative: 5 rounds, cubic schedule, 6 epochs each (lr 0.05)": lambda seed: apply_prune(
            dense, PruneConfig(sparsity=0.9, rounds=5, schedule="cubic",
                               retrain=TrainConfig(epochs=6, lr=0.05, weight_decay=0.0)),
            StageContext(data=ds, seed=seed)),
    }
    print(f"\n### LeNet-300-100 on digits, every layer pruned to 90% ({len(ds.x_test)} test images; "
          f"1 image = {100 / len(ds.x_test):.2f} points)\n")
    print(f"Dense baseline (`dcomp train --epochs {epochs}` defaults): top-1 {base:.2f}%.\n")
    print("| run | retraining seed | sparsity | top-1 right after the last pruning step (%) | top-1 final (%) | vs dense (points) |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        deltas = []
        for seed in range(1, seeds + 1):
            res = run(seed)
            final = res.metrics["top1_after"]
            deltas.append(final - base)
            print(f"| {name} | {seed} | {res.metrics['overall']['sparsity']:.2%} | "
                  f"{res.metrics['history'][-1]['top1_pruned']:.2f} | {final:.2f} | {final - base:+.2f} |")
        print(f"| {name}: mean over seeds | | | | | **{sum(deltas) / len(deltas):+.2f}** |")


def _one_shot(dense, ds, epochs, seed):
    res = apply_prune(dense, PruneConfig(sparsity=0.9, retrain=TrainConfig(epochs=epochs, lr=0.01, weight_decay=0.0)),
                      StageContext(data=ds, seed=seed))
    return res


def filters(epochs: int, retrain_epochs: int) -> None:
    ds = load_dataset("digits")
    print(f"\n### Filter pruning 50% (L1 norm, Li et al.) on digits; dense nets trained {epochs} epochs, "
          f"retrained {retrain_epochs} epochs (lr 0.01)\n")
    print("| model | conv weights before | after | ratio | params before | after | top-1 dense | pruned (stale BN) "
          "| pruned + BN re-estimated | retrained |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in ("vgg-small", "resnet-small"):
        dense = _train(arch, ds, epochs)
        res = apply_prune(dense, PruneConfig(method="filter", sparsity=0.5), StageContext(data=ds))
        back, _ = retrain(res.checkpoint, ds, TrainConfig(epochs=retrain_epochs, lr=0.01, weight_decay=0.0), seed=1)
        o, h = res.metrics["overall"], res.metrics["history"][-1]
        print(f"| {arch} | {o['conv_weights_before']:,} | {o['conv_weights_after']:,} | {o['conv_ratio']:.3f} | "
              f"{o['params_before']:,} | {o['params_after']:,} | {res.metrics['top1_before']:.2f} | "
              f"{h['top1_pruned_stale_bn']:.2f} | {h['top1_pruned']:.2f} | {accuracy(back, ds):.2f} |")


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
    print(f"| baseline: full sort of abs(w) | {t_sort:.2f} | 1.00x | {peak:.1f} | - |")
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
    ap.add_argument("--seeds", type=int, default=3, help="retraining seeds for LeNet-300-100")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.only in (None, "lenet"):
        lenet(args.epochs, args.retrain_epochs, args.seeds)
    if args.only in (None, "filters"):
        filters(args.conv_epochs, args.retrain_epochs)
    if args.only in (None, "big"):
        big()


if __name__ == "__main__":
    main()
