"""The smallest files: configs/lenet-300-100-max.yaml and configs/lenet5-max.yaml, 3 seeds each,
against a dense baseline trained in the same run on the same split (docs/bench/max.md).

    python benchmarks/bench_max.py                          # run what is missing, then the tables
    python benchmarks/bench_max.py --only lenet-5 --seeds 0
    python benchmarks/bench_max.py --report                 # tables from the jsonl only

Per (case, seed): `dcomp train` the dense model (that seed), `dcomp run` the -max recipe on it
with the same data and seed, `dcomp inspect --json` the .dcz. One JSON line per finished case in
docs/bench/max.jsonl (resumable: a rerun skips what is there). Everything runs through the CLI
with one torch thread (--threads 1, OMP_NUM_THREADS=1): the machine is shared.

Data: MNIST-10k (../shared/data/mnist10k.npz: 8k train / 2k test real MNIST; one image = 0.05
points) for the LeNets; `digits` (scikit-learn's 8x8 digits, 1,437 / 360; one image = 0.28
points) for the quick check, with the recipe's sparsities overridden for the 64-pixel input.

Ratio = dense float32 bytes of every parameter (what `dcomp inspect` calls dense_float32_bytes,
as docs/bench/size.md counts it) / the .dcz file's bytes. Nothing else is counted or left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # --repack imports dcomp in-process: this tree's, not an installed one
DATA = ROOT.parent / "shared" / "data" / "mnist10k.npz"
if not DATA.exists():
    DATA = Path("/work/shared/data/mnist10k.npz")
OUT = ROOT / "docs" / "bench" / "max.jsonl"

# case -> (arch, recipe, data spec, dense epochs, recipe overrides, target ratio, accuracy budget)
CASES = {
    "lenet-300-100": ("lenet-300-100", "configs/lenet-300-100-max.yaml", f"npz:{DATA}", 30, [], 150, 0.3),
    "lenet-5": ("lenet-5", "configs/lenet5-max.yaml", f"npz:{DATA}", 20, [], 300, 0.3),
    "lenet-300-100-digits": ("lenet-300-100", "configs/lenet-300-100-max.yaml", "digits", 20,
                             ["stages.0.layers={fc1: 0.95, fc2: 0.95, fc3: 0.8}", "stages.0.sparsity=0.95",
                              # the prior's weight is per training sample: 1,437 digits, not 8,000
                              "stages.2.sws.tau=0.1",
                              # plain k-means: rate-distortion rounding raised the training loss 20% (max.md)
                              "stages.3.rd_lambda=0"], 50, 0.5),
}

# published figures (their own training sets: 60,000 MNIST images; dense float32 vs their file)
LITERATURE = {
    "lenet-300-100": [("Deep Compression (Han et al. 2016)", "40x", "1.58% error (dense 1.64%)"),
                      ("Soft weight-sharing (Ullrich et al. 2017)", "64x", "1.94% error (dense 1.89%)"),
                      ("EPR (Oktay et al. 2020)", "124x", "1.88% error (dense 1.64%)")],
    "lenet-5": [("Deep Compression (Han et al. 2016)", "39x", "0.74% error (dense 0.80%)"),
                ("Soft weight-sharing (Ullrich et al. 2017)", "162x", "0.97% error (dense 0.88%)"),
                ("DeepCABAC (Wiedemann et al. 2019)", "115x", "0.90% error (dense 0.91%)"),
                ("EPR (Oktay et al. 2020)", "606x", "1.02% error (dense 0.80%)")],
}


def dcomp(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "dcomp", "--quiet", "--threads", "1", *args],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"dcomp {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def breakdown(info: dict) -> dict:
    """Bytes of the .dcz by part, from `dcomp inspect --json` (they add up to the file)."""
    parts = {"header": info["header_bytes"], "positions": 0, "labels": 0, "codebooks": 0, "tables": 0,
             "biases": 0, "other": 0}
    for lay in info["layers"]:
        b = lay["bytes"]
        if len(lay["shape"]) <= 1:
            parts["biases"] += lay["total_bytes"]
            continue
        parts["positions"] += b["indices"]
        parts["labels"] += b["values"]
        parts["codebooks"] += b["codebook"]
        parts["tables"] += b["tables"]
        parts["other"] += b["other"]
    parts["padding"] = info["file_bytes"] - sum(parts.values())
    return parts


def run_case(case: str, seed: int, work: Path, dense_from: Path | None = None) -> dict:
    arch, recipe, data, epochs, overrides, target, budget = CASES[case]
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"{case}-s{seed}-dense.pt"
    out = work / f"{case}-s{seed}.dcz"
    t0 = time.perf_counter()
    extra = ["--resize", "28"] if arch == "lenet-5" else []
    reused = dense_from / base.name if dense_from is not None else None
    if reused is not None and reused.is_file():
        # the dense model an earlier run of this script trained (same seed, data, epochs): evaluated again
        if reused.resolve() != base.resolve():
            shutil.copyfile(reused, base)
        dense = {"test": json.loads(dcomp("eval", str(base), "--data", data, *extra, "--json")),
                 "reused": str(reused)}
    else:
        dense = json.loads(dcomp("--seed", str(seed), "train", "--arch", arch, "--data", data, *extra, "--epochs",
                                 str(epochs), "-o", str(base), "--json"))
    t_dense = time.perf_counter() - t0
    sets = [a for o in overrides for a in ("--set", o)]
    summary = json.loads(dcomp("--seed", str(seed), "run", recipe, "--model", str(base), "--data", data, *sets,
                               "-o", str(out), "--workdir", str(work / f"{case}-s{seed}.run"), "--json"))
    t_run = time.perf_counter() - t0 - t_dense
    info = json.loads(dcomp("inspect", str(out), "--json"))
    evals = [s for s in summary.get("stages", []) if s.get("stage") == "eval"]
    top1 = evals[-1]["metrics"]["top1"] if evals else None
    nnz = sum(lay["nnz"] or 0 for lay in info["layers"] if len(lay["shape"]) > 1)
    return {"case": case, "arch": arch, "seed": seed, "data": data.replace(str(ROOT.parent), ".."),
            "recipe": recipe, "overrides": overrides, "dense_epochs": epochs,
            "dense_top1": dense["test"]["top1"], "top1": top1,
            "delta": None if top1 is None else round(top1 - dense["test"]["top1"], 4),
            "file_bytes": info["file_bytes"], "dense_float32_bytes": info["dense_float32_bytes"],
            "ratio": info["dense_float32_bytes"] / info["file_bytes"], "params": info["params"],
            "nonzero_weights": nnz, "parts": breakdown(info),
            "layers": {lay["name"]: {"nnz": lay["nnz"], "bytes": lay["total_bytes"], "bits": lay["bits"],
                                     "index_bits": lay["index_bits"]} for lay in info["layers"]},
            "target_ratio": target, "budget_points": budget,
            "seconds_dense": round(t_dense, 1), "seconds_recipe": round(t_run, 1),
            **({"dense_reused": dense["reused"]} if "reused" in dense else {}),
            "resumed_stages": sum(bool(s.get("resumed")) for s in summary.get("stages", [])),
            "loadavg": list(os.getloadavg()), "commit": _commit()}


def repack(row: dict, work: Path) -> dict:
    """Pack the run's quantized checkpoint again with this tree's writer (same pack settings from
    the recipe), decode the bytes and measure their accuracy: the bytes a newer coder gives for
    the very same trained model (training is not repeated)."""
    import torch

    from dcomp.data import load_dataset
    from dcomp.formats.checkpoint import read_checkpoint
    from dcomp.formats.dcz import inspect_bytes, pack
    from dcomp.recipe import load_recipe
    from dcomp.train import evaluate

    torch.set_num_threads(1)
    run = work / f"{row['case']}-s{row['seed']}.run"
    quantized = sorted(run.glob("*-quantize.pt"))
    if not quantized:
        raise SystemExit(f"{run}: no quantize stage output to re-pack (was the work directory removed?)")
    rec = load_recipe(ROOT / row["recipe"])
    cfg = next(st.config for st in rec.stages if st.kind == "pack")
    data, _ = pack(read_checkpoint(quantized[-1].read_bytes()), cfg)
    info = inspect_bytes(data)
    back = read_checkpoint(data)
    ds = load_dataset(CASES[row["case"]][2], resize=28 if row["arch"] == "lenet-5" else None)
    top1 = evaluate(back.build_model(), ds.x_test, ds.y_test)["top1"]
    return {"commit": _commit(), "file_bytes": len(data), "ratio": info["dense_float32_bytes"] / len(data),
            "parts": breakdown(info), "top1": top1, "delta": round(top1 - row["dense_top1"], 4),
            "coders": sorted({(lay.get("gaps") or {}).get("coding") for lay in info["layers"]} - {None})}


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip()


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(rows: list[dict]) -> str:
    lines = []
    for case in CASES:
        rs = sorted((r for r in rows if r["case"] == case), key=lambda r: r["seed"])
        if not rs:
            continue
        target, budget = rs[0]["target_ratio"], rs[0]["budget_points"]
        lines += [f"### {case} ({rs[0]['arch']}, data {rs[0]['data']})", ""]
        if all("repack" in r for r in rs):
            lines += [f"Bytes as re-packed by commit {rs[0]['repack']['commit']} (coders "
                      f"{', '.join(sorted({c for r in rs for c in r['repack']['coders']}))}); in brackets the file the "
                      f"run wrote (commit {', '.join(sorted({r['commit'] for r in rs}))}); "
                      + ("each re-packed file decodes to the accuracy of the one the run wrote."
                         if all(r["repack"]["top1"] == r["top1"] for r in rs)
                         else "**the re-packed files' accuracy differs from the written ones'** (shown: re-packed)."),
                      ""]
        lines += ["| seed | dense top-1 | .dcz top-1 | change | .dcz bytes | ratio | header | positions | labels "
                  "| codebooks | tables | biases | pad | non-zero weights |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            if "repack" in r:
                r = {**r, "orig_bytes": r["file_bytes"], "orig_ratio": r["ratio"], **{k: r["repack"][k] for k in
                     ("file_bytes", "ratio", "parts", "top1", "delta")}}
            p = r["parts"]
            lines.append(f"| {r['seed']} | {r['dense_top1']:.2f}% | {r['top1']:.2f}% | {r['delta']:+.2f} | "
                         f"{r['file_bytes']:,}{_orig(r)} | {r['ratio']:.1f}x | {p['header']:,} | {p['positions']:,} | "
                         f"{p['labels']:,} | {p['codebooks']:,} | {p['tables']:,} | {p['biases']:,} | "
                         f"{p['padding'] + p['other']:,} | {r['nonzero_weights']:,} / {r['params']:,} |")
        rs = [{**r, **{k: r["repack"][k] for k in ("file_bytes", "ratio", "top1", "delta")}} if "repack" in r else r
              for r in rs]
        mean_delta = statistics.mean(r["delta"] for r in rs)
        worst = min(r["delta"] for r in rs)
        mean_ratio = statistics.mean(r["ratio"] for r in rs)
        min_ratio = min(r["ratio"] for r in rs)
        lines.append(f"| **mean** | {statistics.mean(r['dense_top1'] for r in rs):.2f}% | "
                     f"{statistics.mean(r['top1'] for r in rs):.2f}% | **{mean_delta:+.2f}** | "
                     f"{statistics.mean(r['file_bytes'] for r in rs):,.0f} | **{mean_ratio:.1f}x** | | | | | | | | |")
        ratio_ok = min_ratio >= target
        acc_ok = mean_delta >= -budget and worst >= -max(0.5, budget)
        verdict = "**met**" if ratio_ok and acc_ok and len(rs) >= 3 else "**not met**"
        lines += ["", f"Target >= {target}x within {budget} points (mean of 3 seeds, every seed within "
                      f"{max(0.5, budget)}): {verdict} — smallest ratio {min_ratio:.1f}x, mean change "
                      f"{mean_delta:+.2f}, worst seed {worst:+.2f}, {len(rs)} seed(s); load average "
                      f"{min(min(_loads(r)) for r in rs):.1f}-{max(max(_loads(r)) for r in rs):.1f}.", ""]
        if rs[0]["arch"] in LITERATURE and "digits" not in case:
            lines += ["| published (60,000 training images) | ratio | accuracy |", "|---|---:|---|"]
            lines += [f"| {n} | {x} | {a} |" for n, x, a in LITERATURE[rs[0]["arch"]]]
            lines.append("")
    return "\n".join(lines)


def _loads(r: dict) -> list[float]:
    """1-minute load averages of the row: where its stages were resumed from a work directory, the ones
    logged while they ran (``loadavg_runs``), else the one at the end of the case."""
    return r.get("loadavg_runs") or [r["loadavg"][0]]


def _orig(r: dict) -> str:
    return f" ({r['orig_bytes']:,})" if "orig_bytes" in r else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(CASES), help="cases, comma separated: " + ", ".join(CASES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--work", default="/tmp/dcomp-bench-max")
    ap.add_argument("--dense-from", default=None, help="folder of dense models an earlier run trained "
                    "(CASE-sSEED-dense.pt): evaluate and reuse them instead of training again")
    ap.add_argument("--mnist", default=None, help=f"path of mnist10k.npz (default {DATA}); give the one an "
                    "earlier run used to resume its work directory")
    ap.add_argument("--report", action="store_true", help="print the tables from the jsonl, run nothing")
    ap.add_argument("--repack", action="store_true", help="re-pack every finished run's quantized checkpoint with "
                    "this tree's writer and record the bytes beside the original ones (no training)")
    args = ap.parse_args()
    if args.mnist:  # the same file under another path: stage keys of `dcomp run` hash the --data text
        for case, spec in CASES.items():
            if spec[2].startswith("npz:"):
                CASES[case] = (*spec[:2], f"npz:{args.mnist}", *spec[3:])
    out = Path(args.out)
    if args.repack:
        rows = load(out)
        for row in rows:
            row["repack"] = repack(row, Path(args.work))
            print(f"{row['case']} seed {row['seed']}: re-packed {row['repack']['file_bytes']:,} B "
                  f"{row['repack']['ratio']:.1f}x, top-1 {row['repack']['top1']:.2f}%", file=sys.stderr, flush=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif not args.report:
        for case in args.only.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                if any(r["case"] == case and r["seed"] == seed for r in load(out)):
                    continue
                row = run_case(case, seed, Path(args.work), Path(args.dense_from) if args.dense_from else None)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{case} seed {seed}: {row['file_bytes']:,} B {row['ratio']:.1f}x, top-1 {row['top1']:.2f}% "
                      f"(dense {row['dense_top1']:.2f}%, {row['delta']:+.2f})", file=sys.stderr, flush=True)
    print(report(load(out)))


if __name__ == "__main__":
    main()
