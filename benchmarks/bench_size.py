"""Where the bytes of a packed LeNet-300-100 go, on real MNIST (docs/bench/size.md).

    python benchmarks/bench_size.py                       # train, compress, break down
    python benchmarks/bench_size.py --reuse /tmp/dcz-size # re-pack the quantized model kept there

Trains LeNet-300-100 on MNIST-10k (../shared/data/mnist10k.npz: 8k train / 2k test real MNIST)
with `dcomp train`, runs a shortened configs/deep-compression.yaml (same stages and rates, fewer
epochs, no onnxruntime bench stage) with `dcomp run`, then re-packs the quantized checkpoint with
the library under each provenance mode and coder choice and prints:

* the byte breakdown `dcomp inspect --json` gives (header, provenance, gap indices, codebook
  indices, values, codebooks, biases/raw, tables) and bits per non-zero weight;
* per symbol stream, bits per symbol of fixed width, Huffman and rANS against the Shannon bound
  (the empirical entropy of the stream, i.e. the cost of an ideal static i.i.d. coder without a
  table).

CPU is kept modest for a shared machine: one torch thread (--threads 1), 6 training epochs,
pruning 3 rounds x 2 epochs, 4 distillation epochs, 2 centroid fine-tuning epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mnist10k.npz"
if not DATA.exists():
    DATA = Path("/work/shared/data/mnist10k.npz")
EPOCHS = {"train": 6, "prune_retrain": 2, "distill": 4, "finetune": 2}


def dcomp(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "dcomp", "--quiet", "--threads", "1", *args],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"dcomp {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


MODELS = {"lenet-300-100": "deep-compression.yaml", "lenet-5": "lenet5.yaml"}


def compress(work: Path, arch: str = "lenet-300-100") -> dict:
    """Train the base model and run the shortened recipe; returns the run summary."""
    base = work / f"{arch}.pt"
    data = f"npz:{DATA}"
    dcomp("train", "--arch", arch, "--data", data, "--epochs", str(EPOCHS["train"]), "-o", str(base))
    recipe = yaml.safe_load((ROOT / "configs" / MODELS[arch]).read_text())
    recipe["name"] = "deep-compression-size-bench"
    stages = []
    for s in recipe["stages"]:
        if s["stage"] == "bench":
            continue
        if s["stage"] == "prune":
            s["retrain"]["epochs"] = EPOCHS["prune_retrain"]
        if s["stage"] == "distill":
            s["train"]["epochs"] = EPOCHS["distill"]
        if s["stage"] == "quantize":
            s["finetune"]["epochs"] = EPOCHS["finetune"]
        stages.append(s)
    recipe["stages"] = stages
    rfile = work / "recipe.yaml"
    rfile.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / "model.dcz"
    t0 = time.perf_counter()
    summary = json.loads(dcomp("run", str(rfile), "--model", str(base), "--data", data, "-o", str(out),
                               "--workdir", str(work / "run"), "--json"))
    summary["seconds"] = time.perf_counter() - t0
    (work / "summary.json").write_text(json.dumps(summary))
    return summary


def breakdown(info: dict) -> dict:
    """Bytes by part from an inspect_bytes report."""
    parts = {"header": info["header_bytes"], "gap indices": 0, "codebook indices": 0, "values": 0,
             "codebooks": 0, "tables": 0, "biases/raw": 0, "other": 0}
    nnz_w = 0
    for row in info["layers"]:
        b = row["bytes"]
        if len(row["shape"]) >= 2:
            nnz_w += row["nnz"]
            parts["gap indices"] += b.get("indices", 0)
            parts["codebook indices" if row["indices"] else "values"] += b.get("values", 0)
            parts["codebooks"] += b.get("codebook", 0)
            parts["tables"] += b.get("tables", 0)
            parts["other"] += b.get("other", 0)
        else:
            parts["biases/raw"] += row["total_bytes"]
    return {"parts": parts, "nnz_weights": nnz_w, "file_bytes": info["file_bytes"]}


def pack_variants(ckpt) -> list[tuple[str, dict, bytes]]:
    from dcomp.formats import dcz
    out = []
    fields = dcz.PackConfig.model_fields
    variants = [("default (brief, best coder per stream)", {})]
    if "provenance" in fields:
        variants += [("provenance full", {"provenance": "full"}), ("provenance none", {"provenance": "none"})]
    if "ans" in fields:
        variants += [("brief, Huffman/fixed only (--no-ans)", {"ans": False}),
                     ("none, Huffman/fixed only", {"ans": False, "provenance": "none"})]
    for label, kw in variants:
        data, info = dcz.pack(ckpt, dcz.PackConfig(**kw))
        out.append((label, info, data))
    return out


def stream_table(ckpt) -> list[dict]:
    """Bits per symbol of each coder on the gap and codebook-index streams of every sparse weight."""
    from dcomp.compressors import huffman as hf
    from dcomp.formats.dcz.spec import _bits, gap_symbols
    try:
        from dcomp.compressors import rans
    except ImportError:
        rans = None
    rows = []
    for name, t in ckpt.state_dict.items():
        if t.dim() < 2:
            continue
        u = _bits(t)
        pos = np.flatnonzero(u != 0)
        q = ckpt.quant.get(name)
        streams = [("gaps", gap_symbols(pos, u.size, 5), 32)]
        if q is not None:
            bits = int(q["bits"])
            streams.append(("indices", q["assignments"].reshape(-1).numpy().astype(np.int64)[pos], 1 << bits))
        for kind, syms, alphabet in streams:
            n = len(syms)
            counts = np.bincount(syms, minlength=alphabet)
            p = counts[counts > 0] / n
            h = float(-(p * np.log2(p)).sum())
            huff = hf.plan_stream(counts, alphabet, hf.DEFAULT_BLOCK, True)
            fixed = hf.plan_stream(counts, alphabet, hf.DEFAULT_BLOCK, False)
            row = {"tensor": name, "stream": kind, "symbols": n, "nnz": len(pos), "entropy": h,
                   "fixed": 8 * fixed.nbytes / n, "huffman": 8 * huff.nbytes / n}
            if rans is not None:
                row["rans"] = 8 * len(rans.encode(syms, alphabet)) / n
            rows.append(row)
    return rows


def bias_table(ckpt) -> list[str]:
    """quantize --bias-bits on the packed model: bias bytes, file bytes and test top-1 per setting."""
    from dcomp.compressors.quantization import quantize_biases, round_to_float16
    from dcomp.data import load_dataset
    from dcomp.formats import dcz
    from dcomp.retrain import accuracy

    data = load_dataset(f"npz:{DATA}")
    rows = ["| biases | bias bytes | file | top-1 (2,000 test images) |", "|---|---:|---:|---:|"]
    for bits in (None, 6, 5, 4, 3, 2):
        ck = ckpt.copy()
        if bits is not None:
            quantize_biases(ck, bits)
            round_to_float16(ck)
        data_b, info = dcz.pack(ck)
        bias = sum(r["total_bytes"] for r in info["layers"] if len(r["shape"]) == 1)
        label = "float16 (quantize --float16)" if bits is None else f"--bias-bits {bits} (+ float16 codebook)"
        rows.append(f"| {label} | {bias:,} | {len(data_b):,} | {accuracy(ck, data):.2f}% |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reuse", help="work directory of an earlier run (skip training)")
    ap.add_argument("--keep", help="keep the work directory here")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from dcomp.formats.checkpoint import read_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.reuse or args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.reuse:
            summary = json.loads((work / "summary.json").read_text())
        else:
            summary = compress(work)
        qfile = sorted((work / "run").glob("*-quantize.pt"))[-1]
        ckpt = read_checkpoint(qfile.read_bytes(), source=str(qfile))
        dense = sum(t.numel() * 4 for t in ckpt.state_dict.values())
        print(f"# LeNet-300-100 on MNIST-10k; load average {os.getloadavg()[0]:.1f} "
              f"({os.cpu_count()} CPUs); epochs {EPOCHS}")
        print(f"top-1 dense {summary.get('top1_before', float('nan')):.2f}% -> packed "
              f"{summary.get('top1_after', float('nan')):.2f}%; run {summary.get('seconds', 0):.0f} s; "
              f"dense float32 {dense:,} B\n")
        variants = pack_variants(ckpt)
        print("| packing | file | ratio | header | gap indices | codebook indices | codebooks | tables "
              "| biases/raw | weight bits / nz | all bits / nz |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for label, info, data in variants:
            b = breakdown(info)
            p, nz = b["parts"], b["nnz_weights"]
            wbytes = p["gap indices"] + p["codebook indices"] + p["values"] + p["codebooks"] + p["tables"]
            print(f"| {label} | {b['file_bytes']:,} | {dense / b['file_bytes']:.1f}x | {p['header']:,} "
                  f"| {p['gap indices']:,} | {p['codebook indices'] + p['values']:,} | {p['codebooks']:,} "
                  f"| {p['tables']:,} | {p['biases/raw']:,} | {8 * wbytes / nz:.2f} | {8 * b['file_bytes'] / nz:.2f} |")
        print()
        rows = stream_table(ckpt)
        cols = ["fixed", "huffman"] + (["rans"] if rows and "rans" in rows[0] else [])
        print("| tensor | stream | symbols | Shannon bound | " + " | ".join(cols) + " | best - bound |")
        print("|---|---|---:|---:|" + "---:|" * (len(cols) + 1))
        for r in rows:
            best = min(r[c] for c in cols)
            print(f"| {r['tensor']} | {r['stream']} | {r['symbols']:,} | {r['entropy']:.3f} | "
                  + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {best - r['entropy']:+.3f} |")
        print("\nbits per symbol; tables/frequency headers included in each coder's figure\n")
        print("\n".join(bias_table(ckpt)))


if __name__ == "__main__":
    main()
