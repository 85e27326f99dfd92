"""Show what a checkpoint holds: architecture, layers with shapes and density, provenance."""

from __future__ import annotations

from rich.table import Table

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, ResizeOpt
from dcomp.cli.ui import human_bytes


def describe_arch(arch: dict) -> str:
    from dcomp.models.arch import describe_arch as describe

    return describe(arch)


def layer_rows(ckpt) -> list[dict]:
    import torch

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
    macs = model_macs(ckpt)
    layer_macs = macs.get("per_layer", {})
    for r in rows:
        mod = r["name"].rpartition(".")[0]
        if r["name"].endswith("weight") and mod in layer_macs:
            r["macs"] = layer_macs[mod]
    arch_json = {k: v for k, v in ckpt.arch.items() if k not in ("archive", "graph")}
    if isinstance(ckpt.arch.get("graph"), dict):  # the whole graph is long: its size here
        arch_json.update(modules=len(ckpt.arch["graph"].get("modules") or []), nodes=len(ckpt.arch["graph"].get("nodes") or []))
    summary = {"source": inp.source, "arch": arch_json,
               "input_shape": ckpt.input_shape, "num_classes": ckpt.num_classes, "data": ckpt.data,
               "params": params, "nonzero": nonzero, "density": nonzero / max(params, 1),
               "file_bytes": len(inp.data), "layers": rows, "macs": macs, "provenance": ckpt.provenance,
               "arch_needs_trust": trust_note}

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
        if trust_note:
            c.print(f"note: other commands will not build this model without trust: {trust_note}")
        p = Table(title="provenance", title_justify="left")
        for col in ("#", "stage", "time", "params", "metrics"):
            p.add_column(col, no_wrap=col in ("#", "stage", "time"), overflow="fold")
        for i, e in enumerate(ckpt.provenance):
            p.add_row(str(i), e["stage"], str(e.get("time", ""))[:16].replace("T", " "), _short(e.get("params", {})),
                      _short(e.get("metrics", {})))
        c.print(p)

    common.emit(summary, human)


def _short(d: dict, limit: int = 240) -> str:
    """k=v pairs; nested tables (per-layer details) are left to --json."""
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()
                     if v is not None and not isinstance(v, (dict, list)))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def model_macs(ckpt) -> dict:
    """{"total", "per_layer", "original"} MACs at batch 1 (original: the architecture at the shapes its builder
    makes, before structured pruning); {"note": why not} when the model cannot be built or run here.

    info runs nothing from the file, whatever the flags: only architectures that build without trust
    (zoo, graph, torchvision's own factories) are counted; TorchScript, pickles and file-named
    factories are not (and --trust-pickle does not change that here)."""
    import dataclasses

    from dcomp.compressors.graph.macs import count_macs
    from dcomp.errors import DcompError
    from dcomp.models.arch import build_reference, needs_trust

    why = needs_trust(ckpt.arch)
    if why is not None or ckpt.arch.get("kind") in ("torchscript", "pickle"):
        return {"note": "not counted (info never builds an architecture that would run code from the file)"}
    safe = dataclasses.replace(ckpt, trusted_refs=frozenset())  # shallow: no tensor is copied
    try:
        model = safe.build_model()
        total, per = count_macs(model, ckpt.input_shape)
    except DcompError as e:
        return {"note": f"not counted ({str(e).splitlines()[0][:120]})"}
    except Exception as e:  # noqa: BLE001 - counting is a report; never fail info for it
        return {"note": f"not counted ({type(e).__name__})"}
    out = {"total": total, "per_layer": per}
    try:
        out["original"] = count_macs(build_reference(safe), ckpt.input_shape)[0]
    except Exception:  # noqa: BLE001 - the original size is a bonus line of the report
        pass
    return out
