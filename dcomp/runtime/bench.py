"""The benchmark behind ``dcomp bench``: every variant of a model and its dense baseline, timed
in one process with the same threads, interleaved so that load on the machine hits all alike.

Targets (each a runner from dcomp.runtime.runner / .sparse):

    baseline dense   the --baseline checkpoint exported dense, in onnxruntime (the reference)
    dense            the model, weights expanded, in onnxruntime (the reference without --baseline)
    shrunk           the model at its structurally pruned shapes (only when layers were removed)
    sparse           ONNX sparse initializers: smaller file, densified by onnxruntime at load
    hybrid           onnxruntime for dense parts + a CSR kernel for the sparse Linear layers
    pytorch          eager PyTorch, for reference (model and baseline)

Per target and batch size: latency p50/p90/p99 (per call, perf_counter), throughput (samples/s at
the mean latency), speed against the reference at p50 with the p10-p90 spread of the medians of
interleaved rounds (a difference is called only when the intervals do not overlap; a note warns
when the load average exceeds the threads timed); per target: model bytes, accuracy on the
test split, and the resident memory the target added while it was built and ran its first batch
(peak of /proc/self/statm sampled every 2 ms, minus the level before; Linux only, approximate
because freed memory is not always returned to the OS).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dcomp.config.bench import DEFAULT_SWEEP, TARGET_VARIANTS, BenchConfig  # noqa: F401 - re-exported
from dcomp.errors import DcompError, UsageError
from dcomp.formats.checkpoint import Checkpoint


def parse_int_list(text: str, option: str = "--batch") -> list[int]:
    """'1,8,64' -> [1, 8, 64]; anything that is not a positive integer is a UsageError."""
    parts = [p.strip() for p in str(text).split(",")]
    out = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            v = 0
        if v < 1 or str(v) != p.lstrip("+"):
            raise UsageError(f"{option} takes positive integers separated by commas, e.g. 1,8,64; got {p!r}")
        out.append(v)
    return out


def parse_float_list(text: str, option: str) -> list[float]:
    try:
        return [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{option} takes numbers separated by commas, e.g. 0.5,0.9,0.99; got {text!r}") from None


# ---- memory ---------------------------------------------------------------------------------------

def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class RssPeak:
    """Peak resident memory above the level at entry, sampled every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.added: int | None = None

    def __enter__(self):
        gc.collect()
        self._base = rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            v = rss_bytes()
            if v is not None and v > self._peak:
                self._peak = v
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self._base is not None:
            self._thread.join()
            v = rss_bytes()
            self._peak = max(self._peak, v or 0)
            self.added = max(0, self._peak - self._base)
        return False


# ---- targets --------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    engine: str
    variant: str
    runner: Any
    role: str = "model"              # "model" or "baseline"
    model_bytes: int | None = None
    rss_added_bytes: int | None = None
    top1: float | None = None
    info: dict = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)


def check_same_architecture(model: Checkpoint, base: Checkpoint, source: str = "--baseline") -> None:
    """The baseline must be the same network (same layers; sizes may differ by structured pruning)."""
    def arch_id(c):
        a = c.arch
        return (a.get("kind"), a.get("name") or a.get("target"))
    if arch_id(model) != arch_id(base):
        raise UsageError(f"{source} is a different architecture ({'/'.join(map(str, arch_id(base)))}) than the model "
                         f"({'/'.join(map(str, arch_id(model)))}); give the dense original of this model")
    if list(model.input_shape) != list(base.input_shape) or int(model.num_classes) != int(base.num_classes):
        raise UsageError(f"{source} takes input {list(base.input_shape)} with {base.num_classes} classes, the model "
                         f"{list(model.input_shape)} with {model.num_classes}; give the dense original of this model")
    if model.arch.get("factorized") or base.arch.get("factorized"):
        return  # low-rank factors (dcomp factorize) rename and reshape layers: same network, other layers
    mk, bk = set(model.state_dict), set(base.state_dict)
    if mk != bk:
        diff = sorted(mk ^ bk)
        raise UsageError(f"{source} has different layers than the model (first difference: {diff[0]!r}); "
                         f"give the dense original of this model")
    for k in sorted(mk):
        if model.state_dict[k].dim() != base.state_dict[k].dim():
            raise UsageError(f"{source}: layer {k!r} has rank {base.state_dict[k].dim()} there and "
                             f"{model.state_dict[k].dim()} in the model; give the dense original of this model")


def _build(target_fn: Callable[[], Target], x_first: np.ndarray) -> Target:
    with RssPeak() as mem:
        t = target_fn()
        t.runner.run(x_first)
    t.rss_added_bytes = mem.added
    return t


