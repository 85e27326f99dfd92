"""Retraining a 50%-filter-pruned MobileNetV2 on MNIST-10k: accuracy before and after (docs/bench/structured.md).

    python benchmarks/bench_structured_retrain.py [--epochs 3] [--retrain-epochs 2] [--seeds 0]

torchvision's mobilenet_v2 (random init, 10 classes) with its first convolution taking 1 channel
(MNIST is grey), at 32x32 input (``--resize 32``), trained ``--epochs`` on the 8,000 training images
of ../shared/data/mnist10k.npz; then ``prune --method filter --sparsity 0.5`` (every conv group,
L1; BatchNorm statistics re-estimated on 2,048 training images) and ``--retrain-epochs`` of
retraining (lr 0.01, cosine). Test top-1 on the 2,000 test images at each step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist10k.npz")


def mobilenet_v2_gray(num_classes: int = 10) -> nn.Module:
    """torchvision's mobilenet_v2 with a 1-channel stem (for MNIST)."""
    from dcomp.models.vision import vision_models

    m = vision_models().mobilenet_v2(num_classes=num_classes)
    m.features[0][0] = nn.Conv2d(1, 32, 3, stride=2, padding=1, bias=False)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--retrain-epochs", type=int, default=2)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data", default=DATA)
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dcomp.compressors.pruning import PruneConfig, apply_prune
    from dcomp.data import load_dataset
    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.retrain import accuracy
    from dcomp.stages import StageContext
    from dcomp.train import TrainConfig, fit

    ds = load_dataset(f"npz:{a.data}", resize=32)
    for seed in [int(s) for s in a.seeds.split(",")]:
        t0 = time.time()
        torch.manual_seed(seed)
        model = mobilenet_v2_gray()
        fit(model, ds, TrainConfig(epochs=a.epochs, lr=0.05), seed=seed)
        ck = Checkpoint(arch={"kind": "import", "target": "bench_structured_retrain:mobilenet_v2_gray", "kwargs": {}},
                        state_dict={}, input_shape=list(ds.input_shape), num_classes=10,
                        data={"spec": ds.spec, "resize": 32})
        ck.update_from_model(model.eval())
        dense = accuracy(ck, ds, True)
        cfg = PruneConfig(method="filter", sparsity=0.5, retrain=TrainConfig(epochs=a.retrain_epochs, lr=0.01))
        res = apply_prune(ck, cfg, StageContext(data=ds, seed=seed, trust_pickle=True))  # a factory of this script
        h = res.metrics["history"][0]
        o = res.metrics["overall"]
        print(json.dumps({"seed": seed, "epochs": a.epochs, "retrain_epochs": a.retrain_epochs, "top1_dense": dense,
                          "top1_pruned_stale_bn": h.get("top1_pruned_stale_bn"), "top1_pruned": h.get("top1_pruned"),
                          "top1_retrained": h.get("top1_retrained"), "params": [o["params_before"], o["params_after"]],
                          "macs": [o.get("macs_before"), o.get("macs_after")], "seconds": round(time.time() - t0),
                          "load": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
