"""Where the bytes of a packed LeNet-300-100 go, on real MNIST (docs/bench/size.md).

    python benchmarks/bench_size.py                       # train, compress, break down
    python benchmarks/bench_size.py --reuse /tmp/dcz-size # re-pack the quantized model kept there
    python benchmarks/bench_size.py --headers /tmp/dcomp-bench-max   # JSON vs binary header of every .dcz there

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
    variants = [("default: --coder auto (brief provenance)", {}),
                ("provenance full", {"provenance": "full"}), ("provenance none", {"provenance": "none"}),
                ("--coder huffman (format 1.2; was --no-ans)", {"coder": "huffman"}),
                ("--coder rans (+ fixed)", {"coder": "rans"}),
                ("--coder huffman + rANS (the 1.3 default)", {"coder": "auto", "cabac_budget": 0}),
                ("--coder cabac (+ fixed)", {"coder": "cabac"})]
    for label, kw in variants:
        data, info = dcz.pack(ckpt, dcz.PackConfig(**kw))
        out.append((label, info, data))
    return out


def _h(counts) -> float:
    """Total Shannon information (bits) of a histogram."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    p = counts[counts > 0] / n
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def _cond_h(x: np.ndarray, ctx: np.ndarray, k: int) -> float:
    """Total conditional information (bits) of symbols ``x`` (< k) given integer contexts ``ctx``:
    the cost of an ideal static coder with one free table per context."""
    joint = np.bincount(ctx.astype(np.int64) * k + x, minlength=(int(ctx.max()) + 1) * k).reshape(-1, k)
    return sum(_h(row) for row in joint if row.sum())


