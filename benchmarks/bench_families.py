"""The other compression families: low-rank factorization and ternary / binary weights.
Prints the tables of docs/bench/families.md.

    python benchmarks/bench_families.py factorize OUT.json    # accuracy, params, MACs, packed size; 3 seeds
    python benchmarks/bench_families.py lowbit OUT.json       # TTQ / binary vs k-means; 3 seeds
    flock /tmp/dcomp-timing.lock python benchmarks/bench_families.py timing OUT.json
    python benchmarks/bench_families.py report OUT.json ...   # markdown tables from the JSON files

Data: MNIST-10k (../shared/data/mnist10k.npz: 8k train / 2k test real MNIST) and `digits`.
Every number of a row comes from the same run as its dense baseline (same seed, same base
model). One torch thread throughout (the machine is shared). `timing` reads the seed-0
checkpoints the `factorize` run saved (FAMILIES_DIR, default /tmp/families_bench) and times
the dense and factorized ONNX exports in onnxruntime in one process, interleaved, 1 thread.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist10k.npz"
if not MNIST.exists():
    MNIST = Path("/work/shared/data/mnist10k.npz")
WORK = Path(os.environ.get("FAMILIES_DIR", "/tmp/families_bench"))
SEEDS = [int(s) for s in os.environ.get("FAMILIES_SEEDS", "0,1,2").split(",")]


def load(spec: str, resize=None):
    from dcomp.data import load_dataset

    return load_dataset(spec, resize)


def train_base(arch: str, data, epochs: int, seed: int):
    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.models import build_zoo
    from dcomp.train import TrainConfig, fit

    torch.manual_seed(seed)
    model = build_zoo(arch, data.input_shape, data.num_classes)
    fit(model, data, TrainConfig(epochs=epochs), seed=seed)
    ck = Checkpoint(arch={"kind": "zoo", "name": arch, "kwargs": {}}, state_dict={},
                    input_shape=list(data.input_shape), num_classes=data.num_classes,
                    data={"spec": data.spec, "resize": None})
    ck.update_from_model(model)
    ck.add_provenance("train", {"epochs": epochs, "seed": seed})
    return ck


def top1(ck, data) -> float:
    from dcomp.retrain import accuracy

    return accuracy(ck, data)


def packed(ck) -> tuple[int, dict]:
    from dcomp.formats import dcz

    data, report = dcz.pack(ck)
    return len(data), report


def macs(ck) -> int:
    from dcomp.compressors.lowrank import layer_macs

    return sum(v["macs"] for v in layer_macs(ck.build_model(), ck.input_shape).values())


def ft_cfg(epochs: int, lr: float = 0.01):
    from dcomp.train import FINETUNE_DEFAULTS, TrainConfig

    return TrainConfig(epochs=epochs, **{**FINETUNE_DEFAULTS, "lr": lr})


# ---- factorization ---------------------------------------------------------------------------------

FACT_CASES = [
    # (model, data spec, base epochs, settings, fine-tune epochs)
    ("lenet-300-100", "mnist", 15, [{"rank": 128}, {"rank": 64}, {"rank": 32}, {"rank": 16}, {"rank": 8}], 5),
    ("lenet-300-100", "digits", 20, [{"rank": 32}, {"rank": 16}, {"rank": 8}, {"energy": 0.9}], 5),
    ("vgg-small", "digits", 20, [{"ratio": 0.5}, {"ratio": 0.25}, {"ratio": 0.1}, {"ratio": 0.25, "conv": "spatial"},
                                 {"energy": 0.9}], 5),
]


# run after the first: --ratio is per layer, and vgg-small's first conv (1 input channel, 288 weights)
# gets rank 1 at ratio 0.25 (a one-channel bottleneck) and the classifier rank 2 (a 2-wide layer
# before 10 outputs); the same budget with those two layers left whole
FACT_EXTRA = [("vgg-small", "digits", 20, [{"ratio": 0.25, "exclude": ["^features\\.0$", "^classifier$"]}], 5)]


def run_factorize(out: Path, cases=FACT_CASES, dense: bool = True) -> None:
    from dcomp.compressors.lowrank import FactorizeConfig, apply_factorize
    from dcomp.compressors.quantization import QuantizeConfig, apply_quantize
    from dcomp.retrain import retrain
    from dcomp.stages import StageContext

    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch, dspec, base_epochs, settings, ft in cases:
        data = load(f"npz:{MNIST}" if dspec == "mnist" else dspec)
        for seed in SEEDS:
            t0 = time.perf_counter()
            base = train_base(arch, data, base_epochs, seed)
            if dense:
                dense_ft, _ = retrain(base, data, ft_cfg(ft), seed=seed)
                q = apply_quantize(base, QuantizeConfig(fc_bits=5, conv_bits=8), StageContext(seed=seed)).checkpoint
                rows.append({"model": arch, "data": dspec, "seed": seed, "setting": "dense", "params": base.param_count(),
                             "macs": macs(base), "packed": packed(base)[0], "top1": top1(base, data),
                             "top1_ft": top1(dense_ft, data), "packed_q": packed(q)[0], "top1_q": top1(q, data),
                             "ranks": {}, "seconds": time.perf_counter() - t0})
            if seed == SEEDS[0] and dense:
                base.save(WORK / f"{arch}-{dspec}-dense.pt")
            for st in settings:
                t0 = time.perf_counter()
                ctx = StageContext(data=data, seed=seed)
                res = apply_factorize(base, FactorizeConfig(**st, finetune=ft_cfg(ft)), ctx)
                ck = res.checkpoint
                q = apply_quantize(ck, QuantizeConfig(fc_bits=5, conv_bits=8), StageContext(seed=seed)).checkpoint
                label = ", ".join(f"{k} {v}" if k != "exclude" else "first conv and classifier whole" for k, v in st.items())
                rows.append({"model": arch, "data": dspec, "seed": seed, "setting": label, "params": ck.param_count(),
                             "macs": macs(ck), "packed": packed(ck)[0], "top1": res.metrics["top1_factorized"],
                             "top1_ft": res.metrics["top1_finetuned"], "packed_q": packed(q)[0], "top1_q": top1(q, data),
                             "ranks": {r["layer"]: r["rank"] for r in res.metrics["layers"] if r["layer"] in
                                       (ck.arch.get("factorized") or {})},
                             "seconds": time.perf_counter() - t0})
                if seed == SEEDS[0]:
                    ck.save(WORK / f"{arch}-{dspec}-{label.replace(', ', '_').replace(' ', '')}.pt")
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out.write_text(json.dumps(rows, indent=1))


def run_timing(out: Path) -> None:
    import subprocess

    import numpy as np

    from dcomp.formats.checkpoint import read_checkpoint
    from dcomp.formats.onnx_export import ExportConfig, export_checkpoint
    from dcomp.runtime.bench import percentiles, time_interleaved
    from dcomp.runtime.runner import OrtRunner

    load_before = os.getloadavg()
    rows = []
    for arch, dspec, *_ in FACT_CASES:
        files = sorted(WORK.glob(f"{arch}-{dspec}-*.pt"))
        dense = WORK / f"{arch}-{dspec}-dense.pt"
        others = [f for f in files if f != dense]
        cks = [(f.stem.split(f"{dspec}-", 1)[1], read_checkpoint(f.read_bytes())) for f in [dense] + others]
        runners = [OrtRunner(export_checkpoint(ck, ExportConfig(variant="dense")).onnx_bytes, 1, name) for name, ck in cks]
        for batch in (1, 64):
            x = np.random.default_rng(0).standard_normal((batch, *cks[0][1].input_shape)).astype(np.float32)
            lat = time_interleaved(runners, x, warmup=20, iters=2000, seconds=1.5)
            base_p50 = percentiles(lat[0])["p50_ms"]
            base_min = float(lat[0].min()) * 1e3
            for (name, _), la in zip(cks, lat):
                p = percentiles(la)
                rows.append({"model": arch, "data": dspec, "setting": name, "batch": batch, **p, "calls": len(la),
                             "min_ms": float(la.min()) * 1e3, "speedup_p50": base_p50 / p["p50_ms"],
                             "speedup_min": base_min / (float(la.min()) * 1e3)})
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out.write_text(json.dumps({"load_before": load_before, "load_after": os.getloadavg(), "uptime": uptime,
                               "rows": rows}, indent=1))


# ---- ternary / binary ------------------------------------------------------------------------------

LOWBIT_CASES = [
    # (model, data, resize, recipe, base epochs, low-bit training epochs, lr, recipe overrides, settings left out)
    # The machine ran at load 14-20 on 2 cores: LeNet-300-100 epochs took ~15 s, LeNet-5 epochs on
    # MNIST-10k ~100 s, so LeNet-5 runs on digits (resized to 28x28, 1,437 training images) and both
    # recipes are shortened (--set overrides, stated in docs/bench/families.md).
    ("lenet-300-100", "mnist", None, "deep-compression.yaml", 10, 4, 0.02,
     ["stages.0.retrain.epochs=2", "stages.1.train.epochs=8"], ()),
    ("lenet-5", "digits", 28, "lenet5.yaml", 10, 3, 0.02, ["stages.1.train.epochs=8"],
     ("k-means 1-bit all layers", "binary, first/last 8/5-bit")),
]
# Centroid fine-tuning moves each centroid by lr x the SUM of its weights' gradients (Han et al.):
# with 4 or 2 clusters over ~100k weights that diverges at the loop's lr (digits, seed 0: 8.9% for
# 2 bits, 7.5% for 1 bit); these centroid rates were picked on digits seed 0 (96.1% / 94.7%).
CENTROID_LR = {2: 1e-3, 1: 2e-4}
MODELS = os.environ.get("FAMILIES_MODELS", "lenet-300-100,lenet-5").split(",")
ONLY = [s for s in os.environ.get("FAMILIES_ONLY", "").split(";") if s]  # a rerun of some settings


def _layer_bits(report: dict, names: list[str]) -> dict:
    out = {}
    for r in report["layers"]:
        if r["name"] in names:
            ind = r.get("indices") or {}
            out[r["name"]] = {"encoding": r["encoding"], "numel": r["numel"], "nnz": r["nnz"],
                              "bits_per_weight": 8 * r["total_bytes"] / max(r["numel"], 1),
                              "coding": ind.get("coding"), "bits_per_symbol": ind.get("bits_per_symbol"),
                              "entropy": ind.get("entropy")}
    return out


def run_lowbit(out: Path) -> None:
    from dcomp.compressors.quantization import QuantizeConfig, apply_quantize, quantizable
    from dcomp.recipe import load_recipe
    from dcomp.retrain import apply_retrain
    from dcomp.compressors.pruning import apply_prune
    from dcomp.stages import StageContext

    rows = []
    cur: dict = {}

    def record(arch, seed, label, ck, t0, extra=None):
        data = cur["data"]
        size, report = packed(ck)
        rows.append({"model": arch, "data": dspec, "seed": seed, "setting": label, "packed": size, "top1": top1(ck, data),
                     "nonzero": ck.nonzero_count(), "params": ck.param_count(),
                     "layers": _layer_bits(report, list(quantizable(ck))), "seconds": time.perf_counter() - t0,
                     **(extra or {})})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "layers"}), file=sys.stderr, flush=True)

    for arch, dspec, resize, recipe_name, base_epochs, low_epochs, lr, sets, leave_out in LOWBIT_CASES:
        if arch not in MODELS:
            continue
        data = load(f"npz:{MNIST}" if dspec == "mnist" else dspec, resize)
        cur["data"] = data
        recipe = load_recipe(ROOT / "configs" / recipe_name, sets)
        st = {s.kind: s.config for s in recipe.stages}
        for seed in SEEDS:
            t0 = time.perf_counter()
            base = train_base(arch, data, base_epochs, seed)
            record(arch, seed, "dense float32", base, t0)
            ctx = StageContext(data=data, seed=seed)
            for label, cfg in [
                ("k-means 5/8-bit (fc/conv)", QuantizeConfig(fc_bits=5, conv_bits=8, finetune=ft_cfg(low_epochs, lr))),
                ("k-means 2-bit all layers", QuantizeConfig(bits=2, finetune=ft_cfg(low_epochs, lr),
                                                            centroid_lr=CENTROID_LR[2])),
                ("k-means 1-bit all layers", QuantizeConfig(bits=1, finetune=ft_cfg(low_epochs, lr),
                                                            centroid_lr=CENTROID_LR[1])),
                ("TTQ all layers", QuantizeConfig(mode="ttq", keep_first_last=False, finetune=ft_cfg(low_epochs, lr))),
                ("TTQ, first/last 8/5-bit", QuantizeConfig(mode="ttq", finetune=ft_cfg(low_epochs, lr))),
                ("binary all layers", QuantizeConfig(mode="binary", keep_first_last=False, finetune=ft_cfg(low_epochs, lr))),
                ("binary, first/last 8/5-bit", QuantizeConfig(mode="binary", finetune=ft_cfg(low_epochs, lr))),
            ]:
                if label in leave_out or (ONLY and label not in ONLY):
                    continue
                t0 = time.perf_counter()
                record(arch, seed, label, apply_quantize(base, cfg, ctx).checkpoint, t0)
            if ONLY:
                continue
            # the Deep Compression pipeline of the shipped recipe: prune + distill, then three endings
            t0 = time.perf_counter()
            pruned = apply_prune(base, st["prune"], ctx).checkpoint
            pruned = apply_retrain(pruned, st["distill"], ctx, teacher_ckpt=base).checkpoint
            t_pr = time.perf_counter() - t0
            qcfg = st["quantize"]
            for label, cfg in [
                (f"{recipe_name}: pruned + k-means (recipe)", qcfg),
                (f"{recipe_name}: pruned + TTQ", qcfg.model_copy(update={"mode": "ttq", "keep_first_last": False})),
                (f"{recipe_name}: pruned + binary", qcfg.model_copy(update={"mode": "binary", "keep_first_last": False})),
            ]:
                t0 = time.perf_counter() - t_pr
                record(arch, seed, label, apply_quantize(pruned, cfg, ctx).checkpoint, t0)
    out.write_text(json.dumps(rows, indent=1))


# ---- report ----------------------------------------------------------------------------------------

def _ms(vals):
    import statistics

    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return m, s


def report(paths: list[Path]) -> None:
    fact: list[dict] = []
    for p in paths:
        obj = json.loads(p.read_text())
        if isinstance(obj, dict):  # timing
            print(f"\ntiming: load average before {obj['load_before']}, after {obj['load_after']} ({obj['uptime']})\n")
            print("| model | data | variant | batch | min ms | p50 ms | p90 ms | vs dense (min) | vs dense (p50) | calls |")
            print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
            for r in obj["rows"]:
                print(f"| {r['model']} | {r['data']} | {r['setting']} | {r['batch']} | {r.get('min_ms', float('nan')):.3f} | "
                      f"{r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r.get('speedup_min', float('nan')):.2f}x | "
                      f"{r['speedup_p50']:.2f}x | {r['calls']} |")
        elif "macs" in obj[0]:
            fact += obj  # factorize and factorize-extra rows: one table
        else:
            _lowbit_table(obj)
    if fact:
        _factorize_table(fact)


def _groups(rows: list[dict]) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["model"], r.get("data", "mnist"), r["setting"]), []).append(r)
    return groups


def _factorize_table(rows: list[dict]) -> None:
    groups = _groups(rows)
    print("\n| model | data | setting | ranks (seed 0) | params | MACs | packed fp32 | top-1 no retrain | "
          "top-1 +5 ep | 5/8-bit packed | 5/8-bit top-1 |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (model, dspec, setting), rs in groups.items():
        dense = groups[(model, dspec, "dense")]
        t, ts = _ms([r["top1"] for r in rs])
        f, fs = _ms([r["top1_ft"] for r in rs])
        q, qs = _ms([r["top1_q"] for r in rs])
        ranks = ", ".join(f"{k}:{v}" for k, v in rs[0]["ranks"].items()) or "-"
        print(f"| {model} | {dspec} | {setting} | {ranks} | {rs[0]['params']:,} ({rs[0]['params'] / dense[0]['params']:.0%}) "
              f"| {rs[0]['macs']:,} ({rs[0]['macs'] / dense[0]['macs']:.0%}) | {rs[0]['packed']:,} B | "
              f"{t:.2f} ± {ts:.2f} | {f:.2f} ± {fs:.2f} | {rs[0]['packed_q']:,} B | {q:.2f} ± {qs:.2f} |")


def _coding(v: dict) -> str:
    """How pack stored a layer: 'codebook' (every index) or 'sparse' (gaps + indices of the
    non-zeros), the index stream's code (huffman / fixed) and, for Huffman, bits per symbol and
    the order-0 entropy of the symbols."""
    enc = "cb" if v["encoding"] == "codebook" else v["encoding"]
    if v.get("coding") == "huffman" and v.get("entropy") is not None:
        return f"({enc}, huff {v['bits_per_symbol']:.2f}/H {v['entropy']:.2f})"
    if v.get("coding"):
        return f"({enc}, {v['coding']} {v['bits_per_symbol']:.0f})"
    return f"({enc})"


def _lowbit_table(rows: list[dict]) -> None:
    groups = _groups(rows)
    print("\n| model | data | setting | packed (mean) | vs float32 | top-1 (mean ± sd) | bits/weight of the quantized layers (seed 0) |")
    print("|---|---|---|---:|---:|---:|---|")
    for (model, dspec, setting), rs in groups.items():
        dense = groups[(model, dspec, "dense float32")]
        size = sum(r["packed"] for r in rs) / len(rs)
        t, ts = _ms([r["top1"] for r in rs])
        bits = "; ".join(f"{n.removesuffix('.weight')} {v['bits_per_weight']:.2f} {_coding(v)}"
                         for n, v in rs[0]["layers"].items()) if setting != "dense float32" else "32"
        print(f"| {model} | {dspec} | {setting} | {size:,.0f} B | {dense[0]['packed'] / size:.1f}x | "
              f"{t:.2f} ± {ts:.2f} (n={len(rs)}) | {bits} |")


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "factorize":
        run_factorize(Path(sys.argv[2]))
    elif what == "factorize-extra":
        run_factorize(Path(sys.argv[2]), FACT_EXTRA, dense=False)
    elif what == "timing":
        run_timing(Path(sys.argv[2]))
    elif what == "lowbit":
        run_lowbit(Path(sys.argv[2]))
    elif what == "report":
        report([Path(p) for p in sys.argv[2:]])
    else:
        raise SystemExit(__doc__)
