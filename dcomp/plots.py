"""Pictures: sweep curves, weight histograms, .dcz symbol streams and byte breakdowns, bench
latency. matplotlib with the Agg backend only (no display needed); PNG by default, SVG on request.

Every figure is a grid of panels of ``PANEL`` inches at ``DPI`` dots per inch, saved without
``bbox_inches="tight"``, so a PNG's pixel size is known in advance: ``figure_pixels(panels, cols)``.
Each function takes plain data (a sweep document, a Checkpoint, .dcz bytes, an inspect or bench
summary) and a path, writes the file atomically, and returns the path.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

DPI = 100
PANEL = (4.0, 3.0)          # inches per panel (width, height)
FORMATS = ("png", "svg")
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def grid_shape(panels: int, cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(cols, panels))
    return max(1, math.ceil(panels / cols)), cols


def figure_pixels(panels: int, cols: int = 4) -> tuple[int, int]:
    """(width, height) in pixels of a PNG with ``panels`` panels in at most ``cols`` columns."""
    rows, cols = grid_shape(panels, cols)
    return int(round(PANEL[0] * cols * DPI)), int(round(PANEL[1] * rows * DPI))


def _figure(panels: int, cols: int = 4):
    plt = _plt()
    rows, cols = grid_shape(panels, cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL[0] * cols, PANEL[1] * rows), dpi=DPI, squeeze=False)
    flat = list(axes.reshape(-1))
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def save(fig, path: str | Path, fmt: str | None = None) -> str:
    """Write ``fig`` to ``path`` atomically (format from ``fmt`` or the suffix) and close it."""
    from dcomp.formats.checkpoint import atomic_write

    plt = _plt()
    fmt = (fmt or Path(path).suffix.lstrip(".") or "png").lower()
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format=fmt, dpi=DPI)
    finally:
        plt.close(fig)
    atomic_write(Path(path), buf.getvalue())
    return str(path)


# ---- sweep curves ---------------------------------------------------------------------------------

def _sparsity_axis(ax) -> None:
    """x = -log10(1 - s): 0, 90%, 99% equally spaced, where pruning curves bend."""
    fwd = lambda s: -np.log10(np.clip(1 - np.asarray(s, dtype=float), 1e-4, None))  # noqa: E731
    inv = lambda y: 1 - 10 ** (-np.asarray(y, dtype=float))  # noqa: E731
    ax.set_xscale("function", functions=(fwd, inv))
    ticks = [0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:.0%}" for t in ticks], fontsize=7)
    ax.set_xlim(0, 0.995)


def sweep_panels(doc: dict[str, Any]) -> list[str]:
    """Panel order of the sweep figure: the whole model, then each layer with a curve."""
    scopes = list(dict.fromkeys(p["scope"] for p in doc["points"]))
    return (["*"] if "*" in scopes else []) + [s for s in scopes if s != "*"]


def sweep_figure(doc: dict[str, Any], path: str | Path, fmt: str | None = None) -> str:
    """Accuracy vs sparsity: one curve per method (dashed: after retraining), one panel for the
    whole model and one per layer pruned alone; the dotted line is 1 point below the baseline."""
    from dcomp.compressors.sensitivity import baseline, curves

    panels = sweep_panels(doc)
    fig, axes = _figure(len(panels))
    pruned, retrained = curves(doc, "top1"), curves(doc, "top1_retrained")
    methods = list(dict.fromkeys(p["method"] for p in doc["points"]))
    try:
        base = baseline(doc)
    except Exception:  # noqa: BLE001 - a grid without 0 simply has no reference line
        base = None
    for ax, scope in zip(axes, panels):
        for i, m in enumerate(methods):
            color = COLORS[i % len(COLORS)]
            c = pruned.get((m, scope))
            if c:
                ax.plot([s for s, _ in c], [a for _, a in c], "o-", ms=3, lw=1.2, color=color, label=m)
            r = retrained.get((m, scope))
            if r:
                ax.plot([s for s, _ in r], [a for _, a in r], "s--", ms=3, lw=1.2, color=color, label=f"{m}, retrained")
        if base is not None:
            ax.axhline(base - 1.0, color="grey", ls=":", lw=1, label="baseline - 1 pt")
        _sparsity_axis(ax)
        ax.set_title("whole model" if scope == "*" else f"{scope} alone", fontsize=9)
        ax.set_xlabel("sparsity (weights or units removed)", fontsize=7)
        ax.set_ylabel(f"top-1 % ({doc.get('split', 'test')})", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if axes:
        axes[0].legend(fontsize=6, loc="lower left")
    data = str(doc.get("data"))
    kind, sep, rest = data.partition(":")
    fig.suptitle(f"sweep on {kind + sep + Path(rest).name if sep else data}", fontsize=9)
    return save(fig, path, fmt)


# ---- weights ------------------------------------------------------------------------------------

def weight_layers(ckpt) -> list[str]:
    """Linear/Conv weight tensors (dim >= 2, floating) of a checkpoint."""
    return [k for k, v in ckpt.state_dict.items()
            if k.endswith(".weight") and v.dim() >= 2 and v.is_floating_point()]


def weights_figure(ckpt, path: str | Path, before=None, fmt: str | None = None, bins: int = 80) -> str:
    """Per layer: histogram of the weights that remain (pruned ones left out); with ``before``, the
    same layer's weights in that checkpoint behind it; quantized layers get their codebook
    centroids marked (vertical lines)."""
    from dcomp.errors import UsageError

    names = weight_layers(ckpt)
    if not names:
        raise UsageError("the model has no Linear or Conv weights to draw")
    fig, axes = _figure(len(names))
    for ax, n in zip(axes, names):
        w = ckpt.state_dict[n].detach().float()
        m = ckpt.masks.get(n)
        kept = w[m] if m is not None and m.shape == w.shape else w.reshape(-1)
        kept = kept.numpy()
        lo, hi = (float(kept.min()), float(kept.max())) if kept.size else (-1.0, 1.0)
        b = None
        if before is not None and n in before.state_dict:
            b = before.state_dict[n].detach().float().reshape(-1).numpy()
            lo, hi = min(lo, float(b.min())), max(hi, float(b.max()))
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        if b is not None:  # stairs, not hist: one artist instead of one patch per bin
            ax.stairs(np.histogram(b, bins=edges)[0], edges, fill=True, color="#bbbbbb", label=f"before ({b.size:,})")
        ax.stairs(np.histogram(kept, bins=edges)[0], edges, fill=True, color=COLORS[0], alpha=0.8,
                  label=f"remaining ({kept.size:,})")
        q = ckpt.quant.get(n) if ckpt.quant else None
        if q is not None:
            cb = q["codebook"].float().numpy()
            ax.vlines(cb, 0, 1, transform=ax.get_xaxis_transform(), color=COLORS[1], lw=0.6, alpha=0.8,
                      label=f"{len(cb)} centroids ({q['bits']} bits)")
        ax.set_title(f"{n} {'x'.join(map(str, w.shape))}", fontsize=9)
        ax.set_xlabel("weight value", fontsize=7)
        ax.set_ylabel("count", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
    return save(fig, path, fmt)


# ---- .dcz streams and bytes -----------------------------------------------------------------------

def dcz_streams(data: bytes, source: str = "input") -> list[dict[str, Any]]:
    """Per sparse or codebook tensor of a .dcz: the gap-symbol and codebook-index histograms and the
    Huffman code length of each symbol (the canonical code built from those counts, as the packer
    does; None where the stream is fixed width). Uses only the public reader API."""
    from dcomp.compressors import huffman as hf
    from dcomp.formats.dcz import gap_symbols, read_bytes, read_header

    hdr = read_header(data, source)
    ckpt = read_bytes(data, source)
    out = []
    for t in hdr.h["tensors"]:
        if t["encoding"] not in ("sparse", "codebook"):
            continue
        name = t["name"]
        w = ckpt.state_dict[name]
        rec: dict[str, Any] = {"name": name, "encoding": t["encoding"], "gaps": None, "indices": None}
        flat = w.detach().reshape(-1)
        m = ckpt.masks.get(name)
        support = m.reshape(-1).numpy() if m is not None and m.shape == w.shape and t["encoding"] == "sparse" \
            and not flat[~m.reshape(-1)].any() else (flat != 0).numpy()
        pos = np.flatnonzero(support) if t["encoding"] == "sparse" else np.arange(flat.numel())

        def stream(symbols, alphabet, srec):
            counts = np.bincount(symbols, minlength=alphabet)
            lens = hf.code_lengths(counts) if srec.get("coding") == "huffman" else None
            return {"counts": counts, "lens": lens, "coding": srec.get("coding"),
                    "width": int(alphabet).bit_length() - 1}

        if t["encoding"] == "sparse":
            k = int(t["index_bits"])
            rec["gaps"] = stream(gap_symbols(pos, flat.numel(), k), 1 << k, t["gaps"])
        v = t["values"]
        if v["kind"] == "codebook" and ckpt.quant and name in ckpt.quant:
            a = ckpt.quant[name]["assignments"].reshape(-1).long().numpy()
            rec["indices"] = stream(a[pos], 1 << int(v["bits"]), v["indices"])
        out.append(rec)
    return out


def streams_figure(data: bytes, path: str | Path, fmt: str | None = None, source: str = "input") -> str:
    """Per tensor: the distribution of relative-index gaps and of codebook indices (bars, left
    axis), with each symbol's Huffman code length in bits (steps, right axis)."""
    from dcomp.errors import UsageError

    recs = dcz_streams(data, source)
    panels = [(r["name"], kind, r[kind]) for r in recs for kind in ("gaps", "indices") if r[kind] is not None]
    if not panels:
        raise UsageError(f"{source}: no sparse or codebook-coded tensor to draw (pack a pruned or quantized model)")
    fig, axes = _figure(len(panels), cols=2)
    for ax, (name, kind, s) in zip(axes, panels):
        counts = s["counts"]
        x = np.arange(len(counts))
        ax.stairs(counts, np.arange(len(counts) + 1) - 0.5, fill=True, color=COLORS[0] if kind == "gaps" else COLORS[2])
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(f"{name}: {'relative-index gaps' if kind == 'gaps' else 'codebook indices'}", fontsize=9)
        ax.set_xlabel("gap symbol (last = filler)" if kind == "gaps" else "codebook index", fontsize=7)
        ax.set_ylabel("count", fontsize=7)
        ax.tick_params(labelsize=7)
        ax2 = ax.twinx()
        if s["lens"] is not None:
            lens = np.where(s["lens"] > 0, s["lens"], np.nan)
            ax2.step(x, lens, where="mid", color=COLORS[1], lw=1)
            ax2.set_ylabel("Huffman code length (bits)", fontsize=7, color=COLORS[1])
        else:
            ax2.axhline(s["width"], color=COLORS[1], lw=1)
            ax2.set_ylabel(f"fixed width: {s['width']} bits", fontsize=7, color=COLORS[1])
        ax2.set_ylim(0, 26)
        ax2.tick_params(labelsize=7)
    return save(fig, path, fmt)


