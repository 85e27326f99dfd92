"""Importing torchvision for its model definitions on a CPU-only torch.

PyPI's torchvision 0.28.0 wheel is a CUDA build: its C extension (detection ops such as nms)
cannot load beside the CPU torch 2.13.0 that dcomp pins, and torchvision's own meta
registrations then fail at import with "operator torchvision::nms does not exist". The
classification models are pure Python and never call those ops, so when the extension is
missing we declare the two op schemas those registrations expect (no kernel: calling them
still fails loudly) and import normally.
"""

from __future__ import annotations

import importlib
import importlib.util

from dcomp.errors import UsageError

_shim = None  # keeps the torch.library.Library alive: dropping it removes the definitions


def import_torchvision():
    """Return the ``torchvision`` module, or raise a UsageError saying how to install it."""
    global _shim
    if importlib.util.find_spec("torchvision") is None:
        raise UsageError("torchvision is not installed: pip install -c constraints.txt 'dcomp[vision]'")
    import torch

    if _shim is None and not _has_op("nms"):
        try:
            _load_extension()
        except Exception:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _shim = lib
    return importlib.import_module("torchvision")


def _has_op(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _load_extension() -> None:
    """Load torchvision's compiled ops the way torchvision does; raises when they cannot load."""
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    folder = os.path.dirname(spec.origin)
    for name in os.listdir(folder):
        if name.startswith("_C") and name.endswith(".so"):
            torch.ops.load_library(os.path.join(folder, name))
            return
    raise OSError("torchvision's _C extension is missing")


def vision_models():
    """``torchvision.models`` (classification factories are its top-level callables)."""
    import_torchvision()
    return importlib.import_module("torchvision.models")
