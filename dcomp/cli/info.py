"""Show what a checkpoint holds: architecture, layers with shapes and density, provenance."""

from __future__ import annotations

import torch
from rich.table import Table

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, ResizeOpt
from dcomp.cli.ui import human_bytes


def describe_arch(arch: dict) -> str:
    from dcomp.models.arch import describe_arch as describe

    return describe(arch)


def layer_rows(ckpt) -> list[dict]:
    rows = []
    for name in ckpt.param_names():
        t = ckpt.state_dict[name]
        nz = int(torch.count_nonzero(t))
        q = ckpt.quant.get(name)
        rows.append({"name": name, "shape": list(t.shape), "params": t.numel(), "nonzero": nz,
                     "density": nz / max(t.numel(), 1), "masked": name in ckpt.masks,
                     "bits": q["bits"] if q else None})
    return rows


def info(model: InputArg = None, arch: ArchOpt = None, arch_kwargs: ArchKwargsOpt = None,
         data: DataOpt = None, resize: ResizeOpt = None):
    """Show what a checkpoint holds: architecture, layers with shapes and density, provenance.

    Never runs code from the file, whatever the flags: the model is not built (layers come from
    the stored weights), TorchScript and pickled models are refused."""
    from dcomp.models.arch import needs_trust

    inp = common.read_input(model)
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, data, resize, execute=False)
    # which building would need trust: said, never done here
    trust_note = needs_trust(ckpt.arch) if ckpt.arch.get("target") not in common.state.typed_archs else None
    rows = layer_rows(ckpt)
    params, nonzero = ckpt.param_count(), ckpt.nonzero_count()
    arch_json = {k: v for k, v in ckpt.arch.items() if k not in ("archive", "graph")}
    if isinstance(ckpt.arch.get("graph"), dict):  # the whole graph is long: its size here
        arch_json.update(modules=len(ckpt.arch["graph"].get("modules") or []), nodes=len(ckpt.arch["graph"].get("nodes") or []))
    summary = {"source": inp.source, "arch": arch_json,
               "input_shape": ckpt.input_shape, "num_classes": ckpt.num_classes, "data": ckpt.data,
               "params": params, "nonzero": nonzero, "density": nonzero / max(params, 1),
               "file_bytes": len(inp.data), "layers": rows, "provenance": ckpt.provenance,
               "arch_needs_trust": trust_note}

    def human(c):
        c.print(f"[bold]{inp.source}[/]: {describe_arch(ckpt.arch)}, input {list(ckpt.input_shape)}, "
                f"{ckpt.num_classes} classes, {params:,} params, {nonzero:,} non-zero "
                f"({100 * nonzero / max(params, 1):.2f}%), {human_bytes(len(inp.data))}")
        t = Table(title="layers", title_justify="left")
        for col in ("name", "shape", "params", "non-zero", "density", "mask", "bits"):
            t.add_column(col, justify="right" if col in ("params", "non-zero", "density", "bits") else "left")
        for r in rows:
            t.add_row(r["name"], "x".join(map(str, r["shape"])), f"{r['params']:,}", f"{r['nonzero']:,}",
                      f"{100 * r['density']:.2f}%", "yes" if r["masked"] else "", str(r["bits"] or ""))
        c.print(t)
        if trust_note:
            c.print(f"note: other commands will not build this model without trust: {trust_note}")
        p = Table(title="provenance", title_justify="left")
        for col in ("#", "stage", "time", "params", "metrics"):
            p.add_column(col)
        for i, e in enumerate(ckpt.provenance):
            p.add_row(str(i), e["stage"], e.get("time", ""), _short(e.get("params", {})), _short(e.get("metrics", {})))
        c.print(p)

    common.emit(summary, human)


def _short(d: dict, limit: int = 80) -> str:
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items() if v is not None)
    return text if len(text) <= limit else text[: limit - 1] + "…"
