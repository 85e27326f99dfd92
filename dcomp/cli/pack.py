"""`dcomp pack` / `unpack` / `inspect`: the .dcz packed format (docs/FORMAT.md).

    dcomp pack q.pt -o model.dcz          # sparse relative indices + codebook indices, Huffman coded
    dcomp unpack model.dcz -o restored.pt # a checkpoint bit-identical to what was packed
    dcomp inspect model.dcz               # per-layer sizes from the header alone; --json for CI
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from dcomp.cli import common
from dcomp.cli.common import ArchKwargsOpt, ArchOpt, DataOpt, InputArg, OutputOpt, ResizeOpt
from dcomp.cli.ui import human_bytes
from dcomp.errors import UsageError


def pack(
    model: InputArg = None,
    output: OutputOpt = None,
    index_bits: Annotated[Optional[int], typer.Option("--index-bits", help="relative-index width for every sparse tensor, 1..16 (default: 5 fc, 8 conv)")] = None,
    index_bits_fc: Annotated[int, typer.Option("--index-bits-fc", help="relative-index width for fc (2-D) weights")] = 5,
    index_bits_conv: Annotated[int, typer.Option("--index-bits-conv", help="relative-index width for conv (4-D) weights")] = 8,
    no_huffman: Annotated[bool, typer.Option("--no-huffman", help="fixed-width streams only (no Huffman, no rANS)")] = False,
    coder: Annotated[str, typer.Option("--coder", help="stream coders: auto (default: per stream the smallest of fixed, Huffman, rANS and context-adaptive cabac; cabac within a decode budget, --cabac-budget), huffman (format 1.2, readable by dcomp before 1.3), rans, cabac")] = "auto",
    cabac_budget: Annotated[Optional[int], typer.Option("--cabac-budget", min=0, help="with --coder auto: cabac decoding work allowed per file, in bins (default 2097152, ~0.05-0.08 s of decoding); 0 = no cabac")] = None,
    no_ans: Annotated[bool, typer.Option("--no-ans", help="deprecated, the same as --coder huffman")] = False,
    block: Annotated[int, typer.Option("--block", help="symbols per Huffman block (decoding parallelism)")] = 1024,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip decoding the result to check it bit for bit")] = False,
    keep_times: Annotated[bool, typer.Option("--keep-times", help="keep provenance times in the file (default: none, so the same checkpoint packs to the same bytes)")] = False,
    provenance: Annotated[str, typer.Option("--provenance", help="provenance in the file: full, brief (stage names and scalar params; default) or none")] = "brief",
    header: Annotated[str, typer.Option("--header", help="header form: binary (format 1.5, default: ~0.3 KB on LeNet-5) or json (formats 1.0-1.4, for dcomp releases before 1.5)")] = "binary",
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = None,
    resize: ResizeOpt = None,
):
    """Pack a checkpoint into a .dcz file (sparse indices, codebooks, canonical Huffman)."""
    from dcomp.formats import dcz

    extra = {} if cabac_budget is None else {"cabac_budget": cabac_budget}
    if no_ans:
        if coder not in ("auto", "huffman"):
            raise UsageError(f"--no-ans (deprecated) means --coder huffman; it contradicts --coder {coder}: drop one")
        coder = "huffman"
    cfg = _config(index_bits=index_bits, index_bits_fc=index_bits_fc, index_bits_conv=index_bits_conv,
                  huffman=not no_huffman, coder=coder, block=block, verify=not no_verify, keep_times=keep_times,
                  provenance=provenance, header=header, **extra)
    inp = common.read_input(model)
    sink = common.plan_output(output, inp, what=".dcz file")
    ckpt = common.load_checkpoint(inp, arch, arch_kwargs, data, resize)
    blob, report = dcz.pack(ckpt, cfg)
    dest = sink.write(blob)
    report["source"] = inp.source
    report["output"] = dest
    report["input_bytes"] = len(inp.data)
    common.emit(report, lambda c: _render(c, report, title=f"packed {inp.source} -> {dest}"))


MaxDecodedOpt = Annotated[Optional[str], typer.Option(
    "--max-decoded", help="refuse files that decode to more than this (e.g. 8G; default a quarter of RAM, or DCOMP_MAX_DECODED)")]
MaxHeaderOpt = Annotated[Optional[str], typer.Option(
    "--max-header", help="refuse header JSON larger than this (default 16M, or DCOMP_MAX_HEADER)")]
MaxTablesOpt = Annotated[Optional[int], typer.Option(
    "--max-tables", min=1, help="refuse files with more Huffman tables than this (default 16384, or DCOMP_MAX_TABLES)")]


def _limits(max_decoded, max_header, max_tables):
    from dcomp.formats import limits

    limits.set_overrides(max_decoded=limits.parse_size(max_decoded, "--max-decoded") if max_decoded else None,
                         max_header=limits.parse_size(max_header, "--max-header") if max_header else None,
                         max_tables=max_tables)


def unpack(model: InputArg = None, output: OutputOpt = None, max_decoded: MaxDecodedOpt = None,
           max_header: MaxHeaderOpt = None, max_tables: MaxTablesOpt = None):
    """Unpack a .dcz file into a dcomp checkpoint (weights bit-identical to what was packed)."""
    from dcomp.formats import DCZ_MAGIC, dcz

    _limits(max_decoded, max_header, max_tables)

    inp = common.read_input(model, what="a .dcz file")
    if not inp.data.startswith(DCZ_MAGIC):
        raise UsageError(f"{inp.source}: not a .dcz file (wrong magic bytes); unpack reads files written by 'dcomp pack'")
    sink = common.plan_output(output, inp)
    ckpt = dcz.read_bytes(inp.data, source=inp.source)
    blob = ckpt.to_bytes()
    dest = sink.write(blob)
    summary = {"source": inp.source, "output": dest, "tensors": len(ckpt.state_dict), "params": ckpt.param_count(),
               "nonzero": ckpt.nonzero_count(), "dcz_bytes": len(inp.data), "checkpoint_bytes": len(blob)}
    common.emit(summary, lambda c: c.print(
        f"unpacked {inp.source} ({human_bytes(len(inp.data))}) -> {dest} ({human_bytes(len(blob))}), "
        f"{summary['tensors']} tensors, {summary['params']:,} params"))


def inspect(
    model: InputArg = None,
    verify: Annotated[bool, typer.Option("--verify", help="also check every section's CRC32 and decode everything")] = False,
    max_decoded: MaxDecodedOpt = None,
    max_header: MaxHeaderOpt = None,
    max_tables: MaxTablesOpt = None,
):
    """Show a .dcz file's per-layer encoding and sizes (reads the header only, unless --verify)."""
    from dcomp.formats import DCZ_MAGIC, dcz

    _limits(max_decoded, max_header, max_tables)

    inp = common.read_input(model, what="a .dcz file")
    if not inp.data.startswith(DCZ_MAGIC):
        raise UsageError(f"{inp.source}: not a .dcz file (wrong magic bytes); for checkpoints use 'dcomp info'")
    report = dcz.inspect_bytes(inp.data, source=inp.source)
    if verify:
        dcz.read_bytes(inp.data, source=inp.source)
        report["verified"] = True
    common.emit(report, lambda c: _render(c, report, title=str(inp.source)))


