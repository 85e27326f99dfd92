"""ONNX export of a dcomp checkpoint, in three variants, checked against PyTorch.

    dense    every weight expanded to a dense float32 initializer (what any runtime loads)
    shrunk   the model at its stored, structurally pruned shapes: layers that ``prune --method
             filter`` removed are simply not in the graph, so it is smaller AND faster. For a
             checkpoint that was never shrunk this is the same graph as ``dense`` (the export
             info says so: ``shrunk_layers`` is empty).
    sparse   the dense graph with every weight that is mostly zeros stored as an ONNX sparse
             initializer (values + flat int64 indices): a smaller file. onnxruntime densifies
             sparse initializers when it loads them, so it is no faster; the fast path for
             unstructured sparsity is dcomp.runtime.sparse (the hybrid runner).

Facts this module works around: torch.onnx.export defaults to the dynamo exporter, which needs
onnxscript (not installed), so the TorchScript exporter is used (``dynamo=False``); onnxruntime
1.31 loads IR versions <= 13, so the IR version is pinned (``IR_VERSION``). The batch axis is
dynamic. Every export is loaded in onnxruntime and compared with the PyTorch model on a seeded
input; a mismatch is an error, not a warning.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from dcomp.errors import DcompError
from dcomp.formats.checkpoint import Checkpoint

OPSET = 17
IR_VERSION = 8            # what opset 17 needs; onnxruntime 1.31 loads <= 13, onnx 1.23 would write 14
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
RTOL = 1e-5               # outputs must match PyTorch within RTOL relative to the output scale
VARIANTS = ("dense", "shrunk", "sparse")


class ExportConfig(BaseModel):
    """How to export. ``sparse_min_sparsity``: store a weight sparse only when at least this
    fraction is zero AND the sparse form is smaller (values 4 B + index 8 B per non-zero)."""

    model_config = ConfigDict(extra="forbid")

    variant: Literal["dense", "shrunk", "sparse"] = "dense"
    opset: int = OPSET
    sparse_min_sparsity: float = Field(0.5, ge=0.0, le=1.0)
    verify: bool = True

    @field_validator("opset")
    @classmethod
    def _opset(cls, v: int) -> int:
        if not 13 <= v <= 20:
            raise ValueError("opset must be between 13 and 20 (onnxruntime 1.31 runs these); 17 is the default")
        return v


@dataclass
class ExportResult:
    onnx_bytes: bytes
    variant: str
    info: dict[str, Any] = field(default_factory=dict)


# ---- the export itself ------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_fds():
    """Silence stdout/stderr at the file-descriptor level: the TorchScript exporter prints its IR
    graph from C++ on failure, which would corrupt a piped stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
            except OSError:
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def export_module(model: nn.Module, input_shape, opset: int = OPSET,
                  input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME) -> bytes:
    """Export an eval-mode module to ONNX bytes (dynamic batch axis, pinned IR version).
    Raises DcompError naming the layer that cannot be exported."""
    import onnx

    model = model.eval()
    x = torch.zeros(2, *[int(s) for s in input_shape])
    buf = io.BytesIO()
    # nn.MultiheadAttention's fused eval path (aten::_native_multi_head_attention) has no ONNX export;
    # its plain path computes the same function
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with quiet_fds(), torch.no_grad():
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; we name the layer
        raise DcompError(_explain_failure(model, x, e, opset)) from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, IR_VERSION) if proto.ir_version else IR_VERSION
    return proto.SerializeToString()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _explain_failure(model: nn.Module, x: torch.Tensor, err: BaseException, opset: int) -> str:
    """Find the deepest sub-module that fails to export on its own and say which and why."""
    inputs: dict[str, tuple] = {}
    hooks = []
    for name, m in model.named_modules():
        if name:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: inputs.setdefault(name, args)))
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:  # noqa: BLE001
        return f"the model cannot run on an input of shape {list(x.shape)}: {_first_line(e)}"
    finally:
        for h in hooks:
            h.remove()
    names = [n for n in inputs if all(isinstance(a, torch.Tensor) for a in inputs[n])]
    names.sort(key=lambda n: -n.count("."))  # deepest first
    for name in names:
        try:
            with quiet_fds(), torch.no_grad():
                torch.onnx.export(model.get_submodule(name), inputs[name], io.BytesIO(), dynamo=False,
                                  opset_version=opset)
        except Exception as e:  # noqa: BLE001
            mod = model.get_submodule(name)
            return (f"cannot export layer {name!r} ({type(mod).__name__}) to ONNX opset {opset}: {_first_line(e)}; "
                    f"replace that layer with standard ops, or run the model in PyTorch")
    return f"cannot export the model to ONNX opset {opset}: {_first_line(err)} (in the model's own forward code)"


# ---- sparse initializers ----------------------------------------------------------------------

