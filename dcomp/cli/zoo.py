"""List the built-in models with their parameter counts."""

from __future__ import annotations

from rich.table import Table

from dcomp.cli import common


def zoo():
    from dcomp.models import ZOO, build_zoo

    rows = []
    for name, (_, desc) in ZOO.items():
        shape = (1, 28, 28) if name == "lenet-5" else (1, 8, 8)
        model = build_zoo(name, shape, 10)
        rows.append({"name": name, "description": desc, "example_input": list(shape),
                     "params": sum(p.numel() for p in model.parameters())})

    def human(c):
        t = Table(title="dcomp model zoo", title_justify="left")
        for col in ("name", "params (10 classes)", "at input", "description"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], f"{r['params']:,}", "x".join(map(str, r["example_input"])), r["description"])
        c.print(t)

    common.emit({"models": rows}, human)