def build_targets(ckpt: Checkpoint, baseline: Checkpoint | None, cfg: BenchConfig, threads: int,
                  x_first: np.ndarray, trust_pickle: bool = False, log: Callable[[str], None] | None = None
                  ) -> tuple[list[Target], list[str]]:
    from dcomp.formats.onnx_export import ExportConfig, export_checkpoint, shrunk_layers
    from dcomp.runtime.runner import OrtRunner, TorchRunner

    log = log or (lambda s: None)
    notes: list[str] = []
    targets: list[Target] = []
    model = ckpt.build_model(trust_pickle=trust_pickle)

    def ort_target(c: Checkpoint, variant: str, name: str, role: str):
        def make():
            res = export_checkpoint(c, ExportConfig(variant=variant), trust_pickle=trust_pickle)
            return Target(name, "onnxruntime", variant, OrtRunner(res.onnx_bytes, threads, name), role,
                          len(res.onnx_bytes), info=res.info)
        return make

    _warm_engines(threads, cfg.kernel if "hybrid" in cfg.variants else None)
    if baseline is not None:
        log("exporting the baseline (dense)")
        targets.append(_build(ort_target(baseline, "dense", "baseline dense", "baseline"), x_first))
    for v in cfg.variants:
        if v == "shrunk":
            layers = shrunk_layers(ckpt)
            if not layers:
                notes.append("shrunk: skipped, no layer of this model was removed (dcomp prune --method filter does that)")
                continue
            if "dense" in cfg.variants:
                notes.append("this model is stored shrunk, so its dense export is the shrunk graph (the row 'shrunk')")
                continue
        if v in ("dense", "shrunk", "sparse"):
            log(f"exporting the {v} variant")
            name = "shrunk" if v == "dense" and shrunk_layers(ckpt) else v
            t = _build(ort_target(ckpt, v, name, "model"), x_first)
            if v == "sparse" and not t.info.get("sparse_initializers"):
                notes.append("sparse: no weight is sparse enough to be stored sparse (needs > 67% zeros); "
                             "same file as dense")
            targets.append(t)
        elif v == "hybrid":
            log(f"building the hybrid sparse path ({cfg.kernel} kernel, calibrating each prunable layer)")
            try:
                t = _build(lambda: _hybrid_target(model, ckpt, cfg, threads), x_first)
            except DcompError as e:
                notes.append(f"hybrid: skipped, {e}")
                continue
            targets.append(t)
    if cfg.eager:
        targets.append(_build(lambda: Target("pytorch", "pytorch eager", "eager", TorchRunner(model, "pytorch"),
                                             "model"), x_first))
        if baseline is not None:
            bm = baseline.build_model(trust_pickle=trust_pickle)
            targets.append(_build(lambda: Target("baseline pytorch", "pytorch eager", "eager",
                                                 TorchRunner(bm, "baseline pytorch"), "baseline"), x_first))
    return targets, notes


def _warm_engines(threads: int, kernel: str | None) -> None:
    """Load onnxruntime, compile the numba kernels, so the first target's memory figure is its own."""
    from dcomp.runtime.runner import ort_session
    from dcomp.runtime.sparse import SparseLinear, dense_gemm_onnx

    sess = ort_session(dense_gemm_onnx(4, 4), threads)
    sess.run(None, {"x": np.zeros((1, 4), np.float32)})
    if kernel is not None:
        SparseLinear(torch.eye(4), None, kernel, threads=threads)(np.zeros((1, 4), np.float32))


def _hybrid_target(model, ckpt, cfg, threads) -> Target:
    from dcomp.runtime.sparse import HybridRunner

    # calibrated at the batch sizes timed: info["layers"][i]["choice"] says, per batch size, whether
    # each prunable layer runs sparse or dense (and info["plans"] what runs)
    h = HybridRunner(model, ckpt.input_shape, threads, kernel=cfg.kernel, min_sparsity=cfg.min_sparsity,
                     calibrate=cfg.batches)
    engine = "onnxruntime + " + ("sparse-codebook kernel" if cfg.kernel == "numba" else "torch CSR")
    return Target("hybrid", engine, "hybrid", h, "model", h.model_bytes, info=h.describe())


# ---- timing ---------------------------------------------------------------------------------------

def percentiles(lat: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(lat, 50) * 1e3), "p90_ms": float(np.percentile(lat, 90) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "mean_ms": float(lat.mean() * 1e3)}


def time_interleaved(runners: list, x: np.ndarray, warmup: int, iters: int, seconds: float,
                     block: int = 5) -> list[np.ndarray]:
    """Per-call latencies (s) for each runner (see ``time_rounds``)."""
    return time_rounds(runners, x, warmup, iters, seconds, block)[0]


