"""Run the fuzz targets of tests/fuzzing/targets.py under atheris (libFuzzer), one core.

    python tests/fuzzing/run.py                      # every target, the default budget (>= 1M inputs)
    python tests/fuzzing/run.py dcz_header_decode 50000
    make fuzz                                        # the same as the first line

Each target runs in its own process: an input taking over 5 s of CPU is a hang (measured per input;
libFuzzer's wall-clock -timeout=120 is a backstop), a process over 2.5 GB resident is an allocation
over the bound (-rss_limit_mb), any exception other than the documented ones is a crash. A failing input is written to
tests/data/fuzz-corpus/<target>/ (where pytest replays it: tests/test_fuzz.py) and the run stops.
Without atheris, hypothesis-free random inputs are used instead (no coverage guidance).
Prints one line per target and writes the summary to docs/bench/fuzz.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CORPUS = ROOT / "tests" / "data" / "fuzz-corpus"
BUDGET = {"dcz_decode": 400_000, "dcz_header_decode": 150_000, "huffman_decode": 250_000,
          "checkpoint_decode": 150_000, "checkpoint_dict_decode": 20_000, "huffman_round_trip": 20_000,
          "pack_round_trip": 10_000, "cabac_decode": 200_000, "cabac_round_trip": 10_000,
          "dcz_binary_decode": 200_000, "dcz_binary_round_trip": 5_000}


def child(name: str, runs: int) -> None:
    sys.path.insert(0, str(HERE.parent))
    import atheris

    with atheris.instrument_imports(include=["dcomp"]):
        import dcomp.compressors.huffman  # noqa: F401
        import dcomp.formats.ckpt_validate  # noqa: F401
        import dcomp.formats.checkpoint  # noqa: F401
        import dcomp.formats.dcz  # noqa: F401
    from fuzzing import targets

    import random
    import time

    from dcomp.formats import dcz

    target = targets.TARGETS[name]
    # warm up: numba compiles its kernels once (seconds), not inside an input's time
    for seed in targets.seed_files():
        dcz.read_bytes(seed, "warm-up")
    rng = random.Random(0)
    for _ in range(20):
        try:
            target(bytes(rng.getrandbits(8) for _ in range(64)))
        except Exception:  # noqa: BLE001 - a failure here is found again by the fuzzer
            pass

    def fn(data: bytes) -> None:
        # a hang is > 5 s of this process's CPU for one input (wall time means little on a machine
        # shared by many processes); libFuzzer's wall-clock -timeout is only a backstop
        t = time.process_time()
        target(data)
        took = time.process_time() - t
        if took > 5:
            raise RuntimeError(f"hang: one input took {took:.1f} s of CPU")
    out = CORPUS / name
    out.mkdir(parents=True, exist_ok=True)
    seeds = ROOT / "build" / "fuzz-seeds" / name
    seeds.mkdir(parents=True, exist_ok=True)
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-timeout=120", "-rss_limit_mb=2500", "-max_len=4096",
                   f"-artifact_prefix={out}/", "-print_final_stats=1", str(seeds)], fn)
    atheris.Fuzz()


def run(name: str, runs: int) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", name, str(runs)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    err = p.stderr
    m = re.findall(r"Done (\d+) runs in (\d+) second", err)
    done = int(m[-1][0]) if m else None
    crash = re.findall(r"(Test unit written to \S+)", err)
    kind = "ok"
    if "ERROR: libFuzzer: timeout" in err or "RuntimeError: hang" in err:
        kind = "hang (> 5 s CPU)"
    elif "out-of-memory" in err:
        kind = "allocation over the bound (rss > 2500 MB)"
    elif p.returncode != 0:
        kind = "crash"
    res = {"target": name, "runs": done, "asked": runs, "seconds": round(time.time() - t0), "outcome": kind,
           "artifacts": crash, "returncode": p.returncode}
    if kind != "ok":
        res["log_tail"] = err[-3000:]
    return res


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(argv[1], int(argv[2]))
        return 0
    names = argv[:1] or list(BUDGET)
    runs = int(argv[1]) if len(argv) > 1 else None
    results = []
    load = os.getloadavg()
    for name in names:
        r = run(name, runs or BUDGET[name])
        print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
        if r["outcome"] != "ok":
            print(r["log_tail"], file=sys.stderr)
        results.append(r)
    total = sum(r["runs"] or 0 for r in results)
    summary = {"total_runs": total, "load_average_at_start": [round(x, 2) for x in load],
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "results": results}
    if not argv:
        (ROOT / "docs" / "bench").mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "bench" / "fuzz.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"total: {total:,} inputs; " + ", ".join(f"{r['target']}: {r['outcome']}" for r in results))
    return 0 if all(r["outcome"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
