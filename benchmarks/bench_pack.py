"""Benchmark the .dcz packer: speed on a 25M-parameter model and size on LeNet-300-100.

    python benchmarks/bench_pack.py            # prints markdown tables (docs/bench/pack.md)
    python benchmarks/bench_pack.py --quick    # a 2.5M-parameter model instead of 25M

Part 1: four 2500x2500 Linear weights (25M parameters), 90% magnitude-pruned, 5-bit k-means
(dcomp's own quantize_weight). Times `pack` (with and without the built-in verification decode)
and decoding the .dcz against `torch.load(weights_only=True)` of the same model's dense float32
state_dict from a file, all in this process (best of 3 after a warm-up; the cold first decode,
which may include numba's compile-or-cache-load, is reported too).

Part 2: LeNet-300-100 (the 784-300-100-10 MLP, digits resized to 28x28) trained here, pruned by
magnitude and quantized with k-means, packed: file size vs float32 dense bytes, next to Deep
Compression's 40x for LeNet-300-100 on MNIST (Han et al. 2016, Table 1). Each file is also packed
with an uncompressed header (format 1.0 layout, `PackConfig(compress_header=False)`) in the same
process, so the header's share and the effect of zlib-compressing it are measured side by side.

Part 2b: float16-exact payloads (format 1.2). The 90%/5-bit checkpoint of part 2 (and the recipe
output of part 3) with its biases and codebooks rounded to the nearest float16 here
(`t.half().float()`, the weights re-derived from the rounded codebook), packed with and without
`PackConfig(fp16_exact=...)`, next to the unrounded checkpoint; top-1 is measured before and after
the rounding.

Part 3 (skip with --no-recipe): `make demo`'s pipeline, `dcomp train` (20 epochs) and
`dcomp run configs/deep-compression.yaml` on LeNet-300-100 with the 8x8 digits as they are (50,610
parameters; its provenance holds every stage's parameters and metrics), run as subprocesses in a
temporary directory; the resulting .dcz is then re-packed here with and without header compression.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from dcomp.compressors import huffman as hf
from dcomp.compressors import rans
from dcomp.compressors.masks import magnitude_mask
from dcomp.compressors.quantization import quantize_weight
from dcomp.formats import dcz
from dcomp.formats.checkpoint import Checkpoint


def best_of(fn, n=3):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def big_model(layers: int, size: int, sparsity: float, bits: int) -> Checkpoint:
    g = torch.Generator().manual_seed(0)
    sd, masks, quant = {}, {}, {}
    for i in range(layers):
        w = torch.randn(size, size, generator=g) * 0.02
        m = magnitude_mask(w, sparsity)
        entry, new_w, _ = quantize_weight(w, m, bits, max_iter=30)
        sd[f"fc{i}.weight"], masks[f"fc{i}.weight"], quant[f"fc{i}.weight"] = new_w, m, entry
        sd[f"fc{i}.bias"] = torch.randn(size, generator=g) * 0.01
    return Checkpoint(arch={"kind": "import", "target": "bench:big", "kwargs": {}}, state_dict=sd,
                      input_shape=[size], num_classes=size, masks=masks, quant=quant)


def speed(quick: bool) -> list[str]:
    layers, size = (4, 800) if quick else (4, 2500)
    t = time.perf_counter()
    ck = big_model(layers, size, 0.9, 5)
    build = time.perf_counter() - t
    params = sum(v.numel() for v in ck.state_dict.values())

    t = time.perf_counter()
    data, report = dcz.pack(ck, dcz.PackConfig())
    pack_verify = time.perf_counter() - t
    t = time.perf_counter()
    dcz.pack(ck, dcz.PackConfig(verify=False))
    pack_plain = time.perf_counter() - t
    data_h, _ = dcz.pack(ck, dcz.PackConfig(ans=False, verify=False))   # before rANS (format 1.2 streams)

    with tempfile.TemporaryDirectory() as d:
        dense = os.path.join(d, "dense.pt")
        torch.save(ck.state_dict, dense)
        dense_bytes = os.path.getsize(dense)
        packed = os.path.join(d, "model.dcz")
        with open(packed, "wb") as f:
            f.write(data)
        packed_h = os.path.join(d, "model-huffman.dcz")
        with open(packed_h, "wb") as f:
            f.write(data_h)

        def load_dcz_h():
            with open(packed_h, "rb") as f:
                dcz.read_bytes(f.read(), source="model-huffman.dcz")

        def load_dense():
            torch.load(dense, map_location="cpu", weights_only=True)

        def load_dcz():
            with open(packed, "rb") as f:
                dcz.read_bytes(f.read(), source="model.dcz")

        hf._KERNEL = False  # fresh: the first decode pays numba's compile or cache load
        rans._KERNELS = False
        t = time.perf_counter()
        load_dcz()
        cold = time.perf_counter() - t
        load_dense()
        load_dcz_h()
        load1 = os.getloadavg()[0]
        # interleaved, so that load from other processes on the machine hits all alike
        tl, dz, dh = [], [], []
        for _ in range(5):
            tl.append(best_of(load_dense, 1)[0])
            dz.append(best_of(load_dcz, 1)[0])
            dh.append(best_of(load_dcz_h, 1)[0])
        tl_min, tl_med, dz_min, dz_med = min(tl), statistics.median(tl), min(dz), statistics.median(dz)
        dh_min, dh_med = min(dh), statistics.median(dh)
        saved = hf._KERNEL
        hf._KERNEL = None  # numpy-only reference decoder
        np_min, np_med = best_of(load_dcz, 1)
        hf._KERNEL = saved

    streams = [s for r in report["layers"] for s in (r["gaps"], r["indices"]) if s and s["coding"] != "fixed"]
    worst = max((s["bits_per_symbol"] / s["entropy"] - 1) for s in streams) if streams else 0.0
    codings = sorted({s["coding"] for r in report["layers"] for s in (r["gaps"], r["indices"]) if s})
    rows = [
        f"model: {layers} x Linear {size}x{size} + biases = {params:,} parameters, 90% pruned, 5-bit k-means "
        f"(built in {build:.1f} s)",
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| dense float32 state_dict (torch.save) | {dense_bytes / 2**20:.1f} MiB | |",
        f"| .dcz file (streams: {', '.join(codings)}) | {len(data) / 2**20:.2f} MiB ({dense_bytes / len(data):.1f}x smaller) | |",
        f"| .dcz file, Huffman/fixed only (`ans=False`) | {len(data_h) / 2**20:.2f} MiB | |",
        f"| load average (1 min) during the timed loads | {load1:.1f} on {os.cpu_count()} cores | |",
        f"| `pack` incl. verification decode | {pack_verify:.2f} s | < 10 s |",
        f"| `pack` without verification | {pack_plain:.2f} s | |",
        f"| `torch.load(weights_only=True)` dense, best / median of 5 | {tl_min * 1e3:.0f} / {tl_med * 1e3:.0f} ms | baseline |",
        f"| .dcz decode (numba kernel), best / median of 5 | {dz_min * 1e3:.0f} / {dz_med * 1e3:.0f} ms | |",
        f"| ratio decode / torch.load (best) | {dz_min / tl_min:.2f}x | <= 2x |",
        f"| ratio decode / torch.load (median) | {dz_med / tl_med:.2f}x | <= 2x |",
        f"| .dcz decode, Huffman/fixed-only file, best / median of 5 | {dh_min * 1e3:.0f} / {dh_med * 1e3:.0f} ms "
        f"({dh_min / tl_min:.2f}x / {dh_med / tl_med:.2f}x torch.load) | <= 2x |",
        f"| first decode in a fresh process state (numba compile or cache load) | {cold * 1e3:.0f} ms | |",
        f"| .dcz decode, numpy-only lockstep decoder (one run) | {np_min * 1e3:.0f} ms ({np_min / tl_min:.1f}x torch.load) | |",
        f"| entropy-coded streams: worst bits/symbol over entropy | +{100 * worst:.2f}% | <= 2% |",
    ]
    return rows


def lenet(sparsity: float, bits: int, epochs: int) -> dict:
    from dcomp.compressors.pruning import PruneConfig, apply_prune
    from dcomp.compressors.quantization import QuantizeConfig, apply_quantize
    from dcomp.data import load_dataset
    from dcomp.models import build_zoo
    from dcomp.retrain import accuracy, retrain
    from dcomp.stages import StageContext
    from dcomp.train import TrainConfig, fit

    ds = load_dataset("digits", 28)
    torch.manual_seed(0)
    model = build_zoo("lenet-300-100", ds.input_shape, ds.num_classes)
    fit(model, ds, TrainConfig(epochs=epochs))
    ck = Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}}, state_dict={},
                    input_shape=list(ds.input_shape), num_classes=ds.num_classes, data={"spec": "digits", "resize": 28})
    ck.update_from_model(model)
    ck.add_provenance("train", {"epochs": epochs})
    top_dense = accuracy(ck, ds)
    ctx = StageContext(data=ds)
    pruned = apply_prune(ck, PruneConfig(sparsity=sparsity, min_weights=0), ctx).checkpoint
    pruned, _ = retrain(pruned, ds, TrainConfig(epochs=epochs, lr=0.01))  # Deep Compression: prune, retrain
    q = apply_quantize(pruned, QuantizeConfig(bits=bits), ctx).checkpoint
    q, _ = retrain(q, ds, TrainConfig(epochs=1, lr=0.001))                   # then centroid fine-tuning
    top_q = accuracy(q, ds)
    data, report = dcz.pack(q)
    plain, plain_report = dcz.pack(q, dcz.PackConfig(compress_header=False, header="json"))  # 1.0 layout: JSON as is
    back = dcz.read_bytes(data)
    top_back = accuracy(back, ds)
    params = sum(v.numel() for v in q.state_dict.values())
    nnz = sum(int(torch.count_nonzero(v)) for v in q.state_dict.values())
    buf = io.BytesIO()
    torch.save(q.state_dict, buf)
    head = report["header_bytes"]
    return {"ckpt": q, "ds": ds, "sparsity": sparsity, "bits": bits, "params": params, "nnz": nnz, "dense": params * 4,
            "file": len(data), "ratio": params * 4 / len(data), "ratio_no_header": params * 4 / (len(data) - head),
            "header": head, "plain_file": len(plain), "plain_header": plain_report["header_bytes"],
            "header_json": report["header_json_bytes"], "top_dense": top_dense, "top_q": top_q, "top_back": top_back, "report": report}


def size(epochs: int) -> list[str]:
    rows = ["| LeNet-300-100 | density | bits | params | float32 dense | .dcz | ratio | ratio without header | "
            "top-1 dense -> pruned+quantized -> unpacked | target |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    detail = None
    results = []
    for sparsity, bits in ((0.9, 5), (0.92, 6)):
        r = lenet(sparsity, bits, epochs)
        results.append(r)
        detail = detail or r
        rows.append(f"| dcomp, {int(sparsity * 100)}% pruned, {bits}-bit | {100 * r['nnz'] / r['params']:.1f}% | {bits} | "
                    f"{r['params']:,} | {r['dense']:,} B | {r['file']:,} B | **{r['ratio']:.1f}x** | {r['ratio_no_header']:.1f}x | "
                    f"{r['top_dense']:.2f}% -> {r['top_q']:.2f}% -> {r['top_back']:.2f}% | >= 30x |")
    rows.append("| Deep Compression (Han et al., MNIST), 92% pruned, 6-bit | 8% | 6 | 266,200 | 1,070 KB | 27 KB | 40x | | "
                "98.36% -> 98.42% (MNIST) | |")
    rows += ["", "Per layer (90% / 5-bit):", "",
             "| tensor | encoding | bytes | ratio | index b/sym (entropy) | value b/sym (entropy) |", "|---|---|---:|---:|---|---|"]
    for layer in detail["report"]["layers"]:
        def cell(s):
            if not s or not s["count"]:
                return ""
            ent = f" ({s['entropy']:.3f})" if s.get("entropy") is not None else ""
            return f"{s['bits_per_symbol']:.3f}{ent} {s['coding']}"
        rows.append(f"| {layer['name']} | {layer['encoding']} | {layer['total_bytes']:,} | {layer['ratio']:.1f}x | "
                    f"{cell(layer['gaps'])} | {cell(layer['indices'])} |")
    rows.append(f"| header (zlib-compressed JSON incl. provenance, preamble, padding) | | {detail['header']:,} | | | |")
    rows += ["", "Header compression (same checkpoints, packed twice in this process):", "",
             "| LeNet-300-100 (28x28) | header JSON | header before (plain JSON) | header after (zlib) | "
             ".dcz before | .dcz after | ratio before | ratio after |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(header_row(f"{int(r['sparsity'] * 100)}% pruned, {r['bits']}-bit", r["header_json"], r["plain_header"],
                               r["header"], r["plain_file"], r["file"], r["dense"]))
    rows += ["", "Float16-exact biases and codebooks (format 1.2), 90% / 5-bit:", ""]
    rows += fp16_rows("LeNet-300-100 (28x28), 90%/5-bit", detail["ckpt"], detail["ds"])
    return rows


def round_fp16(ck: Checkpoint) -> Checkpoint:
    """Biases and codebooks rounded to float16 values (kept float32); weights re-derived from the codebook."""
    out = ck.copy() if hasattr(ck, "copy") else Checkpoint.from_bytes(ck.to_bytes())
    sd = dict(out.state_dict)
    quant = {k: dict(v) for k, v in out.quant.items()}
    for name, t in ck.state_dict.items():
        if name in ck.quant:
            q = quant[name]
            cb = q["codebook"].half().float()
            q["codebook"] = cb
            mask = ck.masks[name] if name in ck.masks else t != 0
            sd[name] = torch.where(mask, cb[q["assignments"].long()], torch.zeros((), dtype=t.dtype))
        elif t.is_floating_point() and t.dtype == torch.float32:
            sd[name] = t.half().float()
    out.state_dict, out.quant = sd, quant
    return out


def fp16_rows(label: str, ck: Checkpoint, ds=None) -> list[str]:
    """Bytes and ratio: unrounded vs rounded-to-float16 biases/codebooks, packed with and without fp16_exact."""
    rounded = round_fp16(ck)
    cases = [("not rounded", ck, dcz.PackConfig()),
             ("rounded, fp16_exact=False (1.1 behaviour: float32)", rounded, dcz.PackConfig(fp16_exact=False)),
             ("rounded, fp16_exact=True (default: stored float16)", rounded, dcz.PackConfig())]
    rows = [f"| {label} | .dcz | ratio | biases | codebooks | weights w/o codebooks | header | top-1 | stored float16 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    acc = {}
    if ds is not None:
        from dcomp.retrain import accuracy
        acc = {id(ck): accuracy(ck, ds), id(rounded): accuracy(rounded, ds)}
    for name, c, cfg in cases:
        data, rep = dcz.pack(c, cfg)
        back = dcz.read_bytes(data)
        assert all(torch.equal(back.state_dict[k].view(torch.int32), v.view(torch.int32))
                   for k, v in c.state_dict.items() if v.dtype == torch.float32)
        layers = rep["layers"]
        biases = sum(r["total_bytes"] for r in layers if r["name"].endswith(".bias"))
        cbs = sum(r["bytes"]["codebook"] for r in layers)
        weights = sum(r["total_bytes"] for r in layers if not r["name"].endswith(".bias")) - cbs
        half = sum(r["stored_dtype"] == "float16" for r in layers)
        top = f"{acc[id(c)]:.2f}%" if acc else ""
        rows.append(f"| {name} | {len(data):,} B | **{rep['ratio']:.1f}x** | {biases:,} B | {cbs:,} B | {weights:,} B | "
                    f"{rep['header_bytes']:,} B | {top} | {half} of {len(layers)} tensors |")
    return rows


def header_row(label, json_bytes, before, after, file_before, file_after, dense) -> str:
    return (f"| {label} | {json_bytes:,} B | {before:,} B | {after:,} B | {file_before:,} B | {file_after:,} B | "
            f"{dense / file_before:.1f}x | **{dense / file_after:.1f}x** |")


def recipe(epochs: int = 20) -> list[str]:
    """The deep-compression recipe as `make demo` runs it, then the file re-packed both ways."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as d:
        base, out = os.path.join(d, "base.pt"), os.path.join(d, "model.dcz")
        t = time.perf_counter()
        for cmd in (["train", "--arch", "lenet-300-100", "--data", "digits", "--epochs", str(epochs), "-o", base],
                    ["run", os.path.join(root, "configs", "deep-compression.yaml"), "--model", base, "-o", out,
                     "--workdir", os.path.join(d, "work"), "--fresh"]):
            subprocess.run([sys.executable, "-m", "dcomp", "--quiet", *cmd], check=True, cwd=d,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        took = time.perf_counter() - t
        with open(out, "rb") as f:
            ck = dcz.read_bytes(f.read(), source="model.dcz")
    from dcomp.data import load_dataset
    half = fp16_rows("recipe output (8x8 digits)", ck, load_dataset("digits"))
    after, rep_after = dcz.pack(ck, dcz.PackConfig(header="json"))      # the JSON header's zlib (format 1.1);
    before, rep_before = dcz.pack(ck, dcz.PackConfig(compress_header=False, header="json"))  # 1.5: bench_size --headers
    dense = rep_after["dense_float32_bytes"]
    layers = rep_after["layers"]
    biases = sum(r["total_bytes"] for r in layers if r["name"].endswith(".bias"))
    weights = sum(r["total_bytes"] for r in layers if not r["name"].endswith(".bias"))
    nnz = sum(r["nnz"] or 0 for r in layers if not r["name"].endswith(".bias"))
    params = sum(r["numel"] for r in layers)
    return [f"recipe run: {took:.0f} s; {params:,} parameters, {nnz:,} non-zero weights, provenance stages "
            f"{', '.join(rep_after['provenance_stages'])}", "",
            "| LeNet-300-100 (8x8 digits), configs/deep-compression.yaml | header JSON | header before (plain JSON) | "
            "header after (zlib) | .dcz before | .dcz after | ratio before | ratio after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            header_row("recipe output", rep_after["header_json_bytes"], rep_before["header_bytes"],
                       rep_after["header_bytes"], len(before), len(after), dense),
            "", f"After: weights (indices, codebook indices, codebooks, tables) {weights:,} B, biases (raw float32) "
            f"{biases:,} B, header {rep_after['header_bytes']:,} B. Ratio if the header were free: "
            f"{dense / (len(after) - rep_after['header_bytes']):.1f}x.", "",
            "Float16-exact biases and codebooks (format 1.2) on the recipe output:", "", *half]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--no-recipe", action="store_true", help="skip part 3 (the deep-compression recipe, about 1 minute)")
    ap.add_argument("--only-size", action="store_true", help="skip part 1 (speed)")
    ap.add_argument("--only-speed", action="store_true", help="part 1 (speed) only")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} cores\n")
    if not args.only_size:
        print("## Speed\n")
        print("\n".join(speed(args.quick)))
    if args.only_speed:
        return
    print("\n## Size: LeNet-300-100\n")
    print("\n".join(size(args.epochs)))
    if not args.no_recipe:
        print("\n## Size: the deep-compression recipe (make demo)\n")
        print("\n".join(recipe()))


if __name__ == "__main__":
    main()