def time_rounds(runners: list, x: np.ndarray, warmup: int, iters: int, seconds: float,
                block: int = 5) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Interleaved rounds: after ``warmup`` calls each, every round gives each runner ``block``
    calls in turn (starting one runner later each round, so no runner is always first), until each has ``iters`` calls or the budget (``seconds`` per runner) is used;
    at least 3 rounds whatever the budget. Returns per runner the per-call latencies (s) and the
    median of each round: load on the machine hits every runner of a round alike, and the spread
    of the round medians is what a difference between runners must exceed."""
    for r in runners:
        for _ in range(warmup):
            r.run(x)
    lat: list[list[float]] = [[] for _ in runners]
    rounds: list[list[float]] = [[] for _ in runners]
    deadline = time.perf_counter() + seconds * len(runners)
    n = len(runners)
    k = 0
    while True:
        for i in [(k + j) % n for j in range(n)]:  # each round starts with the next runner: no position bias
            r = runners[i]
            calls = []
            for _ in range(max(1, min(block, iters - len(lat[i])))):
                t0 = time.perf_counter()
                r.run(x)
                calls.append(time.perf_counter() - t0)
            lat[i] += calls
            rounds[i].append(float(np.median(calls)))
        k += 1
        done = all(len(v) >= iters for v in lat)
        if done or (time.perf_counter() > deadline and all(len(v) >= 3 for v in rounds)):
            break
    return [np.asarray(v) for v in lat], [np.asarray(v) for v in rounds]


def spread(round_medians: np.ndarray) -> dict[str, float]:
    """p10 / p90 of the round medians (ms): the interval a faster or slower call must leave."""
    return {"round_p10_ms": float(np.percentile(round_medians, 10) * 1e3),
            "round_p90_ms": float(np.percentile(round_medians, 90) * 1e3), "rounds": int(round_medians.size)}


def compare(r: dict, ref: dict) -> dict[str, Any]:
    """Speed of result ``r`` against the reference's, at p50, with the interval the spreads allow:
    [ref p10 / r p90, ref p90 / r p10]. A difference is called only when the two p10-p90
    intervals do not overlap (the interval excludes 1); otherwise the verdict is 'same'."""
    out: dict[str, Any] = {"vs_reference": ref["p50_ms"] / r["p50_ms"]}
    if "round_p10_ms" in r and "round_p10_ms" in ref:
        lo = ref["round_p10_ms"] / r["round_p90_ms"]
        hi = ref["round_p90_ms"] / r["round_p10_ms"]
        out["vs_reference_interval"] = [lo, hi]
        out["verdict"] = "faster" if lo > 1.0 else "slower" if hi < 1.0 else "same"
    return out


def speed_label(r: dict) -> str:
    """'2.31x faster (2.10-2.52)', 'slower: 0.61x (0.55-0.66)', 'same (0.83-1.25x)'."""
    x = r["vs_reference"]
    if "verdict" not in r:
        from dcomp.runtime.sparse import speed_words

        return speed_words(x)
    lo, hi = r["vs_reference_interval"]

    def num(v: float) -> str:
        return f"{v:.2f}" if v >= 0.1 else f"{v:.2g}"

    if r["verdict"] == "faster":
        return f"{num(x)}x faster ({num(lo)}-{num(hi)})"
    if r["verdict"] == "slower":
        return f"slower: {num(x)}x ({num(lo)}-{num(hi)})"
    return f"same ({num(lo)}-{num(hi)}x)"


def load_note(threads: int) -> str | None:
    """A warning when the machine is busier than the threads being timed (1-minute load average)."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if load > threads:
        return (f"load average {load:.1f} exceeds the {threads} thread{'s' if threads != 1 else ''} timed: other "
                f"work shares the cores, so latencies are noisy; a difference is called only where the p10-p90 "
                f"intervals of the interleaved rounds do not overlap")
    return None


def top1(runner, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        out = runner.run(np.ascontiguousarray(x[i:i + batch]))
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / max(len(x), 1)


def make_batch(x_pool: np.ndarray | None, input_shape, batch: int, seed: int = 0) -> np.ndarray:
    if x_pool is not None and len(x_pool):
        idx = np.arange(batch) % len(x_pool)
        return np.ascontiguousarray(x_pool[idx], dtype=np.float32)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *[int(s) for s in input_shape]), dtype=np.float32)


# ---- the whole run ----------------------------------------------------------------------------------

