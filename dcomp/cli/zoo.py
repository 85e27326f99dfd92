"""List the built-in models with their parameter counts (the table goes to stdout).

Counting parameters means building each model, which needs torch (seconds to import); the
rows are a pure function of the zoo's source code, so they are cached in
``$DCOMP_CACHE_DIR`` (default ``~/.cache/dcomp``) under a hash of that code and answered from
there afterwards, without importing torch."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dcomp import __version__
from dcomp.cli import common


def cache_dir() -> Path:
    env = os.environ.get("DCOMP_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcomp"


def _source_key() -> str:
    """A hash of the code the rows depend on: dcomp/models/*.py and this version."""
    import dcomp

    h = hashlib.sha256(__version__.encode())
    models = Path(dcomp.__file__).parent / "models"
    for p in sorted(models.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _compute_rows() -> list[dict]:
    from dcomp.models import ZOO, build_zoo

    rows = []
    for name, (_, desc) in ZOO.items():
        shape = (1, 28, 28) if name == "lenet-5" else (1, 8, 8)
        model = build_zoo(name, shape, 10)
        rows.append({"name": name, "description": desc, "example_input": list(shape),
                     "params": sum(p.numel() for p in model.parameters())})
    return rows


def zoo_rows() -> list[dict]:
    path = cache_dir() / f"zoo-{_source_key()}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["models"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    rows = _compute_rows()
    try:
        from dcomp.atomic import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"models": rows}).encode())
    except Exception:  # noqa: BLE001 - a cache that cannot be written only costs time
        pass
    return rows


def zoo():
    rows = zoo_rows()

    def human(c):
        t = Table(title="dcomp model zoo", title_justify="left")
        for col in ("name", "params (10 classes)", "at input", "description"):
            t.add_column(col, overflow="fold")
        for r in rows:
            t.add_row(r["name"], f"{r['params']:,}", "x".join(map(str, r["example_input"])), r["description"])
        Console(highlight=False).print(t)  # the table is this command's output: stdout

    common.emit({"models": rows}, human)
