"""MetaPruning: search per-layer channel widths under a budget, then write the model at those widths.

A PruningNet (one small MLP per conv/linear layer that generates its weights from the widths kept)
is trained through the one training loop with a random candidate per step; an evolutionary search
then scores candidates inside the budget window by the validation top-1 (held out of the training
set, never the test split) of their generated weights after BatchNorm re-estimation. The winner is
written as a physically smaller checkpoint: the input's top units by L1 (--init l1) or the generated
weights (--init generated). Retrain it with `dcomp retrain`.

Budgets: --max-macs / --max-params / --max-latency-ms (onnxruntime at --latency-batch), each a
fraction of the input (0.5x) or absolute (12M, 250k, 1.5); a candidate must use at least
--min-fraction of each. Resumable: every scored candidate is appended to OUT.search.jsonl and the
trained PruningNet saved to OUT.pruningnet.pt; a rerun with the same model, data and settings reuses
both (--fresh: start over). Under torchrun the PruningNet trains data-parallel and the candidates
are scored across the ranks. The picture OUT.png shows every candidate.

Examples:

\b
  dcomp search model.pt --data digits --max-macs 0.5x -o searched.pt
  dcomp search model.pt --data digits --max-params 0.3x --population 20 --iterations 5 -o small.pt
  dcomp search model.pt --data digits --max-latency-ms 0.8x --latency-batch 8 -o fast.pt
  dcomp retrain searched.pt --data digits --epochs 10 -o searched-rt.pt
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, OutputOpt, ResizeOpt
from dcomp.errors import UsageError


@common.with_train_options(exclude=("select",), weight_decay=0.0)
def search(
    model: InputArg = None,
    output: OutputOpt = None,
    max_macs: Annotated[Optional[str], typer.Option("--max-macs", help="MACs budget: 0.5x of the input, or absolute (12M)")] = None,
    max_params: Annotated[Optional[str], typer.Option("--max-params", help="parameter budget: 0.5x or absolute (250k)")] = None,
    max_latency_ms: Annotated[Optional[str], typer.Option("--max-latency-ms", help="onnxruntime latency budget in ms, or 0.5x")] = None,
    min_fraction: Annotated[float, typer.Option("--min-fraction", help="candidates use at least this fraction of each budget")] = 0.9,
    latency_batch: Annotated[int, typer.Option("--latency-batch", min=1, help="batch size of the latency measurement")] = 1,
    grid: Annotated[Optional[str], typer.Option("--grid", help="width ratios: LO:HI:COUNT (default 0.1:1:31) or 0.25,0.5,1")] = None,
    population: Annotated[int, typer.Option("--population", help="candidates per iteration")] = 50,
    parents: Annotated[int, typer.Option("--parents", help="best candidates kept as parents")] = 10,
    mutations: Annotated[int, typer.Option("--mutations", help="mutants per iteration")] = 25,
    crossovers: Annotated[int, typer.Option("--crossovers", help="crossovers per iteration")] = 25,
    mutation_prob: Annotated[float, typer.Option("--mutation-prob", help="probability each gene is redrawn")] = 0.1,
    iterations: Annotated[int, typer.Option("--iterations", help="search iterations")] = 20,
    epochs: Annotated[int, typer.Option("--epochs", min=0, help="PruningNet training epochs (one random candidate per step)")] = 3,
    hidden: Annotated[int, typer.Option("--hidden", help="hidden units of each weight generator")] = 32,
    init: Annotated[str, typer.Option("--init", help="output weights: l1 (input's top units) or generated")] = "l1",
    pruningnet_init: Annotated[str, typer.Option("--pruningnet-init", help="generators start at the input's weights (input) or at random")] = "input",
    recal_samples: Annotated[int, typer.Option("--recal-samples", help="training samples re-estimating each candidate's BatchNorm")] = 512,
    val_samples: Annotated[int, typer.Option("--val-samples", help="held-out training samples scoring each candidate")] = 1000,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="keep the width of layers matching REGEX; repeatable")] = None,
    log: Annotated[Optional[str], typer.Option("--log", help="candidate log (default OUT.search.jsonl)")] = None,
    pruningnet: Annotated[Optional[str], typer.Option("--pruningnet", help="where the trained PruningNet is kept and reused (default OUT.pruningnet.pt)")] = None,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="draw OUT.png")] = True,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore the log and the saved PruningNet")] = False,
    data: DataOpt = None,
    resize: ResizeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    train_opts: dict | None = None,
):
    from pydantic import ValidationError

    from dcomp.config.search import SearchConfig, parse_grid
    from dcomp.stages import StageContext

    fields: dict = dict(max_macs=max_macs, max_params=max_params, max_latency_ms=max_latency_ms,
                        min_fraction=min_fraction, latency_batch=latency_batch, population=population,
                        parents=parents, mutations=mutations, crossovers=crossovers, mutation_prob=mutation_prob,
                        iterations=iterations, hidden=hidden, init=init, pruningnet_init=pruningnet_init,
                        recal_samples=recal_samples, val_samples=val_samples, exclude=list(exclude or []),
                        train=common.train_config(epochs=epochs, **train_opts))
    if grid is not None:
        fields["grid"] = parse_grid(grid)
    try:
        cfg = SearchConfig(**fields)
    except ValidationError as e:
        raise UsageError(common.pydantic_message(e).replace("--value", "--max-macs")) from None
    if data is None:
        raise UsageError("search trains a PruningNet and scores candidates on training data: give --data")

    inp = common.read_input(model)
    sink = common.plan_output(output, inp)
    base = sink.path
    log_path = Path(log) if log else (base.with_name(base.stem + ".search.jsonl") if base is not None else None)
    pn_path = Path(pruningnet) if pruningnet else (base.with_name(base.stem + ".pruningnet.pt") if base is not None else None)
    pic_path = base.with_name(base.stem + ".png") if (plot and base is not None) else None
    for p in (log_path, pn_path, pic_path):
        if p is not None and inp.path is not None and p.exists() and p.resolve() == inp.path.resolve():
            raise UsageError(f"{p} would overwrite the input; choose another output path")
        if p is not None and not p.parent.is_dir():
            raise UsageError(f"folder {p.parent} does not exist (for {p.name})")
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, data, resize)
    ds = common.dataset_for(ckpt, data, resize)

    from dcomp.compressors.metaprune.apply import apply_search
    from dcomp.compressors.metaprune.store import SearchStore

    con = common.console()
    with SearchStore(log_path, pn_path, fresh) as store:
        result = apply_search(ckpt, cfg, StageContext(data=ds, console=con, seed=common.state.seed,
                                                      trust_pickle=common.state.trust_pickle,
                                                      threads=getattr(common.state, "threads", None)),
                              **store.hooks())
    m = result.metrics
    dest = sink.write(result.checkpoint.to_bytes())
    written = {"checkpoint": dest}
    if pic_path is not None and common.is_main_process():
        from dcomp.plots import search_figure

        written["picture"] = search_figure(m, pic_path)
    if log_path is not None:
        written["log"] = str(log_path)
    summary = {"outputs": written, **{k: v for k, v in m.items() if k != "candidates"}}
    common.emit(summary, lambda c: render(c, m, written))


def render(c, m: dict, written: dict) -> None:
    from rich.table import Table

    from dcomp.cli.ui import kv_table

    t = Table(title="searched widths", title_justify="left")
    for col in ("group", "units"):
        t.add_column(col)
    uni = m.get("uniform") or {}
    for name, w in m["winner"]["widths"].items():
        t.add_row(name, f"{w['units']} of {w['of']}")
    c.print(t)
    rows = {"MACs": f"{m['winner']['macs']:,} of {m['model']['macs']:,} ({m['macs_ratio']:.1%})",
            "params": f"{m['winner']['params']:,} of {m['model']['params']:,} ({m['params_ratio']:.1%})",
            "val top-1 % (generated weights)": f"{m['winner']['val_top1']:.2f}",
            "test top-1 % (before retraining)": f"{m['top1_test_before_retrain']:.2f}"}
    if uni:
        rows["uniform baseline"] = f"ratio {uni['ratio']:g}: val top-1 {uni['top1']:.2f}%, {uni['macs']:,} MACs"
    rows["candidates"] = f"{m['evaluated']} scored ({m['reused']} reused from the log)"
    rows["CPU seconds"] = f"PruningNet {m['cpu_seconds']['pruningnet']:.0f}, search {m['cpu_seconds']['search']:.0f}"
    for k, v in written.items():
        rows[k] = v
    c.print(kv_table("search", rows))