def _config(**values):
    from dcomp.config.pack import PackConfig

    return common.build_config(PackConfig, **values)


def _stream_cell(s: dict | None) -> str:
    """bits/symbol, then the entropy for Huffman streams (h), "a" for rANS, "c" for cabac or "f" for fixed width."""
    if not s or not s["count"]:
        return ""
    if s["coding"] == "ans":
        return f"{s['bits_per_symbol']:.2f}a"
    if s["coding"] == "cabac":
        return f"{s['bits_per_symbol']:.2f}c"
    if s["coding"] == "huffman" and s.get("entropy") is not None:
        return f"{s['bits_per_symbol']:.2f}/{s['entropy']:.2f}h"
    return f"{s['bits_per_symbol']:.0f}f"


def _render(c, report: dict, title: str) -> None:
    from rich import box

    wide = c.width >= 140  # narrow terminals: totals and bits/symbol only (--json has every part)
    parts = ("indices", "values", "codebook", "tables", "other") if wide else ()
    t = Table(title=title, title_justify="left", box=box.HEAVY_HEAD if wide else box.SIMPLE_HEAD, pad_edge=wide, collapse_padding=not wide,
              caption="b/sym: code bits per symbol" + (" / entropy (h: Huffman, f: fixed width, a: rANS, c: context-adaptive cabac)" if wide else
                                                      " of the index and value streams (--json: entropy, where the file or the writer states it)")
              + "; ratio: float32 dense bytes / packed bytes", caption_justify="left")
    streams = ["idx b/sym", "val b/sym"] if wide else ["b/sym"]
    cols = ["tensor", "shape", "enc", "dens", "bits", "idx", *parts, "total", "ratio", *streams]
    width = max([len(r["name"]) for r in report["layers"]] + [6])
    for col in cols:
        t.add_column(col, justify="left" if col in ("tensor", "shape", "enc") else "right", no_wrap=True,
                     min_width=min(width, 28) if col == "tensor" else None)
    for r in report["layers"]:
        b = r["bytes"]
        if wide:
            cells = [_stream_cell(r["gaps"]), _stream_cell(r["indices"])]
        else:
            cells = [",".join(f"{s['bits_per_symbol']:.2f}" for s in (r["gaps"], r["indices"]) if s and s["count"])]
        t.add_row(r["name"], "x".join(map(str, r["shape"])) or "scalar", r["encoding"],
                  f"{100 * r['density']:.1f}%" if r["density"] is not None else "",
                  str(r["bits"] or ""), str(r["index_bits"] or ""),
                  *(f"{b[k]:,}" if b[k] else "" for k in parts),
                  f"{r['total_bytes']:,}", f"{r['ratio']:.1f}x" if r["ratio"] else "", *cells)
    c.print(t)
    ratio = report["ratio"]
    c.print(f"file {report['file_bytes']:,} bytes ({human_bytes(report['file_bytes'])}; header {report['header_bytes']:,}), "
            f"float32 dense {report['dense_float32_bytes']:,} bytes, {report['params']:,} values: "
            f"[bold]{ratio:.1f}x[/] smaller" if ratio else f"file {report['file_bytes']:,} bytes")
    if "decoded_bytes" in report:
        over = report["decoded_bytes"] > report["max_decoded"]
        c.print(f"decodes to {report['decoded_bytes']:,} bytes ({human_bytes(report['decoded_bytes'])})"
                + (f", over the --max-decoded limit of {human_bytes(report['max_decoded'])}: unpack would refuse it"
                   if over else ""), soft_wrap=True)
