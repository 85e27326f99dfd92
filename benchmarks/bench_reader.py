"""What the validating readers cost: .dcz decode and checkpoint load of a 25M-parameter model.

    python benchmarks/bench_reader.py [--quick] [--file model.dcz]

Four 2500x2500 Linear weights, 90% magnitude-pruned, 5-bit k-means (the model of bench_pack.py
part 1). Times, best of 5 after a warm-up, in this process: `dcz.read_bytes` of the packed file,
and `read_checkpoint` of the same model saved as a dcomp checkpoint (which since the digest
hashes every tensor and checks the dict's schema before use). Run it once per source tree
(PYTHONPATH=<tree>) to compare versions: docs/bench/reader.md has the table and the command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dcomp.formats import dcz  # noqa: E402
from dcomp.formats.checkpoint import read_checkpoint  # noqa: E402


def best(fn, n=5):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--file", help="a .dcz to decode (written by --write if missing)")
    ap.add_argument("--ckpt", help="a checkpoint file to load")
    ap.add_argument("--write", action="store_true", help="build the model and write --file and --ckpt")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.write:
        from bench_pack import big_model
        ck = big_model(4, 800 if a.quick else 2500, 0.9, 5)
        Path(a.file).write_bytes(dcz.write_bytes(ck))
        Path(a.ckpt).write_bytes(ck.to_bytes())
        return
    data = Path(a.file).read_bytes()
    raw = Path(a.ckpt).read_bytes()
    t_dcz = best(lambda: dcz.read_bytes(data, "m.dcz"))
    t_ck = best(lambda: read_checkpoint(raw, "m.pt"))
    print(f"tree={os.environ.get('PYTHONPATH', '')} dcz_bytes={len(data)} decode_s={t_dcz:.4f} "
          f"ckpt_bytes={len(raw)} ckpt_load_s={t_ck:.4f} load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
