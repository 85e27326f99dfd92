"""The built-in model zoo and the rules for rebuilding any model from a checkpoint.

Zoo factories take ``input_shape`` (from the dataset) and ``num_classes``; every layer
size that depends on them is computed, never hard-coded, so a structurally shrunk
checkpoint rebuilds by resizing modules to the stored shapes (see ``conform_to_state_dict``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dcomp.errors import DcompError, UsageError
from dcomp.models import zoo
from dcomp.models.arch import build_from_factory, import_factory  # noqa: F401 - moved there, names kept

ZOO: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "lenet-300-100": (zoo.LeNet300100, "MLP 784-300-100-10 of Han et al. (any input size, flattened)"),
    "lenet-5": (zoo.LeNet5, "Caffe LeNet-5: conv 20-50 5x5, fc 500 (inputs >= 16x16; --resize 28 for digits)"),
    "vgg-small": (zoo.VGGSmall, "VGG-style convnet with BatchNorm, 3 stages (widths configurable)"),
    "resnet-small": (zoo.ResNetSmall, "ResNet-style net, basic residual blocks, 3 stages with projections"),
}


def zoo_names() -> list[str]:
    return list(ZOO)


def build_zoo(name: str, input_shape, num_classes: int, **kwargs) -> nn.Module:
    if name not in ZOO:
        raise UsageError(f"unknown architecture {name!r}: zoo models are {', '.join(ZOO)} (or use package.module:factory)")
    try:
        return ZOO[name][0](input_shape=tuple(input_shape), num_classes=int(num_classes), **kwargs)
    except TypeError as e:
        raise UsageError(f"bad --arch-kwargs for {name}: {e}") from None


def conform_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Resize Linear / Conv / BatchNorm modules so their parameters match ``state_dict`` shapes.

    This is how a structurally pruned checkpoint rebuilds: the factory makes the original
    architecture, then every layer whose stored weight is smaller is replaced by a new layer
    of the stored size. Layers of other types with mismatched shapes are an error.
    Returns the names of the resized layers.
    """
    resized = []
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        w = state_dict.get(prefix + "weight")
        if w is None or not hasattr(module, "weight") or module.weight is None:
            continue
        if tuple(module.weight.shape) == tuple(w.shape):
            continue
        new = _resized(module, w.shape, state_dict.get(prefix + "bias") is not None)
        if new is None:
            raise DcompError(
                f"cannot rebuild layer {name!r} ({type(module).__name__}) at shape {list(w.shape)}: "
                f"only Linear, Conv and BatchNorm layers can change size"
            )
        _set_submodule(model, name, new)
        resized.append(name)
    return resized


def _resized(m: nn.Module, shape, bias: bool) -> nn.Module | None:
    if isinstance(m, nn.Linear):
        return nn.Linear(shape[1], shape[0], bias=bias)
    if isinstance(m, nn.Conv2d):
        groups = m.groups
        if groups != 1:
            if groups == m.in_channels == m.out_channels and shape[1] == 1:  # depthwise
                groups = shape[0]
            else:
                return None
        return nn.Conv2d(shape[1] * groups, shape[0], m.kernel_size, m.stride, m.padding,
                         m.dilation, groups, bias=bias, padding_mode=m.padding_mode)
    if isinstance(m, nn.Conv1d) and m.groups == 1:
        return nn.Conv1d(shape[1], shape[0], m.kernel_size, m.stride, m.padding, m.dilation, bias=bias)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return type(m)(shape[0], eps=m.eps, momentum=m.momentum, affine=m.affine,
                       track_running_stats=m.track_running_stats)
    return None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of Linear and Conv layers: the ones magnitude pruning and quantization act on.

    Biases and normalisation parameters are never in this set.
    """
    out: dict[str, nn.Parameter] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.weight is not None:
            out[f"{name}.weight" if name else "weight"] = m.weight
    if not out and isinstance(model, torch.jit.ScriptModule):
        # TorchScript hides module types: fall back to the >=2-D parameters named *weight.
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:
                out[name] = p
    return out
