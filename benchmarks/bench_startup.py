"""Start-up time of light commands, before/after: `python benchmarks/bench_startup.py BEFORE_TREE AFTER_TREE`.

Each command runs REPEAT times per tree (alternating trees, so load hits both alike) with the tree
first on PYTHONPATH; prints a markdown table of median wall time and median CPU time (user+sys
of the child), plus the load average. Needs a .dcz and a checkpoint: made in a temp folder.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPEAT = int(os.environ.get("REPEAT", "5"))


def run(tree: str, args: list[str], cwd: str) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dcomp", *args], cwd=cwd, env=env, capture_output=True,
                       stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{tree}: dcomp {' '.join(args)} failed: {r.stderr.decode()[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    before_tree, after_tree = sys.argv[1], sys.argv[2]
    root = Path(after_tree)
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "PYTHONPATH": after_tree}
        subprocess.run([sys.executable, "-m", "dcomp", "train", "--epochs", "1", "-o", f"{d}/m.pt", "-q"], env=env, check=True)
        subprocess.run([sys.executable, "-m", "dcomp", "pack", f"{d}/m.pt", "-o", f"{d}/m.dcz", "-q"], env=env, check=True)
        commands = [["--version"], ["--help"], ["zoo"], ["prune", "--help"],
                    ["recipe", "validate", str(root / "configs" / "deep-compression.yaml")], ["inspect", f"{d}/m.dcz"],
                    ["info", f"{d}/m.pt"]]
        for tree in (before_tree, after_tree):  # warm caches (zoo table, .pyc)
            for c in commands:
                run(tree, c, d)
        load0 = os.getloadavg()[0]
        results = {}
        for c in commands:
            for _ in range(REPEAT):
                for tree in (before_tree, after_tree):
                    results.setdefault((" ".join(c), tree), []).append(run(tree, c, d))
        load1 = os.getloadavg()[0]
    print(f"load average {load0:.1f} at the start, {load1:.1f} at the end; {REPEAT} runs each, median\n")
    print("| command | before: wall s | before: CPU s | after: wall s | after: CPU s |")
    print("|---|---|---|---|---|")
    for c in commands:
        name = " ".join(c).replace(str(root) + "/", "")
        if c and c[0] == "inspect":
            name = "inspect m.dcz"
        elif c and c[0] == "info":
            name = "info m.pt"
        cells = []
        for tree in (before_tree, after_tree):
            rs = results[(" ".join(c), tree)]
            cells += [f"{statistics.median(w for w, _ in rs):.2f}", f"{statistics.median(u for _, u in rs):.2f}"]
        print(f"| `dcomp {name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