BYTE_PARTS = ("indices", "values", "codebooks", "biases", "tables", "other")


def byte_breakdown(report: dict[str, Any]) -> tuple[list[str], dict[str, list[int]], int]:
    """From ``inspect_bytes`` (``dcomp inspect --json``): per layer (module), bytes of relative
    indices, values, codebooks, biases (every non-weight tensor), Huffman tables and other
    (bitmaps, raw quantization); plus the header and padding bytes."""
    layers: list[str] = []
    parts = {p: [] for p in BYTE_PARTS}
    index: dict[str, int] = {}
    for r in report["layers"]:
        name = r["name"]
        module, _, leaf = name.rpartition(".")
        module = module or name
        if module not in index:
            index[module] = len(layers)
            layers.append(module)
            for p in BYTE_PARTS:
                parts[p].append(0)
        i = index[module]
        b = r["bytes"]
        if leaf == "weight" and len(r["shape"]) >= 2:
            parts["indices"][i] += b.get("indices", 0)
            parts["values"][i] += b.get("values", 0)
            parts["codebooks"][i] += b.get("codebook", 0)
            parts["tables"][i] += b.get("tables", 0)
            parts["other"][i] += b.get("other", 0)
        else:
            parts["biases"][i] += sum(b.values())
    header = report["file_bytes"] - sum(sum(v) for v in parts.values())
    return layers, parts, header