def _bucket(cnt: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """The cabac significance model's density classes (dcomp/compressors/cabac.py)."""
    x = cnt * 32
    return np.select([seen == 0, x == 0, x < seen, x < 2 * seen, x < 4 * seen, x < 8 * seen, x < 16 * seen],
                     [0, 1, 2, 3, 4, 5, 6], 7)


def significance_contexts(flags2d: np.ndarray) -> np.ndarray:
    """The cabac significance model's context of every element (left, above, column and row density)."""
    f = flags2d.astype(np.int64)
    r, c = f.shape
    left = np.zeros_like(f)
    left[:, 1:] = f[:, :-1]
    above = np.zeros_like(f)
    above[1:] = f[:-1]
    colcnt = np.zeros_like(f)
    colcnt[1:] = np.cumsum(f, 0)[:-1]
    rowcnt = np.zeros_like(f)
    rowcnt[:, 1:] = np.cumsum(f, 1)[:, :-1]
    cb = _bucket(colcnt, np.repeat(np.arange(r)[:, None], c, 1))
    rb = _bucket(rowcnt, np.repeat(np.arange(c)[None], r, 0))
    return ((((left << 1) | above) << 6) | (cb << 3) | rb).reshape(-1)


def stream_table(ckpt) -> list[dict]:
    """Bits per non-zero weight of each coder on the positions (gap stream / significance map) and the
    codebook indices of every sparse weight, against the Shannon bounds: order-0 (the stream's
    empirical entropy: an ideal static i.i.d. coder with a free table) and the context model's (the
    empirical conditional entropy given cabac's contexts: an ideal static coder with a free table per
    context; an adaptive coder can beat it where the statistics drift)."""
    from dcomp.compressors import cabac
    from dcomp.compressors import huffman as hf
    from dcomp.compressors import rans
    from dcomp.formats.dcz.spec import _bits, gap_symbols
    rows = []
    for name, t in ckpt.state_dict.items():
        if t.dim() < 2:
            continue
        u = _bits(t)
        numel = u.size
        pos = np.flatnonzero(u != 0)
        nnz = len(pos)
        k = 8 if t.dim() >= 3 else 5           # PackConfig's default gap widths (conv 8, fc 5)
        gaps = gap_symbols(pos, numel, k)
        cols = cabac.matrix_cols(list(t.shape))
        flags = np.zeros(numel, dtype=np.int64)
        flags[pos] = 1
        q = ckpt.quant.get(name)
        streams = [("positions", gaps, 1 << k, _cond_h(flags, significance_contexts(flags.reshape(-1, cols)), 2),
                    len(cabac.encode_significance(pos, numel, cols)))]
        if q is not None:
            bits = int(q["bits"])
            a = q["assignments"].reshape(-1).numpy().astype(np.int64)[pos]
            prev = np.concatenate([[-1], a[:-1]])
            pctx = np.where(prev < 0, 0, 1 + ((prev << 3) >> bits))
            streams.append(("indices", a, 1 << bits, _cond_h(a, pctx, 1 << bits),
                            min(len(cabac.encode_tree(a, 1 << bits, m)) for m in (cabac.TREE, cabac.TREE_PREV))))
        for kind, syms, alphabet, ctx_bits, cabac_bytes in streams:
            counts = np.bincount(syms, minlength=alphabet)
            huff = hf.plan_stream(counts, alphabet, hf.DEFAULT_BLOCK, True)
            fixed = hf.plan_stream(counts, alphabet, hf.DEFAULT_BLOCK, False)
            enc = rans.encode_stream(syms, alphabet, counts) if len(syms) else None
            row = {"tensor": name, "stream": kind, "nnz": nnz, "symbols": len(syms),
                   "order0": _h(counts) / nnz, "context": ctx_bits / nnz,
                   "fixed": 8 * fixed.nbytes / nnz, "huffman": 8 * huff.nbytes / nnz,
                   "rans": 8 * len(enc[0]) / nnz if enc else float("nan"), "cabac": 8 * cabac_bytes / nnz}
            if kind == "positions":      # the significance map as i.i.d. flags: what an order-0 bit coder pays
                row["order0_flags"] = _h(np.bincount(flags, minlength=2)) / nnz
            rows.append(row)
    return rows


def adaptive_bits(bins, ctx) -> float:
    """Ideal code length (bits) of a bin sequence under cabac's adaptive estimator (the coder itself
    adds < 0.1% and 5 flush bytes): for comparing binarisations without writing a coder for each."""
    from dcomp.compressors import cabac
    p1, p2, n = {}, {}, {}
    total = 0.0
    one = cabac.ONE
    for b, c in zip(bins, ctx):
        a1, a2, k = p1.get(c, one >> 1), p2.get(c, one >> 1), n.get(c, 0)
        p = min(max((a1 + 3 * a2) >> 2, cabac.PMIN), one - cabac.PMIN)
        total -= np.log2(p / one if b else 1 - p / one)
        rf, rs = int(cabac.RATE_FAST[k]), int(cabac.RATE_SLOW[k])
        if b:
            a1 += ((one - a1) * rf) >> 16
            a2 += ((one - a2) * rs) >> 16
        else:
            a1 -= (a1 * rf) >> 16
            a2 -= (a2 * rs) >> 16
        p1[c], p2[c], n[c] = a1, a2, min(k + 1, 255)
    return total


def _tree_bins(a, bits, prev_ctx):
    bins, ctx = [], []
    prev = -1
    for s in a:
        base = 0 if not prev_ctx or prev < 0 else (1 + ((prev << 3) >> bits)) << bits
        node = 1
        for lvl in range(bits - 1, -1, -1):
            b = (s >> lvl) & 1
            bins.append(b)
            ctx.append(base + node)
            node = 2 * node + b
        prev = s
    return bins, ctx


def _deepcabac_bins(a, zero, u):
    """DeepCABAC-style binarisation of a sorted-codebook index: sign (context: previous sign), then
    greater-than-k flags k < u (context: k and sign), then an Exp-Golomb-0 remainder (prefix bins
    contexted by position, suffix bins in one context)."""
    bins, ctx = [], []
    prev_sign = 0
    for s in a:
        neg = int(s < zero)
        m = (zero - 1 - s) if neg else (s - zero)
        bins.append(neg)
        ctx.append(("sign", prev_sign))
        for k in range(u):
            bins.append(int(m > k))
            ctx.append(("gt", k, neg))
            if m <= k:
                break
        if m >= u:
            r = m - u + 1
            nb = r.bit_length() - 1
            bins += [1] * nb + [0]
            ctx += [("eg", j) for j in range(nb + 1)]
            bins += [(r >> j) & 1 for j in range(nb - 1, -1, -1)]
            ctx += [("suffix",)] * nb
        prev_sign = neg
    return bins, ctx


def binarisation_table(ckpt) -> list[str]:
    """Codebook indices of the larger layers: the tree models cabac uses against a DeepCABAC-style
    sign / greater-than-k / Exp-Golomb binarisation, same adaptive estimator (bits per non-zero)."""
    rows = ["| tensor | non-zeros | tree | tree, previous symbol's octile | DeepCABAC-style u=1 | u=4 | u=8 |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in ckpt.state_dict.items():
        q = ckpt.quant.get(name)
        if q is None or t.dim() < 2:
            continue
        flat = t.reshape(-1).numpy() != 0
        a = q["assignments"].reshape(-1).numpy().astype(np.int64)[flat].tolist()
        if len(a) < 1000:
            continue
        bits = int(q["bits"])
        zero = int(np.searchsorted(q["codebook"].numpy(), 0.0))
        cells = [adaptive_bits(*_tree_bins(a, bits, False)), adaptive_bits(*_tree_bins(a, bits, True))]
        cells += [adaptive_bits(*_deepcabac_bins(a, zero, u)) for u in (1, 4, 8)]
        rows.append(f"| {name} | {len(a):,} | " + " | ".join(f"{c / len(a):.3f}" for c in cells) + " |")
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


def _json_header_costs(data: bytes) -> list[tuple[str, int]]:
    """What each part of a JSON (1.0-1.4) header costs, stored: the zlib size of the header without
    that part, subtracted from the whole (parts overlap in what zlib shares, so the sum is not exact)."""
    import zlib
    from dcomp.formats.dcz import read_header
    h = read_header(data).h

    def stored(x: dict) -> int:
        return len(zlib.compress(json.dumps(x, separators=(",", ":")).encode(), 9))

    def streams(x):
        for t in x["tensors"]:
            for s in (t.get("gaps"), (t.get("values") or {}).get("indices")):
                if isinstance(s, dict):
                    yield s

    base = stored(h)

    def without(edit) -> int:
        x = json.loads(json.dumps(h))
        edit(x)
        return base - stored(x)

    def crcs(x):
        x["sections"] = [s[:2] for s in x["sections"]]

    def entropy(x):
        for s in streams(x):
            s.pop("entropy", None)

    def derivable(x):
        for s in streams(x):
            for k in ("bytes", "alphabet", "width"):
                s.pop(k, None)

    def names_keys(x):   # every key name shortened to one character (what repeated keys cost)
        def walk(o):
            if isinstance(o, dict):
                return {k[:1] + str(i): walk(v) for i, (k, v) in enumerate(o.items())}
            if isinstance(o, list):
                return [walk(v) for v in o]
            return o
        x.update(walk({k: x.pop(k) for k in list(x)}))

    d = read_header(data)
    pad = sum(b2 - e1 for (_, e1, _), (b2, _, _) in zip(d.sections, d.sections[1:])) + d.d - 32 - d.stored
    return [("header as stored (zlib), + 32 B preamble", base + 32),
            ("per-section CRC32s", without(crcs)),
            ("per-stream entropy figures", without(entropy)),
            ("stream fields a reader can compute (bytes, alphabet, width)", without(derivable)),
            ("data spec", without(lambda x: x.update(data={}))),
            ("masks + quant records", without(lambda x: x.update(masks={}, quant={}))),
            ("key names (vs 1-2 character keys)", without(names_keys)),
            ("8-byte alignment padding (header and sections; not in the header)", pad)]


def header_table(folder: Path) -> list[str]:
    """Every .dcz in ``folder`` with its header as JSON (format 1.0-1.4) and binary (1.5): the same
    sections re-headered (dcomp.formats.dcz.writer.reheader), decoded and compared bit for bit."""
    import numpy as np
    from dcomp.formats.dcz import read_bytes, read_header
    from dcomp.formats.dcz.spec import _bits
    from dcomp.formats.dcz.writer import reheader
    rows = ["| file | 1.4 (JSON): file | header | padding | 1.5 (binary): file | header | padding | file saved "
            "| tensors bit-identical |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    files = sorted(folder.glob("*.dcz"))
    for f in files:
        raw = f.read_bytes()
        # "before": the file as written by a JSON-header dcomp (entropy figures included)
        js = raw if not read_header(raw).binary else reheader(raw, "json")
        bn = reheader(raw, "binary")
        out = []
        for d in (js, bn):
            h = read_header(d)
            pad = sum(b2 - e1 for (_, e1, _), (b2, _, _) in zip(h.sections, h.sections[1:])) + h.d - 32 - h.stored
            out.append((len(d), h.d, pad))
        a, b = read_bytes(js), read_bytes(bn)
        same = list(a.state_dict) == list(b.state_dict) and all(
            np.array_equal(_bits(v), _bits(b.state_dict[k])) for k, v in a.state_dict.items())
        (fj, hj, pj), (fb, hb, pb) = out
        rows.append(f"| {f.name} | {fj:,} | {hj:,} | {pj} | {fb:,} | {hb:,} | {pb} | {fj - fb:,} ({100 * (fj - fb) / fj:.1f}%) "
                    f"| {'yes' if same else 'NO'} |")
    if files:
        rows += ["", f"What each part of the JSON header of {files[-1].name} costs (bytes, stored):", "",
                 "| part | bytes |", "|---|---:|"]
        last = files[-1].read_bytes()
        rows += [f"| {k} | {v:,} |" for k, v in _json_header_costs(last if not read_header(last).binary
                                                                   else reheader(last, "json"))]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headers", metavar="DIR", help="only the header table: every .dcz in DIR with a JSON "
                                                     "(1.0-1.4) and a binary (1.5) header")
    ap.add_argument("--arch", default="lenet-300-100", choices=sorted(MODELS))
    ap.add_argument("--reuse", help="work directory of an earlier run (skip training)")
    ap.add_argument("--keep", help="keep the work directory here")
    ap.add_argument("--no-bias-table", action="store_true")
    ap.add_argument("--binarisation", action="store_true", help="only the codebook-index binarisation comparison")
    args = ap.parse_args()
    if args.headers:
        sys.path.insert(0, str(ROOT))
        print(f"# .dcz headers, JSON (1.4) vs binary (1.5); load average {os.getloadavg()[0]:.1f}\n")
        print("\n".join(header_table(Path(args.headers))))
        return
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
            summary = compress(work, args.arch)
        qfile = sorted((work / "run").glob("*-quantize.pt"))[-1]
        ckpt = read_checkpoint(qfile.read_bytes(), source=str(qfile))
        dense = sum(t.numel() * 4 for t in ckpt.state_dict.values())
        if args.binarisation:
            print("\n".join(binarisation_table(ckpt)))
            return
        print(f"# {args.arch} on MNIST-10k; load average {os.getloadavg()[0]:.1f} "
              f"({os.cpu_count()} CPUs); epochs {EPOCHS}")
        print(f"top-1 dense {summary.get('top1_before', float('nan')):.2f}% -> packed "
              f"{summary.get('top1_after', float('nan')):.2f}%; run {summary.get('seconds', 0):.0f} s; "
              f"dense float32 {dense:,} B\n")
        variants = pack_variants(ckpt)
        print("| packing | file | ratio | header | positions | codebook indices | codebooks | tables "
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
        cols = ["fixed", "huffman", "rans", "cabac"]
        print("| tensor | stream | non-zeros | order-0 bound | context bound | " + " | ".join(cols)
              + " | best - order-0 |")
        print("|---|---|---:|---:|---:|" + "---:|" * (len(cols) + 1))
        for r in rows:
            best = min(r[c] for c in cols if r[c] == r[c])
            print(f"| {r['tensor']} | {r['stream']} | {r['nnz']:,} | {r['order0']:.3f} | {r['context']:.3f} | "
                  + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {100 * (best / r['order0'] - 1):+.1f}% |")
        tot = {c: sum(r[c] * r["nnz"] for r in rows if r[c] == r[c]) / 8 for c in cols + ["order0", "context"]}
        print(f"| **all weights** | both | | {tot['order0']:,.0f} B | {tot['context']:,.0f} B | "
              + " | ".join(f"{tot[c]:,.0f} B" for c in cols) + " | |")
        print("\nbits per non-zero weight; each coder's figure includes its tables; positions: order-0 bound of "
              "the gap stream (i.i.d. flags: " + ", ".join(f"{r['tensor']} {r['order0_flags']:.3f}"
                                                          for r in rows if "order0_flags" in r) + ")\n")
        if not args.no_bias_table:
            print("\n".join(bias_table(ckpt)))


if __name__ == "__main__":
    main()
