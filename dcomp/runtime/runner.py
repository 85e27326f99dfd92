"""Things that run a model on numpy batches, with one interface for the benchmark:
``run(x: float32 array (B, ...)) -> logits array (B, classes)`` plus a name and a size.

    OrtRunner     an ONNX model in onnxruntime (CPU), --threads intra-op threads, 1 inter-op
    TorchRunner   the PyTorch model in eager mode under inference_mode (the reference)
    HybridRunner  in dcomp.runtime.sparse: onnxruntime for the dense parts, CSR kernels between
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dcomp.errors import DcompError


def resolve_threads(threads: int | None) -> int:
    """--threads, else what torch uses (its default: the physical cores)."""
    return int(threads) if threads else max(1, torch.get_num_threads())


def apply_threads(threads: int) -> None:
    """One thread count for every engine in the process, so comparisons are fair."""
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # numba is optional: only the numba CSR kernel needs it
        pass


def ort_session(onnx_bytes: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Idle onnxruntime threads spin by default; with 2 cores that steals the CPU from the next
    # engine (torch, numba) in an interleaved or hybrid run. Off for every session, so it is fair.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DcompError(f"onnxruntime cannot load the model: {first}") from None


class OrtRunner:
    kind = "onnxruntime"

    def __init__(self, onnx_bytes: bytes, threads: int, name: str = "onnx"):
        self.name = name
        self.model_bytes = len(onnx_bytes)
        self.session = ort_session(onnx_bytes, threads)
        self._input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: x})[0]


class TorchRunner:
    kind = "pytorch eager"

    def __init__(self, model: nn.Module, name: str = "pytorch", model_bytes: int | None = None):
        self.name = name
        self.model = model.eval()
        self.model_bytes = model_bytes

    def run(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()
