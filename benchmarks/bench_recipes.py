"""Every shipped recipe on its base model, as `dcomp run` does it: prints the table of
docs/RECIPES.md ("what it reaches") and the Deep Compression headline of docs/BENCHMARKS.md.

    python benchmarks/bench_recipes.py                 # all recipes in configs/
    python benchmarks/bench_recipes.py deep-compression

Base models are trained here, in the same run, with `dcomp train` defaults (20 epochs;
LeNet-5 on digits resized to 28x28). The dense size is float32 bytes of every parameter; the
output size is the file the recipe writes (a .dcz when it packs). Accuracy is top-1 on the
digits test split (359 images: one image is 0.28 points).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def dcomp(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dcomp", "--quiet", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"dcomp {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def main(names: list[str]) -> None:
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    if names:
        configs = [c for c in configs if c.stem in names]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bases: dict[tuple, Path] = {}
        for cfg in configs:
            raw = yaml.safe_load(cfg.read_text())
            resize = raw.get("defaults", {}).get("resize")
            arch = "lenet-5" if resize else "lenet-300-100"
            key = (arch, resize)
            if key not in bases:
                bases[key] = Path(tmp) / f"{arch}.pt"
                extra = ["--resize", str(resize)] if resize else []
                dcomp("train", "--arch", arch, "--data", "digits", "--epochs", "20", *extra, "-o", str(bases[key]))
            packs = any(s.get("stage") == "pack" for s in raw["stages"])
            out = Path(tmp) / (cfg.stem + (".dcz" if packs else ".pt"))
            t0 = time.perf_counter()
            s = json.loads(dcomp("run", str(cfg), "--model", str(bases[key]), "-o", str(out), "--json"))
            rows.append({"recipe": cfg.stem, "model": arch, "seconds": time.perf_counter() - t0, **s})
    print("| recipe | model | output | size | ratio vs float32 | non-zero / params | top-1 before | top-1 after | change | time |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['model']} | {r['output_kind']} | {r['output_bytes']:,} B | {r['compression_ratio']:.1f}x "
              f"| {r['nonzero']:,} / {r['params']:,} | {r['top1_before']:.2f}% | {r['top1_after']:.2f}% "
              f"| {r['top1_delta']:+.2f} | {r['seconds']:.0f} s |")
    for r in rows:
        if r.get("bench"):
            print(f"\n{r['recipe']} speed: {r['bench'].get('headline')}")


if __name__ == "__main__":
    main(sys.argv[1:])
