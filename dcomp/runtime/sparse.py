"""The hybrid sparse path: onnxruntime runs the dense parts of a model, a compiled CSR kernel runs
its pruned Linear layers.

Why: onnxruntime densifies sparse initializers when it loads them and its sparse contrib op is
slower than dense MatMul, and a custom op cannot carry a fast path here (see design.md). So the
model is cut at its sparse Linear layers:

    torch.fx traces the model; a Linear whose weight is at least ``min_sparsity`` zeros becomes
    a cut point when nothing else stays alive across it (no skip connection jumps over it);
    the nodes between two cuts become a sub-model exported to ONNX (one onnxruntime session
    each); a cut runs as ``y = W_csr @ x + b`` in the chosen kernel.

For an MLP that makes the whole model a chain of sparse layers with tiny onnxruntime sessions
(ReLU, Flatten) between them; for a convnet only its classifier layers go sparse. Kernels:

    torch   torch.sparse.mm on a CSR tensor, no compile step; it parallelises with OpenMP,
            whose static split stalls for a scheduler tick whenever one of its threads is
            descheduled (measured 20+ ms per call on 2 busy cores), so it is not the default
    numba   a serial CSR kernel compiled with numba (nogil; first use compiles, ~1-2 s), run on
            row chunks balanced by non-zeros that the caller and sleeping helper threads take
            dynamically (ChunkPool), so a descheduled thread never stalls a call

Whether this is faster than dense onnxruntime depends on sparsity, layer shape and batch size;
``sweep`` measures exactly that and ``break_even`` reads the answer off it.
"""

from __future__ import annotations

import warnings

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dcomp.errors import DcompError, UsageError

KERNELS = ("torch", "numba")
# Below SMALL_WORK / 4 multiply-adds the numba kernel runs on the calling thread only.
SMALL_WORK = 1 << 20


# ---- kernels ------------------------------------------------------------------------------------

_numba_kernels: dict[str, Any] = {}


def _numba():
    """Compile the numba CSR kernels on first use. They are serial and release the GIL; the
    parallelism comes from ChunkPool, which hands out row chunks dynamically."""
    if _numba_kernels:
        return _numba_kernels
    try:
        from numba import njit
    except ImportError:
        raise UsageError("--kernel numba needs the numba package; use --kernel torch") from None

    @njit(nogil=True, fastmath=True, cache=False)
    def csr_mv(rowptr, cols, vals, bias, x, y, r0, r1):  # x: (in,), y: (out,), rows [r0, r1)
        for i in range(r0, r1):
            # four accumulators: one chain of dependent adds would bound the loop by FP latency
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            k = rowptr[i]
            end = rowptr[i + 1]
            while k + 4 <= end:
                a0 += vals[k] * x[cols[k]]
                a1 += vals[k + 1] * x[cols[k + 1]]
                a2 += vals[k + 2] * x[cols[k + 2]]
                a3 += vals[k + 3] * x[cols[k + 3]]
                k += 4
            while k < end:
                a0 += vals[k] * x[cols[k]]
                k += 1
            y[i] = bias[i] + ((a0 + a1) + (a2 + a3))

    @njit(nogil=True, fastmath=True, cache=False)
    def csr_mm(rowptr, cols, vals, bias, xt, yt, r0, r1):  # xt: (in, B), yt: (out, B)
        nb = xt.shape[1]
        for i in range(r0, r1):
            for b in range(nb):
                yt[i, b] = bias[i]
            for k in range(rowptr[i], rowptr[i + 1]):
                v = vals[k]
                c = cols[k]
                for b in range(nb):
                    yt[i, b] += v * xt[c, b]

    _numba_kernels.update(mv=csr_mv, mm=csr_mm)
    return _numba_kernels