def sparsify_initializers(onnx_bytes: bytes, min_sparsity: float = 0.5) -> tuple[bytes, list[dict]]:
    """Move every float initializer of rank >= 2 that is at least ``min_sparsity`` zeros, and
    smaller in sparse form, into ``graph.sparse_initializer`` (flat int64 indices, COO)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(onnx_bytes)
    keep, converted = [], []
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init) if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2 else None
        if arr is None or arr.size == 0:
            keep.append(init)
            continue
        flat = arr.reshape(-1)
        idx = np.flatnonzero(flat)
        sparsity = 1.0 - idx.size / flat.size
        if sparsity < min_sparsity or idx.size * 12 >= flat.size * 4:
            keep.append(init)
            continue
        values = numpy_helper.from_array(flat[idx].astype(np.float32), init.name)
        indices = numpy_helper.from_array(idx.astype(np.int64), init.name + "_indices")
        sp = onnx.helper.make_sparse_tensor(values, indices, list(arr.shape))
        proto.graph.sparse_initializer.append(sp)
        converted.append({"name": init.name, "shape": list(arr.shape), "sparsity": round(sparsity, 4)})
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return proto.SerializeToString(), converted


# ---- checks -----------------------------------------------------------------------------------

def check_onnx(onnx_bytes: bytes) -> None:
    import onnx

    try:
        onnx.checker.check_model(onnx.load_from_string(onnx_bytes))
    except Exception as e:  # noqa: BLE001 - onnx raises ValidationError and friends
        raise DcompError(f"the exported ONNX model fails onnx.checker: {_first_line(e)}") from None


def compare_with_torch(onnx_bytes: bytes, model: nn.Module, input_shape, batch: int = 3, seed: int = 0,
                       rtol: float = RTOL, x: torch.Tensor | None = None) -> float:
    """Run both on the same input (``x``, else seeded Gaussian noise); return the largest difference
    relative to the output scale (max |onnx - torch| / max(|torch|)). Raises DcompError above ``rtol``."""
    import onnxruntime as ort

    if x is None:
        x = torch.randn(batch, *[int(s) for s in input_shape], generator=torch.Generator().manual_seed(seed))
    try:
        sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise DcompError(f"onnxruntime cannot run the exported model: {_first_line(e)}") from None
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    if got.shape != ref.shape:
        raise DcompError(f"exported model gives shape {list(got.shape)}, PyTorch gives {list(ref.shape)}")
    scale = max(float(np.abs(ref).max()), 1e-6)
    rel = float(np.abs(got - ref).max()) / scale
    if not rel <= rtol:
        raise DcompError(f"exported model differs from PyTorch by {rel:.2e} (relative to the output scale), "
                         f"more than {rtol:.0e}; rerun with --debug and report it")
    return rel


# ---- from a checkpoint ------------------------------------------------------------------------

def shrunk_layers(ckpt: Checkpoint) -> list[dict]:
    """Layers stored smaller than the architecture builds them (structured pruning removed rows,
    filters or channels). Empty for TorchScript/pickle architectures, which have no factory."""
    from dcomp.models.arch import build_reference

    try:
        ref = build_reference(ckpt)  # trust as the checkpoint carries it (typed --arch); no pickle
    except DcompError:
        return []
    if ref is None:
        return []
    out = []
    for name, t in ref.state_dict().items():
        stored = ckpt.state_dict.get(name)
        if name.endswith("weight") and stored is not None and tuple(stored.shape) != tuple(t.shape):
            out.append({"name": name, "built": list(t.shape), "stored": list(stored.shape)})
    return out


def _own_samples(ckpt: Checkpoint, n: int = 3) -> torch.Tensor | None:
    """A few test images of the dataset the checkpoint records, or None (then the check uses noise).

    BatchNorm statistics re-estimated on real data can have channels of near-zero variance (constant on
    the data; 327 of them in a filter-pruned EfficientNet-B0 on MNIST): such a model amplifies Gaussian
    noise, which it never sees, by 1/sqrt(eps) per layer, and onnxruntime's fused Conv+BatchNorm, exact
    on the data, then looked 3.4e-1 off PyTorch on noise. The check uses the model's own inputs."""
    spec = (ckpt.data or {}).get("spec")
    if not spec:
        return None
    try:
        from dcomp.data import load_dataset

        ds = load_dataset(spec, ckpt.data.get("resize"))
        x = torch.as_tensor(ds.x_test[:n]).float()
        return x if tuple(x.shape[1:]) == tuple(int(s) for s in ckpt.input_shape) else None
    except Exception:  # noqa: BLE001 - the data may live elsewhere now: fall back to noise
        return None


def export_checkpoint(ckpt: Checkpoint, cfg: ExportConfig | None = None, trust_pickle: bool = False) -> ExportResult:
    """Export ``ckpt`` as ``cfg.variant``; checked with onnx.checker and against PyTorch."""
    cfg = cfg or ExportConfig()
    model = ckpt.build_model(trust_pickle=trust_pickle)
    data = export_module(model, ckpt.input_shape, cfg.opset)
    info: dict[str, Any] = {"variant": cfg.variant, "opset": cfg.opset, "ir_version": IR_VERSION,
                            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
                            "input_shape": ["batch", *[int(s) for s in ckpt.input_shape]]}
    if cfg.variant == "shrunk":
        info["shrunk_layers"] = shrunk_layers(ckpt)
        if not info["shrunk_layers"]:
            info["note"] = ("no layer of this model was removed or shrunk, so 'shrunk' is the same graph as "
                            "'dense'; shrink it first with dcomp prune --method filter")
    if cfg.variant == "sparse":
        data, converted = sparsify_initializers(data, cfg.sparse_min_sparsity)
        info["sparse_initializers"] = converted
        if not converted:
            info["note"] = (f"no weight was at least {cfg.sparse_min_sparsity:.0%} zeros and smaller stored "
                            "sparse (needs > 67% zeros), so the file is the same as 'dense'")
    check_onnx(data)
    if cfg.verify:
        info["max_rel_diff"] = compare_with_torch(data, model, ckpt.input_shape, x=_own_samples(ckpt))
    info["file_bytes"] = len(data)
    return ExportResult(data, cfg.variant, info)
