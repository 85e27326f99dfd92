"""`make bench`: run every benchmarks/bench_*.py in turn (each prints its markdown tables).

The measured tables and their interpretation live in docs/BENCHMARKS.md; rerun this after
changing hot code and update that file with what it prints. A benchmark that fails makes
this script exit non-zero.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
failed = []
for script in sorted(here.glob("bench_*.py")):
    print(f"\n## {script.name}\n", flush=True)
    if subprocess.run([sys.executable, str(script)], cwd=here.parent).returncode != 0:
        failed.append(script.name)
if failed:
    print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1)
