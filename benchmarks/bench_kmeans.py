"""k-means weight sharing: dcomp's sorted 1-D k-means against scikit-learn's KMeans, and the
accuracy of LeNet-300-100 on digits through prune -> quantize (5 bits) -> centroid fine-tuning.

    python benchmarks/bench_kmeans.py                 # both parts
    python benchmarks/bench_kmeans.py --part kmeans   # speed / inertia only
    python benchmarks/bench_kmeans.py --part pipeline --seeds 3
    python benchmarks/bench_kmeans.py --sizes 1000000 # smaller run

Speed: the same float32 values, the same 32 linearly spaced initial centroids, one run each, in this
process. scikit-learn: KMeans(n_clusters=32, init=<those centroids>, n_init=1, max_iter=50,
algorithm="lloyd") (default tol). dcomp: kmeans1d with its default (1000 iterations at most, stops
when the assignment no longer changes), timed on its first call for that size (fresh memory, as
in a CLI run) and again; then with max_iter=50 (the same budget as scikit-learn). Inertia of both is
computed by the same function (nearest centroid, float64 sums) from the centroids each returned.

Pipeline: the real commands (`dcomp train`, `dcomp prune`, `dcomp quantize`) in subprocesses.
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
import torch


def make_data(kind: str, n: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    if kind == "normal":
        return g.standard_normal(n, dtype=np.float32)
    if kind == "pruned":  # what 90% magnitude pruning leaves of a Laplace-like layer: two tails, no centre
        w = g.laplace(0.0, 0.05, size=10 * n).astype(np.float32)
        t = np.partition(np.abs(w), 9 * n)[9 * n]
        return w[np.abs(w) >= t][:n]
    raise ValueError(kind)


def bench_kmeans(sizes: list[int], kinds: list[str], k: int = 32) -> list[dict]:
    from sklearn.cluster import KMeans

    from dcomp.compressors import kmeans as km
    from dcomp.compressors.kmeans import inertia_of, kmeans1d

    t0 = time.perf_counter()
    compiled = km.warm_up()  # numba kernels: compiled (or loaded from numba's cache) once per process
    print(f"numba kernels: {'yes' if compiled else 'no'} (load/compile {time.perf_counter() - t0:.2f} s, not "
          f"counted below; used from {km.NUMBA_MIN:,} values)\n")
    rows = []
    for kind in kinds:
        for n in sizes:
            x = make_data(kind, n)
            xt = torch.from_numpy(x)
            init = np.linspace(float(x.min()), float(x.max()), k, dtype=np.float32)
            kmeans1d(xt[:1000], k)  # warm-up of torch kernels (not timed)

            # first call on this size: includes the page faults of its fresh arrays, as a CLI run has
            t0 = time.perf_counter()
            dfull = kmeans1d(xt, k, centroids=torch.from_numpy(init), with_inertia=False)
            t_cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            dfull = kmeans1d(xt, k, centroids=torch.from_numpy(init), with_inertia=False)
            t_dfull = time.perf_counter() - t0
            t0 = time.perf_counter()
            d50 = kmeans1d(xt, k, max_iter=50, centroids=torch.from_numpy(init), with_inertia=False)
            t_d50 = time.perf_counter() - t0

            t0 = time.perf_counter()
            km = KMeans(n_clusters=k, init=init[:, None], n_init=1, max_iter=50, algorithm="lloyd").fit(x[:, None])
            t_sk = time.perf_counter() - t0

            i_sk = inertia_of(xt, torch.from_numpy(km.cluster_centers_.ravel().astype(np.float32)))
            i_d50 = inertia_of(xt, d50.codebook)
            i_dfull = inertia_of(xt, dfull.codebook)
            rows.append({"data": kind, "n": n, "sklearn_s": t_sk, "sklearn_iter": int(km.n_iter_),
                         "dcomp50_s": t_d50, "dcomp50_iter": d50.iterations,
                         "dcomp_cold_s": t_cold, "speedup_cold": t_sk / t_cold,
                         "dcomp_s": t_dfull, "dcomp_iter": dfull.iterations, "dcomp_converged": dfull.converged,
                         "speedup50": t_sk / t_d50, "inertia_ratio50": i_d50 / i_sk,
                         "speedup": t_sk / t_dfull, "inertia_ratio": i_dfull / i_sk})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            del km, x, xt
    return rows


def kmeans_table(rows: list[dict]) -> str:
    lines = [
        "| data | n | sklearn s (iters) | dcomp default, first call s | speedup | dcomp default, again s (iters) "
        "| speedup | inertia dcomp/sklearn | dcomp 50 iters s | speedup | inertia dcomp/sklearn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        conv = "" if r["dcomp_converged"] else ", not converged"
        lines.append(
            f"| {r['data']} | {r['n']:,} | {r['sklearn_s']:.2f} ({r['sklearn_iter']}) | {r['dcomp_cold_s']:.3f} | "
            f"{r['speedup_cold']:.0f}x | {r['dcomp_s']:.3f} ({r['dcomp_iter']}{conv}) | {r['speedup']:.0f}x | "
            f"{r['inertia_ratio']:.4f} | {r['dcomp50_s']:.3f} | {r['speedup50']:.0f}x | {r['inertia_ratio50']:.4f} |")
    return "\n".join(lines)


def dcomp(*args: str, cwd: Path) -> dict:
    cmd = [sys.executable, "-m", "dcomp", *args, "--json", "--quiet"]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def bench_pipeline(seeds: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for seed in seeds:
            s = str(seed)
            dense = dcomp("train", "--arch", "lenet-300-100", "--data", "digits", "--epochs", "30",
                          "--seed", s, "-o", "dense.pt", cwd=d)
            pruned = dcomp("prune", "dense.pt", "--method", "global", "--sparsity", "0.9", "--min-weights", "0",
                           "--rounds", "5", "--epochs-per-round", "8", "--lr", "0.05", "--data", "digits",
                           "--seed", s, "-o", "pruned.pt", cwd=d)
            row = {"seed": seed, "dense": dense["test"]["top1"], "pruned": pruned["top1_after"]}
            for init in ("linear", "density"):
                q = dcomp("quantize", "pruned.pt", "--bits", "5", "--init", init, "--finetune-epochs", "3",
                          "--lr", "0.01", "--data", "digits", "--seed", s, "-o", f"q-{init}.pt", cwd=d)
                row[f"{init}_quantized"] = q["top1_quantized"]
                row[f"{init}_finetuned"] = q["top1_finetuned"]
                row[f"{init}_sqnr_fc2"] = q["layers"]["fc2.weight"]["sqnr_db"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def pipeline_table(rows: list[dict]) -> str:
    cols = ["dense", "pruned", "linear_quantized", "linear_finetuned", "density_quantized", "density_finetuned"]
    lines = ["| seed | dense | pruned 90% | 5-bit linear | + fine-tune | 5-bit density | + fine-tune | "
             "linear+ft vs dense | density+ft vs dense |", "|---|" + "---:|" * 8]
    for r in rows + ([_mean(rows, cols)] if len(rows) > 1 else []):
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) +
                     f" | {r['linear_finetuned'] - r['dense']:+.2f} | {r['density_finetuned'] - r['dense']:+.2f} |")
    return "\n".join(lines)


def _mean(rows: list[dict], cols: list[str]) -> dict:
    return {"seed": "mean", **{c: float(np.mean([r[c] for r in rows])) for c in cols}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["kmeans", "pipeline", "all"], default="all")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 25_000_000])
    ap.add_argument("--kinds", nargs="+", default=["normal", "pruned"])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.1f}\n")
    if args.part in ("kmeans", "all"):
        print("## k-means, 32 clusters, linear init: dcomp vs scikit-learn (one run each)\n")
        print(kmeans_table(bench_kmeans(args.sizes, args.kinds)))
        print()
    if args.part in ("pipeline", "all"):
        print("## LeNet-300-100 on digits: test top-1 % (359 test images; one image = 0.28 points)\n")
        print(pipeline_table(bench_pipeline(list(range(args.seeds)))))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