class ChunkPool:
    """Run ``fn(r0, r1)`` over a list of row chunks with ``threads`` threads: the caller and
    ``threads - 1`` sleeping helpers take chunks from a shared counter until none is left.

    Why not numba's prange or OpenMP: they split the rows statically, so on a loaded machine
    one descheduled thread stalls the whole call for a scheduler tick (measured 10-20 ms on
    a 0.5 ms layer with 2 cores and other jobs running). Here a helper that is not running
    simply takes no chunk, and the caller does the work."""

    def __init__(self, threads: int):
        import threading

        self.threads = max(1, int(threads))
        self._cv = threading.Condition()
        self._gen = 0
        self._job: dict | None = None
        for _ in range(self.threads - 1):
            threading.Thread(target=self._helper, daemon=True, name="dcomp-csr").start()

    def _helper(self):
        seen = 0
        while True:
            with self._cv:
                while self._gen == seen:
                    self._cv.wait()
                seen, job = self._gen, self._job
            self._work(job)

    def _work(self, job):
        chunks, fn = job["chunks"], job["fn"]
        while True:
            with self._cv:
                i = job["next"]
                if i >= len(chunks):
                    return
                job["next"] = i + 1
            try:
                fn(*chunks[i])
            except BaseException as e:  # noqa: BLE001 - handed to the caller, never lost in a helper
                job["error"] = e
            finally:
                with self._cv:
                    job["done"] += 1
                    if job["done"] == len(chunks):
                        self._cv.notify_all()

    def run(self, fn, chunks: list[tuple[int, int]]) -> None:
        if self.threads == 1 or len(chunks) == 1:
            for c in chunks:
                fn(*c)
            return
        job = {"fn": fn, "chunks": chunks, "next": 0, "done": 0}
        with self._cv:
            self._job = job
            self._gen += 1
            self._cv.notify_all()
        self._work(job)
        with self._cv:
            while job["done"] < len(chunks):
                self._cv.wait()
        if job.get("error") is not None:
            raise job["error"]


_pools: dict[int, ChunkPool] = {}


def chunk_pool(threads: int) -> ChunkPool:
    threads = max(1, int(threads))
    if threads not in _pools:
        _pools[threads] = ChunkPool(threads)
    return _pools[threads]


