"""What the validating readers cost: .dcz decode and checkpoint load of a 25M-parameter model.

    python benchmarks/bench_reader.py [--quick] [--file model.dcz]
    flock /tmp/dcomp-timing.lock python benchmarks/bench_reader.py --coders [--quick]

Four 2500x2500 Linear weights, 90% magnitude-pruned, 5-bit k-means (the model of bench_pack.py
part 1). Times, best of 5 after a warm-up, in this process: `dcz.read_bytes` of the packed file,
and `read_checkpoint` of the same model saved as a dcomp checkpoint (which since the digest
hashes every tensor and checks the dict's schema before use). Run it once per source tree
(PYTHONPATH=<tree>) to compare versions: docs/bench/reader.md has the table and the command.

--coders: the same model packed with each stream coder (`PackConfig.coder`: huffman, rans, auto =
the default, cabac = context-adaptive everywhere) and decoded, interleaved with `torch.load` of the
dense float32 state_dict (weights_only=True), both read from a file in the page cache, 5 rounds after a warm-up; prints best and
median seconds and the ratio to torch.load (docs/bench/size.md, "Decode speed").
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


def coders(quick: bool, rounds: int = 5) -> None:
    import statistics

    from bench_pack import big_model

    size = 800 if quick else 2500
    ck = big_model(4, size, 0.9, 5)
    params = sum(v.numel() for v in ck.state_dict.values())
    files = {}
    for c in ("huffman", "rans", "auto", "cabac"):
        data, report = dcz.pack(ck, dcz.PackConfig(coder=c, verify=False))
        codings = sorted({r[k]["coding"] for r in report["layers"] for k in ("gaps", "indices") if r.get(k)})
        files[c] = (data, "/".join(codings))
    import tempfile
    tmp = Path(tempfile.mkdtemp())
    torch.save(ck.state_dict, tmp / "dense.pt")
    dense = (tmp / "dense.pt").read_bytes()
    for c, (d, _) in files.items():
        (tmp / f"{c}.dcz").write_bytes(d)
    # both from a file (in the page cache): what `dcomp unpack` / a loader does
    runs = {c: (lambda c=c: dcz.read_bytes((tmp / f"{c}.dcz").read_bytes(), "m.dcz")) for c in files}
    runs["torch.load"] = lambda: torch.load(tmp / "dense.pt", weights_only=True)
    for fn in runs.values():
        fn()
    ts = {k: [] for k in runs}
    load0 = os.getloadavg()
    for _ in range(rounds):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    load1 = os.getloadavg()
    base_b, base_m = min(ts["torch.load"]), statistics.median(ts["torch.load"])
    print(f"# {params:,} parameters (4 x {size}x{size} Linear, 90% pruned, 5-bit k-means); one thread; {rounds} rounds; "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| file | bytes | stream codings | decode best / median | vs torch.load best / median |")
    print("|---|---:|---|---:|---:|")
    print(f"| dense float32, torch.load | {len(dense):,} | - | {base_b * 1e3:.0f} / {base_m * 1e3:.0f} ms | 1 |")
    for c, (data, codings) in files.items():
        b, m = min(ts[c]), statistics.median(ts[c])
        print(f"| .dcz --coder {c} | {len(data):,} | {codings} | {b * 1e3:.0f} / {m * 1e3:.0f} ms "
              f"| {b / base_b:.2f}x / {m / base_m:.2f}x |")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coders", action="store_true", help="decode time per stream coder vs torch.load")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --coders")
    ap.add_argument("--file", help="a .dcz to decode (written by --write if missing)")
    ap.add_argument("--ckpt", help="a checkpoint file to load")
    ap.add_argument("--write", action="store_true", help="build the model and write --file and --ckpt")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.coders:
        coders(a.quick, a.rounds)
        return
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