def bytes_figure(report: dict[str, Any], path: str | Path, fmt: str | None = None) -> str:
    """A stacked bar per layer of where the .dcz's bytes go, and one bar for the header
    (preamble, JSON header, section table, alignment padding)."""
    layers, parts, header = byte_breakdown(report)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(PANEL[0] * 2, PANEL[1] * 1.5), dpi=DPI)
    labels = layers + ["header"]
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for j, p in enumerate(BYTE_PARTS):
        vals = np.array(parts[p] + [0], dtype=float)
        if vals.any():
            ax.bar(x, vals, bottom=bottom, color=COLORS[j % len(COLORS)], label=p)
            bottom += vals
    ax.bar([len(labels) - 1], [header], color="#444444", label="header + padding")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("bytes", fontsize=8)
    ax.set_title(f"{Path(str(report.get('source', ''))).name}: {report['file_bytes']:,} bytes", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    return save(fig, path, fmt)


# ---- bench -----------------------------------------------------------------------------------------

def bench_figure(summary: dict[str, Any], path: str | Path, fmt: str | None = None) -> str:
    """Latency (p50, ms per call) against batch size, one line per benchmarked variant, both
    axes logarithmic; from ``dcomp bench --json``."""
    from dcomp.errors import UsageError

    targets = [t for t in summary.get("targets", []) if t.get("results")]
    if not targets:
        raise UsageError("the bench summary has no timed targets (expected the output of dcomp bench --json)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(PANEL[0] * 1.5, PANEL[1] * 1.5), dpi=DPI)
    for i, t in enumerate(targets):
        rs = sorted(t["results"], key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in rs], [r["p50_ms"] for r in rs], "o-", ms=3, color=COLORS[i % len(COLORS)],
                label=f"{t.get('name')} ({t.get('role', '')})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size", fontsize=8)
    ax.set_ylabel("p50 latency per call (ms)", fontsize=8)
    load = summary.get("load_average") or summary.get("loadavg")
    if isinstance(load, (list, tuple)):
        load = "/".join(f"{float(x):.1f}" for x in load)
    ax.set_title("latency vs batch size" + (f" (load average {load})" if load else ""), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    return save(fig, path, fmt)


def search_figure(doc: dict[str, Any], path: str | Path, fmt: str | None = None) -> str:
    """MetaPruning search (``dcomp search``): validation top-1 against MACs of every scored candidate,
    coloured by the iteration that first scored it, with the budget window shaded, the winner and the
    uniform-width baseline marked. ``doc`` is the search's metrics (``candidates``, ``winner``,
    ``uniform``, ``window``, ``model``)."""
    fig, (ax,) = _figure(1, 1)
    cands = doc.get("candidates") or []
    full = float((doc.get("model") or {}).get("macs") or 1)
    if cands:
        xs = np.array([c["macs"] / full for c in cands])
        ys = np.array([c["top1"] for c in cands])
        its = np.array([c.get("iteration", 0) for c in cands])
        sc = ax.scatter(xs, ys, c=its, cmap="viridis", s=12, alpha=0.8, linewidths=0)
        cb = fig.colorbar(sc, ax=ax)
        cb.set_label("iteration")
    win = (doc.get("window") or {}).get("macs")
    if win:
        ax.axvspan(win[0] / full, win[1] / full, color="#cccccc", alpha=0.35, lw=0, label="MACs window")
    w = doc.get("winner")
    if w:
        ax.scatter([w["macs"] / full], [w["val_top1"]], marker="*", s=160, color=COLORS[1], edgecolors="black",
                   linewidths=0.6, zorder=5, label="winner")
    u = doc.get("uniform")
    if u:
        ax.scatter([u["macs"] / full], [u["top1"]], marker="D", s=50, color=COLORS[4], edgecolors="black",
                   linewidths=0.6, zorder=5, label=f"uniform {u['ratio']:g}")
    ax.set_xlabel("MACs (fraction of the input model)")
    ax.set_ylabel("val top-1 % (generated weights)")
    ax.set_title("MetaPruning search", fontsize=10)
    ax.grid(True, alpha=0.3)
    if w or u or win:
        ax.legend(fontsize=7, loc="lower right")
    return save(fig, path, fmt)
