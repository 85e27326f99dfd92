"""Export a model (checkpoint, .dcz or any model file) to ONNX: dense, shrunk or sparse.

The file is checked with onnx.checker and its outputs compared with PyTorch in onnxruntime
before it is written (batch axis dynamic, IR version onnxruntime 1.31 loads)."""

from __future__ import annotations

from typing import Annotated

import typer

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, OutputOpt, ResizeOpt
from dcomp.cli.ui import human_bytes, kv_table

VariantOpt = Annotated[str, typer.Option("--variant", help="dense (weights expanded), shrunk (structurally pruned "
                                                           "shapes) or sparse (ONNX sparse initializers)")]


def export(
    model: InputArg = None,
    output: OutputOpt = None,
    variant: VariantOpt = "dense",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (13-20)")] = 17,
    min_sparsity: Annotated[float, typer.Option("--min-sparsity", help="sparse: store a weight sparse from this "
                                                                       "fraction of zeros (and only if smaller)")] = 0.5,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = None,
    resize: ResizeOpt = None,
):
    from dcomp.formats.onnx_export import export_checkpoint

    cfg = _config(variant=variant, opset=opset, sparse_min_sparsity=min_sparsity)
    inp = common.read_input(model)
    sink = common.plan_output(output, inp, what="ONNX model")
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, data, resize)
    res = export_checkpoint(ckpt, cfg, trust_pickle=common.state.trust_pickle)
    dest = sink.write(res.onnx_bytes)
    info = res.info
    summary = {"source": inp.source, "output": dest, **info}
    rows = {"variant": cfg.variant, "opset / IR": f"{info['opset']} / {info['ir_version']}",
            "input": f"{info['input_name']} {info['input_shape']}", "file size": human_bytes(info["file_bytes"]),
            "max diff vs PyTorch": f"{info['max_rel_diff']:.1e} (relative to the output scale)"}
    if "sparse_initializers" in info:
        rows["sparse initializers"] = len(info["sparse_initializers"])
    if info.get("shrunk_layers"):
        rows["shrunk layers"] = ", ".join(f"{s['name']} {s['built']}->{s['stored']}" for s in info["shrunk_layers"][:4]) \
            + (" ..." if len(info["shrunk_layers"]) > 4 else "")
    if info.get("note"):
        rows["note"] = info["note"]
    rows["output"] = dest
    common.emit(summary, lambda c: c.print(kv_table(f"export {inp.source}", rows)))


def _config(**values):
    from pydantic import ValidationError

    from dcomp.errors import UsageError
    from dcomp.formats.onnx_export import ExportConfig

    try:
        return ExportConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        opt = {"sparse_min_sparsity": "min-sparsity"}.get(str(err["loc"][0]), str(err["loc"][0]))
        msg = err["msg"].removeprefix("Value error, ")
        if opt == "variant":
            msg = "must be dense, shrunk or sparse"
        raise UsageError(f"--{opt}: {msg} (got {err.get('input')!r})") from None
