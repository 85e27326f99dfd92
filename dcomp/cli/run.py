"""Run a YAML recipe: every stage in order, in a resumable work directory, then a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, OutputOpt, ResizeOpt
from dcomp.cli.ui import human_bytes, kv_table

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe value: stages.0.sparsity=0.95 (repeatable)")]


def run(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file (see configs/ and docs/RECIPES.md)")],
    model: Annotated[Optional[str], typer.Option("--model", help="input model file ('-' or omitted: stdin)")] = None,
    model_m: Annotated[Optional[str], typer.Option("-m", hidden=True, help="old spelling of --model")] = None,
    output: OutputOpt = None,
    workdir: Annotated[Optional[str], typer.Option("--workdir", help="where stage outputs and run.jsonl go (default: OUTPUT.work/, or dcomp-run-NAME/ when the result goes to stdout)")] = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    resize: ResizeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore finished stages in the work directory and run all")] = False,
    target_size: Annotated[Optional[str], typer.Option("--target-size", help="choose per-layer sparsity and bits so the .dcz is this big: 8KB (1000 bytes), 8KiB, 9000")] = None,
    target_ratio: Annotated[Optional[str], typer.Option("--target-ratio", help="as --target-size, as a ratio to the dense float32 weights: 60x")] = None,
):
    from dcomp.data import load_dataset
    from dcomp.recipe import load_recipe, run_recipe
    from dcomp.stages import StageContext
    from dcomp.train import evaluate

    if model_m is not None:  # `-m` means --method in prune; kept here only so old scripts work
        if model is not None:
            raise common.UsageError("give the model once: --model (-m is its old spelling)")
        model = model_m
    rec = load_recipe(recipe, set_ or [])  # everything validated before any work
    target = None
    if target_size is not None or target_ratio is not None:
        from dcomp.compressors.size_target import check_recipe, parse_ratio, parse_size

        if target_size is not None and target_ratio is not None:
            raise common.UsageError("give --target-size or --target-ratio, not both")
        target = ("size", parse_size(target_size)) if target_size is not None else ("ratio", parse_ratio(target_ratio))
        check_recipe(rec)  # the recipe has the stages a target needs (raises otherwise)
    inp = common.read_input(model)
    if output and output.endswith(".dcz") and not rec.packs:
        raise common.UsageError(f"-o {output}: the recipe has no 'pack' stage, so its result is a checkpoint, not a .dcz")
    sink = common.plan_output(output, inp, "result", reads=(recipe,))
    work = Path(workdir) if workdir else Path(f"{output}.work" if output and output != "-" else f"dcomp-run-{rec.name}")
    spec = data or rec.defaults.data
    size = resize if resize is not None else rec.defaults.resize
    ds = load_dataset(spec, size)
    con = common.console()
    seed = common.state.seed if common.state.seed_given else rec.defaults.seed
    ctx = StageContext(data=ds, console=con, seed=seed, trust_pickle=common.state.trust_pickle,
                       threads=common.state.threads)
    # what the stages' results depend on beyond the recipe itself: part of every resume key
    settings = {"data": spec, "resize": size, "seed": seed, "arch": arch, "arch_kwargs": arch_kwargs}

    def load(b: bytes, src: str):
        ckpt = common.load_checkpoint(common.Input(b, src, inp.path), arch, arch_kwargs, spec, size)
        common.dataset_for(ckpt, spec, size)  # the data must fit the model before any stage runs
        return ckpt

    def on_stage(s, resumed: bool):
        what = "resumed (unchanged, output intact)" if resumed else "running"
        con.print(f"[bold]stage {s.index} {s.kind}[/] {what}" + (f" — {s.note}" if s.note and not resumed else ""))

    target_info = None
    if target is not None:
        from dcomp.compressors.size_target import run_for_size

        state, records, target_info = run_for_size(rec, target, inp, work, ctx, load, on_stage, fresh, settings)
    else:
        state, records = run_recipe(rec, inp.data, inp.source, work, ctx, load, on_stage, fresh=fresh, settings=settings)

    from dcomp.formats.checkpoint import read_checkpoint

    final_bytes = state.packed if state.packed is not None else state.current.to_bytes()
    final = read_checkpoint(final_bytes, "result") if state.packed is not None else state.current
    final.trusted_refs = state.input_ckpt.trusted_refs  # same architecture as the input the user gave
    trust = common.state.trust_pickle
    before = evaluate(state.input_ckpt.build_model(trust_pickle=trust), ds.x_test, ds.y_test)["top1"]
    after = evaluate(final.build_model(trust_pickle=trust), ds.x_test, ds.y_test)["top1"]
    dense_bytes = 4 * state.input_ckpt.param_count()
    dest = sink.write(final_bytes)
    summary = {
        "recipe": rec.name, "output": dest, "workdir": str(work), "data": ds.spec,
        "dense_float32_bytes": dense_bytes, "output_bytes": len(final_bytes),
        "output_kind": "dcz" if state.packed is not None else "checkpoint",
        "compression_ratio": dense_bytes / max(len(final_bytes), 1),
        "top1_before": before, "top1_after": after, "top1_delta": after - before,
        "params": final.param_count(), "nonzero": final.nonzero_count(),
        "stages": [{"index": r.index, "stage": r.stage, "seconds": r.seconds, "resumed": r.resumed,
                    "metrics": r.metrics} for r in records],
    }
    bench = next((r.metrics for r in reversed(records) if r.stage == "bench"), None)
    if bench:
        summary["bench"] = bench
    if target_info is not None:
        summary["target"] = target_info

    def human(c):
        t = Table(title=f"recipe {rec.name}: stages", title_justify="left")
        for col in ("#", "stage", "seconds", "", "result"):
            t.add_column(col)
        for r in records:
            t.add_row(str(r.index), r.stage, f"{r.seconds:.1f}", "resumed" if r.resumed else "", _headline(r.metrics))
        c.print(t)
        rows = {"dense float32 weights": human_bytes(dense_bytes),
                f"output ({summary['output_kind']})": human_bytes(len(final_bytes)),
                "compression ratio": f"{summary['compression_ratio']:.1f}x",
                "test top-1 % before": before, "test top-1 % after": after,
                "accuracy change (points)": f"{after - before:+.2f}",
                "non-zero / params": f"{summary['nonzero']:,} / {summary['params']:,}", "output": dest,
                "work directory": str(work)}
        if bench and "headline" in bench:
            rows["speed"] = bench["headline"]
        if target_info is not None:
            rows["target size"] = (f"{target_info['target_bytes']:,} bytes asked, {target_info['reached_bytes']:,} reached "
                                   f"({target_info['error']:+.1%}, {len(target_info['runs'])} run(s))")
            rows["chosen per layer"] = ", ".join(f"{n.removesuffix('.weight')} {s:.2%} / {b} bits"
                                                 for n, (s, b) in target_info["plan"].items())
        c.print(kv_table("summary", rows))

    common.emit(summary, human)


def _headline(m: dict) -> str:
    keys = ("sparsity", "masked_sparsity", "top1_after", "top1", "ratio", "file_bytes", "headline")
    parts = []
    for k in keys:
        if k in m and not isinstance(m[k], (dict, list)):
            v = m[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)
