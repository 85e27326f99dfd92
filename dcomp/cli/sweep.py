"""Sensitivity sweep: accuracy against sparsity for pruning methods, for the whole model and for
each prunable layer pruned alone (the others dense), optionally retraining each point.

Writes OUT.json (every point, the settings, the model's digest), OUT.csv and OUT.png (one curve
per method; one panel for the whole model and one per layer). Resumable: each measured point is
logged to OUT.json.partial.jsonl as it finishes, and a rerun with the same model and settings
reuses the points found there or in OUT.json (--fresh: measure all again).

Methods: magnitude (layer-wise), global (one threshold; whole model only), neuron (units of
Linear layers), filter (Conv filters). Default: magnitude plus neuron/filter where they apply.
The grid's sparsity is of weights for magnitude/global and of units for neuron/filter.

Examples:

\b
  dcomp sweep base.pt --data digits -o sweep.json
  dcomp sweep base.pt --data digits -m magnitude -m neuron --grid 0:0.95:0.05 -o sweep.json
  dcomp sweep base.pt --data digits --retrain-epochs 2 --no-per-layer -o sweep-rt.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, ResizeOpt
from dcomp.errors import UsageError


@common.with_train_options(exclude=("select",))
def sweep(
    model: InputArg = None,
    output: Annotated[str, typer.Option("-o", "--output", help="sweep JSON; the CSV and the picture go beside it")] = "sweep.json",
    method: Annotated[Optional[list[str]], typer.Option("--method", "-m", help="magnitude, global, neuron or filter; repeatable or comma-separated")] = None,
    grid: Annotated[Optional[str], typer.Option("--grid", help="sparsities: 0,0.5,0.9 or START:STOP:STEP (default 0..0.99, dense near the top)")] = None,
    whole: Annotated[bool, typer.Option("--whole/--no-whole", help="the whole model pruned at each sparsity")] = True,
    per_layer: Annotated[bool, typer.Option("--per-layer/--no-per-layer", help="each layer pruned alone, the others dense")] = True,
    split: Annotated[str, typer.Option("--split", help="measure accuracy on test, val (carved off the training set) or train")] = "test",
    retrain_epochs: Annotated[int, typer.Option("--retrain-epochs", min=0, help="retrain each point this many epochs (masks kept) and measure again")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="picture format: png or svg")] = "png",
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="draw the picture")] = True,
    fresh: Annotated[bool, typer.Option("--fresh", help="measure every point again (ignore earlier results)")] = False,
    data: DataOpt = None,
    resize: ResizeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    train_opts: dict | None = None,
):
    from pydantic import ValidationError

    from dcomp.compressors.sensitivity import SweepConfig, apply_sweep, parse_grid
    from dcomp.formats.checkpoint import atomic_write
    from dcomp.plots import FORMATS
    from dcomp.stages import StageContext

    methods = [m.strip() for item in (method or []) for m in item.split(",") if m.strip()] or None
    fields: dict = {"methods": methods, "whole": whole, "per_layer": per_layer, "split": split}
    if grid is not None:
        fields["grid"] = parse_grid(grid)
    if retrain_epochs > 0:
        fields["retrain"] = common.train_config(epochs=retrain_epochs, **train_opts)
    try:
        cfg = SweepConfig(**fields)
    except ValidationError as e:
        raise UsageError(common.pydantic_message(e).replace("--methods", "--method")) from None
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use png or svg")
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"-o {output} is a directory; give a file name such as {out / 'sweep.json'}")
    if not out.parent.exists():
        raise UsageError(f"-o {output}: folder {out.parent} does not exist")
    stem = out.with_suffix("") if out.suffix == ".json" else out
    csv_path = stem.with_name(stem.name + ".csv")
    pic_path = stem.with_name(stem.name + "." + fmt)
    log_path = out.with_name(out.name + ".partial.jsonl")

    inp = common.read_input(model)
    if inp.path is not None and any(p.exists() and p.resolve() == inp.path.resolve() for p in (out, csv_path, pic_path)):
        raise UsageError(f"-o {output} would overwrite the input; choose another output path")
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, data, resize)
    ds = common.dataset_for(ckpt, data, resize)

    cache = {} if fresh else _earlier_points(out, log_path)
    con = common.console()
    bar = _Progress(con)
    log_file = None

    def on_point(rec: dict, reused: bool) -> None:
        nonlocal log_file
        if reused:
            return
        if log_file is None:
            log_file = open(log_path, "a" if not fresh else "w", encoding="utf-8")
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    try:
        result = apply_sweep(ckpt, cfg, StageContext(data=ds, console=con, seed=common.state.seed,
                                                     trust_pickle=common.state.trust_pickle),
                             cache=cache, on_point=on_point, progress=bar.update)
    finally:
        bar.stop()
        if log_file is not None:
            log_file.close()
    doc = result.metrics
    doc["model"] = inp.source
    atomic_write(out, (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write(csv_path, to_csv(doc).encode())
    written = {"json": str(out), "csv": str(csv_path)}
    if plot:
        from dcomp.plots import sweep_figure

        written["picture"] = sweep_figure(doc, pic_path, fmt)
    if log_path.exists():
        log_path.unlink()
    summary = {"outputs": written, "measured": doc["measured"], "reused": doc["reused"],
               "points": len(doc["points"]), "baseline_top1": doc["baseline_top1"], "split": doc["split"],
               "summary": doc["summary"]}
    common.emit(summary, lambda c: render(c, doc, written))


def _earlier_points(out: Path, log_path: Path) -> dict[str, dict]:
    """Points already measured: from an earlier OUT.json and from the log of an interrupted run."""
    cache: dict[str, dict] = {}
    if out.is_file():
        try:
            for p in json.loads(out.read_text(encoding="utf-8")).get("points", []):
                if isinstance(p, dict) and "key" in p:
                    cache[p["key"]] = p
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            try:
                p = json.loads(line)
                cache[p["key"]] = p
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line
    return cache


CSV_COLUMNS = ("method", "scope", "sparsity", "top1", "top1_retrained", "weights_removed", "removed_fraction", "key")


def to_csv(doc: dict) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for p in doc["points"]:
        w.writerow([("whole" if p.get(c) == "*" else p.get(c, "")) if c == "scope" else p.get(c, "") for c in CSV_COLUMNS])
    return buf.getvalue()


class _Progress:
    """A rich bar over the sweep's points on a terminal; silent otherwise (the table follows)."""

    def __init__(self, console):
        self.console = console
        self._p = None
        self._task = None

    def update(self, done: int, total: int, label: str) -> None:
        if self.console.quiet or not self.console.is_terminal:
            return
        if self._p is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("[bold]sweep[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)
            self._p.start()
            self._task = self._p.add_task(label, total=total)
        self._p.update(self._task, completed=done, description=label)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def render(c, doc: dict, written: dict) -> None:
    from rich.table import Table

    from dcomp.cli.ui import kv_table

    t = Table(title=f"largest sparsity within 1 point of the dense {doc['baseline_top1']:.2f}% ({doc['split']})",
              title_justify="left")
    retrained = any("within_1pt_retrained" in r for r in doc["summary"])
    for col in ("method", "scope", "pruned") + (("retrained",) if retrained else ()):
        t.add_column(col)
    for r in doc["summary"]:
        row = [r["method"], "whole model" if r["scope"] == "*" else r["scope"], _pct(r["within_1pt"])]
        if retrained:
            row.append(_pct(r.get("within_1pt_retrained")))
        t.add_row(*row)
    c.print(t)
    c.print(kv_table("sweep", {"points": f"{len(doc['points'])} ({doc['measured']} measured, {doc['reused']} reused)",
                               **written}))


def _pct(v) -> str:
    return "none" if v is None else f"{v:.1%}"
