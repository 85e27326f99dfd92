"""Evaluate a model: top-1/top-5 accuracy, loss, parameters, non-zeros, file size."""

from __future__ import annotations

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, ResizeOpt
from dcomp.cli.ui import human_bytes, kv_table


def eval_(model: InputArg = None, arch: ArchOpt = None, arch_kwargs: ArchKwargsOpt = None,
          data: DataOpt = None, resize: ResizeOpt = None):
    from dcomp.train import evaluate

    inp = common.read_input(model)
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, data, resize)
    ds = common.dataset_for(ckpt, data, resize)
    net = ckpt.build_model(trust_pickle=common.state.trust_pickle)
    res = evaluate(net, ds.x_test, ds.y_test)
    params, nonzero = ckpt.param_count(), ckpt.nonzero_count()
    summary = {"source": inp.source, "data": ds.spec, **res, "params": params, "nonzero": nonzero,
               "density": nonzero / max(params, 1), "file_bytes": len(inp.data)}
    rows = {"data": f"{ds.spec} (test, {res['samples']} samples)", "top-1 %": res["top1"]}
    if "top5" in res:
        rows["top-5 %"] = res["top5"]
    rows |= {"loss": res["loss"], "params": params, "non-zero": nonzero,
             "density": f"{100 * nonzero / max(params, 1):.2f}%", "file size": human_bytes(len(inp.data))}
    common.emit(summary, lambda c: c.print(kv_table(f"eval {inp.source}", rows)))
