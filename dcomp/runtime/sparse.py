"""The hybrid sparse path: a compiled sparse-codebook kernel runs a model's pruned Linear and Conv2d
layers, onnxruntime runs the rest, and a short calibration at load decides, per layer and batch
size, which of the two runs each prunable layer.

Why: onnxruntime densifies sparse initializers when it loads them and its sparse contrib op is
slower than dense MatMul, and a custom op cannot carry a fast path here (see design.md). So:

    torch.fx traces the model; a Linear or Conv2d (groups 1, zero padding) that is at least
    ``min_sparsity`` zeros is a *candidate* when nothing else stays alive across it (no skip
    connection jumps over it);
    calibration (``calibrate``): each candidate is timed at each batch size as the sparse kernel
    (dcomp.runtime.kernels) and as a one-layer onnxruntime session; ``choose_layers`` runs a layer
    sparse only where its measured cost is lower (a measured cost model, no fixed threshold);
    the chosen layers become cut points; the pieces between two cuts run natively when they are
    only ReLU / Flatten / MaxPool(k, stride k) (ReLU fused into the kernel before it), otherwise
    as a sub-model exported to ONNX (one onnxruntime session each);
    finally the whole hybrid plan is timed against the whole dense model at each batch size and
    ``choose_plan`` keeps the dense model where the hybrid one is not faster, so the hybrid
    runner is never slower than dense onnxruntime beyond timing noise.

Kernels: ``numba`` (default; dcomp.runtime.kernels: uint16 columns + uint8 codebook indices,
dynamic row chunks on sleeping helper threads, Linear and Conv2d) and ``torch`` (torch.sparse.mm on
a CSR tensor, Linear only; kept for comparison: its OpenMP split stalls for a scheduler tick
whenever one of its threads is descheduled, 20+ ms per call measured on 2 busy cores).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dcomp.errors import DcompError, UsageError
from dcomp.runtime.kernels import ChunkPool, MaxPool, SparseConv2d, chunk_pool, row_chunks  # noqa: F401
from dcomp.runtime.kernels import SparseLinear as KernelLinear

KERNELS = ("numba", "torch")
# A sparse layer must beat its dense cost by this factor to be chosen: timing noise on a loaded
# machine is +-10-30%, and a wrong "sparse" costs more than a wrong "dense" (the fallback exists).
DEFAULT_MARGIN = 1.1
# The whole hybrid plan must beat the whole dense model by this factor at load, else dense runs:
# a plan within 5% is not worth the risk of being the slower one.
PLAN_MARGIN = 1.05
# Calibration compares the 25th percentile of interleaved timings, not the median: on a loaded
# machine preemption adds long, random delays to single calls (both kinds alike), and a median of a
# few calls can still land on one (measured: a 0.8 ms layer timed at 5.4 ms and run dense).
CALIB_QUANTILE = 25.0


# ---- the torch CSR kernel (for comparison) ---------------------------------------------------------

class TorchCSRLinear:
    """``y = x @ W.T + b`` by torch.sparse.mm on a CSR tensor (Linear layers only)."""

    kind = "linear"

    def __init__(self, weight, bias, threads: int = 1, name: str = ""):
        w = torch.as_tensor(np.asarray(weight, np.float32))
        self.name = name
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.nnz = int(torch.count_nonzero(w))
        self.sparsity = 1.0 - self.nnz / max(w.numel(), 1)
        self.bias_t = torch.zeros(self.out_features) if bias is None else torch.as_tensor(np.asarray(bias, np.float32))
        with warnings.catch_warnings():  # torch calls its CSR support "beta" on every conversion
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.csr = w.to_sparse_csr()

    @property
    def nbytes(self) -> int:
        return self.nnz * (4 + 8) + (self.out_features + 1) * 8 + self.out_features * 4

    def __call__(self, x: np.ndarray, relu: bool = False) -> np.ndarray:
        x2 = torch.from_numpy(np.ascontiguousarray(x.reshape(x.shape[0], -1), np.float32))
        with torch.inference_mode():
            y = torch.sparse.mm(self.csr, x2.t()).t().add_(self.bias_t)
            if relu:
                y.clamp_(min=0)
        return y.contiguous().numpy()


def SparseLinear(weight, bias, kernel: str = "numba", name: str = "", threads: int | None = None):
    """One sparse Linear layer in the chosen kernel: ``layer(x (B, in)) -> (B, out)``."""
    if kernel not in KERNELS:
        raise UsageError(f"--kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    w = weight.detach().float().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, np.float32)
    b = None if bias is None else (bias.detach().float().numpy() if isinstance(bias, torch.Tensor) else np.asarray(bias))
    threads = int(threads) if threads else torch.get_num_threads()
    if kernel == "torch":
        return TorchCSRLinear(w, b, threads, name)
    return KernelLinear(w, b, threads=threads, name=name)


# ---- candidates and plans ------------------------------------------------------------------------

@dataclass
class Candidate:
    """A prunable layer the hybrid runner can cut the model at."""

    name: str
    kind: str                 # "linear" | "conv"
    sparsity: float
    in_shape: tuple           # without batch
    out_shape: tuple


@dataclass
class Plan:
    """What the hybrid runner may run: the traced model, its cuttable candidates, and the layers
    it could not cut and why. ``steps(chosen)`` lays out one concrete plan."""

    gm: Any = None
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    shapes: dict = field(default_factory=dict)

    @property
    def sparse_layers(self) -> list[str]:
        return [c.name for c in self.candidates]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with each BatchNorm that directly follows a Conv2d or Linear
    (and has no other input) folded into that layer's weight and bias (torch.fx's ``fuse``), so the
    sparse kernel runs convolution and normalisation in one pass. Zeros stay zeros (each output
    channel is scaled); shared values are scaled per channel, so such a layer runs from float
    values instead of a codebook. The model itself when it has no BatchNorm or cannot be traced."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval())
    except Exception:  # noqa: BLE001 - untraceable: plan_hybrid says so with a clear message
        return model


def _conv_supported(m: nn.Conv2d) -> str | None:
    if m.groups != 1:
        return "grouped convolution"
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return f"padding {m.padding!r} / {m.padding_mode}"
    if m.stride[0] != m.stride[1]:
        return "unequal strides"
    return None


def plan_hybrid(model: nn.Module, input_shape, min_sparsity: float = 0.3) -> Plan:
    """Trace ``model`` with torch.fx and list the Linear/Conv2d layers that are at least
    ``min_sparsity`` zeros and that no other value lives across."""
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types on untraceable code
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DcompError(f"the hybrid sparse path cannot trace this model with torch.fx ({first}); "
                         f"use the dense or sparse ONNX variants") from None
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(2, *[int(s) for s in input_shape]))
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    plan = Plan(gm=gm)
    for n in nodes:
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            plan.shapes[n.name] = tuple(int(s) for s in meta.shape[1:])
    for n in nodes:
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(n.target)
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        sparsity = 1.0 - int(torch.count_nonzero(mod.weight)) / mod.weight.numel()
        if sparsity < min_sparsity:
            continue
        p = pos[n]
        live = [m.name for m in nodes[:p] if any(pos[u] > p for u in m.users)]
        why = _conv_supported(mod) if isinstance(mod, nn.Conv2d) else None
        if len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
            why = "called with extra arguments"
        elif live:
            why = f"values live across it ({', '.join(live[:3])}): a skip connection"
        if why:
            plan.skipped.append({"layer": str(n.target), "sparsity": sparsity, "why": why})
            continue
        plan.candidates.append(Candidate(str(n.target), "linear" if isinstance(mod, nn.Linear) else "conv", sparsity,
                                         plan.shapes[n.args[0].name], plan.shapes[n.name]))
    return plan


def _native_op(gm, n) -> tuple | None:
    """("relu",), ("flatten",), ("pool", k), ("gap",) (global average pooling) or ("id",) for a node
    the runner does itself; else None."""
    import operator

    import torch.nn.functional as F

    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.ReLU):
            return ("relu",)
        if isinstance(m, (nn.Dropout, nn.Identity)):
            return ("id",)
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return ("flatten",)
        if isinstance(m, nn.MaxPool2d):
            k, s = m.kernel_size, m.stride
            k = k if isinstance(k, int) else (k[0] if k[0] == k[1] else None)
            s = s if isinstance(s, int) else (s[0] if s[0] == s[1] else None)
            pad = m.padding if isinstance(m.padding, int) else max(m.padding)
            dil = m.dilation if isinstance(m.dilation, int) else max(m.dilation)
            if k and k == s and pad == 0 and dil == 1 and not m.ceil_mode and not m.return_indices:
                return ("pool", int(k))
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return ("gap",)
        return None
    if n.op == "call_function":
        if n.target in (torch.relu, F.relu) and len(n.args) == 1:
            return ("relu",)
        if n.target is torch.flatten and tuple(n.args[1:]) == (1,) and not n.kwargs:
            return ("flatten",)
        if n.target is operator.getitem:
            return None
    if n.op == "call_method":
        if n.target == "relu" and len(n.args) == 1:
            return ("relu",)
        if n.target == "flatten" and tuple(n.args[1:]) == (1,) and not n.kwargs:
            return ("flatten",)
    return None


def _native_segment(gm, seg_nodes, start) -> list[tuple] | None:
    """The native ops of a segment if every node is one and they form a chain from ``start``."""
    import torch.fx as fx

    ops = []
    prev = start
    for n in seg_nodes:
        op = _native_op(gm, n)
        if op is None or not n.args or n.args[0] is not prev or any(isinstance(a, fx.Node) for a in n.args[1:]):
            return None
        ops.append(op)
        prev = n
    kinds = [o[0] for o in ops]
    if "gap" in kinds and "relu" in kinds[kinds.index("gap"):]:
        return None  # ReLU after an average does not commute with it (the runner hoists ReLU)
    return ops


def _segment(gm, seg_nodes, start, end_value):
    import torch.fx as fx

    g = fx.Graph()
    env = {start: g.placeholder("x")}
    for n in seg_nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[end_value])
    return fx.GraphModule(gm, g)


def layout_steps(plan: Plan, chosen: set[str]) -> list[tuple]:
    """The steps that run ``plan`` with the layers in ``chosen`` sparse, in order:
    ("onnx", sub-module, input shape), ("native", ops, input shape) and ("sparse", layer name)."""
    gm = plan.gm
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    cuts = [n for n in nodes if n.op == "call_module" and str(n.target) in chosen]
    placeholder = next(n for n in nodes if n.op == "placeholder")
    output = next(n for n in nodes if n.op == "output")
    steps: list[tuple] = []
    start = placeholder
    for cut in cuts + [None]:
        end_value = cut.args[0] if cut is not None else output.args[0]
        hi = pos[cut] if cut is not None else pos[output]
        if end_value is not start:
            seg = nodes[pos[start] + 1:hi]
            in_shape = plan.shapes[start.name]
            ops = _native_segment(gm, seg, start)
            if ops is not None and seg and seg[-1] is end_value:
                steps.append(("native", ops, in_shape))
            else:
                steps.append(("onnx", _segment(gm, seg, start, end_value), in_shape))
        if cut is not None:
            steps.append(("sparse", str(cut.target)))
            start = cut
    return steps


# ---- the decision --------------------------------------------------------------------------------

def choose_layers(costs: dict[str, dict[int, tuple[float, float]]], margin: float = DEFAULT_MARGIN
                  ) -> dict[int, dict[str, str]]:
    """Per batch size and layer, "sparse" where the sparse kernel's measured cost times ``margin``
    is below the dense cost, else "dense". ``costs[layer][batch] = (sparse_s, dense_s)``."""
    out: dict[int, dict[str, str]] = {}
    for layer, per in costs.items():
        for b, (sparse_s, dense_s) in per.items():
            out.setdefault(int(b), {})[layer] = "sparse" if sparse_s * margin < dense_s else "dense"
    return out


def choose_plan(hybrid_s: float, dense_s: float, margin: float = 1.0) -> str:
    """"hybrid" if the whole hybrid plan measured faster than the whole dense model, else "dense"."""
    return "hybrid" if hybrid_s * margin < dense_s else "dense"


def nearest_batch(batch: int, calibrated) -> int:
    """The calibrated batch size closest to ``batch`` on a log scale (ties: the larger)."""
    return min(calibrated, key=lambda c: (abs(math.log2(c) - math.log2(max(batch, 1))), -c))


# ---- the runner -----------------------------------------------------------------------------------

class HybridRunner:
    """Runs a model with its chosen sparse layers in the compiled kernel and the rest in
    onnxruntime; ``run(x)`` picks the plan calibrated for the nearest batch size.

    ``calibrate``: batch sizes to calibrate for (default 1, 8, 64); ``None`` or empty: no
    calibration, every candidate runs sparse (what the tests of the kernels use). ``costs``: inject
    per-layer costs instead of measuring (``{layer: {batch: (sparse_s, dense_s)}}``).

    One call at a time: the layers reuse their buffers between calls (no per-call allocation), so
    a runner must not be called from two threads at once (build one runner per thread)."""

    kind = "hybrid"

    def __init__(self, model: nn.Module, input_shape, threads: int, kernel: str = "numba",
                 min_sparsity: float = 0.3, name: str = "hybrid", plan: Plan | None = None,
                 calibrate: list[int] | tuple[int, ...] | None = (1, 8, 64), calib_seconds: float = 0.05,
                 margin: float = DEFAULT_MARGIN, costs: dict | None = None, log=None):
        from dcomp.formats.onnx_export import export_module
        from dcomp.runtime.runner import ort_session

        if kernel not in KERNELS:
            raise UsageError(f"--kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.name, self.kernel, self.threads = name, kernel, max(1, int(threads))
        self.input_shape = tuple(int(s) for s in input_shape)
        self.model = model = fold_batchnorm(model.eval())
        self.plan = plan or plan_hybrid(model, input_shape, min_sparsity)
        if kernel == "torch":
            for c in [c for c in self.plan.candidates if c.kind != "linear"]:
                self.plan.skipped.append({"layer": c.name, "sparsity": c.sparsity, "why": "the torch kernel runs Linear only"})
            self.plan.candidates = [c for c in self.plan.candidates if c.kind == "linear"]
        if not self.plan.candidates:
            why = "; ".join(f"{s['layer']}: {s['why']}" for s in self.plan.skipped)
            raise DcompError(f"no Linear or Conv2d layer is at least {min_sparsity:.0%} zeros and cuttable, so the hybrid "
                             f"path has nothing to run sparse{' (' + why + ')' if why else ''}")
        self._export, self._session = export_module, ort_session
        self.layers = {c.name: self._make_layer(c) for c in self.plan.candidates}
        self._dense_sess = None
        self._step_cache: dict = {}
        self.costs: dict[str, dict[int, tuple[float, float]]] = {}
        self.plan_costs: dict[int, tuple[float, float]] = {}
        names = [c.name for c in self.plan.candidates]
        if costs is not None or calibrate:
            batches = sorted({int(b) for b in (calibrate or [])} | {int(b) for per in (costs or {}).values() for b in per})
            self.costs = costs if costs is not None else self._measure_layers(batches, calib_seconds, log)
            self.choice = choose_layers(self.costs, margin)
        else:
            self.choice = {1: {n: "sparse" for n in names}}
        self.plans: dict[int, list | None] = {}
        for b, per in self.choice.items():
            chosen = {n for n, v in per.items() if v == "sparse"}
            self.plans[b] = self._build(chosen) if chosen else None
        if calibrate and costs is None:
            self._verify_plans(calib_seconds * 4, log)
        if any(calls is None for calls in self.plans.values()):
            self._dense()
        self._by_batch: dict[int, Any] = {}
        self.model_bytes = self._model_bytes()

    # -- building
    def _make_layer(self, c: Candidate):
        m = self.model.get_submodule(c.name)
        w = m.weight.detach().float().numpy()
        b = None if m.bias is None else m.bias.detach().float().numpy()
        if c.kind == "linear":
            return SparseLinear(w, b, self.kernel, name=c.name, threads=self.threads)
        return SparseConv2d(w, b, c.in_shape[1:], m.stride, m.padding, m.dilation, threads=self.threads, name=c.name)

    def _build(self, chosen: set[str]) -> list:
        key = frozenset(chosen)
        if key in self._step_cache:
            return self._step_cache[key]
        calls = []
        before = None  # the sparse layer just before a native segment: it can take the ReLU and a max-pool
        for step in layout_steps(self.plan, chosen):
            if step[0] == "sparse":
                calls.append(["sparse", self.layers[step[1]], False, 1])
                before = calls[-1]
            elif step[0] == "native":
                ops = [o for o in step[1] if o[0] != "id"]
                relu = any(o[0] == "relu" for o in ops)
                ops = [o for o in ops if o[0] != "relu"]  # ReLU commutes with flatten and max-pool
                can_fuse = before is not None and (self.kernel == "numba" or before[1].kind == "linear")
                if relu and can_fuse:
                    before[2], relu = True, False
                shape = step[2]
                if (ops and ops[0][0] == "pool" and can_fuse and before[1].kind == "conv"
                        and before[1].stride == 1):
                    before[3] = ops[0][1]  # max-pool fused into the convolution's write-out
                    shape = (shape[0], shape[1] // ops[0][1], shape[2] // ops[0][1])
                    ops = ops[1:]
                for o in ops:
                    if o[0] == "gap":  # global average pooling: (B, C, H, W) -> (B, C, 1, 1)
                        calls.append(["gap", None, relu, 1])
                        relu = False
                        shape = (shape[0], 1, 1)
                    elif o[0] == "pool":
                        pool = MaxPool(o[1], shape, relu=relu)
                        relu = False
                        calls.append(["pool", pool, False, 1])
                        shape = pool.out_shape(shape)
                    else:
                        calls.append(["flatten", None, False, 1])
                        shape = (math.prod(shape),)
                if relu:
                    calls.append(["relu", None, False, 1])
                before = None
            else:
                data = self._export(step[1], step[2], input_name="x", output_name="y")
                calls.append(["onnx", _OrtCall(self._session(data, self.threads), len(data)), False, 1])
                before = None
        if self.kernel == "numba":
            calls = _chain_linear(calls)
        self._step_cache[key] = calls
        return calls

    def _dense(self):
        if self._dense_sess is None:
            data = self._export(self.model, self.input_shape, input_name="x", output_name="y")
            self._dense_sess = _OrtCall(self._session(data, self.threads), len(data))
        return self._dense_sess

    # -- calibration
    def _measure_layers(self, batches, seconds, log) -> dict:
        costs: dict[str, dict[int, tuple[float, float]]] = {}
        rng = np.random.default_rng(0)
        for c in self.plan.candidates:
            if log:
                log(f"calibrating {c.name}")
            sub = self.model.get_submodule(c.name)
            sess = self._session(self._export(sub, c.in_shape, input_name="x", output_name="y"), self.threads)
            layer = self.layers[c.name]
            costs[c.name] = {}
            for b in batches:
                x = rng.standard_normal((b, *c.in_shape), dtype=np.float32)
                med = interleaved_median({"sparse": lambda: layer(x), "dense": lambda: sess.run(None, {"x": x})},
                                         seconds, min_reps=9, max_reps=200, warmup=2, quantile=CALIB_QUANTILE)
                costs[c.name][b] = (med["sparse"], med["dense"])
        return costs

    def _verify_plans(self, seconds, log, max_tries: int = 4) -> None:
        """Time each batch size's hybrid plan against the whole dense model, interleaved. Two plans
        start: the per-layer choice, and every candidate sparse (per-layer timing charges each
        dense layer a whole onnxruntime call, so it can miss that cutting *all* layers removes
        onnxruntime from the path, as for the LeNets at batch 1); the faster one that beats dense
        wins. If neither does, drop the per-layer choice's layer with the smallest measured gain
        and try again (at most ``max_tries`` plans); if none wins, that batch size runs dense."""
        rng = np.random.default_rng(1)
        dense = self._dense()
        everything = frozenset(c.name for c in self.plan.candidates)
        for b in sorted(self.plans):
            chosen = frozenset(n for n, v in self.choice[b].items() if v == "sparse")
            gain = {n: self.costs[n][b][1] - self.costs[n][b][0] for n in chosen}
            x = rng.standard_normal((b, *self.input_shape), dtype=np.float32)
            self.plans[b] = None
            options = [o for o in dict.fromkeys([chosen, everything]) if o]
            for _ in range(max_tries):
                if not options:
                    break
                if log:
                    log(f"checking {len(options)} hybrid plan(s) ({', '.join(str(len(o)) for o in options)} sparse "
                        f"layers) against dense at batch {b}")
                fns = {i: (lambda calls=self._build(set(o)): self._run_calls(calls, x)) for i, o in enumerate(options)}
                fns["dense"] = lambda: dense(x)
                med = interleaved_median(fns, seconds, min_reps=9, max_reps=300, warmup=2, quantile=CALIB_QUANTILE)
                best = min(range(len(options)), key=lambda i: med[i])
                self.plan_costs[b] = (med[best], med["dense"])
                if choose_plan(med[best], med["dense"], PLAN_MARGIN) == "hybrid":
                    chosen = options[best]
                    self.plans[b] = self._build(set(chosen))
                    break
                chosen = chosen - {min(chosen, key=lambda n: gain[n])} if chosen else chosen
                options = [chosen] if chosen else []
            if self.plans[b] is not None:
                self.choice[b] = {n: ("sparse" if n in chosen else "dense") for n in self.choice[b]}

    # -- running
    @staticmethod
    def _run_calls(calls, x: np.ndarray) -> np.ndarray:
        for kind, obj, relu, pool in calls:
            if kind == "chain":
                x = obj(x)
            elif kind == "sparse":
                x = obj(x, relu, pool) if pool != 1 else (obj(x, relu) if relu else obj(x))
            elif kind == "onnx" or kind == "pool":
                x = obj(x)
            elif kind == "flatten":
                x = x.reshape(x.shape[0], -1)
            elif kind == "gap":
                x = (np.maximum(x, 0) if relu else x).mean(axis=(2, 3), keepdims=True, dtype=np.float32)
            else:  # relu
                x = np.maximum(x, 0)
        return x

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        b = x.shape[0]
        calls = self._by_batch.get(b, _MISSING)
        if calls is _MISSING:
            calls = self._by_batch[b] = self.plans[nearest_batch(b, self.plans)]
        if calls is None:
            return self._dense_sess(x)
        out = self._run_calls(calls, x)
        return out.copy() if calls[-1][0] in ("sparse", "pool", "chain") else out

    # -- reporting
    def _model_bytes(self) -> int:
        """Bytes of what the chosen plans run: compressed layers, ONNX segments, the dense model
        where a batch size falls back to it."""
        active = [calls for calls in self.plans.values() if calls is not None]
        objs = {id(obj): obj for calls in active for kind, obj, *_ in calls if kind in ("sparse", "onnx")}
        objs.update({id(lay): lay for calls in active for kind, obj, *_ in calls if kind == "chain" for lay in obj.layers})
        total = sum(obj.nbytes for obj in objs.values())
        if any(calls is None for calls in self.plans.values()):
            total += self._dense().nbytes
        return total

    def describe(self) -> dict:
        """Per layer: shape, sparsity, bytes, the choice per batch size and the measured costs."""
        layers = []
        for c in self.plan.candidates:
            lay = self.layers[c.name]
            row = {"name": c.name, "kind": c.kind, "in_shape": list(c.in_shape), "out_shape": list(c.out_shape),
                   "sparsity": round(c.sparsity, 4), "bytes": lay.nbytes,
                   "codebook": getattr(getattr(lay, "w", None), "codebook", None) is not None,
                   "choice": {}}
            for b in sorted(self.choice):
                v = self.choice[b].get(c.name, "dense")
                row["choice"][str(b)] = v if self.plans.get(b) is not None else "dense (whole model)"
            if c.name in self.costs:
                row["sparse_ms"] = {str(b): round(s * 1e3, 4) for b, (s, _) in self.costs[c.name].items()}
                row["dense_ms"] = {str(b): round(d * 1e3, 4) for b, (_, d) in self.costs[c.name].items()}
            layers.append(row)
        plans = {str(b): ("dense" if calls is None else " > ".join(
            f"sparse:{obj.name}{'+relu' if relu else ''}{f'+pool{pool}' if pool != 1 else ''}" if kind == "sparse"
            else " > ".join(f"sparse:{lay.name}{'+relu' if r else ''}" for lay, r in zip(obj.layers, obj.relus))
            if kind == "chain" else kind for kind, obj, relu, pool in calls))
            for b, calls in sorted(self.plans.items())}
        out = {"kernel": self.kernel, "threads": self.threads, "layers": layers, "plans": plans,
               "sparse_layers": [{"name": c.name, "shape": [self.layers[c.name].out_features,
                                                            self.layers[c.name].in_features],
                                  "sparsity": round(c.sparsity, 4)} for c in self.plan.candidates if c.kind == "linear"],
               "not_cut": self.plan.skipped}
        if self.plan_costs:
            out["plan_check_ms"] = {str(b): {"hybrid": round(h * 1e3, 4), "dense": round(d * 1e3, 4)}
                                    for b, (h, d) in self.plan_costs.items()}
        return out


_MISSING = object()


def _chain_linear(calls: list) -> list:
    """Runs of sparse Linear steps (a flatten between them is a no-op on (B, features)) become one
    ``LinearChain`` step: activations stay in the kernel's layout between the layers."""
    from dcomp.runtime.kernels import LinearChain

    out, run = [], []

    def flush():
        if run:
            out.append(["chain", LinearChain([c[1] for c in run], [c[2] for c in run]), False, 1])
            run.clear()

    for c in calls:
        if c[0] == "sparse" and c[1].kind == "linear" and c[3] == 1:
            run.append(c)
        elif c[0] == "flatten" and run:
            continue
        else:
            flush()
            out.append(c)
    flush()
    return out


