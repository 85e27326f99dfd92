"""Show what a checkpoint holds: architecture, layers with shapes and density, provenance."""

from __future__ import annotations

import torch
from rich.table import Table

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, ResizeOpt
from dcomp.cli.ui import human_bytes


def describe_arch(arch: dict) -> str:
    kind = arch.get("kind")
    if kind == "zoo":
        return f"zoo:{arch['name']}" + (f" {arch['kwargs']}" if arch.get("kwargs") else "")
    if kind == "import":
        return f"{arch['target']}" + (f" {arch['kwargs']}" if arch.get("kwargs") else "")
    if kind in ("torchscript", "pickle"):
        return f"{kind} archive ({human_bytes(arch['archive'].numel())})"
    return str(kind)


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
    inp = common.read_input(model)
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, data, resize)
    rows = layer_rows(ckpt)
    params, nonzero = ckpt.param_count(), ckpt.nonzero_count()
    macs = model_macs(ckpt, common.state.trust_pickle)
    layer_macs = macs.get("per_layer", {})
    for r in rows:
        mod = r["name"].rpartition(".")[0]
        if r["name"].endswith("weight") and mod in layer_macs:
            r["macs"] = layer_macs[mod]
    summary = {"source": inp.source, "arch": {k: v for k, v in ckpt.arch.items() if k != "archive"},
               "input_shape": ckpt.input_shape, "num_classes": ckpt.num_classes, "data": ckpt.data,
               "params": params, "nonzero": nonzero, "density": nonzero / max(params, 1),
               "file_bytes": len(inp.data), "layers": rows, "macs": macs, "provenance": ckpt.provenance}

    def human(c):
        c.print(f"[bold]{inp.source}[/]: {describe_arch(ckpt.arch)}, input {list(ckpt.input_shape)}, "
                f"{ckpt.num_classes} classes, {params:,} params, {nonzero:,} non-zero "
                f"({100 * nonzero / max(params, 1):.2f}%), {human_bytes(len(inp.data))}")
        if "total" in macs:
            line = f"MACs (batch 1, convolutions and matrix products): {macs['total']:,}"
            if macs.get("original") not in (None, macs["total"]):
                line += (f" (the architecture at its original shapes: {macs['original']:,}; "
                         f"{macs['total'] / max(macs['original'], 1):.1%})")
            c.print(line)
        elif macs.get("note"):
            c.print(f"MACs: {macs['note']}")
        t = Table(title="layers", title_justify="left")
        for col in ("name", "shape", "params", "non-zero", "density", "mask", "bits", "MACs"):
            t.add_column(col, justify="right" if col in ("params", "non-zero", "density", "bits", "MACs") else "left")
        for r in rows:
            t.add_row(r["name"], "x".join(map(str, r["shape"])), f"{r['params']:,}", f"{r['nonzero']:,}",
                      f"{100 * r['density']:.2f}%", "yes" if r["masked"] else "", str(r["bits"] or ""),
                      f"{r['macs']:,}" if "macs" in r else "")
        c.print(t)
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


def model_macs(ckpt, trust: bool) -> dict:
    """{"total", "per_layer", "original"} MACs at batch 1 (original: the architecture at the shapes its builder
    makes, before structured pruning); {"note": why not} when the model cannot be built or run here."""
    from dcomp.compressors.graph.macs import count_macs
    from dcomp.errors import DcompError

    try:
        model = ckpt.build_model(trust_pickle=trust)
        total, per = count_macs(model, ckpt.input_shape)
    except DcompError as e:
        return {"note": f"not counted ({str(e).splitlines()[0][:120]})"}
    except Exception as e:  # noqa: BLE001 - counting is a report; never fail info for it
        return {"note": f"not counted ({type(e).__name__})"}
    out = {"total": total, "per_layer": per}
    kind = ckpt.arch.get("kind")
    if kind in ("zoo", "import"):
        try:
            from dcomp.models import build_from_factory, build_zoo

            if kind == "zoo":
                ref = build_zoo(ckpt.arch["name"], ckpt.input_shape, ckpt.num_classes, **ckpt.arch.get("kwargs", {}))
            else:
                ref = build_from_factory(ckpt.arch["target"], ckpt.arch.get("kwargs", {}), trusted=trust)
            out["original"] = count_macs(ref, ckpt.input_shape)[0]
        except Exception:  # noqa: BLE001
            pass
    return out
