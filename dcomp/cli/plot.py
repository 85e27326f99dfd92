"""Draw a picture (PNG by default, --format svg) of a model, a .dcz, a sweep or a benchmark.

Kinds:

\b
  weights  MODEL   histogram of each layer's remaining weights (--before BASE: the dense ones
                   behind them); quantized layers get their codebook centroids marked
  streams  X.dcz   distribution of relative-index gaps and of codebook indices per tensor,
                   with each symbol's Huffman code length
  bytes    X.dcz   stacked bar per layer of where the file's bytes go (indices, values,
                   codebooks, biases, Huffman tables, other) and the header (also reads the
                   output of 'dcomp inspect --json')
  sweep    S.json  the curves of 'dcomp sweep' (redraw without measuring again)
  bench    B.json  p50 latency against batch size per variant, from 'dcomp bench --json'

Examples:

\b
  dcomp plot weights pruned.pt --before base.pt -o weights.png
  dcomp plot streams model.dcz
  dcomp plot bytes model.dcz --format svg
  dcomp bench model.dcz --json > bench.json && dcomp plot bench bench.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dcomp.cli import common
from dcomp.errors import UsageError

KINDS = ("weights", "streams", "bytes", "sweep", "bench")


def plot(
    kind: Annotated[str, typer.Argument(help="weights, streams, bytes, sweep or bench")],
    source: Annotated[str, typer.Argument(help="the file to draw (a model, a .dcz, or a JSON summary)")],
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="picture path (default: SOURCE-KIND.FORMAT beside the source)")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="png or svg (default: from -o, else png)")] = None,
    before: Annotated[Optional[str], typer.Option("--before", help="weights: a model to draw behind (e.g. the dense one)")] = None,
    arch: common.ArchOpt = None,
    arch_kwargs: common.ArchKwargsOpt = None,
):
    from dcomp import plots

    if kind not in KINDS:
        raise UsageError(f"unknown picture kind {kind!r}: use {', '.join(KINDS)}")
    if fmt is None:
        suffix = Path(output).suffix.lstrip(".").lower() if output else ""
        fmt = suffix if suffix in plots.FORMATS else "png"
    if fmt not in plots.FORMATS:
        raise UsageError(f"--format {fmt!r}: use png or svg")
    if before is not None and kind != "weights":
        raise UsageError("--before only applies to 'dcomp plot weights'")
    src = Path(source)
    out = Path(output) if output else src.with_name(f"{src.stem}-{kind}.{fmt}")
    if out.is_dir():
        raise UsageError(f"-o {out} is a directory; give a file name")
    if not out.parent.exists():
        raise UsageError(f"-o {out}: folder {out.parent} does not exist")
    if src.exists() and out.exists() and out.resolve() == src.resolve():
        raise UsageError(f"-o {out} would overwrite the input; choose another output path")
    inp = common.read_input(source, "a file to draw")

    if kind == "weights":
        ckpt = common.load_checkpoint(inp, arch, arch_kwargs)
        base = common.load_checkpoint(common.read_input(before), arch, arch_kwargs) if before else None
        path = plots.weights_figure(ckpt, out, before=base, fmt=fmt)
    elif kind == "streams":
        _need_dcz(inp, kind)
        path = plots.streams_figure(inp.data, out, fmt=fmt, source=inp.source)
    elif kind == "bytes":
        if inp.data[:1] in (b"{", b" ", b"\n"):
            report = _json(inp, "dcomp inspect --json")
            if "layers" not in report or "file_bytes" not in report:
                raise UsageError(f"{inp.source}: not the output of 'dcomp inspect --json'")
        else:
            _need_dcz(inp, kind)
            from dcomp.formats.dcz import inspect_bytes

            report = inspect_bytes(inp.data, source=inp.source)
        path = plots.bytes_figure(report, out, fmt=fmt)
    elif kind == "sweep":
        from dcomp.compressors.sensitivity import read_sweep

        path = plots.sweep_figure(read_sweep(source), out, fmt=fmt)
    else:
        summary = _json(inp, "dcomp bench --json")
        path = plots.bench_figure(summary, out, fmt=fmt)
    common.emit({"kind": kind, "source": inp.source, "picture": path, "format": fmt},
                lambda c: c.print(f"wrote {path}"))


def _need_dcz(inp, kind: str) -> None:
    from dcomp.formats.checkpoint import sniff

    if sniff(inp.data) != "dcz":
        raise UsageError(f"{inp.source}: 'dcomp plot {kind}' reads a .dcz file (dcomp pack writes one)")


def _json(inp, what: str) -> dict:
    try:
        doc = json.loads(inp.data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{inp.source}: not JSON ({e}); expected the output of '{what}'") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{inp.source}: expected a JSON object, the output of '{what}'")
    return doc