class _OrtCall:
    def __init__(self, sess, nbytes: int):
        self.sess, self.nbytes = sess, nbytes
        self.input = sess.get_inputs()[0].name

    def __call__(self, x):
        return self.sess.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]


# ---- break-even sweep ---------------------------------------------------------------------------

def dense_gemm_onnx(out_features: int, in_features: int, weight: np.ndarray | None = None) -> bytes:
    """A one-Gemm ONNX model (x @ W.T + b), the dense onnxruntime reference for one layer."""
    from onnx import TensorProto, helper, numpy_helper

    from dcomp.formats.onnx_export import IR_VERSION, OPSET

    w = weight if weight is not None else np.zeros((out_features, in_features), np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        [numpy_helper.from_array(w.astype(np.float32), "W"),
         numpy_helper.from_array(np.zeros(out_features, np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR_VERSION
    return m.SerializeToString()


def random_sparse_weight(out_features: int, in_features: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Gaussian weight with exactly round(sparsity * numel) zeros at uniformly random places."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    k = int(round(sparsity * w.numel()))
    if k:
        w.view(-1)[torch.randperm(w.numel(), generator=g)[:k]] = 0
    return w


def interleaved_median(fns: dict[str, Any], seconds: float = 0.5, min_reps: int = 5, max_reps: int = 2000,
                       warmup: int = 3, quantile: float = 50.0) -> dict[str, float]:
    """Median (or another ``quantile``) seconds per call of each function, timed in alternation
    (so machine load hits all alike)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_end = time.perf_counter() + seconds
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() < t_end):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        reps += 1
    return {k: float(np.percentile(v, quantile)) for k, v in times.items()}


def sweep(shape: tuple[int, int], sparsities, batches, threads: int, kernel: str = "numba",
          seconds: float = 0.3, seed: int = 0, levels: int | None = None) -> list[dict]:
    """Dense onnxruntime Gemm vs the sparse kernel on one layer shape (out, in), per sparsity and
    batch size; ``levels``: share the non-zeros to that many values first (a codebook). Rows:
    sparsity, batch, dense_s, sparse_s, speedup (dense time / sparse time)."""
    from dcomp.runtime.runner import ort_session

    out_f, in_f = int(shape[0]), int(shape[1])
    dense = ort_session(dense_gemm_onnx(out_f, in_f, random_sparse_weight(out_f, in_f, 0.0, seed).numpy()), threads)
    rows = []
    rng = np.random.default_rng(seed)
    for s in sparsities:
        w = random_sparse_weight(out_f, in_f, float(s), seed)
        if levels:
            book = torch.linspace(-3.0, 3.0, int(levels))
            w = torch.where(w != 0, book[torch.bucketize(w.clamp(-3, 3), (book[1:] + book[:-1]) / 2)], w)
        sl = SparseLinear(w, None, kernel, threads=threads)
        for b in batches:
            x = rng.standard_normal((int(b), in_f), dtype=np.float32)
            med = interleaved_median({"dense": lambda: dense.run(None, {"x": x}), "sparse": lambda: sl(x)}, seconds)
            rows.append({"shape": [out_f, in_f], "sparsity": float(s), "batch": int(b), "dense_s": med["dense"],
                         "sparse_s": med["sparse"], "speedup": med["dense"] / med["sparse"]})
    return rows


def break_even(rows: list[dict], batch: int) -> float | None:
    """The lowest swept sparsity from which the sparse kernel is faster at every higher swept
    sparsity, linearly interpolated with the point below; None if it never is."""
    pts = sorted((r["sparsity"], r["speedup"]) for r in rows if r["batch"] == batch)
    if not pts or pts[-1][1] < 1.0:
        return None
    i = len(pts) - 1
    while i > 0 and pts[i - 1][1] >= 1.0:
        i -= 1
    if i == 0:
        return pts[0][0]
    (s0, v0), (s1, v1) = pts[i - 1], pts[i]
    return s0 + (1.0 - v0) * (s1 - s0) / (v1 - v0) if v1 != v0 else s1


def speed_words(speedup: float, than: str = "") -> str:
    """How a ratio reads in a table: '2.30x faster', 'slower than dense: 0.60x', 'same (1.02x)'."""
    num = f"{speedup:.2f}" if speedup >= 0.1 else f"{speedup:.3f}"
    if speedup >= 1.05:
        return f"{num}x faster"
    if speedup <= 0.95:
        return f"slower{' than ' + than if than else ''}: {num}x"
    return f"same ({num}x)"