def row_chunks(rowptr: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Split rows into ``n`` ranges holding about equal numbers of non-zeros."""
    rows = rowptr.shape[0] - 1
    cuts = np.searchsorted(rowptr, np.linspace(0, rowptr[-1], n + 1)[1:-1]).tolist()
    bounds = sorted(set([0, *[min(max(c, 0), rows) for c in cuts], rows]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class SparseLinear:
    """``y = x @ W.T + b`` with W (out, in) held in CSR; x is a float32 array (..., in)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "torch", name: str = "",
                 threads: int | None = None):
        if kernel not in KERNELS:
            raise UsageError(f"--kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        w = weight.detach().to(torch.float32).contiguous()
        self.name = name
        self.kernel = kernel
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.nnz = int(torch.count_nonzero(w))
        self.sparsity = 1.0 - self.nnz / max(w.numel(), 1)
        b = torch.zeros(self.out_features) if bias is None else bias.detach().to(torch.float32).contiguous()
        self.bias_t = b
        with warnings.catch_warnings():  # torch calls its CSR support "beta" on every conversion
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = w.to_sparse_csr()
        if kernel == "torch":
            self.csr = csr
        else:
            k = _numba()
            self.rowptr = csr.crow_indices().to(torch.int32).numpy()
            # int16 column indices where they fit: 6 bytes per non-zero instead of 8 (the kernel
            # streams values and indices from memory; measured 20% faster at 4096x4096, 95%)
            self.cols = csr.col_indices().numpy().astype(np.int16 if self.in_features <= 32767 else np.int32)
            self.vals = csr.values().numpy()
            self.bias = b.numpy()
            self._mv, self._mm = k["mv"], k["mm"]
            self.pool = chunk_pool(threads if threads else torch.get_num_threads())
            # about 4 chunks per thread, none under ~16k non-zeros (Python hands out each chunk)
            n = max(1, min(4 * self.pool.threads, self.nnz // 16384))
            self.chunks = row_chunks(self.rowptr, n) if self.out_features else []
            self(np.zeros((1, self.in_features), np.float32))  # compile now, not inside a timing
            self(np.zeros((2, self.in_features), np.float32))

    @property
    def nbytes(self) -> int:
        """Bytes of the CSR arrays and bias as this kernel holds them."""
        if self.kernel == "torch":
            return self.nnz * (4 + 8) + (self.out_features + 1) * 8 + self.out_features * 4
        return self.nnz * (4 + self.cols.itemsize) + (self.out_features + 1) * 4 + self.out_features * 4

    def _run(self, fn, batch: int) -> None:
        if self.nnz * batch < SMALL_WORK // 4:  # too little work to share
            fn(0, self.out_features)
        else:
            self.pool.run(fn, self.chunks)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "torch":
            xt = torch.from_numpy(x2)
            with torch.inference_mode():
                y = torch.sparse.mm(self.csr, xt.t()).t().add_(self.bias_t)
            out = y.contiguous().numpy()
        elif x2.shape[0] == 1:
            out = np.empty((1, self.out_features), np.float32)
            xv, yv = np.ascontiguousarray(x2[0]), out[0]
            rp, ci, va, bi, mv = self.rowptr, self.cols, self.vals, self.bias, self._mv
            self._run(lambda r0, r1: mv(rp, ci, va, bi, xv, yv, r0, r1), 1)
        else:
            yt = np.empty((self.out_features, x2.shape[0]), np.float32)
            xt = np.ascontiguousarray(x2.T)
            rp, ci, va, bi, mm = self.rowptr, self.cols, self.vals, self.bias, self._mm
            self._run(lambda r0, r1: mm(rp, ci, va, bi, xt, yt, r0, r1), x2.shape[0])
            out = yt.T
        return np.ascontiguousarray(out).reshape(*lead, self.out_features)


# ---- cutting a model at its sparse Linear layers -----------------------------------------------

@dataclass
class Plan:
    """What the hybrid runner will run: ("onnx", sub-module, input shape) and ("sparse", layer name)
    steps in order, plus the sparse Linear layers that could not be cut and why."""

    steps: list[tuple] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def sparse_layers(self) -> list[str]:
        return [s[1] for s in self.steps if s[0] == "sparse"]


def plan_hybrid(model: nn.Module, input_shape, min_sparsity: float = 0.5) -> Plan:
    """Trace ``model`` with torch.fx and cut it at each Linear layer that is at least
    ``min_sparsity`` zeros and that no other value lives across."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types on untraceable code
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DcompError(f"the hybrid sparse path cannot trace this model with torch.fx ({first}); "
                         f"use the dense or sparse ONNX variants") from None
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    plan = Plan()
    cuts = []
    for n in nodes:
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(n.target)
        if not isinstance(mod, nn.Linear):
            continue
        sparsity = 1.0 - int(torch.count_nonzero(mod.weight)) / mod.weight.numel()
        if sparsity < min_sparsity:
            continue
        p = pos[n]
        live = [m.name for m in nodes[:p] if any(pos[u] > p for u in m.users)]
        if len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
            plan.skipped.append({"layer": n.target, "sparsity": sparsity, "why": "called with extra arguments"})
        elif live:
            plan.skipped.append({"layer": n.target, "sparsity": sparsity,
                                 "why": f"values live across it ({', '.join(live[:3])}): a skip connection"})
        else:
            cuts.append(n)
    placeholder = next(n for n in nodes if n.op == "placeholder")
    output = next(n for n in nodes if n.op == "output")
    start = placeholder
    for cut in cuts + [None]:
        end_value = cut.args[0] if cut is not None else output.args[0]
        hi = pos[cut] if cut is not None else pos[output]
        if end_value is not start:
            plan.steps.append(("onnx", _segment(gm, nodes[pos[start] + 1:hi], start, end_value)))
        if cut is not None:
            plan.steps.append(("sparse", str(cut.target)))
            start = cut
    return _with_shapes(plan, gm, input_shape)


def _segment(gm, seg_nodes, start, end_value):
    import torch.fx as fx

    g = fx.Graph()
    env = {start: g.placeholder("x")}
    for n in seg_nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[end_value])
    return fx.GraphModule(gm, g)


def _with_shapes(plan: Plan, gm, input_shape) -> Plan:
    """Record each ONNX segment's input shape (without batch) by running the steps once."""
    x = torch.zeros(2, *[int(s) for s in input_shape])
    steps = []
    with torch.no_grad():
        for step in plan.steps:
            if step[0] == "onnx":
                steps.append(("onnx", step[1], list(x.shape[1:])))
                x = step[1](x)
            else:
                steps.append(step)
                x = gm.get_submodule(step[1])(x)
    plan.steps = steps
    return plan


class HybridRunner:
    """Runs a Plan: onnxruntime sessions for the dense segments, SparseLinear for the cuts."""

    kind = "hybrid"

    def __init__(self, model: nn.Module, input_shape, threads: int, kernel: str = "torch",
                 min_sparsity: float = 0.5, name: str = "hybrid", plan: Plan | None = None):
        from dcomp.formats.onnx_export import export_module
        from dcomp.runtime.runner import ort_session

        self.name = name
        self.kernel = kernel
        self.plan = plan or plan_hybrid(model, input_shape, min_sparsity)
        if not self.plan.sparse_layers:
            why = "; ".join(f"{s['layer']}: {s['why']}" for s in self.plan.skipped)
            raise DcompError(f"no Linear layer is at least {min_sparsity:.0%} zeros and cuttable, so the hybrid path "
                             f"has nothing to run sparse{' (' + why + ')' if why else ''}")
        self.calls = []
        self.model_bytes = 0
        self.layers: list[SparseLinear] = []
        for step in self.plan.steps:
            if step[0] == "onnx":
                data = export_module(step[1], step[2], input_name="x", output_name="y")
                sess = ort_session(data, threads)
                self.model_bytes += len(data)
                self.calls.append(_ort_call(sess))
            else:
                lin = model.get_submodule(step[1])
                sl = SparseLinear(lin.weight, lin.bias, kernel, name=step[1], threads=threads)
                self.layers.append(sl)
                self.model_bytes += sl.nbytes
                self.calls.append(sl)

    def describe(self) -> dict:
        return {"kernel": self.kernel,
                "steps": [s[0] if s[0] == "onnx" else f"sparse:{s[1]}" for s in self.plan.steps],
                "sparse_layers": [{"name": s.name, "shape": [s.out_features, s.in_features],
                                   "sparsity": round(s.sparsity, 4)} for s in self.layers],
                "not_cut": self.plan.skipped}

    def run(self, x: np.ndarray) -> np.ndarray:
        for call in self.calls:
            x = call(x)
        return x


def _ort_call(sess):
    name = sess.get_inputs()[0].name

    def call(x):
        return sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    return call


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
                       warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (so machine load hits all alike)."""
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
    return {k: float(np.median(v)) for k, v in times.items()}


def sweep(shape: tuple[int, int], sparsities, batches, threads: int, kernel: str = "torch",
          seconds: float = 0.3, seed: int = 0) -> list[dict]:
    """Dense onnxruntime Gemm vs the sparse kernel on one layer shape (out, in), per sparsity and
    batch size. Rows: sparsity, batch, dense_s, sparse_s, speedup (dense time / sparse time)."""
    from dcomp.runtime.runner import ort_session

    out_f, in_f = int(shape[0]), int(shape[1])
    dense = ort_session(dense_gemm_onnx(out_f, in_f, random_sparse_weight(out_f, in_f, 0.0, seed).numpy()), threads)
    rows = []
    rng = np.random.default_rng(seed)
    for s in sparsities:
        sl = SparseLinear(random_sparse_weight(out_f, in_f, float(s), seed), None, kernel, threads=threads)
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