def run_bench(ckpt: Checkpoint, cfg: BenchConfig, threads: int, baseline: Checkpoint | None = None,
              data=None, trust_pickle: bool = False, seed: int = 0,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run everything; return the plain-data summary (what --json prints)."""
    from dcomp.runtime.runner import apply_threads
    from dcomp.runtime.sparse import break_even, sweep

    log = log or (lambda s: None)
    if baseline is not None:
        check_same_architecture(ckpt, baseline)
    apply_threads(threads)
    x_pool = data.x_test.numpy() if data is not None else None
    first = make_batch(x_pool, ckpt.input_shape, max(cfg.batches), seed)
    targets, notes = build_targets(ckpt, baseline, cfg, threads, first, trust_pickle, log)
    busy = load_note(threads)
    if busy:
        notes.append(busy)
    ref = next((t for t in targets if t.role == "baseline" and t.engine == "onnxruntime"), None) \
        or next((t for t in targets if t.engine == "onnxruntime" and t.variant in ("dense", "shrunk")), None) \
        or targets[0]
    # agreement with eager PyTorch: the same inputs through every target
    eager_out = None
    for t in targets:
        if t.engine == "pytorch eager" and t.role == "model":
            eager_out = t.runner.run(first)
    for t in targets:
        if t.role == "model" and eager_out is not None:
            out = t.runner.run(first)
            t.info["max_rel_diff_vs_pytorch"] = float(np.abs(out - eager_out).max() / max(np.abs(eager_out).max(), 1e-6))
    if data is not None:
        log(f"accuracy on {data.spec} ({len(data.x_test)} test samples)")
        y = data.y_test.numpy()
        for t in targets:
            t.top1 = top1(t.runner, x_pool, y)
    for b in cfg.batches:
        log(f"timing batch {b}")
        x = make_batch(x_pool, ckpt.input_shape, b, seed)
        # eager PyTorch is timed apart: its idle OpenMP threads spin and would slow the others
        groups = [[t for t in targets if t.engine != "pytorch eager"], [t for t in targets if t.engine == "pytorch eager"]]
        pairs = []
        for g in groups:
            if g:
                pairs += zip(g, *time_rounds([t.runner for t in g], x, cfg.warmup, cfg.iters, cfg.seconds))
        for t, lat, rounds in pairs:
            t.results.append({"batch": b, **percentiles(lat), **spread(rounds),
                              "throughput_per_s": b / float(np.median(lat)), "calls": int(lat.size)})
    for t in targets:
        for r, rr in zip(t.results, ref.results):
            r.update(compare(r, rr))
    summary: dict[str, Any] = {
        "threads": threads, "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "data": data.spec if data is not None else None, "reference": ref.name,
        "batches": cfg.batches, "warmup": cfg.warmup, "iters": cfg.iters,
        "memory_how": "peak RSS added while building the target and running its first batch "
                      "(/proc/self/statm sampled every 2 ms)",
        "targets": [_target_dict(t) for t in targets], "notes": notes,
    }
    hybrid = next((t for t in targets if t.variant == "hybrid"), None)
    if hybrid is not None and cfg.sweep and cfg.sweep_sparsities:
        shapes = sorted({tuple(l["shape"]) for l in hybrid.info["sparse_layers"]}, key=lambda s: -s[0] * s[1])
        rows = []
        for shape in shapes:
            log(f"break-even sweep on a {shape[0]}x{shape[1]} layer")
            rows += sweep(shape, cfg.sweep_sparsities, cfg.batches, threads, cfg.kernel, cfg.sweep_seconds, seed)
        be = {f"{s[0]}x{s[1]}": {str(b): break_even([r for r in rows if tuple(r["shape"]) == s], b)
                                 for b in cfg.batches} for s in shapes}
        summary["sweep"] = {"kernel": cfg.kernel, "rows": rows, "break_even": be}
    return summary


def _target_dict(t: Target) -> dict[str, Any]:
    info = {k: v for k, v in t.info.items() if k not in ("input_name", "output_name")}
    return {"name": t.name, "engine": t.engine, "variant": t.variant, "role": t.role, "model_bytes": t.model_bytes,
            "rss_added_bytes": t.rss_added_bytes, "top1": t.top1, "results": t.results, "info": info}


# ---- a model for benchmarks: a stack of square Linear layers -----------------------------------------

class LinearStack(nn.Module):
    """``depth`` Linear(width, width) layers with ReLU between; input (width,), output ``out`` classes
    (default: width). The 4096x4096 benchmark of the hybrid path uses it (--arch
    dcomp.runtime.bench:LinearStack --arch-kwargs width=4096,depth=4)."""

    def __init__(self, width: int = 4096, depth: int = 4, out: int | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(width, out if (out and i == depth - 1) else width))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)
