"""Benchmark a model in onnxruntime beside its dense original: latency p50/p90/p99, throughput,
size, memory and accuracy for every variant (dense, shrunk, sparse, hybrid sparse path) and
eager PyTorch, in one process with the same --threads; plus the sparse kernel's break-even."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, ResizeOpt
from dcomp.cli.ui import human_bytes


def bench(
    model: InputArg = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="the dense original (any model file): "
                                                                       "the reference for speed")] = None,
    batch: Annotated[str, typer.Option("--batch", help="batch sizes, comma separated")] = "1,8,64",
    variants: Annotated[str, typer.Option("--variants", help="any of dense,shrunk,sparse,hybrid")] = "dense,shrunk,sparse,hybrid",
    kernel: Annotated[str, typer.Option("--kernel", help="sparse kernel of the hybrid path: numba (compiled sparse-codebook kernel, Linear and Conv2d) or torch (torch CSR, Linear only; stalls when cores are contended)")] = "numba",
    min_sparsity: Annotated[float, typer.Option("--min-sparsity", help="hybrid: consider a Linear/Conv2d layer for the sparse kernel from this fraction of zeros (a calibration then decides per layer)")] = 0.5,
    warmup: Annotated[int, typer.Option("--warmup", help="untimed calls per target and batch size")] = 10,
    iters: Annotated[int, typer.Option("--iters", help="timed calls per target and batch size (at most)")] = 100,
    seconds: Annotated[float, typer.Option("--seconds", help="time budget per target and batch size")] = 2.0,
    sweep: Annotated[bool, typer.Option("--sweep/--no-sweep", help="measure the sparse kernel's break-even sparsity")] = True,
    sweep_sparsities: Annotated[str, typer.Option("--sweep-sparsities", help="sparsities for the break-even sweep")] = "0.5,0.7,0.8,0.9,0.95,0.98,0.99",
    eager: Annotated[bool, typer.Option("--eager/--no-eager", help="also time eager PyTorch")] = True,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    data: Annotated[Optional[str], typer.Option("--data", help="dataset for inputs and accuracy (default: the model's "
                                                               "own, else digits); 'none': random inputs, no accuracy")] = None,
    resize: ResizeOpt = None,
):
    from dcomp.runtime.bench import BenchConfig, parse_float_list, parse_int_list, run_bench
    from dcomp.runtime.runner import resolve_threads

    cfg = _config(batches=parse_int_list(batch, "--batch"),
                  variants=[v.strip() for v in variants.split(",") if v.strip()], kernel=kernel,
                  min_sparsity=min_sparsity, warmup=warmup, iters=iters, seconds=seconds, sweep=sweep,
                  sweep_sparsities=parse_float_list(sweep_sparsities, "--sweep-sparsities"), eager=eager)
    inp = common.read_input(model)
    base_inp = common.read_input(baseline, "a baseline model file") if baseline else None
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, None if data == "none" else data, resize)
    base = common.load_checkpoint(base_inp, arch, arch_kwargs, None if data == "none" else data, resize) if base_inp else None
    ds = None if data == "none" else common.dataset_for(ckpt, data, resize)
    threads = resolve_threads(common.state.threads)
    con = common.console()
    summary = run_bench(ckpt, cfg, threads, baseline=base, data=ds, trust_pickle=common.state.trust_pickle,
                        seed=common.state.seed, log=lambda s: con.print(f"[dim]{s}[/dim]"))
    summary = {"model": inp.source, "baseline": base_inp.source if base_inp else None, **summary}
    common.emit(summary, lambda c: render(c, summary))


def _config(**values):
    from pydantic import ValidationError

    from dcomp.errors import UsageError
    from dcomp.runtime.bench import BenchConfig

    names = {"batches": "batch", "sweep_sparsities": "sweep-sparsities", "min_sparsity": "min-sparsity"}
    try:
        return BenchConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        opt = names.get(str(err["loc"][0]), str(err["loc"][0]))
        msg = err["msg"].removeprefix("Value error, ")
        if opt == "kernel":
            msg = "must be torch or numba"
        raise UsageError(f"--{opt}: {msg} (got {err.get('input')!r})") from None


def render(c, s: dict) -> None:
    from dcomp.runtime.bench import speed_label
    from dcomp.runtime.sparse import speed_words

    load = s.get("loadavg")
    title = (f"bench {s['model']}  threads={s['threads']}  reference: {s['reference']}"
             + (f"  load avg {load[0]:.1f}" if load else ""))
    t = Table(title=title, title_justify="left")
    for col in ("target", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "vs reference", "size", "mem", "top-1 %"):
        t.add_column(col, justify="left" if col in ("target", "vs reference") else "right", no_wrap=True)
    for tg in s["targets"]:
        for i, r in enumerate(tg["results"]):
            first = i == 0
            t.add_row(tg["name"] if first else "", str(r["batch"]),
                      f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['throughput_per_s']:,.0f}",
                      "reference" if tg["name"] == s["reference"] else speed_label(r),
                      human_bytes(tg["model_bytes"]) if first and tg["model_bytes"] else "",
                      human_bytes(tg["rss_added_bytes"]) if first and tg["rss_added_bytes"] is not None else "",
                      f"{tg['top1']:.2f}" if first and tg["top1"] is not None else "")
    if not c.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        c.width = max(c.width, 150)
    c.print(t)
    engines = ", ".join(f"{tg['name']}: {tg['engine']}" for tg in s["targets"])
    c.print(f"[dim]engines: {engines}[/dim]")
    c.print(f"[dim]mem: {s['memory_how']}; size of a hybrid target: its ONNX segments + CSR arrays[/dim]")
    c.print("[dim]vs reference: p50 ratio; in brackets the range the p10-p90 spreads of the interleaved rounds "
            "allow; 'same' when it includes 1[/dim]")
    for n in s.get("notes", []):
        c.print(f"note: {n}")
    _render_hybrid_choice(c, s)
    sw = s.get("sweep")
    if sw:
        st = Table(title=f"sparse {sw['kernel']} CSR kernel vs dense onnxruntime Gemm, one layer (random masks)",
                   title_justify="left")
        for col in ("layer", "sparsity", "batch", "dense ms", "sparse ms", "sparse is"):
            st.add_column(col, justify="right" if col not in ("sparse is",) else "left")
        for r in sw["rows"]:
            st.add_row(f"{r['shape'][0]}x{r['shape'][1]}", f"{r['sparsity']:.0%}", str(r["batch"]),
                       f"{r['dense_s'] * 1e3:.3f}", f"{r['sparse_s'] * 1e3:.3f}", speed_words(r["speedup"], "dense"))
        c.print(st)
        for shape, per_batch in sw["break_even"].items():
            parts = [f"batch {b}: " + (f"{v:.0%}" if v is not None else "never (dense always faster)")
                     for b, v in per_batch.items()]
            c.print(f"break-even sparsity for {shape}: " + ", ".join(parts))


def _render_hybrid_choice(c, s: dict) -> None:
    """Which prunable layers the hybrid target runs sparse, per batch size, and the measured costs."""
    hy = next((tg for tg in s["targets"] if tg["variant"] == "hybrid"), None)
    if hy is None or not hy["info"].get("layers"):
        return
    info = hy["info"]
    t = Table(title="hybrid: per-layer choice (calibrated at load: sparse kernel ms / dense onnxruntime ms)",
              title_justify="left")
    batches = sorted({b for lay in info["layers"] for b in lay["choice"]}, key=int)
    for col in ("layer", "kind", "sparsity", *[f"batch {b}" for b in batches]):
        t.add_column(col, justify="left" if col in ("layer", "kind") or col.startswith("batch") else "right")
    for lay in info["layers"]:
        cells = []
        for b in batches:
            cost = ""
            if "sparse_ms" in lay and b in lay["sparse_ms"]:
                cost = f" ({lay['sparse_ms'][b]:.3f} / {lay['dense_ms'][b]:.3f})"
            cells.append(lay["choice"].get(b, "") + cost)
        t.add_row(lay["name"], lay["kind"], f"{lay['sparsity']:.0%}", *cells)
    c.print(t)
